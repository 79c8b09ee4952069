#!/usr/bin/env python
"""The embedded demo: repair the planted-defect backbone on skimage's natural images, on a CPU.

    python tools/demo.py [--output demo-output] [--model planted-swiglu]

Trains on crops of the training sample images at 224 px (the held-out images are never
seen), then prints the held-out defects before and after and writes the run folder.
"""

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from sinder_hub.cli import ArgumentParser
from sinder_hub.data import HELD_OUT_SAMPLES, TRAIN_SAMPLES, sample_images
from sinder_hub.errors import InputError, RunFolderError
from sinder_hub.files import atomic_path
from sinder_hub.runs import RunFolder
from sinder_hub.training import RepairConfig, repair


def write_training_crops(folder: Path, crops_per_image: int, seed: int = 0) -> int:
    """Deterministic random crops (35-100% of the area) and flips of the training images, as PNGs.

    The boxes are drawn in order from one generator; the crops are cut and written by two
    threads (PIL releases the GIL while it resizes and encodes)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    jobs = []
    for name, image in sample_images(TRAIN_SAMPLES).items():
        width, height = image.size
        for k in range(crops_per_image):
            scale = 0.35 + 0.65 * torch.rand(1, generator=generator).item()
            side = int(min(width, height) * scale**0.5)
            left = int(torch.randint(0, width - side + 1, (1,), generator=generator))
            top = int(torch.randint(0, height - side + 1, (1,), generator=generator))
            jobs.append((image, (left, top, left + side, top + side), k % 2 == 1, folder / f"{name}_{k:02d}.png"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda job: _write_crop(*job), jobs))
    return len(jobs)


def _write_crop(image, box: tuple[int, int, int, int], flip: bool, path: Path) -> None:
    crop = image.crop(box).resize((256, 256))
    if flip:
        crop = crop.transpose(0)  # horizontal flip
    with atomic_path(path) as tmp:
        crop.save(tmp, format="PNG", compress_level=1)  # the same pixels, in less than half the time


def main(argv=None) -> int:
    parser = ArgumentParser(prog="demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo-output")
    parser.add_argument("--model", default="planted-swiglu")
    parser.add_argument("--crops-per-image", type=int, default=16)
    parser.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="tf32")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="replace the run of an earlier demo in OUTPUT/run")
    args = parser.parse_args(argv)
    if args.crops_per_image <= 0:
        raise InputError(f"--crops-per-image {args.crops_per_image}: expected a positive integer")
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise InputError(f"--output {args.output} is a file; expected a folder for the training crops and the run")
    if args.model.startswith("planted-"):
        from sinder_hub.planted import PLANTED_VARIANTS

        if args.model not in PLANTED_VARIANTS:
            raise InputError(f"--model {args.model}: unknown planted backbone; known: {', '.join(PLANTED_VARIANTS)}")

    try:  # before writing anything
        RunFolder(Path(args.output) / "run", overwrite=args.overwrite).check()
    except RunFolderError:
        raise RunFolderError(
            f"{Path(args.output) / 'run'} holds an earlier demo run; pass --overwrite to replace it "
            f"(make demo does) or choose another --output"
        ) from None

    started = time.perf_counter()
    output = Path(args.output)
    count = write_training_crops(output / "train-images", args.crops_per_image)
    print(f"training images: {count} crops of {', '.join(TRAIN_SAMPLES)}")
    print(f"held-out images: {', '.join(HELD_OUT_SAMPLES)}")
    config = RepairConfig(
        model=args.model,
        data=str(output / "train-images"),
        output=str(output / "run"),
        num_images=count,
        resolution=224,
        limit_layers=3,
        window=100,
        directions_method="expected",
        save_every=0,
        quiet=args.quiet,
        num_workers=0,
        precision=args.precision,
        overwrite=args.overwrite,
    )
    print_summary(args.model, repair(config).report, config.output)
    print(f"total wall time {time.perf_counter() - started:.1f} s")
    return 0


def print_summary(model: str, report, output: str) -> None:
    """The held-out defects before and after, per image, and the cosines to the original."""
    held_out = report.held_out
    print(
        f"\nrepaired {model} in {report.steps} steps ({report.updates} updates), "
        f"stopped by {report.stopped_because}; loss blocks {report.loss_layer_histogram}"
    )
    print(f"{'held-out image':>20}  defects before  after")
    for name in held_out.images:
        print(f"{name:>20}  {held_out.before.defects[name]:>14}  {held_out.after.defects[name]:>5}")
    print(
        f"{'total':>20}  {held_out.before.total:>14}  {held_out.after.total:>5}"
        f"   (reduction {100 * (held_out.defect_reduction or 0):.1f}%)"
    )
    print(
        f"cosine to the original: normal tokens {held_out.normal_token_cosine:.4f}, "
        f"class token {held_out.class_token_cosine:.4f}"
    )
    print(f"outputs in {output}: model.safetensors, config.json, repair_report.json, {', '.join(report.pictures)}")
