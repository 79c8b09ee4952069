"""The CLIP family (OpenAI CLIP, OpenCLIP, MetaCLIP vision towers) and its transformers counterpart.

timm ``vit_*_clip_*`` / ``vit_*_clip_quickgelu_*`` (a ``VisionTransformer`` with ``norm_pre``, no layer scale,
no patch-embed bias) <-> ``transformers.CLIPVisionModel``: timm's fused ``attn.qkv`` is split into
``q_proj`` / ``k_proj`` / ``v_proj``; ``norm_pre`` is ``pre_layrnorm``; the final ``norm`` is
``post_layernorm``. timm's ``forward_features`` applies ``norm`` to every token; transformers'
``last_hidden_state`` is *before* ``post_layernorm`` and ``pooler_output`` is ``post_layernorm`` of the
class token, so timm's features are ``model.post_layernorm(outputs.last_hidden_state)``. The projection
to the joint space (timm's ``head``) has no ``CLIPVisionModel`` counterpart: build the timm model with
``num_classes=0``. Back (``from_transformers``): the weights round-trip exactly, under the stock ViT-B/16
CLIP timm name with the config's shape as model args.
"""

from __future__ import annotations

import timm
import torch
from timm.layers import GELU, LayerScale, Mlp, QuickGELU
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .base import (
    ABSOLUTE_POSITIONS_NOTE,
    Family,
    PublishedRegisters,
    TransformersCounterpart,
    processor_settings,
    refuse,
    remap,
    square_size,
)

KEY_MAP = (
    ("cls_token", ("embeddings.class_embedding",)),  # [1, 1, D] <-> [D]
    ("pos_embed", ("embeddings.position_embedding.weight",)),  # [1, 1 + N, D] <-> [1 + N, D]
    ("patch_embed.proj.", ("embeddings.patch_embedding.",)),
    ("norm_pre.", ("pre_layrnorm.",)),
    ("blocks.{}.norm1.", ("encoder.layers.{}.layer_norm1.",)),
    (
        "blocks.{}.attn.qkv.",
        (
            "encoder.layers.{}.self_attn.q_proj.",
            "encoder.layers.{}.self_attn.k_proj.",
            "encoder.layers.{}.self_attn.v_proj.",
        ),
    ),
    ("blocks.{}.attn.proj.", ("encoder.layers.{}.self_attn.out_proj.",)),
    ("blocks.{}.norm2.", ("encoder.layers.{}.layer_norm2.",)),
    ("blocks.{}.mlp.fc1.", ("encoder.layers.{}.mlp.fc1.",)),
    ("blocks.{}.mlp.fc2.", ("encoder.layers.{}.mlp.fc2.",)),
    ("norm.", ("post_layernorm.",)),
)
ACTIVATIONS = ((QuickGELU, "quick_gelu"), (GELU, "gelu"), (nn.GELU, "gelu"))


def clip_config(model: VisionTransformer, source: str = "the model"):
    """``CLIPVisionConfig`` of a timm CLIP vision tower; ``BackboneError`` naming what does not fit."""
    from transformers import CLIPVisionConfig

    block = model.blocks[0]
    found = []
    if model.cls_token is None or model.num_reg_tokens or getattr(model, "no_embed_class", False):
        found.append("not exactly one class token with its own position")
    if model.pos_embed is None:
        found.append("no absolute position embedding")
    if model.patch_embed.proj.bias is not None:
        found.append("a patch-embedding bias (CLIPVisionModel's patch convolution has none)")
    if not isinstance(model.norm_pre, nn.LayerNorm) or not isinstance(model.norm, nn.LayerNorm):
        found.append("norm_pre / norm not LayerNorms")
    if not isinstance(model.fc_norm, nn.Identity):
        found.append("an fc_norm")
    if isinstance(block.ls1, LayerScale):
        found.append("layer scale")
    if (
        block.attn.qkv.bias is None
        or not isinstance(block.attn.q_norm, nn.Identity)
        or not isinstance(getattr(block.attn, "norm", nn.Identity()), nn.Identity)
    ):
        found.append("attention without qkv bias or with a q/k/inner norm")
    act = next((name for cls, name in ACTIVATIONS if isinstance(getattr(block.mlp, "act", None), cls)), None)
    if type(block.mlp) is not Mlp or act is None or not isinstance(block.mlp.norm, nn.Identity):
        found.append(f"MLP {type(block.mlp).__name__} with {type(getattr(block.mlp, 'act', None)).__name__}")
    refuse(
        source,
        "CLIPVisionModel",
        found,
        "a timm CLIP vision tower like vit_base_patch16_clip_224 / vit_base_patch16_clip_quickgelu_224",
    )
    return CLIPVisionConfig(
        hidden_size=model.embed_dim,
        intermediate_size=block.mlp.fc1.out_features,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=block.attn.num_heads,
        image_size=square_size(model, "CLIPVisionModel", source),
        patch_size=model.patch_embed.patch_size[0],
        hidden_act=act,
        layer_norm_eps=model.norm.eps,
        projection_dim=model.embed_dim,
    )


def clip_to_transformers_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = remap(state_dict, KEY_MAP, reverse=False)
    out["embeddings.class_embedding"] = out["embeddings.class_embedding"].reshape(-1)
    out["embeddings.position_embedding.weight"] = out["embeddings.position_embedding.weight"][0]
    return out


def clip_to_timm_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state_dict = {k: v for k, v in state_dict.items() if k != "embeddings.position_ids"}
    out = remap(state_dict, KEY_MAP, reverse=True)
    out["cls_token"] = out["cls_token"].reshape(1, 1, -1)
    out["pos_embed"] = out["pos_embed"][None]
    return out


def clip_timm_architecture(config) -> tuple[str, dict]:
    """``(timm architecture, model_args)`` of a ``CLIPVisionConfig`` (the ViT-B/16 name, full args)."""
    if config.hidden_act not in ("gelu", "quick_gelu"):
        raise ValueError(f"timm's CLIP ViTs use exact GELU or QuickGELU, the config has {config.hidden_act!r}")
    if config.layer_norm_eps != 1e-5:
        raise ValueError(f"timm's CLIP ViTs use LayerNorm eps 1e-5, the config has {config.layer_norm_eps}")
    name = f"vit_base_patch16_clip_{'quickgelu_' if config.hidden_act == 'quick_gelu' else ''}224"
    return name, dict(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size,
        num_classes=0,
    )


def to_transformers(model: nn.Module):
    """timm CLIP vision tower -> ``CLIPVisionModel`` with the same weights (eval). timm's ``forward_features``
    is ``hf_model.post_layernorm(hf_model(pixel_values).last_hidden_state)``."""
    from transformers import CLIPVisionModel

    config = clip_config(model)
    with torch.device("meta"):  # no random init: every weight is assigned below
        hf_model = CLIPVisionModel(config)
    hf_model.load_state_dict(clip_to_transformers_state_dict(model.state_dict()), strict=True, assign=True)
    embeddings = hf_model.embeddings  # a non-persistent buffer, left on the meta device
    embeddings.register_buffer("position_ids", torch.arange(embeddings.num_positions)[None], persistent=False)
    return hf_model.eval()


def image_processor(model: nn.Module, config):
    """The timm model's own preprocessing (``pretrained_cfg``) at its image size."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(**processor_settings(model, config.image_size))


def from_transformers(hf_model, **model_kwargs) -> VisionTransformer:
    """``CLIPVisionModel`` -> timm CLIP ViT (eval, ``num_classes=0``) with the same weights."""
    architecture, model_args = clip_timm_architecture(hf_model.config)
    with torch.device("meta"):
        model = timm.create_model(architecture, pretrained=False, **{**model_args, **model_kwargs})
    model.load_state_dict(clip_to_timm_state_dict(hf_model.state_dict()), strict=True, assign=True)
    return model.eval()


BIBTEX = """@inproceedings{radford2021clip,
  title         = {Learning Transferable Visual Models From Natural Language Supervision},
  author        = {Radford, Alec and Kim, Jong Wook and Hallacy, Chris and Ramesh, Aditya and Goh, Gabriel and Agarwal, Sandhini and Sastry, Girish and Askell, Amanda and Mishkin, Pamela and Clark, Jack and Krueger, Gretchen and Sutskever, Ilya},
  booktitle     = {International Conference on Machine Learning (ICML)},
  year          = {2021},
  eprint        = {2103.00020},
  archivePrefix = {arXiv}
}"""


# ---------------------------------------------------------------- the record

CLIP = Family(
    key="clip",
    name="CLIP",
    tag="clip",
    architectures=("vit_*_clip_*",),
    license="other",
    license_note="the license of the original CLIP weights (OpenAI: MIT; OpenCLIP / MetaCLIP checkpoints: see their model cards)",
    bibtex=BIBTEX,
    interpolation_note="transformers' `CLIPVisionModel` resamples them only with `interpolate_pos_encoding=True`. "
    + ABSOLUTE_POSITIONS_NOTE,
    default_resolution=224,
    transformers=TransformersCounterpart(
        model_types=("clip_vision_model",),
        model_class="CLIPVisionModel",
        to_transformers=to_transformers,
        from_transformers=from_transformers,
        image_processor=image_processor,
        final_norm="post_layernorm",
    ),
    planted=("planted-clip",),
    published_registers=(PublishedRegisters("vit_base_patch16_clip_224", 12, 768, -1, 30.0, 5, 10),),
)
