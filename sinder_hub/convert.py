"""Exporting a backbone as stock timm / transformers folders, and timm -> transformers for DINOv2, CLIP and DINOv3 ViTs.

What a DINOv2 checkpoint looks like (architectures, the timm <-> transformers key maps, the
transformers -> timm direction) is ``sinder_hub.dinov2``; this module builds the transformers
model from it. timm's packed SwiGLU ``mlp.fc1`` is sized with ``mlp_ratio = 2H / D``, transformers'
with ``H = ceil8(int(D * mlp_ratio) * 2 / 3)``. transformers >= 5 saves folders with the legacy key
names (``attention.attention.query``, ``mlp.weights_in``...) and renames them on load (the names
transformers 4 used). timm folders (``save_timm``) work for every family ``load_backbone`` accepts;
transformers folders for DINOv2 (``Dinov2Model`` / ``Dinov2WithRegistersModel``), CLIP vision towers
(``CLIPVisionModel``) and DINOv3 ViTs (``DINOv3ViTModel``); the CLIP and DINOv3 key maps are
``sinder_hub.hf_families``. Other families (DeiT-III, SigLIP, EVA02) are a ``BackboneError``.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from pathlib import Path

import torch
from timm.layers import GluMlp
from timm.models import save_for_hf
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import (
    BitImageProcessor,
    CLIPImageProcessor,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

from . import hf_families
from .backbones import load_backbone
from .data import IMAGENET_MEAN, IMAGENET_STD
from .dinov2 import check_dinov2_like, timm_to_transformers_state_dict
from .errors import RunFolderError
from .files import atomic_path
from .models import base_architecture
from .runs import INCOMPLETE

# DINOv2's own preprocessing (facebook/dinov2-*): resize short side to 256, centre-crop 224, bicubic
IMAGE_PROCESSOR = dict(
    do_resize=True,
    size={"shortest_edge": 256},
    resample=3,
    do_center_crop=True,
    crop_size={"height": 224, "width": 224},
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=list(IMAGENET_MEAN),
    image_std=list(IMAGENET_STD),
    do_convert_rgb=True,
)
# timm's interpolation names -> PIL resample codes, for the CLIP / DINOv3 processors (read from pretrained_cfg)
RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}
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


def _swiglu_ratio(embed_dim: int, hidden: int) -> int:
    """Integer transformers ``mlp_ratio`` whose SwiGLU hidden size is ``hidden``."""
    for ratio in range(1, 17):
        if (int(int(embed_dim * ratio) * 2 / 3) + 7) // 8 * 8 == hidden:
            return ratio
    raise ValueError(f"no integer transformers mlp_ratio gives a SwiGLU hidden size of {hidden} at width {embed_dim}")


def transformers_config(model: nn.Module):
    """transformers config of a DINOv2-like timm ViT (no classifier head, square image size), or of a
    CLIP / DINOv3 one (``hf_families.config_of``)."""
    if hf_families.transformers_family(model):
        return hf_families.config_of(model)
    check_dinov2_like(model, "the model (transformers export: DINOv2, CLIP or DINOv3 ViTs)")
    block = model.blocks[0]
    swiglu = isinstance(block.mlp, GluMlp)
    if swiglu and (not isinstance(block.mlp.act, nn.SiLU) or block.mlp.gate_last):
        raise ValueError("transformers' SwiGLU is silu(gate) * up; the model's GLU MLP is not")
    if swiglu:
        mlp_ratio = _swiglu_ratio(model.embed_dim, block.mlp.fc2.in_features)
    elif block.mlp.fc1.out_features % model.embed_dim == 0 and isinstance(block.mlp.act, nn.GELU):
        mlp_ratio = block.mlp.fc1.out_features // model.embed_dim
    else:
        raise ValueError("transformers' Dinov2 MLP needs exact GELU and an integer mlp_ratio")
    height, width = model.patch_embed.img_size
    if height != width:
        raise ValueError(f"transformers' Dinov2 needs a square image size, the model has {height}x{width}")
    kwargs = dict(
        hidden_size=model.embed_dim,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=block.attn.num_heads,
        mlp_ratio=mlp_ratio,
        use_swiglu_ffn=swiglu,
        layerscale_value=1.0,
        layer_norm_eps=model.norm.eps,
        image_size=height,
        patch_size=model.patch_embed.patch_size[0],
        qkv_bias=block.attn.qkv.bias is not None,
    )
    if model.num_reg_tokens:
        return Dinov2WithRegistersConfig(num_register_tokens=model.num_reg_tokens, **kwargs)
    return Dinov2Config(**kwargs)


def to_transformers(model: nn.Module) -> nn.Module:
    """timm DINOv2 / CLIP / DINOv3 ViT -> transformers ``Dinov2Model`` (``Dinov2WithRegistersModel``) /
    ``CLIPVisionModel`` / ``DINOv3ViTModel`` with the same weights (eval mode). For CLIP, timm's
    ``forward_features`` is ``hf_model.post_layernorm(hf_model(pixel_values).last_hidden_state)``."""
    if hf_families.transformers_family(model):
        return hf_families.to_transformers(model)
    config = transformers_config(model)
    with torch.device("meta"):  # no random init: every weight is assigned below
        hf_model = (Dinov2WithRegistersModel if config.model_type == "dinov2_with_registers" else Dinov2Model)(config)
    state_dict = timm_to_transformers_state_dict(model.state_dict(), config.use_swiglu_ffn)
    hf_model.load_state_dict(state_dict, strict=True, assign=True)
    return hf_model.eval()


def save_timm(model: VisionTransformer, folder: str | Path) -> None:
    """timm ``save_for_hf`` folder under the *stock* architecture name: loads with
    ``timm.create_model('local-dir:<folder>' or 'hf-hub:<repo>', pretrained=True)`` without sinder_hub."""
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


def image_processor(model: nn.Module, config) -> BitImageProcessor | CLIPImageProcessor:
    """DINOv2: its own preprocessing (``IMAGE_PROCESSOR``); CLIP / DINOv3: the timm model's
    ``pretrained_cfg`` (mean, std, interpolation, crop_pct) at the model's image size."""
    if config.model_type.startswith("dinov2"):
        return BitImageProcessor(**IMAGE_PROCESSOR)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = config.image_size
    kwargs = dict(
        do_resize=True,
        size={"shortest_edge": round(size / cfg.get("crop_pct", 1.0))},
        resample=RESAMPLE.get(cfg.get("interpolation"), 3),
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(cfg.get("mean", IMAGENET_MEAN)),
        image_std=list(cfg.get("std", IMAGENET_STD)),
        do_convert_rgb=True,
    )
    return (CLIPImageProcessor if config.model_type == "clip_vision_model" else BitImageProcessor)(**kwargs)


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
    ``sinder_hub.hub.write_model_card(folder, kind)``. Each folder must be new or empty; ``overwrite=True``
    first removes the files an export writes (``EXPORT_FILES``) and nothing else. Every file is written
    in a hidden staging folder and renamed into place, so a folder never mixes two exports.
    Raises ``RunFolderError`` (checked before any model loads).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; expected one of {FORMATS}")
    out_dir = Path(out_dir)
    kinds = ("timm", "transformers") if format == "both" else (format,)
    folders = {kind: out_dir / kind if format == "both" else out_dir for kind in kinds}
    source = None if isinstance(model_or_run_dir, nn.Module) else Path(str(model_or_run_dir)).expanduser()
    check_export_target(source, out_dir, format, overwrite)
    write_card = _card_writer() if card else None
    model = model_or_run_dir if source is None else load_backbone(model_or_run_dir)
    report = source / REPORT_FILE if source is not None and (source / REPORT_FILE).is_file() else None
    extras = (
        [report, *sorted(report.parent.glob("before_after_*.png"))] if report else []
    )  # the card shows the pictures
    for kind, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))
        try:
            (save_timm if kind == "timm" else save_transformers)(model, staging)
            for path in extras:
                shutil.copy2(path, staging / path.name)
            if write_card is not None:
                write_card(staging, kind)
            for path in _export_files(folder):  # an earlier export's files (overwrite=True)
                path.unlink()
            for path in sorted(staging.iterdir()):
                with atomic_path(folder / path.name) as tmp:
                    os.replace(path, tmp)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folders


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
    out_dir = Path(out_dir)
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


def _card_writer():
    from . import hub

    if not hasattr(hub, "write_model_card"):
        raise RuntimeError("card=True needs sinder_hub.hub.write_model_card(folder, kind), which does not exist yet")
    return hub.write_model_card
