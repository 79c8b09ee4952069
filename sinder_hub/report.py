"""The report of a repair run: what it did and what it measured, as typed records with a schema version.

``RepairReport`` is the contract between the trainer, which writes ``repair_report.json``, and
everything that reads it: model cards, push, the viewer, ``diagnose --compare`` and the
benchmarks. ``to_json`` / ``from_json`` round-trip it; reports written before the schema
version existed (version 0, same keys) still read, and so do those written before the normalisation was
recorded (version 1: every model then got ImageNet's, which is what they read as). Beside it: the held-out evaluation that
fills it (defects before / after, cosines to the original), the judgement of the outcome, and
the before/after pictures.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import anatomy, files
from .data import IMAGENET
from .defects import defect_mask
from .diagnostics import json_safe
from .errors import InputError
from .tokens import patch_grid, prepare_blocks

SCHEMA_VERSION = 2  # 1: + schema_version; 2: + normalization
REPORT_FILE = "repair_report.json"
MIN_COSINE = 0.9  # a repaired model whose normal tokens move further from the original's is "degraded"


class Record:
    """JSON (de)serialisation of a dataclass whose fields are plain values, dicts, lists or other Records."""

    def to_json(self) -> dict:
        return json_safe(dataclasses.asdict(self))

    def write(self, path: str | Path) -> None:
        """Write the record atomically as JSON (figures that are not finite become ``null``)."""
        files.write_text_atomic(path, json.dumps(self.to_json(), indent=2, allow_nan=False))

    @classmethod
    def from_json(cls, data: dict):
        hints = typing.get_type_hints(cls)
        values = {}
        for item in dataclasses.fields(cls):
            if item.name not in data:
                continue
            value, kind = data[item.name], hints[item.name]
            record = next(
                (t for t in typing.get_args(kind) or (kind,) if isinstance(t, type) and issubclass(t, Record)), None
            )
            values[item.name] = record.from_json(value) if record is not None and isinstance(value, dict) else value
        return cls(**values)


# Every field defaults to "not recorded" (None, empty), so that a partial or older report reads as what it holds.


@dataclass
class Outcome(Record):
    """``status``: ``ok``, ``degraded`` (features moved too far) or ``failed`` (nothing usable); ``reasons``: sentences."""

    status: str = "ok"
    reasons: list[str] = field(default_factory=list)


@dataclass
class DefectCounts(Record):
    """One side of the held-out comparison: defects per image at the last block, their total, and per block."""

    defects: dict[str, int] = field(default_factory=dict)
    total: int | None = None
    defects_per_block: list[int] = field(default_factory=list)


@dataclass
class HeldOut(Record):
    """Held-out images (never trained on) before and after, at the run's resolution."""

    resolution: int | None = None
    images: list[str] = field(default_factory=list)
    before: DefectCounts = field(default_factory=DefectCounts)
    after: DefectCounts = field(default_factory=DefectCounts)
    defect_reduction: float | None = None  # 1 - after / before; None without defects before
    normal_token_cosine: float | None = None  # final features, over the original's normal patch tokens
    class_token_cosine: float | None = None
    class_token: str = "class token"  # or "mean of the patch tokens" for models without one


@dataclass
class ImageCounts(Record):
    selected: int | None = None  # images taken from --data
    seen: int | None = None  # image slots of all steps, bad files excluded
    clear: int | None = None
    with_loss: int | None = None
    skipped_bad: int | None = None  # unreadable files, once each


@dataclass
class Hardware(Record):
    device: str | None = None
    num_processes: int | None = None


@dataclass
class Timings(Record):
    """Where the run's wall time went (seconds; the loop's figures add up over a resumed run's sessions)."""

    setup_s: float = 0.0  # flags, data listing, model load
    directions_s: float = 0.0  # singular defect directions (Algorithm 1, line 1)
    held_out_s: float = 0.0  # held-out evaluation before and after
    loop_s: float = 0.0  # the training loop
    loader_wait_s: float = 0.0  # of which waiting for decoded images
    loss_images_s: float = 0.0  # of which images with a loss (scan, loss, backward)
    clear_images_s: float = 0.0  # of which clear images (scan only)
    merge_s: float = 0.0  # ε merged into the weights
    write_s: float = 0.0  # model, pictures, report
    peak_memory_gib: float = 0.0
    peak_memory_kind: str = ""  # "cuda allocated" or "process RSS"


@dataclass
class RepairReport(Record):
    """Everything ``repair_report.json`` holds (see docs/DESIGN.md for the meaning of each field)."""

    sinder_hub_version: str | None = None
    source_model: str | None = None
    source_sha256: str | None = None
    architecture: str | None = None
    hyperparameters: dict = field(default_factory=dict)
    normalization: dict | None = None  # data.Normalization.to_json() of every image the run fed the model
    outcome: Outcome | None = None
    steps: int | None = None
    updates: int | None = None
    skipped_nan: int | None = None
    data_passes: float | None = None
    images: ImageCounts = field(default_factory=ImageCounts)
    bad_files: list[dict] = field(default_factory=list)  # {"path", "problem"}
    loss_layer_histogram: dict[str, int] = field(default_factory=dict)
    clear_rate_curve: list[list] = field(default_factory=list)  # [step, clear rate]
    stopped_because: str | None = None  # "clear_rate" | "max_steps" | "no_readable_images"
    wall_time_s: float | None = None
    hardware: Hardware = field(default_factory=Hardware)
    held_out: HeldOut | None = None
    pictures: list[str] = field(default_factory=list)
    timings: Timings | None = None
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_json(cls, data: dict) -> RepairReport:
        version = data.get("schema_version", 0)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise InputError(
                f"repair report schema version {version!r} is newer than this sinder-hub reads "
                f"({SCHEMA_VERSION}); upgrade sinder-hub"
            )
        if version < 2 and "normalization" not in data:  # before version 2 every model got ImageNet's pixels
            data = {**data, "normalization": IMAGENET.to_json()}
        return super().from_json({**data, "schema_version": version})

    @classmethod
    def read(cls, path: str | Path) -> RepairReport:
        """The report at ``path``; ``InputError`` naming the file when it is not valid JSON."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InputError(f"{path}: not a valid repair report ({error})") from error
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected a JSON object, found a {type(data).__name__}")
        return cls.from_json(data)


# ----------------------------------------------------------------------------------------
# Held-out evaluation (before / after), judgement and pictures


def _grid(model: nn.Module, tokens: torch.Tensor, image_hw) -> torch.Tensor:
    grid = patch_grid(model, tokens[0], image_hw)
    return grid.float() if grid.dtype in (torch.bfloat16, torch.float16) else grid


@torch.no_grad()
def held_out_outputs(model, images: dict, directions, mask_thr: float = 4.0, kernel: int = 3) -> dict:
    """Per ``[1, 3, R, R]`` image: defects per block, the last block's mask and raw patch grid (pictures)
    and the final-normed features ``[N, D]`` (cosines).

    Always without autocast (float32; TF32 matrix products unless ``--precision fp32``),
    so that runs trained in different precisions are measured alike.
    """
    outputs = {}
    for name, image in images.items():
        x, blocks = prepare_blocks(model, image)
        image_hw = image.shape[-2:]
        defects = []
        for index, block in enumerate(blocks):
            x = block(x)
            grid = _grid(model, x, image_hw)
            mask, _ = defect_mask(grid, directions[index], mask_thr, kernel)
            defects.append(int(mask.sum()))
        outputs[name] = {
            "defects": defects,
            "mask": mask.cpu(),
            "features": model.norm(x)[0].float().cpu(),
            "grid": grid.float().cpu(),
            "prefix": model.num_prefix_tokens,
            "class_token": anatomy.has_class_token(model),
        }
    return outputs


def _defect_counts(outputs: dict, depth: int) -> DefectCounts:
    return DefectCounts(
        defects={name: output["defects"][-1] for name, output in outputs.items()},
        total=sum(output["defects"][-1] for output in outputs.values()),
        defects_per_block=[sum(output["defects"][i] for output in outputs.values()) for i in range(depth)],
    )


def compare_held_out(model, before: dict, after: dict, resolution: int) -> HeldOut:
    """Defect counts at the last block before/after, and cosines of normal patch tokens and of the class
    token (the mean of the patch tokens when ``before`` has none) to ``before``'s. The two sides may have
    different prefix tokens (a ``reg4`` model beside the original): patch tokens are matched by position."""
    has_class_token = before[next(iter(before))]["class_token"]
    normal_cos, class_cos = [], []
    for name in before:
        old, new = before[name], after[name]
        patches = [side["features"][side["prefix"] :] for side in (old, new)]
        cos = nn.functional.cosine_similarity(*patches, dim=-1)
        normal_cos.append(cos[~old["mask"].flatten()].mean().item())
        if has_class_token and new["class_token"]:
            class_cos.append(nn.functional.cosine_similarity(old["features"][0], new["features"][0], dim=0).item())
        else:
            class_cos.append(nn.functional.cosine_similarity(*(p.mean(0) for p in patches), dim=0).item())
    depth = len(model.blocks)
    counts_before, counts_after = _defect_counts(before, depth), _defect_counts(after, depth)
    return HeldOut(
        resolution=resolution,
        images=list(before),
        before=counts_before,
        after=counts_after,
        defect_reduction=(1 - counts_after.total / counts_before.total) if counts_before.total else None,
        normal_token_cosine=sum(normal_cos) / len(normal_cos),
        class_token_cosine=sum(class_cos) / len(class_cos),
        class_token="class token" if has_class_token else "mean of the patch tokens",
    )


def judge_outcome(updates: int, images: ImageCounts, skipped_nan: int, held_out: HeldOut, model: nn.Module) -> Outcome:
    """Failed when nothing changed (no update) or a weight is not finite, degraded when the repaired
    tokens moved far from the original's (normal-token cosine below ``MIN_COSINE``)."""
    reasons, status = [], "ok"
    if updates == 0:
        status = "failed"
        if images.skipped_bad >= images.selected:
            reasons.append(f"0 updates: none of the {images.selected} images could be read (see bad_files)")
        elif skipped_nan:
            reasons.append(
                f"0 updates: every step with a loss gave a NaN or infinite loss or gradient ({skipped_nan} steps skipped)"
            )
        else:
            reasons.append(
                f"0 updates: all {images.seen} images were clear at every block "
                f"(nothing to repair at these --mask-thr / --skip-less-than)"
            )
    not_finite = [name for name, value in model.state_dict().items() if not bool(torch.isfinite(value).all())]
    if not_finite:
        status = "failed"
        reasons.append(
            f"the repaired weights are not finite in {len(not_finite)} tensors ({', '.join(not_finite[:3])})"
        )
    cosine = held_out.normal_token_cosine
    if cosine is None or not math.isfinite(cosine) or cosine < MIN_COSINE:
        status = "failed" if status == "failed" else "degraded"
        shown = "not a number" if cosine is None or math.isnan(cosine) else f"{cosine:.4f}"
        reasons.append(
            f"normal-token cosine to the original is {shown} (< {MIN_COSINE}): the repair changed "
            f"the features too much (try a smaller --lr)"
        )
    return Outcome(status, reasons)


def write_pictures(images: dict, before: dict, after: dict, output: Path, labels=("original", "repaired")) -> list[str]:
    """One PNG per held-out image (PIL ``images``): the last block's token norms and PCA, before vs after."""
    from .plots import norm_pca_figure

    names = []
    for name, image in images.items():
        path = output / f"before_after_{name}.png"
        with files.atomic_path(path) as tmp:
            grids = {labels[0]: {name: before[name]["grid"]}, labels[1]: {name: after[name]["grid"]}}
            norm_pca_figure({name: image}, grids, tmp)
        names.append(path.name)
    return names
