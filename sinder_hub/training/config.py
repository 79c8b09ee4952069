"""Every hyperparameter of a repair run, with the authors' values as defaults, and their validation."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..data import HELD_OUT_SAMPLES, MAX_PIXELS, SAMPLE_IMAGE_NAMES
from ..defects import GAUSSIAN_KERNELS
from ..errors import check_flags

PRECISIONS = ("fp32", "tf32", "bf16")
DIRECTIONS_METHODS = ("sampled", "expected")
# torch.compile backends for --compile: inductor generates fused kernels; aot_eager traces and
# differentiates the same graphs but runs them eagerly (seconds to compile instead of a minute of C++
# on a CPU: for debugging, and for the tests of the compiled step's logic)
COMPILE_BACKENDS = ("inductor", "aot_eager")
# data-loader processes: 4, or fewer on a machine with fewer cores (torch warns above the cores it may use)
LOADER_WORKERS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@dataclass
class RepairConfig:
    """Every hyperparameter of a repair run; the defaults reproduce the authors' run."""

    model: str = "vit_giant_patch14_dinov2.lvd142m"
    data: str = ""
    output: str = "sinder-run"
    num_images: int = 30_000
    resolution: int = 518
    lr: float = 0.005
    momentum: float = 0.9
    mask_thr: float = 4.0
    skip_less_than: int = 3
    limit_layers: int = 10
    kernel: int = 3
    temperature: float = 0.1
    window: int = 1000
    stop_clear: float = 0.75
    max_steps: int = 30_000
    images_per_step: int = 1
    precision: str = "tf32"
    checkpoint_blocks: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    count_batch: int = 4
    seed: int = 0
    directions_method: str = "sampled"
    directions_samples: int = 100_000
    save_every: int = 500
    resume: bool = False
    overwrite: bool = False
    allow_degraded: bool = False
    allow_no_outliers: bool = False
    num_workers: int = LOADER_WORKERS
    max_pixels: int = MAX_PIXELS
    held_out: tuple[str, ...] = HELD_OUT_SAMPLES
    quiet: bool = False

    # what must match for --resume to continue a run
    RESUME_KEYS = (
        "model",
        "data",
        "num_images",
        "resolution",
        "lr",
        "momentum",
        "mask_thr",
        "skip_less_than",
        "limit_layers",
        "kernel",
        "temperature",
        "window",
        "stop_clear",
        "images_per_step",
        "precision",
        "seed",
        "directions_method",
        "directions_samples",
    )
    HYPERPARAMETERS = (
        "resolution",
        "lr",
        "momentum",
        "mask_thr",
        "skip_less_than",
        "limit_layers",
        "kernel",
        "temperature",
        "window",
        "stop_clear",
        "max_steps",
        "num_images",
        "images_per_step",
        "precision",
        "checkpoint_blocks",
        "compile",
        "compile_backend",
        "count_batch",
        "seed",
        "data",
        "directions_method",
        "directions_samples",
    )

    def hyperparameters(self) -> dict:
        return {key: getattr(self, key) for key in self.HYPERPARAMETERS}

    def validate(self) -> None:
        """Raise ``InputError`` naming the first flag whose value cannot work (no model needed)."""
        checks = [
            ("data", bool(self.data), "a folder of images or a text file listing image paths"),
            ("num_images", self.num_images >= 1, "at least 1"),
            ("resolution", self.resolution >= 1, "a positive multiple of the model's patch size"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "a positive number"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            (
                "mask_thr",
                math.isfinite(self.mask_thr) and self.mask_thr > 0,
                "a positive number of standard deviations",
            ),
            ("skip_less_than", self.skip_less_than >= 0, "0 or more defects"),
            ("limit_layers", self.limit_layers >= 0, "0 (no limit) or a positive number of blocks"),
            ("kernel", self.kernel in GAUSSIAN_KERNELS, f"one of {sorted(GAUSSIAN_KERNELS)}"),
            ("temperature", math.isfinite(self.temperature) and self.temperature > 0, "a positive number"),
            ("window", self.window >= 1, "at least 1 image"),
            ("stop_clear", self.stop_clear > 0, "a positive fraction (above 1 never stops early)"),
            ("max_steps", self.max_steps >= 1, "at least 1"),
            ("images_per_step", self.images_per_step >= 1, "at least 1"),
            ("precision", self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
            ("count_batch", self.count_batch >= 1, "at least 1 block"),
            (
                "compile_backend",
                self.compile_backend in COMPILE_BACKENDS,
                f"one of {', '.join(COMPILE_BACKENDS)}",
            ),
            (
                "directions_method",
                self.directions_method in DIRECTIONS_METHODS,
                f"one of {', '.join(DIRECTIONS_METHODS)}",
            ),
            ("directions_samples", self.directions_samples >= 1, "at least 1"),
            ("save_every", self.save_every >= 0, "0 (only on signals and at the end) or a number of steps"),
            ("num_workers", self.num_workers >= 0, "0 or more"),
            ("max_pixels", self.max_pixels >= 1, "a positive number of pixels"),
            (
                "held_out",
                bool(self.held_out) and all(n in SAMPLE_IMAGE_NAMES for n in self.held_out),
                f"names among {', '.join(SAMPLE_IMAGE_NAMES)}",
            ),
        ]
        check_flags(self, checks)
