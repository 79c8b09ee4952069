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
real files. The repair is ``sinder_hub.trainer.repair`` with ``tools/repair.py``'s
defaults, except that the clear-rate stop is off and each image is processed exactly once
(``max_steps = num_images / images_per_step``).

Measured by wrapping the trainer's own functions (nothing in the trainer changes): the
time of every ``fast_image_loss`` (``compiled_image_loss`` with ``--compile``; split into images with a loss and clear images), the
time spent waiting in ``next()`` on its DataLoader, the model build and the directions;
peak memory is CUDA's max allocated on a GPU, this process's peak RSS on a CPU (the loader
workers not included).
"""

import argparse
import contextlib
import functools
import json
import math
import os
import random
import resource
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path
from unittest import mock

import torch

from sinder_hub import backbones, planted, trainer
from sinder_hub.data import TRAIN_SAMPLES, sample_images

VARIANT = "planted-swiglu"
IMAGE_SIZE = (640, 480)  # width, height of the generated JPEGs
JPEG_QUALITY = 90
CROP_SCALE = (0.25, 1.0)  # fraction of the photo's area
CROP_RATIO = (3 / 4, 4 / 3)
MANIFEST = "manifest.json"

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
# Timing the trainer from outside


class Timings:
    """What the wrappers below measure during one ``repair`` call (seconds, counts)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.build_s = self.directions_s = self.loader_wait_s = 0.0
        self.loss_s = self.clear_s = 0.0
        self.loss_images = self.clear_images = 0
        self.loop_started = self.loop_ended = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def patches(self, model_args: dict, planted_block: int) -> list:
        """``mock.patch`` objects that time the build, directions, image losses, loader waits and the loop."""
        timings = self
        image_losses = {"fast_image_loss": trainer.fast_image_loss, "compiled_image_loss": trainer.compiled_image_loss}
        directions = trainer.singular_defect_directions
        merge = trainer.merge_singular_values

        def build(spec, *args, **kwargs):
            started = time.perf_counter()
            model = planted_giant(model_args, planted_block)
            timings.build_s += time.perf_counter() - started
            return model

        def timed_directions(*args, **kwargs):
            started = time.perf_counter()
            result = directions(*args, **kwargs)
            timings.sync()
            timings.directions_s += time.perf_counter() - started
            return result

        def timed_loss(image_loss, *args, **kwargs):
            timings.sync()
            started = time.perf_counter()
            result = image_loss(*args, **kwargs)
            timings.sync()
            elapsed = time.perf_counter() - started
            if result.block is None:
                timings.clear_s += elapsed
                timings.clear_images += 1
            else:
                timings.loss_s += elapsed
                timings.loss_images += 1
            return result

        def timed_merge(*args, **kwargs):
            timings.sync()
            timings.loop_ended = time.perf_counter()
            return merge(*args, **kwargs)

        class TimedIterator:
            def __init__(self, inner):
                self.inner = inner

            def __iter__(self):
                return self

            def __next__(self):
                started = time.perf_counter()
                try:
                    return next(self.inner)
                finally:
                    timings.loader_wait_s += time.perf_counter() - started

        class TimedLoader(trainer.DataLoader):
            def __iter__(self):
                timings.loop_started = timings.loop_started or time.perf_counter()
                return TimedIterator(super().__iter__())

        return [
            mock.patch.object(backbones, "load_backbone", build),
            mock.patch.object(trainer, "singular_defect_directions", timed_directions),
            *[
                mock.patch.object(trainer, name, functools.partial(timed_loss, loss))
                for name, loss in image_losses.items()
            ],
            mock.patch.object(trainer, "merge_singular_values", timed_merge),
            mock.patch.object(trainer, "DataLoader", TimedLoader),
        ]


def peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "CUDA max allocated"
    return resource.getrusage(
        resource.RUSAGE_SELF
    ).ru_maxrss / 2**20, "peak RSS of this process (not the loader workers)"


# ----------------------------------------------------------------------------------------


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    paths, generate_s = training_images(Path(args.cache), args.num_images)
    model_args = {
        "depth": args.depth,
        "embed_dim": args.width,
        "num_heads": args.width // 64,
        "img_size": args.resolution,
    }
    timings = Timings(device)
    with contextlib.ExitStack() as stack:
        temporary = None if args.output else stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-full-"))
        work = Path(args.output or temporary)
        work.mkdir(parents=True, exist_ok=True)
        listing = work / "images.txt"
        listing.write_text("".join(f"{path.resolve()}\n" for path in paths))
        config = trainer.RepairConfig(
            model=VARIANT,
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
            count_batch=args.count_batch,
            quiet=args.quiet,
        )
        for patch in timings.patches(model_args, args.planted_block):
            stack.enter_context(patch)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        report = trainer.repair(config).report
        timings.sync()
        finished = time.perf_counter()
    memory_gib, memory_kind = peak_memory(device)
    loop_s = timings.loop_ended - timings.loop_started
    images = report["images"]
    held = report["held_out"]
    return {
        "device": device_name,
        "torch": torch.__version__,
        "model": {
            "architecture": report["architecture"],
            **model_args,
            "planted_block": args.planted_block,
            "weight_std": planted.scaled_weight_std(args.width),
        },
        "resolution": args.resolution,
        "precision": args.precision,
        "images_per_step": args.images_per_step,
        "num_workers": args.num_workers,
        "compile": args.compile,
        "count_batch": args.count_batch,
        "limit_layers": args.limit_layers,
        "directions_method": args.directions_method,
        "num_images": args.num_images,
        "images_generated_s": round(generate_s, 2),
        "steps": report["steps"],
        "updates": report["updates"],
        "images_processed": images["seen"] + images["skipped_bad"],
        "images_per_s": images["seen"] / loop_s,
        "loop_s": loop_s,
        "loss": {"images": timings.loss_images, "time_s": timings.loss_s},
        "clear": {"images": timings.clear_images, "time_s": timings.clear_s},
        "loader_wait_s": timings.loader_wait_s,
        "other_loop_s": loop_s - timings.loss_s - timings.clear_s - timings.loader_wait_s,
        "setup_s": timings.loop_started - started,
        "build_s": timings.build_s,
        "directions_s": timings.directions_s,
        "finish_s": finished - timings.loop_ended,
        "total_s": finished - started,
        "peak_memory_gib": memory_gib,
        "peak_memory_kind": memory_kind,
        "report_images": images,
        "loss_layer_histogram": report["loss_layer_histogram"],
        "outcome": report["outcome"]["status"],
        "held_out": {
            "defects_before": held["before"]["total"],
            "defects_after": held["after"]["total"],
            "defect_reduction": held["defect_reduction"],
            "normal_token_cosine": held["normal_token_cosine"],
            "class_token_cosine": held["class_token_cosine"],
        },
    }


def describe(result: dict) -> str:
    model, loss, clear, held = result["model"], result["loss"], result["clear"], result["held_out"]

    def per(part):
        return f"{part['time_s'] / part['images'] * 1000:.1f} ms/image" if part["images"] else "-"

    return "\n".join(
        [
            f"planted {model['architecture']}: {model['depth']} blocks x {model['embed_dim']}, "
            f"defect at block {model['planted_block']}; {result['resolution']} px, {result['precision']}, "
            f"{result['images_per_step']} image(s)/step, {result['num_workers']} loader workers"
            f"{', --compile' if result['compile'] else ''}, on {result['device']}",
            f"  images      {result['images_processed']} processed in {result['loop_s']:.2f} s: {result['images_per_s']:.3f} images/s "
            f"({result['steps']} steps, {result['updates']} updates)",
            f"  with a loss {loss['images']:6d} images  {loss['time_s']:9.2f} s  ({per(loss)}; loss block: images "
            f"{result['loss_layer_histogram']})",
            f"  clear       {clear['images']:6d} images  {clear['time_s']:9.2f} s  ({per(clear)})",
            f"  loader wait {result['loader_wait_s']:9.2f} s; rest of the loop (updates, bookkeeping, checkpoints) "
            f"{result['other_loop_s']:.2f} s",
            f"  set-up      {result['setup_s']:9.2f} s (model build {result['build_s']:.2f} s, directions "
            f"{result['directions_s']:.2f} s); finish (merge, held-out, files) {result['finish_s']:.2f} s; total "
            f"{result['total_s']:.2f} s; images made {result['images_generated_s']:.2f} s",
            f"  peak memory {result['peak_memory_gib']:.2f} GiB ({result['peak_memory_kind']})",
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
    parser.add_argument("--precision", choices=trainer.PRECISIONS, default="tf32")
    parser.add_argument("--images-per-step", type=int, default=1)
    parser.add_argument("--num-workers", type=int, default=trainer.RepairConfig.num_workers)
    parser.add_argument("--compile", action="store_true", help="repair.py --compile (compiled detection scan)")
    parser.add_argument("--count-batch", type=int, default=trainer.RepairConfig.count_batch)
    parser.add_argument("--limit-layers", type=int, default=10)
    parser.add_argument("--directions-method", choices=trainer.DIRECTIONS_METHODS, default="sampled")
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
