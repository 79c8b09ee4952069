"""The DINOv3 family (ViTs: an ``Eva`` with DINOv3 RoPE, 4 storage tokens, layer scale) and its transformers counterpart.

timm ``vit_*_patch16_dinov3*`` (GELU or split SwiGLU MLP) <-> ``transformers.DINOv3ViTModel``, whose
``last_hidden_state`` is after the final norm like timm's ``forward_features``. ``DINOv3ViTModel`` has no
absolute position embedding, so an Eva with ``use_abs_pos_emb=True`` (``planted-dinov3``) is refused.
Eva's separate ``q_bias`` / ``v_bias`` (no key bias) map to the projections' biases. Back
(``from_transformers``): the weights round-trip exactly, under the stock ViT-S(+)/16 DINOv3 timm name
with the config's shape as model args.
"""

from __future__ import annotations

import timm
import torch
from timm.layers import GELU, Mlp, QuickGELU, SwiGLU
from timm.models.eva import Eva
from torch import nn

from .base import Family, TransformersCounterpart, processor_settings, refuse, remap, square_size

KEY_MAP = (
    ("cls_token", ("embeddings.cls_token",)),
    ("reg_token", ("embeddings.register_tokens",)),
    ("patch_embed.proj.", ("embeddings.patch_embeddings.",)),
    ("blocks.{}.norm1.", ("model.layer.{}.norm1.",)),
    (
        "blocks.{}.attn.qkv.",
        ("model.layer.{}.attention.q_proj.", "model.layer.{}.attention.k_proj.", "model.layer.{}.attention.v_proj."),
    ),
    ("blocks.{}.attn.q_bias", ("model.layer.{}.attention.q_proj.bias",)),
    ("blocks.{}.attn.v_bias", ("model.layer.{}.attention.v_proj.bias",)),
    ("blocks.{}.attn.proj.", ("model.layer.{}.attention.o_proj.",)),
    ("blocks.{}.gamma_1", ("model.layer.{}.layer_scale1.lambda1",)),
    ("blocks.{}.norm2.", ("model.layer.{}.norm2.",)),
    ("blocks.{}.gamma_2", ("model.layer.{}.layer_scale2.lambda1",)),
    ("norm.", ("norm.",)),
)
GELU_MLP_MAP = (
    ("blocks.{}.mlp.fc1.", ("model.layer.{}.mlp.up_proj.",)),
    ("blocks.{}.mlp.fc2.", ("model.layer.{}.mlp.down_proj.",)),
)
SWIGLU_MLP_MAP = (
    ("blocks.{}.mlp.fc1_g.", ("model.layer.{}.mlp.gate_proj.",)),
    ("blocks.{}.mlp.fc1_x.", ("model.layer.{}.mlp.up_proj.",)),
    ("blocks.{}.mlp.fc2.", ("model.layer.{}.mlp.down_proj.",)),
)
MASK_TOKEN = "embeddings.mask_token"


def dinov3_config(model: Eva, source: str = "the model"):
    """``DINOv3ViTConfig`` of a timm DINOv3 Eva; ``BackboneError`` naming what does not fit."""
    from transformers import DINOv3ViTConfig

    block = model.blocks[0]
    attn, mlp = block.attn, block.mlp
    found = []
    if model.pos_embed is not None:
        found.append(
            "an absolute position embedding (use_abs_pos_emb=True, as in planted-dinov3): "
            "DINOv3ViTModel has RoPE only and no place for it"
        )
    if model.cls_token is None:
        found.append("no class token")
    if not isinstance(model.norm_pre, nn.Identity) or not isinstance(model.fc_norm, nn.Identity):
        found.append("a norm_pre / fc_norm")
    if (
        getattr(attn, "qkv", None) is None
        or not isinstance(attn.norm, nn.Identity)
        or not isinstance(attn.q_norm, nn.Identity)
        or not isinstance(attn.k_norm, nn.Identity)
    ):
        found.append("attention without a fused qkv, or with a q/k/inner norm")
    if block.gamma_1 is None or block.gamma_2 is None:
        found.append("no layer scale")
    swiglu = isinstance(mlp, SwiGLU)
    if swiglu and not (isinstance(mlp.act, nn.SiLU) and isinstance(mlp.norm, nn.Identity)):
        found.append("a SwiGLU MLP that is not silu(fc1_g) * fc1_x without inner norm")
    if not swiglu and not (
        type(mlp) is Mlp
        and isinstance(mlp.act, (GELU, nn.GELU))
        and not isinstance(mlp.act, QuickGELU)
        and isinstance(mlp.norm, nn.Identity)
    ):
        found.append(f"MLP {type(mlp).__name__} with {type(getattr(mlp, 'act', None)).__name__}")
    rope = model.rope
    if (
        rope.min_period is not None
        or rope.max_period is not None
        or rope.normalize_coords != "separate"
        or not rope.rotate_half
        or rope.grid_indexing != "ij"
        or rope.grid_offset
    ):
        found.append("a RoPE other than DINOv3's (temperature, separate normalisation, rotate-half)")
    refuse(source, "DINOv3ViTModel", found, "a stock timm DINOv3 ViT like vit_small_patch16_dinov3")
    qkv_bias = attn.qkv.bias is not None
    return DINOv3ViTConfig(
        hidden_size=model.embed_dim,
        intermediate_size=mlp.fc2.in_features,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=attn.num_heads,
        image_size=square_size(model, "DINOv3ViTModel", source),
        patch_size=model.patch_embed.patch_size[0],
        num_register_tokens=model.num_prefix_tokens - 1,
        layer_norm_eps=model.norm.eps,
        use_gated_mlp=swiglu,
        hidden_act="silu" if swiglu else "gelu",
        query_bias=qkv_bias or getattr(attn, "q_bias", None) is not None,
        key_bias=qkv_bias,
        value_bias=qkv_bias or getattr(attn, "v_bias", None) is not None,
        proj_bias=attn.proj.bias is not None,
        mlp_bias=mlp.fc2.bias is not None,
        rope_theta=rope.temperature,
        layerscale_value=1.0,
    )


def dinov3_to_transformers_state_dict(state_dict: dict[str, torch.Tensor], swiglu: bool) -> dict[str, torch.Tensor]:
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("attn.k_bias")}  # a zero buffer
    out = remap(state_dict, KEY_MAP + (SWIGLU_MLP_MAP if swiglu else GELU_MLP_MAP), reverse=False)
    out[MASK_TOKEN] = torch.zeros_like(state_dict["cls_token"])
    if "embeddings.register_tokens" not in out:
        out["embeddings.register_tokens"] = state_dict["cls_token"].new_zeros(1, 0, state_dict["cls_token"].shape[-1])
    return out


def to_transformers(model: nn.Module):
    """timm DINOv3 ViT -> ``DINOv3ViTModel`` with the same weights (eval)."""
    from transformers import DINOv3ViTModel

    config = dinov3_config(model)
    with torch.device("meta"):  # no random init: every weight is assigned below
        hf_model = DINOv3ViTModel(config)
    state_dict = dinov3_to_transformers_state_dict(model.state_dict(), config.use_gated_mlp)
    hf_model.load_state_dict(state_dict, strict=True, assign=True)
    rope = hf_model.rope_embeddings
    rope.inv_freq = 1 / config.rope_theta ** torch.arange(0, 1, 4 / rope.head_dim, dtype=torch.float32)
    return hf_model.eval()


def image_processor(model: nn.Module, config):
    """The timm model's own preprocessing (``pretrained_cfg``) at its image size."""
    from transformers import BitImageProcessor

    return BitImageProcessor(**processor_settings(model, config.image_size))


def dinov3_to_timm_state_dict(state_dict: dict[str, torch.Tensor], swiglu: bool) -> dict[str, torch.Tensor]:
    state_dict = {k: v for k, v in state_dict.items() if k != MASK_TOKEN}
    if state_dict.get("embeddings.register_tokens", torch.ones(1)).numel() == 0:
        del state_dict["embeddings.register_tokens"]
    separate = {}  # Eva's separate q_bias / v_bias (no key bias): the fused qkv pattern would also match them
    for key in [k for k in state_dict if k.endswith(("attention.q_proj.bias", "attention.v_proj.bias"))]:
        if key.replace("q_proj", "k_proj").replace("v_proj", "k_proj") not in state_dict:
            separate[key] = state_dict.pop(key)
    key_map = KEY_MAP + (SWIGLU_MLP_MAP if swiglu else GELU_MLP_MAP)
    out = remap(state_dict, key_map, reverse=True)
    return {**out, **remap(separate, [entry for entry in key_map if entry[0].endswith("_bias")], reverse=True)}


def dinov3_timm_architecture(config) -> tuple[str, dict]:
    """``(timm architecture, model_args)`` of a ``DINOv3ViTConfig`` (the ViT-S/16 or S+/16 name, full args)."""
    if config.layer_norm_eps != 1e-5 or config.hidden_act != ("silu" if config.use_gated_mlp else "gelu"):
        raise ValueError(
            "timm's DINOv3 ViTs use LayerNorm eps 1e-5 and GELU (SwiGLU: SiLU) "
            f"(config: eps {config.layer_norm_eps}, hidden_act {config.hidden_act!r})"
        )
    if config.key_bias or config.query_bias != config.value_bias or not (config.proj_bias and config.mlp_bias):
        raise ValueError(
            "timm's DINOv3 ViTs have query and value biases together (or neither), no key bias, "
            "and biased output and MLP projections"
        )
    name = "vit_small_plus_patch16_dinov3" if config.use_gated_mlp else "vit_small_patch16_dinov3"
    image_size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    return name + ("_qkvb" if config.query_bias and not config.use_gated_mlp else ""), dict(
        img_size=image_size,
        patch_size=config.patch_size,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size,
        num_reg_tokens=config.num_register_tokens,
        qkv_bias=config.query_bias,
        rope_temperature=config.rope_theta,
        num_classes=0,
    )


def from_transformers(hf_model, **model_kwargs) -> Eva:
    """``DINOv3ViTModel`` -> timm DINOv3 Eva (eval, ``num_classes=0``) with the same weights."""
    architecture, model_args = dinov3_timm_architecture(hf_model.config)
    model = timm.create_model(
        architecture, pretrained=False, **{**model_args, **model_kwargs}
    )  # not meta: RoPE buffers
    state_dict = dinov3_to_timm_state_dict(hf_model.state_dict(), hf_model.config.use_gated_mlp)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


BIBTEX = """@article{simeoni2025dinov3,
  title         = {{DINOv3}},
  author        = {Sim{\\'e}oni, Oriane and Vo, Huy V. and Seitzer, Maximilian and Baldassarre, Federico and Oquab, Maxime and others},
  journal       = {arXiv preprint arXiv:2508.10104},
  year          = {2025},
  eprint        = {2508.10104},
  archivePrefix = {arXiv}
}"""


# ---------------------------------------------------------------- the record

DINOV3 = Family(
    key="dinov3",
    name="DINOv3",
    tag="dinov3",
    architectures=("vit_*_dinov3*",),
    license="other",
    license_note="the DINOv3 License of the original weights",
    bibtex=BIBTEX,
    interpolation_note="It has no absolute position embedding (RoPE only), so nothing is resampled for other "
    "sizes, but features there still differ from those at the training size.",
    default_resolution=224,
    extra_tokens="storage",
    builtin_extra_tokens=4,
    absolute_positions=False,
    transformers=TransformersCounterpart(
        model_types=("dinov3_vit",),
        model_class="DINOv3ViTModel",
        to_transformers=to_transformers,
        from_transformers=from_transformers,
        image_processor=image_processor,
    ),
    planted=("planted-dinov3",),
)
