"""Exporting a backbone as stock timm / transformers folders, and timm <-> transformers for the families
that have a transformers counterpart (DINOv2, CLIP, DINOv3: ``families.<family>.transformers``).

timm folders (``save_timm``) work for every family ``load_backbone`` accepts; transformers folders for
the families with a counterpart; the others (DeiT-III, SigLIP, EVA02, other ViTs) are a
``BackboneError`` naming the family. A model carrying test-time registers (hooks, not weights) is
refused: export its base model instead; so is a DVT-denoised backbone (``sinder_hub.dvt``), whose denoiser
no stock architecture has.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from pathlib import Path

from timm.models import save_for_hf
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from . import dvt, families
from .backbones import load_backbone
from .errors import BackboneError, RunFolderError
from .files import atomic_path, check_writable, writing
from .models import base_architecture
from .runs import INCOMPLETE

FORMATS = ("timm", "transformers", "both")
REPORT_FILE = "repair_report.json"
# every file an export writes (save_for_hf, save_pretrained incl. shards, the image processor, report, pictures, card):
# the only files export(..., overwrite=True) removes
EXPORT_FILES = (
    "config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "preprocessor_config.json",
    "README.md",
    REPORT_FILE,
    "before_after_*.png",
)


def _counterpart(model: nn.Module, source: str = "the model") -> families.TransformersCounterpart:
    family = families.describe(model)
    if family.transformers is None:
        with_one = ", ".join(f.name for f in families.with_transformers_counterpart())
        raise BackboneError(
            f"{source} is a {family.name} model, not a DINOv2-like backbone or another family with a stock "
            f"transformers class ({with_one}); export it as a timm folder"
        )
    return family.transformers


def _refuse_registers(model: nn.Module, source: str = "the model") -> None:
    if dvt.refusal(model, source):
        raise BackboneError(dvt.refusal(model, source))
    if getattr(model, "test_time_registers", None) is not None:
        raise BackboneError(
            f"{source} carries test-time registers, which are hooks, not weights: export its base model and keep "
            "the registers folder beside it"
        )


def to_transformers(model: nn.Module) -> nn.Module:
    """timm model -> its family's transformers model (``Dinov2Model``, ``Dinov2WithRegistersModel``,
    ``CLIPVisionModel``, ``DINOv3ViTModel``) with the same weights, in eval mode. For CLIP, timm's
    ``forward_features`` is ``hf_model.post_layernorm(hf_model(pixel_values).last_hidden_state)``."""
    _refuse_registers(model)
    return _counterpart(model).to_transformers(model)


def from_transformers(hf_model: nn.Module, **model_kwargs) -> nn.Module:
    """transformers model of a supported family -> timm model (eval) with the same weights."""
    family = families.describe(None, model_type=hf_model.config.model_type)
    if family.transformers is None:
        raise BackboneError(f"transformers model_type {hf_model.config.model_type!r} is not a supported family")
    return family.transformers.from_transformers(hf_model, **model_kwargs)


def image_processor(model: nn.Module, config):
    """The transformers image processor of a timm model's family (DINOv2: its own preprocessing; CLIP /
    DINOv3: the timm model's ``pretrained_cfg`` at the model's image size)."""
    return _counterpart(model).image_processor(model, config)


def save_timm(model: VisionTransformer, folder: str | Path) -> None:
    """timm ``save_for_hf`` folder under the *stock* architecture name: loads with
    ``timm.create_model('local-dir:<folder>' or 'hf-hub:<repo>', pretrained=True)`` without sinder_hub."""
    _refuse_registers(model)
    if "architecture" not in getattr(model, "pretrained_cfg", {}):
        raise ValueError("save_timm needs a model made by timm.create_model or load_backbone (no pretrained_cfg)")
    architecture = base_architecture(model.pretrained_cfg["architecture"])
    save_for_hf(
        model, folder, safe_serialization=True, model_config=dict(pretrained_cfg=dict(architecture=architecture))
    )


def save_transformers(model: VisionTransformer, folder: str | Path) -> None:
    """transformers folder (``config.json``, ``model.safetensors``, ``preprocessor_config.json``) for
    ``AutoModel`` / ``AutoImageProcessor.from_pretrained`` without remote code."""
    hf_model = to_transformers(model)
    hf_model.save_pretrained(folder)
    image_processor(model, hf_model.config).save_pretrained(folder)


def export(
    model_or_run_dir: nn.Module | str | Path,
    out_dir: str | Path,
    format: str = "timm",
    card: bool = False,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write a backbone as stock timm and/or transformers folders; returns ``{format: folder}``.

    ``model_or_run_dir``: a timm model or any ``load_backbone`` spec (a repair run folder, a checkpoint, a
    name...). ``format="both"`` writes ``out_dir/timm`` and ``out_dir/transformers``. A run folder's
    ``repair_report.json`` and ``before_after_*.png`` pictures are copied into each. ``card=True`` also writes a model card with
    ``sinder_hub.cards.write_model_card(folder, kind)``. Each folder must be new or empty; ``overwrite=True``
    first removes the files an export writes (``EXPORT_FILES``) and nothing else. Every file is written
    in a hidden staging folder and renamed into place, so a folder never mixes two exports.
    Raises ``RunFolderError`` (checked before any model loads).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; expected one of {FORMATS}")
    out_dir = Path(out_dir).expanduser()
    kinds = ("timm", "transformers") if format == "both" else (format,)
    folders = {kind: out_dir / kind if format == "both" else out_dir for kind in kinds}
    source = None if isinstance(model_or_run_dir, nn.Module) else Path(str(model_or_run_dir)).expanduser()
    check_export_target(source, out_dir, format, overwrite)
    if source is not None and dvt.source_refusal(str(source)):
        raise BackboneError(dvt.source_refusal(str(source)))
    created = [folder for folder in (out_dir, *folders.values()) if not folder.exists()]
    for folder in folders.values():
        check_writable(folder, "--to")
    try:
        model = model_or_run_dir if source is None else load_backbone(source)
        _refuse_registers(model, str(model_or_run_dir) if source is not None else "the model")
        if "transformers" in kinds:
            _counterpart(model, str(source or "the model"))
        report = source / REPORT_FILE if source is not None and (source / REPORT_FILE).is_file() else None
        extras = [report, *sorted(report.parent.glob("before_after_*.png"))] if report else []  # the card's
        repaired_elsewhere = (families.architecture_of(model) or "").endswith("_sinder")
        for kind, folder in folders.items():
            _export_one(model, kind, folder, extras, card, repaired_elsewhere)
    except BaseException:
        for folder in reversed(created):  # folders this export made and left empty
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    return folders


def _export_one(model: nn.Module, kind: str, folder: Path, extras: list[Path], card: bool, repaired_elsewhere: bool):
    """One format into ``folder``, through a hidden staging folder renamed file by file."""
    with writing(folder, f"write the {kind} export into"):
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))
        try:
            (save_timm if kind == "timm" else save_transformers)(model, staging)
            for path in extras:
                shutil.copy2(path, staging / path.name)
            if card:
                from . import cards

                cards.write_model_card(staging, kind, repaired_elsewhere=repaired_elsewhere)
                if dvt.card_note(model):  # DVT's weights: whose they are, and that no licence is stated
                    card_file = staging / "README.md"
                    card_file.write_text(
                        dvt.amended_card(card_file.read_text(encoding="utf-8"), model), encoding="utf-8"
                    )
            for path in _export_files(folder):  # an earlier export's files (overwrite=True)
                path.unlink()
            for path in sorted(staging.iterdir()):
                with atomic_path(folder / path.name) as tmp:
                    os.replace(path, tmp)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _export_files(folder: Path) -> list[Path]:
    """The files of ``folder`` that an export writes (``EXPORT_FILES``)."""
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and any(fnmatch.fnmatchcase(path.name, pattern) for pattern in EXPORT_FILES)
    )


def check_export_target(source: Path | None, out_dir: str | Path, format: str, overwrite: bool = False) -> None:
    """Raise ``RunFolderError`` unless ``export`` may write ``source`` (a path, or ``None`` for a model) into
    ``out_dir``: not the source's own folder nor a folder that contains it, not an unfinished run, and a
    new or empty folder (with ``overwrite``: one holding nothing but an earlier export's files beside others)."""
    out_dir = Path(out_dir).expanduser()
    kinds = ("timm", "transformers") if format == "both" else (format,)
    folders = [out_dir / kind for kind in kinds] if format == "both" else [out_dir]
    if source is not None and source.exists():
        resolved = source.resolve()
        for folder in [out_dir, *folders]:
            if folder.resolve() == resolved or folder.resolve() in resolved.parents:
                where = "is" if folder.resolve() == resolved else "contains"
                raise RunFolderError(f"--to {folder} {where} the source {source}; export into another folder")
        if (source / INCOMPLETE).exists():
            raise RunFolderError(f"this run is incomplete: {source} (finish it with --resume or start again)")
    for folder in folders:
        if folder.exists() and not folder.is_dir():
            raise RunFolderError(f"--to {folder} is a file; expected a new or empty folder")
    if format == "both" and out_dir.is_dir():
        others = sorted(path.name for path in out_dir.iterdir() if path.name not in kinds)
        if others:
            raise RunFolderError(
                f"--to {out_dir} holds other files ({_listing(others)}); format both writes "
                "timm/ and transformers/ into a new or empty folder"
            )
    for folder in folders:
        if not folder.is_dir():
            continue
        entries = sorted(path.name for path in folder.iterdir())
        if entries and not overwrite:
            raise RunFolderError(
                f"--to {folder} is not empty ({_listing(entries)}); export writes into a new or "
                "empty folder, or pass --overwrite to replace an earlier export's files"
            )


def _listing(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
