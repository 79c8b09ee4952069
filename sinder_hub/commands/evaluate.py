"""Feature quality of frozen backbones side by side: the paper's evaluations, one table.

    sinder-hub evaluate --model vit_small_patch14_dinov2.lvd142m --compare sinder=runs/small \\
        --task linseg kmeans --layers 1 4 --data data/VOCdevkit data/ADEChallengeData2016 --out eval/seg
    accelerate launch -m sinder_hub.cli evaluate ...      # the same, shared over GPUs

Tasks (settings and sources: docs/evaluation.md):
  knn     ImageNet or DATA/{train,val}/<class>/: class-token weighted k-NN (k=20, T=0.07), top-1 / top-5 %
  linear  the same layouts: linear probe on the class token (+ mean patch token), best of DINOv2's lr grid
  linseg  VOC2012, ADE20k, Cityscapes or DATA/{train,val}/images + masks: BN + 1x1 linear head on the
          patch tokens of the last block (--layers 1) or last four (--layers 4), mIoU at full label resolution
  depth   NYU Depth v2 (BTS, depth-toolbox or mmseg layout): linear head over 256 depth bins, RMSE (m), delta1 %
  kmeans  the segmentation layouts' val split: k-means of the patch tokens, Hungarian-matched, mIoU %

Each task runs on every --data it applies to; layouts are recognised (or named with --layout, one per
--data) and every mask is checked before any model loads. Writes OUT/results.json, results.md (rows:
variants, columns: metrics) and results.png; a later command with one more --compare reuses the
finished variants. A small synthetic dataset in each layout:
    python -c "from sinder_hub.synthetic import make_standard_datasets; make_standard_datasets('tiny-data')"
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from sinder_hub.cli import ArgumentParser
from sinder_hub.data import MAX_PIXELS
from sinder_hub.errors import InputError
from sinder_hub.evaluation import LAYOUTS, TASKS, Processes, Streaming
from sinder_hub.evaluation.features import PRECISIONS
from sinder_hub.evaluation.layouts import DatasetOptions, check_dataset_options, parse_split_files
from sinder_hub.evaluation.protocols import add_protocol_flags, check_protocol_flags
from sinder_hub.evaluation.run import (
    LINEAR_INPUTS,
    OVERRIDES,
    EvaluationSettings,
    check_clusters,
    check_datasets,
    check_resolution,
    data_digests,
    evaluate_variants,
    patch_size_of,
    plan_cells,
    settings_record,
)
from sinder_hub.evaluation.table import FILES, OutputFolder, markdown_table
from sinder_hub.files import check_writable
from sinder_hub.variants import parse_variants

# 4 x 518 px, DINOv2's and SINDER's training size: (2048 / 14)² = 21,316 tokens an image, 16 x those of 518 px;
# attention scores grow with the square of that (1.8 GB per head and image in fp32 where no fused kernel
# runs), so larger sizes only exhaust the memory (10,000 px: 510,000 tokens an image)
MAX_RESOLUTION = 2048
POSITIVE = ("resolution", "batch_size", "iterations", "clusters", "max_pixels", "max_images", "num_classes")
POSITIVE += ("test_resolution",)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the reference backbone, a load_backbone spec ([LABEL=]SPEC)")
    parser.add_argument("--compare", nargs="+", help="up to five more backbones ([LABEL=]SPEC), one row each")
    parser.add_argument("--task", nargs="+", required=True, choices=TASKS, metavar="TASK", help=", ".join(TASKS))
    parser.add_argument("--data", nargs="+", required=True, type=Path, help="dataset folders (layouts above)")
    parser.add_argument(
        "--layout",
        nargs="+",
        choices=tuple(LAYOUTS),
        metavar="LAYOUT",
        help=f"the layout of each --data (default: recognised): {', '.join(LAYOUTS)}",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("evaluate-output"), help="output folder (default evaluate-output)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the results an --out folder holds")
    add_protocol_flags(parser)
    parser.add_argument(
        "--layers", nargs="+", type=int, choices=(1, 4), default=[1], help="linseg, depth: Linear 1 / 4"
    )
    parser.add_argument("--linear-input", choices=LINEAR_INPUTS, default="class+mean", help="linear probe input")
    parser.add_argument("--clusters", type=int, help="kmeans: clusters (default: the number of classes)")
    parser.add_argument(
        "--num-classes", type=int, help="classes of DATA/<split>/masks (default: the largest label + 1)"
    )
    parser.add_argument("--seed", type=int, default=0, help="data order, head initialisation, k-means seeding")
    parser.add_argument("--max-images", type=int, help="at most this many images per split, evenly spread")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="backbone precision (bf16: autocast)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image-loading processes")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        help=f"refuse images with more pixels than this (default {MAX_PIXELS:,}, PIL's decompression-bomb limit)",
    )
    parser.add_argument("--depth-scale", type=float, help="depth maps' values per metre (default: 16-bit millimetres)")
    parser.add_argument(
        "--split-file", nargs="+", metavar="[SPLIT=]PATH", help="NYU: BTS's split files, when not beside the dataset"
    )
    args = parser.parse_args(argv)
    if args.depth_scale is not None and not 0 < args.depth_scale < float("inf"):
        raise InputError(f"--depth-scale {args.depth_scale}: expected a positive number of values per metre")
    args.split_file = parse_split_files(args.split_file)
    args.out, args.data = args.out.expanduser(), [data.expanduser() for data in args.data]  # "--out=~/x"
    for flag in POSITIVE:
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise InputError(f"--{flag.replace('_', '-')} {value}: expected a positive integer")
    if args.resolution is not None and args.resolution < 14:
        raise InputError(f"--resolution {args.resolution}: expected at least 14 px, one patch (e.g. 224)")
    if args.resolution is not None and args.resolution > MAX_RESOLUTION:
        raise InputError(
            f"--resolution {args.resolution}: expected at most {MAX_RESOLUTION} px (4 x DINOv2's 518; "
            "larger inputs exhaust the memory), e.g. 518"
        )
    if args.workers < 0:
        raise InputError(f"--workers {args.workers}: expected 0 (load images in the main process) or more")
    if args.learning_rate is not None and not args.learning_rate > 0:
        raise InputError(f"--learning-rate {args.learning_rate}: expected a positive number")
    check_protocol_flags(args)
    if args.layout and len(args.layout) != len(args.data):
        raise InputError(f"--layout: {len(args.layout)} layouts for {len(args.data)} --data folders; expected one each")
    return args


def settings_of(args: argparse.Namespace) -> EvaluationSettings:
    return EvaluationSettings(
        **{name: getattr(args, name) for name in OVERRIDES if name not in ("resolution", "batch_size")},
        protocol=args.protocol,
        resolution=args.resolution,
        batch_size=args.batch_size,
        seed=args.seed,
        max_images=args.max_images,
        layers=tuple(sorted(set(args.layers))),
        linear_input=args.linear_input,
        clusters=args.clusters,
        num_classes=args.num_classes,
        precision=args.precision,
        dataset_options=DatasetOptions(args.depth_scale, args.split_file),
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    variants = parse_variants(args.model, args.compare)
    settings = settings_of(args)
    tasks = list(dict.fromkeys(args.task))
    output = OutputFolder(args.out, args.overwrite)
    reads = [("--model" if i == 0 else "--compare", variant.spec) for i, variant in enumerate(variants)]
    output.check_inputs([*reads, *(("--data", data) for data in args.data)])
    cells = plan_cells(tasks, args.data, args.layout or [None] * len(args.data), settings)
    check_dataset_options([cell.dataset for cell in cells], settings.dataset_options)
    previous = output.previous(settings_record(cells, settings), variants)
    patches = {variant.label: (variant.spec, patch_size_of(variant.spec)) for variant in variants}
    check_resolution(settings.resolution, patches)
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    processes = Processes(Accelerator())

    def progress(items, total, desc):
        return tqdm(items, total=total, desc=desc, unit="file", disable=None)

    created = not args.out.exists()
    processes.on_main(output.lock)  # one command per --out: a second one stops here, touching nothing
    try:
        processes.on_main(lambda: check_writable(args.out, "--out"))
        previous = processes.on_main(lambda: output.previous(settings_record(cells, settings), variants))
        summaries = processes.on_main(lambda: check_datasets(cells, settings, max(1, args.workers), progress))
        check_clusters(cells, settings, summaries, patches)
        digests = processes.on_main(lambda: data_digests(cells, max(1, args.workers), progress))
        streaming = Streaming(args.batch_size or 16, args.workers, args.max_pixels, processes, args.out / ".scratch")
        from sinder_hub import backbones

        document = evaluate_variants(
            variants,
            cells,
            settings,
            summaries,
            streaming,
            backbones.load_backbone,
            output,
            previous,
            report=print if processes.is_main else lambda text: None,
            digests=digests,
        )
    finally:
        if processes.is_main:
            shutil.rmtree(args.out / ".scratch", ignore_errors=True)
            output.unlock()
            if created and args.out.is_dir() and not any(args.out.iterdir()):
                args.out.rmdir()  # a command that wrote nothing leaves no folder
    if processes.is_main:
        print(markdown_table(document))
        print(f"wrote {', '.join(str(args.out / name) for name in FILES)}")
    return 0
