"""The evaluation protocols as presets: every setting of every task, declared once (like timm's per-model configs).

``dinov2`` (the default of ``sinder-hub evaluate``) reproduces DINOv2's evaluation settings, each
value beside the file it is read from (``SOURCES``); ``quick`` keeps the project's earlier,
CPU-sized settings (centre crops everywhere, short training, whole-image testing), under which
the backbone runs once per image (``dense.train_head`` on stored features). ``task_settings``
merges a preset with the flags a user gave: a flag given explicitly overrides the preset, and
the merged dict is what results.json records for the cell (so every preset value lands there).
"""

from __future__ import annotations

import argparse
from types import MappingProxyType

from ..errors import InputError

DINOV2_SEG = "dinov2 mmseg config dinov2_vitb14_ade20k_linear_config.py (dl.fbaipublicfiles.com/dinov2)"
DINOV2_DEPTH = "dinov2 depth config dinov2_vitb14_nyu_linear_config.py (dl.fbaipublicfiles.com/dinov2)"

# Per task: the settings a preset fixes. Sizes are in pixels; ``resolution`` is the crop side (or
# the short side of whole images), ``test_resolution`` the short side images are tested at.
DINOV2 = {
    "knn": {"resolution": 224, "resize_ratio": 0.875, "k": 20, "temperature": 0.07},
    "linear": {"resolution": 224, "resize_ratio": 0.875, "iterations": 12_500},
    "linseg": {
        "resolution": 512,
        "test_resolution": 512,
        "iterations": 40_000,
        "batch_size": 16,
        "learning_rate": 1e-3,
        "weight_decay": 1e-4,
        "schedule": "poly",
        "warmup": 1_500,
        "warmup_ratio": 1e-6,
        "train_crop": "random-scale",
        "scale_range": (0.5, 2.0),
        "flip": True,
        "test_mode": "slide",
        "stride_ratio": 341 / 512,
        "multiscale": False,
        "grad_clip": None,
    },
    "depth": {
        "resolution": 416,
        "crop_width": 544,
        "test_resolution": 480,
        "iterations": 38_400,
        "batch_size": 16,
        "learning_rate": 5e-3,
        "weight_decay": 0.01,
        "schedule": "cosine",
        "warmup": 12_800,
        "warmup_ratio": 1e-3,
        "train_crop": "random",
        "flip": True,
        "test_flip": True,
        "gradient_loss": 0.5,
        "grad_clip": 35.0,
    },
    "kmeans": {"resolution": 224, "fit_split": "train"},
}

QUICK = {
    "knn": {"resolution": 224, "resize_ratio": 1.0, "k": 20, "temperature": 0.07},
    "linear": {"resolution": 224, "resize_ratio": 1.0, "iterations": 12_500},
    "linseg": {
        "resolution": 224,
        "test_resolution": 224,
        "iterations": 4_000,
        "batch_size": 16,
        "learning_rate": 1e-3,
        "weight_decay": 1e-4,
        "schedule": "linear",
        "warmup": 0,
        "warmup_ratio": 1.0,
        "train_crop": "centre",
        "scale_range": (1.0, 1.0),
        "flip": False,
        "test_mode": "whole",
        "stride_ratio": 1.0,
        "multiscale": False,
        "grad_clip": None,
    },
    "depth": {
        "resolution": 224,
        "crop_width": None,
        "test_resolution": 224,
        "iterations": 4_000,
        "batch_size": 16,
        "learning_rate": 1e-3,
        "weight_decay": 1e-4,
        "schedule": "linear",
        "warmup": 0,
        "warmup_ratio": 1.0,
        "train_crop": "centre",
        "flip": False,
        "test_flip": False,
        "gradient_loss": 0.0,
        "grad_clip": None,
    },
    "kmeans": {"resolution": 224, "fit_split": "val"},
}

PROTOCOLS = MappingProxyType({"dinov2": DINOV2, "quick": QUICK})

# Where each dinov2 value comes from (docs/evaluation.md prints the same table).
SOURCES = {
    "knn": "dinov2/eval/knn.py (nb_knn 20 of 10/20/100/200, temperature 0.07); "
    "dinov2/data/transforms.py make_classification_eval_transform (resize 256, crop 224)",
    "linear": "dinov2/eval/linear.py (epochs 10 x epoch_length 1250); dinov2/data/transforms.py (resize 256, crop 224)",
    "linseg": f"{DINOV2_SEG}: AdamW lr 1e-3 wd 1e-4, poly power 1 with 1,500 linear warm-up iterations "
    "(ratio 1e-6), 40,000 iterations, 2 x 8 GPUs, Resize (2048, 512) ratio 0.5-2.0, RandomCrop 512, "
    "RandomFlip 0.5, test slide 512 / 341 at (2048, 512)",
    "depth": f"{DINOV2_DEPTH}: AdamW lr 5e-3 wd 0.01, cosine with 12,800 linear warm-up iterations (ratio 1e-3), "
    "38,400 iterations, grad clip 35, 2 x 8 GPUs, RandomFlip, RandomCrop 416 x 544, SigLoss + 0.5 GradientLoss, "
    "test flip at 480 x 640",
    "kmeans": "STEGO (Hamilton et al. 2022) and the SINDER paper's unsupervised tables fit the clusters on train",
}

TEST_MODES = ("whole", "slide")
MULTISCALE_RATIOS = (1.0, 1.32, 1.73, 2.28, 3.0)  # DINOv2's "+ms" config (MultiScaleFlipAug img_ratios, flip=True)


def task_settings(protocol: str, task: str, overrides: dict | None = None) -> dict:
    """The preset's settings of ``task`` with the explicitly given ``overrides`` (None = not given) on top."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    settings = {"protocol": protocol, **PROTOCOLS[protocol][task]}
    for name, value in (overrides or {}).items():
        if value is not None and name in settings:
            settings[name] = value
    if overrides and overrides.get("resolution") is not None and "test_resolution" in settings:
        if overrides.get("test_resolution") is None:
            settings["test_resolution"] = overrides["resolution"]
        if task == "depth" and overrides.get("crop_width") is None:
            settings["crop_width"] = None  # an explicit --resolution R: R x R crops, as the quick protocol
    return settings


def add_protocol_flags(parser) -> None:
    """``--protocol`` and the flags of the settings it presets (not given: the preset's value)."""
    from .dense import SCHEDULES, TRAIN_CROPS
    from .kmeans import FIT_SPLITS

    def preset(name: str, task: str = "linseg") -> str:
        values = {protocol: PROTOCOLS[protocol][task][name] for protocol in PROTOCOLS}
        return "default: " + ", ".join(f"{value} ({protocol})" for protocol, value in values.items())

    add = parser.add_argument
    add("--protocol", choices=tuple(PROTOCOLS), default="dinov2", help="the settings preset (docs/evaluation.md)")
    add("--resolution", type=int, help=f"crop side / whole images' short side; linseg {preset('resolution')}")
    add("--test-resolution", type=int, help=f"linseg, depth: short side at test; linseg {preset('test_resolution')}")
    add("--batch-size", type=int, help="linseg, depth: images per step over all processes (default 16)")
    add("--iterations", type=int, help=f"steps of the heads; linseg {preset('iterations')}")
    add("--learning-rate", type=float, help=f"linseg, depth: AdamW learning rate; linseg {preset('learning_rate')}")
    add("--weight-decay", type=float, help=f"linseg, depth: AdamW weight decay; linseg {preset('weight_decay')}")
    add("--schedule", choices=SCHEDULES, help=f"linseg, depth: learning-rate schedule; linseg {preset('schedule')}")
    add("--warmup", type=int, help=f"linseg, depth: linear warm-up steps; linseg {preset('warmup')}")
    add("--train-crop", choices=TRAIN_CROPS, help=f"linseg, depth: training crops; linseg {preset('train_crop')}")
    add("--test-mode", choices=TEST_MODES, help=f"linseg: whole images or sliding window; {preset('test_mode')}")
    add(
        "--multiscale",
        action=argparse.BooleanOptionalAction,
        help=f"linseg: test at ratios {', '.join(map(str, MULTISCALE_RATIOS))} with flips (DINOv2's +ms)",
    )
    add("--gradient-loss", type=float, help=f"depth: weight of the gradient loss; {preset('gradient_loss', 'depth')}")
    add("--resize-ratio", type=float, help=f"knn, linear: crop / resize side; {preset('resize_ratio', 'knn')}")
    add("--kmeans-fit", dest="fit_split", choices=FIT_SPLITS, help=f"kmeans: fit on; {preset('fit_split', 'kmeans')}")


def check_protocol_flags(args) -> None:
    """One ``InputError`` line for a flag of ``add_protocol_flags`` out of its range."""
    for name, low, high in (
        ("weight_decay", 0, None),
        ("warmup", 0, None),
        ("gradient_loss", 0, None),
        ("resize_ratio", 1e-9, 1.0),
    ):
        value = getattr(args, name)
        if value is not None and (value < low or (high is not None and value > high)):
            expected = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
            raise InputError(f"--{name.replace('_', '-')} {value}: expected a number {expected}")
    if args.warmup is not None and args.iterations is not None and args.warmup > args.iterations:
        raise InputError(f"--warmup {args.warmup}: expected at most --iterations {args.iterations}")
