"""Feature quality of a frozen backbone, optionally beside a second one (original vs repaired).

    python tools/evaluate.py --model planted-swiglu --compare runs/demo --task knn --data shapes/classification
    python tools/evaluate.py --model vit_small_patch14_dinov2 --task linseg --data voc_small
    python tools/evaluate.py --model vit_small_patch14_dinov2 --task kmeans --data voc_small

Tasks (layouts in sinder_hub.evaluation):
  knn     DATA/train/<class>/*, DATA/val/<class>/*: class-token k-NN (k=20, T=0.07), top-1 / top-5 %
  linseg  DATA/{train,val}/images/* + masks/*.png: linear probe on patch tokens, mIoU / pixel accuracy %
  kmeans  DATA/val/images/* + masks/*.png: k-means on patch tokens + Hungarian matching, mIoU / pixel accuracy %

A small synthetic dataset for trying it out:
    python -c "from sinder_hub.evaluation import make_shapes_dataset; make_shapes_dataset('shapes')"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sinder_hub import evaluation

TASKS = ("knn", "linseg", "kmeans")
METRICS = {"knn": ("top1", "top5"), "linseg": ("miou", "pixel_accuracy"), "kmeans": ("miou", "pixel_accuracy")}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="backbone spec for load_backbone (timm name, planted-swiglu, folder, file)")
    parser.add_argument("--compare", help="a second backbone (e.g. the repaired one), scored in a second column")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--data", required=True, type=Path, help="dataset folder (layout per task, see above)")
    parser.add_argument("--resolution", type=int, default=224, help="square input size (default 224)")
    parser.add_argument("--out", type=Path, help="JSON results (default: evaluate-<task>.json)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="kmeans: seed of the k-means++ seeding")
    parser.add_argument("--steps", type=int, default=100, help="linseg: L-BFGS iterations of the linear layer")
    parser.add_argument("--clusters", type=int, help="kmeans: number of clusters (default: number of classes)")
    return parser.parse_args(argv)


def evaluate(model, args: argparse.Namespace) -> dict:
    if args.task == "knn":
        return evaluation.knn_evaluate(evaluation.class_token_encoder(model), args.data, args.resolution, batch_size=args.batch_size)
    encoder = evaluation.patch_token_encoder(model)
    if args.task == "linseg":
        return evaluation.linear_probe_segmentation(encoder, args.data, args.resolution, steps=args.steps,
                                                    batch_size=args.batch_size)
    return evaluation.kmeans_segmentation(encoder, args.data, args.resolution, clusters=args.clusters, seed=args.seed,
                                          batch_size=args.batch_size)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.data.is_dir():
        raise FileNotFoundError(f"dataset folder {args.data} does not exist")
    from sinder_hub.backbones import load_backbone

    specs = {"original": args.model, **({"repaired": args.compare} if args.compare else {})}
    results = {"task": args.task, "data": str(args.data), "resolution": args.resolution}
    for label, spec in specs.items():
        results[label] = {"model": spec, **evaluate(load_backbone(spec), args)}
    print(f"{args.task} on {args.data} at {args.resolution} px")
    print(f"{'metric':<16}" + "".join(f"{label:>12}" for label in specs))
    for metric in METRICS[args.task]:
        print(f"{metric:<16}" + "".join(f"{results[label][metric]:>12.2f}" for label in specs))
    out = args.out or Path(f"evaluate-{args.task}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return results

