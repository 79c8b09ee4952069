"""timm registry names for SINDER-repaired DINOv2 backbones, registered on ``import sinder_hub``.

Each ``*_sinder`` architecture is identical to its stock timm DINOv2 counterpart (``BASE_ARCHITECTURES``).
Only the giant has published weights: the authors' ``dinov2g_sinder.pth`` on the Hugging Face hub
(``haoqiwang/sinder``, Meta DINOv2 key layout, loaded with ``weights_only=True``). Every name also loads
local weights::

    timm.create_model("vit_base_patch14_dinov2_sinder", pretrained=True,
                      pretrained_cfg_overlay=dict(file="model.safetensors"))  # or an authors' .pth
"""

from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SwiGLUPacked
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .errors import BackboneError
from .families.dinov2 import dinov2_filter_fn

SINDER_HUB_ID = "haoqiwang/sinder"
SINDER_GIANT_FILE = "dinov2g_sinder.pth"

BASE_ARCHITECTURES = {
    "vit_small_patch14_dinov2_sinder": "vit_small_patch14_dinov2",
    "vit_base_patch14_dinov2_sinder": "vit_base_patch14_dinov2",
    "vit_large_patch14_dinov2_sinder": "vit_large_patch14_dinov2",
    "vit_giant_patch14_dinov2_sinder": "vit_giant_patch14_dinov2",
    "vit_giant_sinder": "vit_giant_patch14_dinov2",
    "vit_small_patch14_reg4_dinov2_sinder": "vit_small_patch14_reg4_dinov2",
    "vit_base_patch14_reg4_dinov2_sinder": "vit_base_patch14_reg4_dinov2",
    "vit_large_patch14_reg4_dinov2_sinder": "vit_large_patch14_reg4_dinov2",
    "vit_giant_patch14_reg4_dinov2_sinder": "vit_giant_patch14_reg4_dinov2",
}

# model args of timm's vit_*_patch14_dinov2 (timm/models/vision_transformer.py)
_SMALL = dict(patch_size=14, embed_dim=384, depth=12, num_heads=6, init_values=1e-5)
_BASE = dict(patch_size=14, embed_dim=768, depth=12, num_heads=12, init_values=1e-5)
_LARGE = dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5)
_GIANT = dict(
    patch_size=14,
    embed_dim=1536,
    depth=40,
    num_heads=24,
    init_values=1e-5,
    mlp_ratio=2.66667 * 2,
    mlp_layer=SwiGLUPacked,
    act_layer=nn.SiLU,
)
_REG4 = dict(reg_tokens=4, no_embed_class=True)


def base_architecture(name: str) -> str:
    """Stock timm architecture with the same layout: ``vit_giant_sinder`` -> ``vit_giant_patch14_dinov2``."""
    return BASE_ARCHITECTURES.get(name, name)


def _cfg(**kwargs) -> dict:
    return dict(
        num_classes=0,
        input_size=(3, 518, 518),
        fixed_input_size=True,
        crop_pct=1.0,
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv="patch_embed.proj",
        classifier="head",
        license="apache-2.0",
        **kwargs,
    )


_GIANT_WEIGHTS = dict(hf_hub_id=SINDER_HUB_ID, hf_hub_filename=SINDER_GIANT_FILE)

default_cfgs = generate_default_cfgs(
    {
        "vit_small_patch14_dinov2_sinder": _cfg(),
        "vit_base_patch14_dinov2_sinder": _cfg(),
        "vit_large_patch14_dinov2_sinder": _cfg(),
        "vit_giant_patch14_dinov2_sinder.lvd142m": _cfg(**_GIANT_WEIGHTS),
        "vit_giant_sinder.lvd142m": _cfg(**_GIANT_WEIGHTS),
        "vit_small_patch14_reg4_dinov2_sinder": _cfg(),
        "vit_base_patch14_reg4_dinov2_sinder": _cfg(),
        "vit_large_patch14_reg4_dinov2_sinder": _cfg(),
        "vit_giant_patch14_reg4_dinov2_sinder": _cfg(),
    }
)


def _create_sinder(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    """timm's ``_create_vision_transformer`` with ``dinov2_filter_fn``: it hard-wires ``checkpoint_filter_fn``,
    which reads the authors' stray ``register_tokens`` as a register model."""
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
        if not (cfg.has_weights or cfg.state_dict):
            raise BackboneError(
                f"{variant} has no published weights (the authors released only vit_giant_patch14_dinov2_sinder). "
                f"Load repaired weights with timm.create_model('{variant}', pretrained=True, "
                "pretrained_cfg_overlay=dict(file='model.safetensors' or an authors' .pth)) or "
                "timm.create_model('hf-hub:<user>/<repo>', pretrained=True)"
            )
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=dinov2_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


@register_model
def vit_small_patch14_dinov2_sinder(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-S/14 DINOv2 repaired with SINDER."""
    return _create_sinder("vit_small_patch14_dinov2_sinder", pretrained, **{**_SMALL, **kwargs})


@register_model
def vit_base_patch14_dinov2_sinder(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-B/14 DINOv2 repaired with SINDER."""
    return _create_sinder("vit_base_patch14_dinov2_sinder", pretrained, **{**_BASE, **kwargs})


@register_model
def vit_large_patch14_dinov2_sinder(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-L/14 DINOv2 repaired with SINDER."""
    return _create_sinder("vit_large_patch14_dinov2_sinder", pretrained, **{**_LARGE, **kwargs})


@register_model
def vit_giant_patch14_dinov2_sinder(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-G/14 DINOv2 repaired with SINDER; pretrained: the authors' ``haoqiwang/sinder/dinov2g_sinder.pth``."""
    return _create_sinder("vit_giant_patch14_dinov2_sinder", pretrained, **{**_GIANT, **kwargs})


@register_model
def vit_giant_sinder(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Alias of ``vit_giant_patch14_dinov2_sinder``."""
    return _create_sinder("vit_giant_sinder", pretrained, **{**_GIANT, **kwargs})


@register_model
def vit_small_patch14_reg4_dinov2_sinder(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-S/14 DINOv2 with 4 registers, repaired with SINDER."""
    return _create_sinder("vit_small_patch14_reg4_dinov2_sinder", pretrained, **{**_SMALL, **_REG4, **kwargs})


@register_model
def vit_base_patch14_reg4_dinov2_sinder(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-B/14 DINOv2 with 4 registers, repaired with SINDER."""
    return _create_sinder("vit_base_patch14_reg4_dinov2_sinder", pretrained, **{**_BASE, **_REG4, **kwargs})


@register_model
def vit_large_patch14_reg4_dinov2_sinder(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-L/14 DINOv2 with 4 registers, repaired with SINDER."""
    return _create_sinder("vit_large_patch14_reg4_dinov2_sinder", pretrained, **{**_LARGE, **_REG4, **kwargs})


@register_model
def vit_giant_patch14_reg4_dinov2_sinder(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-G/14 DINOv2 with 4 registers, repaired with SINDER."""
    return _create_sinder("vit_giant_patch14_reg4_dinov2_sinder", pretrained, **{**_GIANT, **_REG4, **kwargs})
