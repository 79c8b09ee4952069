"""Defect statistics and pictures of a backbone (paper §2, Fig. 1 and Fig. 2d), beside up to five variants.

    python tools/diagnose.py --model planted-swiglu
    python tools/diagnose.py --model vit_giant_patch14_dinov2 --compare sinder=RUN_DIR registers=TTR_DIR --images photos/

Writes OUT/report.json ({label: defect_report, with each variant's cosines to the first}), OUT/norm_pca.png
(last-block token norms and PCA per image, every variant on one colour scale), OUT/angles.png and
OUT/variants.png (defects per block and image, defect/normal norm ratio and cosines to the first, per
variant), and prints one table per model and one comparison table. OUT's earlier outputs are replaced
only with --overwrite.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sinder_hub.analysis import METHODS, singular_defect_directions
from sinder_hub.backbones import MAX_RESOLUTION, check_resolution
from sinder_hub.cli import ArgumentParser
from sinder_hub.data import MAX_PIXELS, list_images, load_rgb, normalization_of, sample_images, sinder_transform
from sinder_hub.diagnostics import defect_report, json_safe, last_block_grids
from sinder_hub.errors import DataError, InputError, RunFolderError
from sinder_hub.files import atomic_path, check_writable, write_text_atomic, writing
from sinder_hub.plots import angle_violin_figure, norm_pca_figure, variants_figure
from sinder_hub.report import compare_held_out, held_out_outputs
from sinder_hub.variants import parse_variants

OUTPUTS = ("report.json", "norm_pca.png", "angles.png", "variants.png")


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="sinder-hub diagnose", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="backbone spec for load_backbone (LABEL=SPEC allowed)")
    parser.add_argument("--compare", nargs="+", metavar="SPEC", help="up to five more variants (LABEL=SPEC allowed)")
    parser.add_argument("--images", nargs="+", help="image folders or files (default: the skimage.data sample images)")
    parser.add_argument("--resolution", type=int, help=f"square input size, a multiple of the patch size up to "
                        f"{MAX_RESOLUTION} px (default: the first model's own, e.g. 224 for planted-* models and CLIP, "
                        "518 for DINOv2)")  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=Path("diagnose-output"), help="output folder (default: diagnose-output)"
    )
    parser.add_argument("--overwrite", action="store_true", help=f"replace an earlier diagnose's {', '.join(OUTPUTS)}")
    parser.add_argument(
        "--method", choices=METHODS, default="sampled", help="MLP linearisation for the singular directions"
    )
    parser.add_argument("--samples", type=int, default=100_000, help="least-squares samples of the sampled method")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled method")
    parser.add_argument("--mask-thr", type=float, default=4.0, help="defect threshold in standard deviations (eq. 5)")
    parser.add_argument(
        "--kernel", type=int, default=3, choices=(3, 5), help="neighbourhood size; its border is never defective"
    )
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help=f"refuse images with more pixels than this (default {MAX_PIXELS:,}, PIL's decompression-bomb limit)")  # fmt: skip
    args = parser.parse_args(argv)
    for flag in ("resolution", "samples", "max_pixels"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise InputError(f"--{flag.replace('_', '-')} {value}: expected a positive integer")
    if args.resolution is not None and args.resolution > MAX_RESOLUTION:
        raise InputError(f"--resolution {args.resolution}: expected at most {MAX_RESOLUTION} px")
    args.out = args.out.expanduser()
    args.variants = parse_variants(args.model, args.compare)
    return args


def check_output(out: Path, overwrite: bool) -> None:
    """Before any slow work: ``--out`` is a folder we may write, and holds no earlier outputs unless ``--overwrite``."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; expected a folder for report.json and the pictures")
    earlier = [name for name in OUTPUTS if (out / name).exists()]
    if earlier and not overwrite:
        raise RunFolderError(
            f"--out {out} already holds {', '.join(earlier)}; pass --overwrite to replace them or choose another folder"
        )
    check_writable(out, "--out")


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


def check_alike(model, spec: str, other, other_spec: str) -> None:
    """``InputError`` unless two variants share patch size and depth (their tokens are compared block by block)."""
    shape = (model.patch_embed.patch_size[0], len(model.blocks))
    other_shape = (other.patch_embed.patch_size[0], len(other.blocks))
    if shape != other_shape:
        raise InputError(
            f"--compare {other_spec}: {other_shape[0]}-px patches and {other_shape[1]} blocks, but {spec} has "
            f"{shape[0]}-px patches and {shape[1]} blocks; variants are compared token by token and block by block"
        )


def _cell(value, digits=1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(label: str, spec: str, report: dict) -> str:
    lines = [
        f"{label}: {spec}",
        f"{'block':>5} {'defects/img':>11} {'norm def':>9} {'norm normal':>11} {'within °':>9} {'between °':>9} "
        f"{'all tokens °':>12} {'sing-vs-emp °':>13}",
    ]
    for block in report["blocks"]:
        lines.append(
            f"{block['block']:>5} {block['defects_per_image']:>11.2f} {_cell(block['norm_defective']):>9} "
            f"{_cell(block['norm_normal']):>11} {_cell(block['within_angle']):>9} {_cell(block['between_angle']):>9} "
            f"{_cell(block['all_tokens_angle']):>12} {_cell(block['angle_singular_empirical']):>13}"
        )
    return "\n".join(lines)


def comparison_row(report: dict) -> dict:
    """One variant's figures at the last block: defects per image, defect/normal norm ratio, cosines to the first."""
    last = report["blocks"][-1]
    ratio = last["norm_defective"] / last["norm_normal"] if last["norm_defective"] and last["norm_normal"] else None
    return {
        "defects_per_image": last["defects_per_image"],
        "defects_per_block": [block["defects_per_image"] for block in report["blocks"]],
        "norm_ratio": ratio,
        **report["to_first"],
    }


def format_comparison(reports: dict) -> str:
    first = next(iter(reports))
    lines = [
        f"variants at the last block (cosines of the final features to {first}'s, over its normal patch tokens)",
        f"{'variant':<16} {'defects/img':>11} {'norm def/normal':>15} {'normal cos':>10} {'class cos':>9}",
    ]
    for label, report in reports.items():
        row = comparison_row(report)
        lines.append(
            f"{label:<16} {row['defects_per_image']:>11.2f} {_cell(row['norm_ratio'], 2):>15} "
            f"{_cell(row['normal_token_cosine'], 4):>10} {_cell(row['class_token_cosine'], 4):>9}"
        )
    return "\n".join(lines)


def diagnose_variant(model, pictures: dict, args, first: tuple | None) -> tuple[dict, dict, tuple]:
    """One variant's ``defect_report`` of the PIL ``pictures`` in its own pixels (``sinder_transform``), its
    last-block grids and its held-out outputs, with its cosines to ``first`` (``(model, outputs)`` of the first variant; ``None`` for the first itself)."""
    tensors = {name: sinder_transform(args.resolution, model)(image) for name, image in pictures.items()}
    generator = torch.Generator().manual_seed(args.seed)
    directions = singular_defect_directions(model, samples=args.samples, generator=generator, method=args.method)
    report = defect_report(model, tensors, directions, mask_thr=args.mask_thr, kernel=args.kernel)
    report["normalization"] = normalization_of(model).to_json()
    batches = {name: tensor[None] for name, tensor in tensors.items()}
    outputs = held_out_outputs(model, batches, directions, args.mask_thr, args.kernel)
    reference_model, reference = first if first is not None else (model, outputs)
    compared = compare_held_out(reference_model, reference, outputs, args.resolution)
    report["to_first"] = json_safe(
        {
            "normal_token_cosine": compared.normal_token_cosine,
            "class_token_cosine": compared.class_token_cosine,
            "class_token": compared.class_token,
        }
    )
    return report, last_block_grids(model, tensors), (reference_model, reference)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_output(args.out, args.overwrite)
    pictures = load_images(args.images, args.max_pixels)
    from sinder_hub.backbones import load_backbone, native_resolution

    models = {v.label: load_backbone(v.spec) for v in args.variants}  # a bad --compare fails before the work
    first = args.variants[0]
    args.resolution = args.resolution or native_resolution(first.spec, models[first.label])
    for variant in args.variants:
        check_resolution(models[variant.label], variant.spec, args.resolution, args.kernel)
        check_alike(models[first.label], first.spec, models[variant.label], variant.spec)
    reports, grids, reference = {}, {}, None
    for variant in args.variants:
        report, grids[variant.label], reference = diagnose_variant(models.pop(variant.label), pictures, args, reference)
        reports[variant.label] = {"model": variant.spec, "resolution": args.resolution, "method": args.method,
                                  "samples": args.samples, "seed": args.seed, **report}  # fmt: skip
        print(format_table(variant.label, variant.spec, report), end="\n\n")
    print(format_comparison(reports))
    write_outputs(args.out, reports, pictures, grids)
    print(f"wrote {', '.join(str(args.out / name) for name in OUTPUTS)}")
    return 0


def write_outputs(out: Path, reports: dict, pictures: dict, grids: dict) -> None:
    labels = list(reports)
    with writing(out, "create --out"):
        out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "report.json", json.dumps(reports, allow_nan=False))  # defect_report: no NaN
    with atomic_path(out / "norm_pca.png") as tmp:
        norm_pca_figure(pictures, grids, tmp)
    with atomic_path(out / "angles.png") as tmp:
        angle_violin_figure(reports[labels[0]], tmp, compare=[reports[label] for label in labels[1:]], labels=labels)
    with atomic_path(out / "variants.png") as tmp:
        variants_figure({label: comparison_row(report) for label, report in reports.items()}, tmp)
