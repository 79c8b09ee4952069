"""Defect statistics and pictures of a backbone (paper §2, Fig. 1 and Fig. 2d), optionally beside a second one.

    python tools/diagnose.py --model planted-swiglu
    python tools/diagnose.py --model vit_giant_patch14_dinov2 --compare RUN_DIR --images photos/

Writes OUT/report.json ({"original": defect_report, "repaired"?: defect_report}),
OUT/norm_pca.png (last-block token norms and PCA per image) and OUT/angles.png, and
prints one table per model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sinder_hub.analysis import METHODS, singular_defect_directions
from sinder_hub.cli import ArgumentParser
from sinder_hub.data import MAX_PIXELS, list_images, load_rgb, sample_images, sinder_transform
from sinder_hub.diagnostics import defect_report, last_block_grids
from sinder_hub.errors import DataError, InputError
from sinder_hub.files import atomic_path, write_text_atomic
from sinder_hub.plots import angle_violin_figure, norm_pca_figure

PLANTED_RESOLUTION, DINOV2_RESOLUTION = 224, 518


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="diagnose", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", required=True, help="backbone spec for load_backbone (timm name, planted-swiglu, folder, file)"
    )
    parser.add_argument("--compare", help="a second backbone (e.g. the repaired one), shown beside the first")
    parser.add_argument("--images", nargs="+", help="image folders or files (default: the skimage.data sample images)")
    parser.add_argument(
        "--resolution",
        type=int,
        help=f"square input size (default {PLANTED_RESOLUTION} for planted-* models, "
        f"for which the fixture is calibrated, else {DINOV2_RESOLUTION}, DINOv2's training resolution)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("diagnose-output"), help="output folder (default: diagnose-output)"
    )
    parser.add_argument(
        "--method", choices=METHODS, default="sampled", help="MLP linearisation for the singular directions"
    )
    parser.add_argument("--samples", type=int, default=100_000, help="least-squares samples of the sampled method")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled method")
    parser.add_argument("--mask-thr", type=float, default=4.0, help="defect threshold in standard deviations (eq. 5)")
    parser.add_argument(
        "--kernel", type=int, default=3, choices=(3, 5), help="neighbourhood size; its border is never defective"
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        help=f"refuse images with more pixels than this (default {MAX_PIXELS:,}, PIL's decompression-bomb limit)",
    )
    args = parser.parse_args(argv)
    for flag in ("resolution", "samples", "max_pixels"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise InputError(f"--{flag.replace('_', '-')} {value}: expected a positive integer")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} is a file; expected a folder for report.json and the pictures")
    return args


def load_images(sources: list[str] | None, max_pixels: int | None = MAX_PIXELS):
    """``{name: PIL image}`` from folders / files, or the sample images; names are file stems made unique."""
    if not sources:
        return sample_images()
    images = {}
    for source in sources:
        if not Path(source).exists():
            raise DataError(f"--images {source} does not exist; expected image files or folders of images")
        for path in list_images(source) if Path(source).is_dir() else [Path(source)]:
            name, count = path.stem, 1
            while name in images:
                count += 1
                name = f"{path.stem}_{count}"
            images[name] = load_rgb(path, min_size=14, max_pixels=max_pixels)
    return images


def check_resolution(model, spec: str, resolution: int) -> None:
    """``InputError`` unless ``resolution`` is a whole number of the model's patches."""
    patch = model.patch_embed.patch_size[0]
    if resolution % patch:
        below, above = resolution // patch * patch, (resolution // patch + 1) * patch
        raise InputError(
            f"--resolution {resolution} is not a multiple of the {patch}-px patches of {spec}; "
            f"expected e.g. {below or above} or {above}"
        )


def format_table(label: str, spec: str, report: dict) -> str:
    def cell(value, digits=1):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        f"{label}: {spec}",
        f"{'block':>5} {'defects/img':>11} {'norm def':>9} {'norm normal':>11} {'within °':>9} {'between °':>9} "
        f"{'all tokens °':>12} {'sing-vs-emp °':>13}",
    ]
    for block in report["blocks"]:
        lines.append(
            f"{block['block']:>5} {block['defects_per_image']:>11.2f} {cell(block['norm_defective']):>9} "
            f"{cell(block['norm_normal']):>11} {cell(block['within_angle']):>9} {cell(block['between_angle']):>9} "
            f"{cell(block['all_tokens_angle']):>12} {cell(block['angle_singular_empirical']):>13}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    pictures = load_images(args.images, args.max_pixels)
    from sinder_hub.backbones import load_backbone

    specs = {"original": args.model, **({"repaired": args.compare} if args.compare else {})}
    resolution = args.resolution or (PLANTED_RESOLUTION if args.model.startswith("planted") else DINOV2_RESOLUTION)
    transform = sinder_transform(resolution)
    tensors = {name: transform(image) for name, image in pictures.items()}
    models = {label: load_backbone(spec) for label, spec in specs.items()}  # a bad --compare fails before the work
    for label, model in models.items():
        check_resolution(model, specs[label], resolution)
    reports, grids = {}, {}
    for label, spec in specs.items():
        model = models.pop(label)
        generator = torch.Generator().manual_seed(args.seed)
        directions = singular_defect_directions(model, samples=args.samples, generator=generator, method=args.method)
        report = defect_report(model, tensors, directions, mask_thr=args.mask_thr, kernel=args.kernel)
        reports[label] = {
            "model": spec,
            "resolution": resolution,
            "method": args.method,
            "samples": args.samples,
            "seed": args.seed,
            **report,
        }
        grids[label] = last_block_grids(model, tensors)
        print(format_table(label, spec, report), end="\n\n")
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "report.json", json.dumps(reports, allow_nan=False))  # defect_report: no NaN
    with atomic_path(args.out / "norm_pca.png") as tmp:
        norm_pca_figure(pictures, grids, tmp)
    with atomic_path(args.out / "angles.png") as tmp:
        angle_violin_figure(reports["original"], tmp, compare=reports.get("repaired"))
    print(f"wrote {args.out / 'report.json'}, {args.out / 'norm_pca.png'}, {args.out / 'angles.png'}")
    return 0
