"""timm <-> transformers for the families besides DINOv2: CLIP vision towers and DINOv3 ViTs.

Like ``sinder_hub.dinov2`` for DINOv2, one declarative key map per family (same format: a timm pattern
and its transformers patterns, ``"{}"`` a block index, several targets split / concatenate dim 0):

- CLIP (timm ``vit_*_clip_*`` / ``vit_*_clip_quickgelu_*``: ``VisionTransformer`` with ``norm_pre``, no
  layer scale, no patch-embed bias) <-> ``transformers.CLIPVisionModel``. timm's fused ``attn.qkv`` is
  split into ``q_proj`` / ``k_proj`` / ``v_proj``; ``norm_pre`` is ``pre_layrnorm``; the final ``norm``
  is ``post_layernorm``. timm's ``forward_features`` applies ``norm`` to every token; transformers'
  ``last_hidden_state`` is *before* ``post_layernorm`` and ``pooler_output`` is ``post_layernorm`` of
  the class token, so timm's features are ``model.post_layernorm(outputs.last_hidden_state)``.
  The projection to the joint space (timm's ``head``) has no ``CLIPVisionModel`` counterpart: build the
  timm model with ``num_classes=0``.
- DINOv3 (timm ``vit_*_patch16_dinov3*``: ``Eva`` with DINOv3 RoPE, storage tokens, layer scale, GELU
  or split SwiGLU MLP) <-> ``transformers.DINOv3ViTModel``, whose ``last_hidden_state`` is after the
  final norm like timm's ``forward_features``. ``DINOv3ViTModel`` has no absolute position embedding, so
  an Eva with ``use_abs_pos_emb=True`` (``planted-dinov3``) is refused.

Both families also go back (``clip_from_transformers`` / ``dinov3_from_transformers``: the weights round-trip
exactly, under the stock ViT-B/16 CLIP or ViT-S(+)/16 DINOv3 timm name with the config's shape as model args).
"""

from __future__ import annotations

import timm
import torch
from timm.layers import GELU, LayerScale, Mlp, QuickGELU, SwiGLU
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .dinov2 import _remap
from .errors import BackboneError

CLIP_KEY_MAP = (
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
DINOV3_KEY_MAP = (
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
DINOV3_GELU_MLP_MAP = (
    ("blocks.{}.mlp.fc1.", ("model.layer.{}.mlp.up_proj.",)),
    ("blocks.{}.mlp.fc2.", ("model.layer.{}.mlp.down_proj.",)),
)
DINOV3_SWIGLU_MLP_MAP = (
    ("blocks.{}.mlp.fc1_g.", ("model.layer.{}.mlp.gate_proj.",)),
    ("blocks.{}.mlp.fc1_x.", ("model.layer.{}.mlp.up_proj.",)),
    ("blocks.{}.mlp.fc2.", ("model.layer.{}.mlp.down_proj.",)),
)
DINOV3_MASK_TOKEN = "embeddings.mask_token"
CLIP_ACTIVATIONS = ((QuickGELU, "quick_gelu"), (GELU, "gelu"), (nn.GELU, "gelu"))


def _refuse(source: str, family: str, found: list[str], expected: str) -> None:
    if found:
        raise BackboneError(
            f"{source} cannot be exported as transformers' {family} ({'; '.join(found)}): expected {expected}"
        )


def _square(model: nn.Module, family: str, source: str) -> int:
    height, width = model.patch_embed.img_size
    _refuse(source, family, [f"image size {height}x{width}"] if height != width else [], "a square image size")
    return height


def transformers_family(model: nn.Module) -> str | None:
    """``"clip"`` for a CLIP-like timm ViT (LayerNorm before block 0), ``"dinov3"`` for an Eva with DINOv3
    RoPE, else ``None`` (DINOv2 or something else: ``convert`` checks it as DINOv2)."""
    if isinstance(model, VisionTransformer) and not isinstance(model.norm_pre, nn.Identity):
        return "clip"
    if isinstance(model, Eva) and isinstance(getattr(model, "rope", None), RotaryEmbeddingDinoV3):
        return "dinov3"
    return None


# ---------------------------------------------------------------- CLIP


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
    act = next((name for cls, name in CLIP_ACTIVATIONS if isinstance(getattr(block.mlp, "act", None), cls)), None)
    if type(block.mlp) is not Mlp or act is None or not isinstance(block.mlp.norm, nn.Identity):
        found.append(f"MLP {type(block.mlp).__name__} with {type(getattr(block.mlp, 'act', None)).__name__}")
    _refuse(
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
        image_size=_square(model, "CLIPVisionModel", source),
        patch_size=model.patch_embed.patch_size[0],
        hidden_act=act,
        layer_norm_eps=model.norm.eps,
        projection_dim=model.embed_dim,
    )


def clip_to_transformers_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = _remap(state_dict, CLIP_KEY_MAP, reverse=False)
    out["embeddings.class_embedding"] = out["embeddings.class_embedding"].reshape(-1)
    out["embeddings.position_embedding.weight"] = out["embeddings.position_embedding.weight"][0]
    return out


def clip_to_timm_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state_dict = {k: v for k, v in state_dict.items() if k != "embeddings.position_ids"}
    out = _remap(state_dict, CLIP_KEY_MAP, reverse=True)
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


# ---------------------------------------------------------------- DINOv3


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
    _refuse(source, "DINOv3ViTModel", found, "a stock timm DINOv3 ViT like vit_small_patch16_dinov3")
    qkv_bias = attn.qkv.bias is not None
    return DINOv3ViTConfig(
        hidden_size=model.embed_dim,
        intermediate_size=mlp.fc2.in_features,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=attn.num_heads,
        image_size=_square(model, "DINOv3ViTModel", source),
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
    out = _remap(state_dict, DINOV3_KEY_MAP + (DINOV3_SWIGLU_MLP_MAP if swiglu else DINOV3_GELU_MLP_MAP), reverse=False)
    out[DINOV3_MASK_TOKEN] = torch.zeros_like(state_dict["cls_token"])
    if "embeddings.register_tokens" not in out:
        out["embeddings.register_tokens"] = state_dict["cls_token"].new_zeros(1, 0, state_dict["cls_token"].shape[-1])
    return out


# ---------------------------------------------------------------- both directions


def config_of(model: nn.Module, source: str = "the model"):
    family = transformers_family(model)
    return clip_config(model, source) if family == "clip" else dinov3_config(model, source)


def to_transformers(model: nn.Module):
    """timm CLIP / DINOv3 model -> ``CLIPVisionModel`` / ``DINOv3ViTModel`` with the same weights (eval)."""
    from transformers import CLIPVisionModel, DINOv3ViTModel

    config = config_of(model)
    clip = config.model_type == "clip_vision_model"
    with torch.device("meta"):  # no random init: every weight is assigned below
        hf_model = (CLIPVisionModel if clip else DINOv3ViTModel)(config)
    state_dict = model.state_dict()
    state_dict = (
        clip_to_transformers_state_dict(state_dict)
        if clip
        else dinov3_to_transformers_state_dict(state_dict, config.use_gated_mlp)
    )
    hf_model.load_state_dict(state_dict, strict=True, assign=True)
    if clip:  # a non-persistent buffer, left on the meta device
        embeddings = hf_model.embeddings
        embeddings.register_buffer("position_ids", torch.arange(embeddings.num_positions)[None], persistent=False)
    else:
        rope = hf_model.rope_embeddings
        rope.inv_freq = 1 / config.rope_theta ** torch.arange(0, 1, 4 / rope.head_dim, dtype=torch.float32)
    return hf_model.eval()


def dinov3_to_timm_state_dict(state_dict: dict[str, torch.Tensor], swiglu: bool) -> dict[str, torch.Tensor]:
    state_dict = {k: v for k, v in state_dict.items() if k != DINOV3_MASK_TOKEN}
    if state_dict.get("embeddings.register_tokens", torch.ones(1)).numel() == 0:
        del state_dict["embeddings.register_tokens"]
    separate = {}  # Eva's separate q_bias / v_bias (no key bias): the fused qkv pattern would also match them
    for key in [k for k in state_dict if k.endswith(("attention.q_proj.bias", "attention.v_proj.bias"))]:
        if key.replace("q_proj", "k_proj").replace("v_proj", "k_proj") not in state_dict:
            separate[key] = state_dict.pop(key)
    key_map = DINOV3_KEY_MAP + (DINOV3_SWIGLU_MLP_MAP if swiglu else DINOV3_GELU_MLP_MAP)
    out = _remap(state_dict, key_map, reverse=True)
    return {**out, **_remap(separate, [entry for entry in key_map if entry[0].endswith("_bias")], reverse=True)}


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


def dinov3_from_transformers(hf_model, **model_kwargs) -> Eva:
    """``DINOv3ViTModel`` -> timm DINOv3 Eva (eval, ``num_classes=0``) with the same weights."""
    architecture, model_args = dinov3_timm_architecture(hf_model.config)
    model = timm.create_model(
        architecture, pretrained=False, **{**model_args, **model_kwargs}
    )  # not meta: RoPE buffers
    state_dict = dinov3_to_timm_state_dict(hf_model.state_dict(), hf_model.config.use_gated_mlp)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def clip_from_transformers(hf_model, **model_kwargs) -> VisionTransformer:
    """``CLIPVisionModel`` -> timm CLIP ViT (eval, ``num_classes=0``) with the same weights."""
    architecture, model_args = clip_timm_architecture(hf_model.config)
    with torch.device("meta"):
        model = timm.create_model(architecture, pretrained=False, **{**model_args, **model_kwargs})
    model.load_state_dict(clip_to_timm_state_dict(hf_model.state_dict()), strict=True, assign=True)
    return model.eval()
