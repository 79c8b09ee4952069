"""Feature quality of a frozen backbone, optionally beside a second one (original vs repaired).

    python tools/evaluate.py --model planted-swiglu --compare runs/demo --task knn --data shapes/classification
    python tools/evaluate.py --model vit_small_patch14_dinov2 --task linseg --data voc_small
    python tools/evaluate.py --model vit_small_patch14_dinov2 --task kmeans --data voc_small

Tasks (layouts in sinder_hub.evaluation):
  knn     DATA/train/<class>/*, DATA/val/<class>/*: class-token k-NN (k=20, T=0.07), top-1 / top-5 %
  linseg  DATA/{train,val}/images/* + masks/*.png: linear probe on patch tokens, mIoU / pixel accuracy %
  kmeans  DATA/val/images/* + masks/*.png: k-means on patch tokens + Hungarian matching, mIoU / pixel accuracy %

Every image with more than --max-pixels pixels is refused (one line naming the file). A small synthetic
dataset for trying it out:
    python -c "from sinder_hub.synthetic import make_shapes_dataset; make_shapes_dataset('shapes')"
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sinder_hub import evaluation
from sinder_hub.cli import ArgumentParser
from sinder_hub.data import MAX_PIXELS
from sinder_hub.errors import InputError
from sinder_hub.files import write_json_atomic

TASKS = evaluation.TASKS
METRICS = {"knn": ("top1", "top5"), "linseg": ("miou", "pixel_accuracy"), "kmeans": ("miou", "pixel_accuracy")}


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", required=True, help="backbone spec for load_backbone (timm name, planted-swiglu, folder, file)"
    )
    parser.add_argument("--compare", help="a second backbone (e.g. the repaired one), scored in a second column")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--data", required=True, type=Path, help="dataset folder (layout per task, see above)")
    parser.add_argument("--resolution", type=int, default=224, help="square input size (default 224)")
    parser.add_argument("--out", type=Path, help="JSON results (default: evaluate-<task>.json)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="kmeans: seed of the k-means++ seeding")
    parser.add_argument("--steps", type=int, default=100, help="linseg: L-BFGS iterations of the linear layer")
    parser.add_argument("--clusters", type=int, help="kmeans: number of clusters (default: number of classes)")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        help=f"refuse images with more pixels than this (default {MAX_PIXELS:,}, PIL's decompression-bomb limit)",
    )
    args = parser.parse_args(argv)
    for flag in ("resolution", "batch_size", "steps", "clusters", "max_pixels"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise InputError(f"--{flag.replace('_', '-')} {value}: expected a positive integer")
    if args.resolution < 14:
        raise InputError(f"--resolution {args.resolution}: expected at least 14 px, one patch (e.g. 224)")
    out = args.out or Path(f"evaluate-{args.task}.json")
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; expected a JSON file path")
    return args


def evaluate(model, args: argparse.Namespace) -> dict:
    common = dict(batch_size=args.batch_size, max_pixels=args.max_pixels)
    if args.task == "knn":
        return evaluation.knn_evaluate(evaluation.class_token_encoder(model), args.data, args.resolution, **common)
    encoder = evaluation.patch_token_encoder(model)
    if args.task == "linseg":
        return evaluation.linear_probe_segmentation(encoder, args.data, args.resolution, steps=args.steps, **common)
    return evaluation.kmeans_segmentation(
        encoder, args.data, args.resolution, clusters=args.clusters, seed=args.seed, **common
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    evaluation.check_dataset(args.data, args.task)  # before any model loads
    from sinder_hub.backbones import load_backbone

    specs = {"original": args.model, **({"repaired": args.compare} if args.compare else {})}
    results = {"task": args.task, "data": str(args.data), "resolution": args.resolution}
    models = {label: load_backbone(spec) for label, spec in specs.items()}  # a bad --compare fails before the work
    for label, spec in specs.items():
        results[label] = {"model": spec, **evaluate(models.pop(label), args)}
    print(f"{args.task} on {args.data} at {args.resolution} px")
    print(f"{'metric':<16}" + "".join(f"{label:>12}" for label in specs))
    for metric in METRICS[args.task]:
        print(f"{metric:<16}" + "".join(f"{results[label][metric]:>12.2f}" for label in specs))
    out = args.out or Path(f"evaluate-{args.task}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, results)
    print(f"wrote {out}")
    return 0
