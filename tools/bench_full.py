#!/usr/bin/env python
"""End-to-end benchmark of the main job: a whole repair run of a planted-defect ViT-g/14.

    python tools/bench_full.py --json bench-full.json                      # ViT-g/14 size, 30,000 images, 518 px
    python tools/bench_full.py --depth 6 --width 192 --planted-block 3 --resolution 224 \\
        --num-images 24 --limit-layers 3 --directions-method expected --num-workers 0   # tiny, on a CPU

The backbone is ``sinder_hub.planted.planted_backbone("planted-swiglu")`` (timm's
``vit_giant_patch14_dinov2`` architecture, packed SwiGLU) scaled to ``--depth`` blocks of
``--width`` channels (``width / 64`` heads) at ``img_size = --resolution``, its defect
planted at ``--planted-block``, its block weights drawn with a width-scaled std
(``weight_std``: without it the analysis misses the defect of a ViT-g-sized fixture). The
training images are random resized crops and flips of the ``skimage.data`` training photos,
written once as JPEG (quality 90) to ``--cache`` and reused, so the data loader decodes
real files. The backbone is saved as a timm folder and repaired with
``sinder_hub.training.repair`` and ``tools/repair.py``'s defaults, except that the clear-rate
stop is off and each image is processed exactly once (``max_steps = num_images / images_per_step``).

The figures are the run's own (``RepairReport.timings``: set-up, directions, held-out
evaluation, loader waits, images with a loss and clear images, merge, writes, peak memory,
CUDA's max allocated on a GPU or this process's peak RSS on a CPU, the loader workers not
included); this script adds only the time to build and save the backbone and the total.
"""

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import torch

from sinder_hub import planted, training
from sinder_hub.convert import save_timm
from sinder_hub.data import TRAIN_SAMPLES, sample_images

VARIANT = "planted-swiglu"
IMAGE_SIZE = (640, 480)  # width, height of the generated JPEGs
JPEG_QUALITY = 90
CROP_SCALE = (0.25, 1.0)  # fraction of the photo's area
CROP_RATIO = (3 / 4, 4 / 3)
MANIFEST = "manifest.json"
SETTINGS = ("resolution", "precision", "images_per_step", "num_workers", "compile", "compile_backend", "count_batch",
            "limit_layers", "directions_method", "num_images")  # fmt: skip

# ----------------------------------------------------------------------------------------
# The training images


_photos = None


def _load_photos() -> None:
    global _photos
    _photos = list(sample_images(TRAIN_SAMPLES).values())


def _write_image(job: tuple[int, int, str]) -> None:
    """Image ``index``: a random resized crop (and flip) of a training photo, drawn from ``(seed, index)`` alone."""
    index, seed, folder = job
    rng = random.Random(f"{seed}-{index}")
    photo = rng.choice(_photos)
    width, height = photo.size
    side_w = side_h = min(width, height)
    for _ in range(10):
        area = width * height * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if w <= width and h <= height:
            side_w, side_h = w, h
            break
    left, top = rng.randint(0, width - side_w), rng.randint(0, height - side_h)
    image = photo.crop((left, top, left + side_w, top + side_h)).resize(IMAGE_SIZE, resample=3)  # bicubic
    if rng.random() < 0.5:
        image = image.transpose(0)  # left-right flip
    path = Path(folder) / f"{index:06d}.jpg"
    temporary = path.with_suffix(".tmp")
    image.save(temporary, format="JPEG", quality=JPEG_QUALITY)
    os.replace(temporary, path)


def training_images(
    cache: Path, num_images: int, seed: int = 0, processes: int | None = None
) -> tuple[list[Path], float]:
    """The first ``num_images`` benchmark images under ``cache`` (made if missing); returns their paths and the
    seconds spent making them (0 when the cache already had them all)."""
    settings = {
        "photos": list(TRAIN_SAMPLES),
        "size": IMAGE_SIZE,
        "quality": JPEG_QUALITY,
        "scale": CROP_SCALE,
        "ratio": CROP_RATIO,
        "seed": seed,
    }
    settings = json.loads(json.dumps(settings))  # tuples as lists, as read back
    cache.mkdir(parents=True, exist_ok=True)
    manifest = cache / MANIFEST
    done = json.loads(manifest.read_text()) if manifest.exists() else {}
    count = done.get("count", 0) if done.get("settings") == settings else 0
    paths = [cache / f"{index:06d}.jpg" for index in range(num_images)]
    missing = [index for index in range(num_images) if index >= count or not paths[index].exists()]
    if not missing:
        return paths, 0.0
    started = time.perf_counter()
    jobs = [(index, seed, str(cache)) for index in missing]
    with Pool(processes or min(8, os.cpu_count() or 1), initializer=_load_photos) as pool:
        for _ in pool.imap_unordered(_write_image, jobs, chunksize=64):
            pass
    manifest.write_text(json.dumps({"settings": settings, "count": max(count, num_images)}))
    return paths, time.perf_counter() - started


# ----------------------------------------------------------------------------------------
# The backbone


def planted_giant(model_args: dict, planted_block: int):
    """``planted-swiglu`` at ``model_args``'s size with the width-scaled weight std."""
    return planted.planted_backbone(
        VARIANT,
        model_args=model_args,
        planted_block=planted_block,
        weight_std=planted.scaled_weight_std(model_args["embed_dim"]),
    )


# ----------------------------------------------------------------------------------------


def run(args) -> dict:
    """Build and save the planted backbone, repair it, and read the run's own timings from its report."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    paths, generate_s = training_images(Path(args.cache), args.num_images)
    model_args = {
        "depth": args.depth,
        "embed_dim": args.width,
        "num_heads": args.width // 64,
        "img_size": args.resolution,
    }
    with contextlib.ExitStack() as stack:
        temporary = None if args.output else stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-full-"))
        work = Path(args.output or temporary)
        work.mkdir(parents=True, exist_ok=True)
        listing = work / "images.txt"
        listing.write_text("".join(f"{path.resolve()}\n" for path in paths))
        started = time.perf_counter()
        model_folder = work / "model"
        shutil.rmtree(model_folder, ignore_errors=True)
        save_timm(planted_giant(model_args, args.planted_block), model_folder)
        build_s = time.perf_counter() - started
        config = training.RepairConfig(
            model=str(model_folder),
            data=str(listing),
            output=str(work / "run"),
            overwrite=True,
            num_images=args.num_images,
            resolution=args.resolution,
            stop_clear=2.0,
            max_steps=args.num_images // args.images_per_step,
            images_per_step=args.images_per_step,
            precision=args.precision,
            num_workers=args.num_workers,
            limit_layers=args.limit_layers,
            directions_method=args.directions_method,
            allow_degraded=True,
            compile=args.compile,
            compile_backend=args.compile_backend,
            count_batch=args.count_batch,
            quiet=args.quiet,
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        report = training.repair(config).report
        total_s = time.perf_counter() - started
    return summarise(args, report, model_args, generate_s, build_s, total_s)


def summarise(args, report, model_args: dict, generate_s: float, build_s: float, total_s: float) -> dict:
    """The figures of one run: the report's own timings, counts and held-out results."""
    timings, images, held = report.timings, report.images, report.held_out
    return {
        "device": report.hardware.device,
        "torch": torch.__version__,
        "model": {
            "architecture": report.architecture,
            **model_args,
            "planted_block": args.planted_block,
            "weight_std": planted.scaled_weight_std(args.width),
        },
        **{key: getattr(args, key) for key in SETTINGS},
        "images_generated_s": round(generate_s, 2),
        "build_and_save_s": round(build_s, 2),
        "steps": report.steps,
        "updates": report.updates,
        "images_processed": images.seen + images.skipped_bad,
        "images_per_s": images.seen / timings.loop_s,
        "loss": {"images": images.with_loss, "time_s": timings.loss_images_s},
        "clear": {"images": images.clear, "time_s": timings.clear_images_s},
        "timings": timings.to_json(),
        "other_loop_s": timings.loop_s - timings.loss_images_s - timings.clear_images_s - timings.loader_wait_s,
        "total_s": total_s,
        "report_images": images.to_json(),
        "loss_layer_histogram": report.loss_layer_histogram,
        "outcome": report.outcome.status,
        "held_out": {
            "defects_before": held.before.total,
            "defects_after": held.after.total,
            "defect_reduction": held.defect_reduction,
            "normal_token_cosine": held.normal_token_cosine,
            "class_token_cosine": held.class_token_cosine,
        },
    }


def describe(result: dict) -> str:
    model, loss, clear, held, timings = (result[key] for key in ("model", "loss", "clear", "held_out", "timings"))

    def per(part):
        return f"{part['time_s'] / part['images'] * 1000:.1f} ms/image" if part["images"] else "-"

    return "\n".join(
        [
            f"planted {model['architecture']}: {model['depth']} blocks x {model['embed_dim']}, "
            f"defect at block {model['planted_block']}; {result['resolution']} px, {result['precision']}, "
            f"{result['images_per_step']} image(s)/step, {result['num_workers']} loader workers"
            f"{', --compile (' + result['compile_backend'] + ')' if result['compile'] else ''}, on {result['device']}",
            f"  images      {result['images_processed']} processed in {timings['loop_s']:.2f} s: "
            f"{result['images_per_s']:.3f} images/s ({result['steps']} steps, {result['updates']} updates)",
            f"  with a loss {loss['images']:6d} images  {loss['time_s']:9.2f} s  ({per(loss)}; loss block: images "
            f"{result['loss_layer_histogram']})",
            f"  clear       {clear['images']:6d} images  {clear['time_s']:9.2f} s  ({per(clear)})",
            f"  loader wait {timings['loader_wait_s']:9.2f} s; rest of the loop (updates, bookkeeping, checkpoints) "
            f"{result['other_loop_s']:.2f} s",
            f"  set-up      {timings['setup_s']:9.2f} s (model load), directions {timings['directions_s']:.2f} s, "
            f"held-out {timings['held_out_s']:.2f} s, merge {timings['merge_s']:.2f} s, writes {timings['write_s']:.2f} s; "
            f"total {result['total_s']:.2f} s; build and save {result['build_and_save_s']:.2f} s; "
            f"images made {result['images_generated_s']:.2f} s",
            f"  peak memory {timings['peak_memory_gib']:.2f} GiB ({timings['peak_memory_kind']})",
            f"  held out    defects {held['defects_before']} -> {held['defects_after']}, cosine normal "
            f"{held['normal_token_cosine']:.4f} / class {held['class_token_cosine']:.4f}; outcome {result['outcome']}",
        ]
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=30_000)
    parser.add_argument("--resolution", type=int, default=518, help="training, held-out and the model's img_size")
    parser.add_argument("--depth", type=int, default=40)
    parser.add_argument("--width", type=int, default=1536, help="a multiple of 64 (heads of 64 channels)")
    parser.add_argument("--planted-block", type=int, default=17)
    parser.add_argument("--precision", choices=training.PRECISIONS, default="tf32")
    parser.add_argument("--images-per-step", type=int, default=1)
    parser.add_argument("--num-workers", type=int, default=training.RepairConfig.num_workers)
    parser.add_argument("--compile", action="store_true", help="repair.py --compile (compiled detection scan)")
    parser.add_argument(
        "--compile-backend", choices=training.COMPILE_BACKENDS, default=training.RepairConfig.compile_backend
    )
    parser.add_argument("--count-batch", type=int, default=training.RepairConfig.count_batch)
    parser.add_argument("--limit-layers", type=int, default=10)
    parser.add_argument("--directions-method", choices=training.DIRECTIONS_METHODS, default="sampled")
    parser.add_argument(
        "--cache",
        default=str(Path.home() / ".cache" / "sinder-hub" / "bench-images"),
        help="folder of the generated JPEGs (reused)",
    )
    parser.add_argument("--output", help="work folder (image list and run/); default: a temporary one, removed")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.width % 64:
        parser.error(f"--width {args.width}: expected a multiple of 64")
    if args.num_images % args.images_per_step:
        parser.error(f"--num-images {args.num_images}: expected a multiple of --images-per-step {args.images_per_step}")
    result = run(args)
    print(describe(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
