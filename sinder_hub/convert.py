"""timm <-> transformers for DINOv2 ViTs, and exporting a backbone as stock timm / transformers folders.

One key map (``KEY_MAP``) serves both directions. Besides renames it handles
- timm's fused ``attn.qkv`` <-> transformers' ``q_proj``/``k_proj``/``v_proj`` (split / concatenated on dim 0);
- timm's packed SwiGLU ``mlp.fc1`` (``[2H, D]``, gate half first) <-> ``gate_proj``/``up_proj`` (``[H, D]`` each);
  timm sizes it with ``mlp_ratio = 2H / D``, transformers with ``H = ceil8(int(D * mlp_ratio) * 2 / 3)``;
- registers: timm's ``no_embed_class`` model keeps the class token's position inside ``cls_token`` and has
  ``pos_embed [1, H*W, D]``; transformers adds ``position_embeddings[:, 0]`` to the class token and has
  ``[1, 1 + H*W, D]`` (the conversion writes a zero class position);
- transformers' ``mask_token`` (masked-image-modelling only) is written as zeros and dropped on the way back.
transformers >= 5 saves folders with the legacy key names (``attention.attention.query``, ``mlp.weights_in``...)
and renames them on load (the names transformers 4 used).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import timm
import torch
from timm.layers import GluMlp
from timm.models import save_for_hf
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import (
    BitImageProcessor,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    PreTrainedModel,
)

from .backbones import check_dinov2_like, dinov2_architecture, load_backbone
from .data import IMAGENET_MEAN, IMAGENET_STD
from .models import base_architecture

# (timm pattern, transformers patterns); "{}" is a block index; several targets split / concatenate dim 0
KEY_MAP = (
    ("cls_token", ("embeddings.cls_token",)),
    ("pos_embed", ("embeddings.position_embeddings",)),
    ("reg_token", ("embeddings.register_tokens",)),
    ("patch_embed.proj.", ("embeddings.patch_embeddings.projection.",)),
    ("blocks.{}.norm1.", ("encoder.layer.{}.norm1.",)),
    ("blocks.{}.attn.qkv.", ("encoder.layer.{}.attention.q_proj.", "encoder.layer.{}.attention.k_proj.",
                             "encoder.layer.{}.attention.v_proj.")),
    ("blocks.{}.attn.proj.", ("encoder.layer.{}.attention.o_proj.",)),
    ("blocks.{}.ls1.gamma", ("encoder.layer.{}.layer_scale1.lambda1",)),
    ("blocks.{}.norm2.", ("encoder.layer.{}.norm2.",)),
    ("blocks.{}.ls2.gamma", ("encoder.layer.{}.layer_scale2.lambda1",)),
    ("norm.", ("layernorm.",)),
)
GELU_MLP_MAP = (
    ("blocks.{}.mlp.fc1.", ("encoder.layer.{}.mlp.fc1.",)),
    ("blocks.{}.mlp.fc2.", ("encoder.layer.{}.mlp.fc2.",)),
)
SWIGLU_MLP_MAP = (
    ("blocks.{}.mlp.fc1.", ("encoder.layer.{}.mlp.gate_proj.", "encoder.layer.{}.mlp.up_proj.")),
    ("blocks.{}.mlp.fc2.", ("encoder.layer.{}.mlp.down_proj.",)),
)
MASK_TOKEN = "embeddings.mask_token"
# DINOv2's own preprocessing (facebook/dinov2-*): resize short side to 256, centre-crop 224, bicubic
IMAGE_PROCESSOR = dict(
    do_resize=True, size={"shortest_edge": 256}, resample=3, do_center_crop=True,
    crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
    do_normalize=True, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True,
)
FORMATS = ("timm", "transformers", "both")


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{\}", r"(\d+)") + "(.*)")


def _remap(state_dict: dict[str, torch.Tensor], key_map, reverse: bool) -> dict[str, torch.Tensor]:
    """Rename ``state_dict`` along ``key_map`` (timm -> transformers, or back when ``reverse``)."""
    out, used = {}, set()
    for timm_key, hf_keys in key_map:
        pattern = _pattern(hf_keys[0] if reverse else timm_key)
        for key in list(state_dict):
            match = pattern.fullmatch(key)
            if not match:
                continue
            *index, rest = match.groups()
            if reverse:
                parts = [hf.format(*index) + rest for hf in hf_keys]
                out[timm_key.format(*index) + rest] = torch.cat([state_dict[p] for p in parts])  # a copy
                used.update(parts)
            else:
                for target, chunk in zip(hf_keys, state_dict[key].chunk(len(hf_keys))):
                    out[target.format(*index) + rest] = chunk.clone()
                used.add(key)
    left = [k for k in state_dict if k not in used]
    if left:
        raise ValueError(f"keys with no {'timm' if reverse else 'transformers'} counterpart: {left}")
    return out


def _swiglu_ratio(embed_dim: int, hidden: int) -> int:
    """Integer transformers ``mlp_ratio`` whose SwiGLU hidden size is ``hidden``."""
    for ratio in range(1, 17):
        if (int(int(embed_dim * ratio) * 2 / 3) + 7) // 8 * 8 == hidden:
            return ratio
    raise ValueError(f"no integer transformers mlp_ratio gives a SwiGLU hidden size of {hidden} at width {embed_dim}")


def transformers_config(model: VisionTransformer) -> Dinov2Config | Dinov2WithRegistersConfig:
    """transformers config of a DINOv2-like timm ViT (no classifier head, square image size)."""
    check_dinov2_like(model, "the model")
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
        hidden_size=model.embed_dim, num_hidden_layers=len(model.blocks), num_attention_heads=block.attn.num_heads,
        mlp_ratio=mlp_ratio, use_swiglu_ffn=swiglu, layerscale_value=1.0, layer_norm_eps=model.norm.eps,
        image_size=height, patch_size=model.patch_embed.patch_size[0], qkv_bias=block.attn.qkv.bias is not None,
    )
    if model.num_reg_tokens:
        return Dinov2WithRegistersConfig(num_register_tokens=model.num_reg_tokens, **kwargs)
    return Dinov2Config(**kwargs)


def timm_architecture(config: Dinov2Config | Dinov2WithRegistersConfig) -> tuple[str, dict]:
    """``(timm architecture, model_args)`` of a transformers Dinov2 config: the stock name when the
    shape is stock (model_args then only set the image size), else the family's name with full args."""
    registers = getattr(config, "num_register_tokens", 0)
    swiglu = config.use_swiglu_ffn
    if config.layer_norm_eps != 1e-6 or (not swiglu and config.hidden_act != "gelu"):
        raise ValueError("timm's DINOv2 ViTs use LayerNorm eps 1e-6 and exact GELU "
                         f"(config: eps {config.layer_norm_eps}, hidden_act {config.hidden_act!r})")
    image_size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    model_args = dict(img_size=image_size)
    name = dinov2_architecture(config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                               swiglu, registers)
    if name is None or config.mlp_ratio != 4 or config.patch_size != 14 or not config.qkv_bias:
        name = f"vit_{'giant' if swiglu else 'small'}_patch14_{'reg4_' if registers else ''}dinov2"
        hidden = (int(int(config.hidden_size * config.mlp_ratio) * 2 / 3) + 7) // 8 * 8
        model_args.update(
            patch_size=config.patch_size, embed_dim=config.hidden_size, depth=config.num_hidden_layers,
            num_heads=config.num_attention_heads, qkv_bias=config.qkv_bias,
            mlp_ratio=(2 * hidden + 0.5) / config.hidden_size if swiglu else config.mlp_ratio,
        )
        if registers:
            model_args["reg_tokens"] = registers
    return name, model_args


def timm_to_transformers_state_dict(state_dict: dict[str, torch.Tensor], swiglu: bool) -> dict[str, torch.Tensor]:
    """timm DINOv2 state dict -> transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` state dict."""
    state_dict = dict(state_dict)
    if "reg_token" in state_dict:  # no_embed_class: the class position lives in cls_token
        state_dict["pos_embed"] = torch.cat([torch.zeros_like(state_dict["pos_embed"][:, :1]), state_dict["pos_embed"]], 1)
    out = _remap(state_dict, KEY_MAP + (SWIGLU_MLP_MAP if swiglu else GELU_MLP_MAP), reverse=False)
    out[MASK_TOKEN] = torch.zeros_like(state_dict["cls_token"][0])
    return out


def transformers_to_timm_state_dict(state_dict: dict[str, torch.Tensor], swiglu: bool) -> dict[str, torch.Tensor]:
    """transformers Dinov2 state dict -> timm state dict (the reverse of ``timm_to_transformers_state_dict``)."""
    state_dict = {k: v for k, v in state_dict.items() if k != MASK_TOKEN}
    out = _remap(state_dict, KEY_MAP + (SWIGLU_MLP_MAP if swiglu else GELU_MLP_MAP), reverse=True)
    if "reg_token" in out:
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


def to_transformers(model: VisionTransformer) -> Dinov2Model | Dinov2WithRegistersModel:
    """timm DINOv2 ViT -> transformers model with the same weights (eval mode)."""
    config = transformers_config(model)
    with torch.device("meta"):  # no random init: every weight is assigned below
        hf_model = (Dinov2WithRegistersModel if config.model_type == "dinov2_with_registers" else Dinov2Model)(config)
    state_dict = timm_to_transformers_state_dict(model.state_dict(), config.use_swiglu_ffn)
    hf_model.load_state_dict(state_dict, strict=True, assign=True)
    return hf_model.eval()


def from_transformers(hf_model: PreTrainedModel, **model_kwargs) -> VisionTransformer:
    """transformers Dinov2 / Dinov2WithRegisters model -> timm ViT (eval, ``dynamic_img_size=True``
    unless ``model_kwargs`` say otherwise) with the same weights."""
    architecture, model_args = timm_architecture(hf_model.config)
    with torch.device("meta"):  # no random init: every weight is assigned below
        model = timm.create_model(architecture, pretrained=False, **{**model_args, "dynamic_img_size": True, **model_kwargs})
    state_dict = transformers_to_timm_state_dict(hf_model.state_dict(), hf_model.config.use_swiglu_ffn)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def save_timm(model: VisionTransformer, folder: str | Path) -> None:
    """timm ``save_for_hf`` folder under the *stock* architecture name: loads with
    ``timm.create_model('local-dir:<folder>' or 'hf-hub:<repo>', pretrained=True)`` without sinder_hub."""
    if "architecture" not in getattr(model, "pretrained_cfg", {}):
        raise ValueError("save_timm needs a model made by timm.create_model or load_backbone (no pretrained_cfg)")
    architecture = base_architecture(model.pretrained_cfg["architecture"])
    save_for_hf(model, folder, safe_serialization=True, model_config=dict(pretrained_cfg=dict(architecture=architecture)))


def save_transformers(model: VisionTransformer, folder: str | Path) -> None:
    """transformers folder (``config.json``, ``model.safetensors``, ``preprocessor_config.json``) for
    ``AutoModel`` / ``AutoImageProcessor.from_pretrained`` without remote code."""
    to_transformers(model).save_pretrained(folder)
    BitImageProcessor(**IMAGE_PROCESSOR).save_pretrained(folder)


def export(model_or_run_dir: nn.Module | str | Path, out_dir: str | Path, format: str = "timm",
           card: bool = False) -> dict[str, Path]:
    """Write a backbone as stock timm and/or transformers folders; returns ``{format: folder}``.

    ``model_or_run_dir``: a timm model or any ``load_backbone`` spec (a repair run folder, a checkpoint, a
    name...). ``format="both"`` writes ``out_dir/timm`` and ``out_dir/transformers``. A run folder's
    ``repair_report.json`` and ``before_after_*.png`` pictures are copied into each. ``card=True`` also writes a model card with
    ``sinder_hub.hub.write_model_card(folder, kind)``.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; expected one of {FORMATS}")
    model = model_or_run_dir if isinstance(model_or_run_dir, nn.Module) else load_backbone(model_or_run_dir)
    report = None if isinstance(model_or_run_dir, nn.Module) else Path(model_or_run_dir) / "repair_report.json"
    out_dir = Path(out_dir)
    kinds = ("timm", "transformers") if format == "both" else (format,)
    folders = {kind: out_dir / kind if format == "both" else out_dir for kind in kinds}
    write_card = _card_writer() if card else None
    for kind, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        (save_timm if kind == "timm" else save_transformers)(model, folder)
        if report is not None and report.is_file():
            for path in [report, *sorted(report.parent.glob("before_after_*.png"))]:  # the card shows the pictures
                shutil.copy2(path, folder / path.name)
        if write_card is not None:
            write_card(folder, kind)
    return folders


def _card_writer():
    from . import hub

    if not hasattr(hub, "write_model_card"):
        raise RuntimeError("card=True needs sinder_hub.hub.write_model_card(folder, kind), which does not exist yet")
    return hub.write_model_card
