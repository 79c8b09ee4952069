#!/usr/bin/env python
"""Time ``sinder-hub evaluate`` against one feature pass of its backbones over the same images.

    OMP_NUM_THREADS=2 python tools/bench_evaluate.py                      # quick linseg, 3 variants, 24 images
    python tools/bench_evaluate.py --iterations 200 --variants planted-swiglu

Builds a VOC2012 copy (``synthetic.make_voc2012``, ``--images`` training and ``--val-images``
validation images) in a temporary folder, times one forward pass of every variant's encoder
over every image (the training crops and the whole validation images, as the protocol sizes
them), then the whole ``evaluate`` command (``--protocol``, default quick: features stored once,
heads trained on them), and prints both and their ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sinder_hub.backbones import load_backbone
from sinder_hub.cli import main as cli_main
from sinder_hub.evaluation.features import patch_token_encoder
from sinder_hub.evaluation.layouts import open_dataset
from sinder_hub.evaluation.protocols import task_settings
from sinder_hub.evaluation.streaming import SampleImages, Streaming, by_shape, chunks, stream, whole_size
from sinder_hub.evaluation.targets import check_targets
from sinder_hub.synthetic import make_voc2012

DEFAULT_VARIANTS = ("planted-swiglu", "planted-gelu", "planted-deit3")


@torch.no_grad()
def feature_pass(specs: list[str], root: Path, protocol: str, batch_size: int) -> float:
    """Seconds of one encoder pass of every variant over the training crops and the whole validation images."""
    settings = task_settings(protocol, "linseg")
    dataset = open_dataset(root)
    summary = check_targets(dataset, ("train", "val"))
    streaming = Streaming(batch_size=batch_size)
    start = time.perf_counter()
    for spec in specs:
        encoder = patch_token_encoder(load_backbone(spec), 1)
        train, val = dataset.splits["train"], dataset.splits["val"]
        crops = SampleImages(dataset, train, "crop", settings["resolution"], encoder.patch_size, None)
        for _, pixels, _ in stream(crops, chunks(list(range(len(train))), batch_size), streaming, f"{spec} train"):
            encoder(pixels)
        resolution = settings["test_resolution"]
        shapes = [whole_size(w, h, resolution, encoder.patch_size) for w, h in summary.sizes["val"]]
        whole = SampleImages(dataset, val, "whole", resolution, encoder.patch_size, None)
        for _, pixels, _ in stream(
            whole, by_shape(list(range(len(val))), shapes, batch_size), streaming, f"{spec} val"
        ):
            encoder(pixels)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), help="up to 4 backbone specs")
    parser.add_argument("--images", type=int, default=24, help="training images of the VOC copy (default 24)")
    parser.add_argument("--val-images", type=int, default=8, help="validation images (default 8)")
    parser.add_argument("--protocol", default="quick", help="evaluate's --protocol (default quick)")
    parser.add_argument("--iterations", type=int, help="evaluate's --iterations (default: the protocol's)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as folder:
        root = make_voc2012(Path(folder) / "voc", n_train=args.images, n_val=args.val_images, shape=(240, 320))
        passed = feature_pass(args.variants, root, args.protocol, 16)
        argv = ["evaluate", "--model", args.variants[0], "--task", "linseg", "--data", str(root)]
        argv += ["--protocol", args.protocol, "--workers", "0", "--out", str(Path(folder) / "out")]
        if len(args.variants) > 1:
            argv += ["--compare", *args.variants[1:]]
        if args.iterations:
            argv += ["--iterations", str(args.iterations)]
        start = time.perf_counter()
        code = cli_main(argv)
        evaluated = time.perf_counter() - start
    iterations = args.iterations or task_settings(args.protocol, "linseg")["iterations"]
    print(
        f"linseg, --protocol {args.protocol}, {len(args.variants)} variants, {args.images} + {args.val_images} "
        f"images, {iterations} iterations, {torch.get_num_threads()} threads"
    )
    print(
        f"one feature pass: {passed:.1f} s; evaluate: {evaluated:.1f} s ({evaluated / 60:.1f} min); ratio {evaluated / passed:.1f}"
    )
    return code


if __name__ == "__main__":
    raise SystemExit(main())
