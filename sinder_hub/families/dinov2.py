"""The DINOv2 family: its record, what its checkpoints look like, and its transformers counterpart.

One module owns it, and ``backbones`` (loading), ``convert`` (exporting) and ``models``
(the ``*_sinder`` registry names) read it through the record ``DINOV2`` or import it:

- ``DINOV2_SIZES`` / ``dinov2_architecture`` / ``infer_architecture``: the stock timm
  ``vit_*_patch14[_reg4]_dinov2`` names and how to recognise them from checkpoint shapes;
- ``unwrap_checkpoint`` / ``dinov2_filter_fn``: training-checkpoint wrappers and the
  authors' / Meta key layout, mapped onto timm's;
- ``check_dinov2_like``: what a DINOv2 spec must be (14-px patches, class token, layer scale);
- ``KEY_MAP`` and the MLP maps: timm <-> transformers ``Dinov2Model`` keys. Besides renames they handle
  timm's fused ``attn.qkv`` <-> ``q_proj``/``k_proj``/``v_proj`` (split / concatenated on dim 0), the
  packed SwiGLU ``mlp.fc1`` (``[2H, D]``, gate half first) <-> ``gate_proj``/``up_proj``, registers
  (timm's ``no_embed_class`` keeps the class token's position inside ``cls_token`` and has
  ``pos_embed [1, H*W, D]``; transformers adds ``position_embeddings[:, 0]`` to the class token and
  has ``[1, 1 + H*W, D]``: the conversion writes a zero class position) and transformers'
  ``mask_token`` (written as zeros, dropped on the way back);
- ``timm_architecture`` / ``from_transformers``: a transformers Dinov2 model as a timm ViT, and
  ``transformers_config`` / ``to_transformers`` / ``image_processor`` the other way. timm's packed SwiGLU
  ``mlp.fc1`` is sized with ``mlp_ratio = 2H / D``, transformers' with ``H = ceil8(int(D * mlp_ratio) * 2 / 3)``;
  transformers >= 5 saves folders with the legacy key names and renames them on load.
"""

from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING

import timm
import torch
from timm.layers import GluMlp, LayerScale
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from ..data import IMAGENET_MEAN, IMAGENET_STD
from ..errors import BackboneError
from .base import Family, PublishedRegisters, TransformersCounterpart, remap

if TYPE_CHECKING:
    from transformers import Dinov2Config, Dinov2WithRegistersConfig, PreTrainedModel

TRANSFORMERS_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
STRAY_REGISTER_KEYS = ("register_tokens", "reg_token")
CHECKPOINT_WRAPPERS = ("model", "teacher", "state_dict")
# embed dim -> (size name, depth, heads) of the stock DINOv2 ViTs; only the giant uses a SwiGLU MLP
DINOV2_SIZES = {384: ("small", 12, 6), 768: ("base", 12, 12), 1024: ("large", 24, 16), 1536: ("giant", 40, 24)}


def dinov2_architecture(embed_dim: int, depth: int, num_heads: int, swiglu: bool, num_registers: int) -> str | None:
    """Stock timm DINOv2 name with exactly this shape (``vit_giant_patch14_reg4_dinov2``, ...), else ``None``."""
    size = DINOV2_SIZES.get(embed_dim)
    if size is None or size[1:] != (depth, num_heads) or swiglu != (size[0] == "giant") or num_registers not in (0, 4):
        return None
    return f"vit_{size[0]}_patch14_{'reg4_' if num_registers else ''}dinov2"


def unwrap_checkpoint(checkpoint: dict) -> dict[str, torch.Tensor]:
    """State dict inside a training checkpoint: unwraps ``model`` / ``teacher`` / ``state_dict`` and a
    DINOv2 ``backbone.`` prefix (its heads are not part of the backbone)."""
    while isinstance(checkpoint, dict) and any(isinstance(checkpoint.get(k), dict) for k in CHECKPOINT_WRAPPERS):
        checkpoint = next(checkpoint[k] for k in CHECKPOINT_WRAPPERS if isinstance(checkpoint.get(k), dict))
    if any(k.startswith("backbone.") for k in checkpoint):
        checkpoint = {k.removeprefix("backbone."): v for k, v in checkpoint.items() if k.startswith("backbone.")}
    return dict(checkpoint)


def dinov2_filter_fn(state_dict: dict, model: VisionTransformer) -> dict[str, torch.Tensor]:
    """timm's ``checkpoint_filter_fn`` for DINOv2 checkpoints in any layout (timm, authors', Meta).

    Also unwraps training checkpoints and drops stray ``register_tokens`` / ``reg_token`` entries
    (with a warning) when ``model`` has no registers: timm would otherwise read them as a register model.
    """
    state_dict = unwrap_checkpoint(state_dict)
    if model.reg_token is None:
        stray = [k for k in STRAY_REGISTER_KEYS if k in state_dict]
        if stray:
            shapes = ", ".join(f"{k} {tuple(state_dict[k].shape)}" for k in stray)
            warnings.warn(f"dropping {shapes} from the checkpoint: the model has no register tokens", stacklevel=2)
            state_dict = {k: v for k, v in state_dict.items() if k not in stray}
    return checkpoint_filter_fn(state_dict, model)


def infer_architecture(state_dict: dict[str, torch.Tensor], source: str) -> str:
    """Stock timm DINOv2 name from checkpoint shapes (authors' or timm layout): embed dim, depth,
    SwiGLU (``w12`` or a packed ``fc1``) and registers."""
    if "cls_token" not in state_dict:
        raise BackboneError(f"{source}: no cls_token, not a DINOv2 checkpoint; pass architecture=")
    embed_dim = state_dict["cls_token"].shape[-1]
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 if blocks else 0
    fc1, fc2 = state_dict.get("blocks.0.mlp.fc1.weight"), state_dict.get("blocks.0.mlp.fc2.weight")
    swiglu = "blocks.0.mlp.w12.weight" in state_dict or (
        fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]
    )
    registers = max((state_dict[k].shape[1] for k in STRAY_REGISTER_KEYS if k in state_dict), default=0)
    size = DINOV2_SIZES.get(embed_dim)
    architecture = dinov2_architecture(embed_dim, depth, size[2] if size else 0, swiglu, registers)
    if architecture is None:
        raise BackboneError(
            f"{source}: embed dim {embed_dim}, depth {depth}, {'SwiGLU' if swiglu else 'GELU'} MLP and "
            f"{registers} register tokens match no stock vit_*_patch14_dinov2; pass architecture= "
            "(and model kwargs such as embed_dim=, depth=, num_heads=)"
        )
    return architecture


def check_dinov2_like(model: torch.nn.Module, source: str) -> None:
    """Raise ``BackboneError`` unless ``model`` is a timm ViT with 14-px patches, a class token and layer scale."""
    if isinstance(model, VisionTransformer):
        found = []
        if tuple(model.patch_embed.patch_size) != (14, 14):
            found.append(f"{model.patch_embed.patch_size[0]}-px patches")
        if model.cls_token is None:
            found.append("no class token")
        if not isinstance(model.blocks[0].ls1, LayerScale):
            found.append("no layer scale")
        if not found:
            return
    else:
        found = [f"a {type(model).__name__}"]
    raise BackboneError(
        f"{source} is not a DINOv2-like backbone ({', '.join(found)}): expected a timm VisionTransformer with "
        "14-px patches, a class token and layer scale, like vit_*_patch14_dinov2"
    )


# (timm pattern, transformers patterns); "{}" is a block index; several targets split / concatenate dim 0
KEY_MAP = (
    ("cls_token", ("embeddings.cls_token",)),
    ("pos_embed", ("embeddings.position_embeddings",)),
    ("reg_token", ("embeddings.register_tokens",)),
    ("patch_embed.proj.", ("embeddings.patch_embeddings.projection.",)),
    ("blocks.{}.norm1.", ("encoder.layer.{}.norm1.",)),
    (
        "blocks.{}.attn.qkv.",
        (
            "encoder.layer.{}.attention.q_proj.",
            "encoder.layer.{}.attention.k_proj.",
            "encoder.layer.{}.attention.v_proj.",
        ),
    ),
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


def timm_architecture(config: Dinov2Config | Dinov2WithRegistersConfig) -> tuple[str, dict]:
    """``(timm architecture, model_args)`` of a transformers Dinov2 config: the stock name when the
    shape is stock (model_args then only set the image size), else the family's name with full args."""
    registers = getattr(config, "num_register_tokens", 0)
    swiglu = config.use_swiglu_ffn
    if config.layer_norm_eps != 1e-6 or (not swiglu and config.hidden_act != "gelu"):
        raise ValueError(
            "timm's DINOv2 ViTs use LayerNorm eps 1e-6 and exact GELU "
            f"(config: eps {config.layer_norm_eps}, hidden_act {config.hidden_act!r})"
        )
    image_size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    model_args = dict(img_size=image_size)
    name = dinov2_architecture(
        config.hidden_size, config.num_hidden_layers, config.num_attention_heads, swiglu, registers
    )
    if name is None or config.mlp_ratio != 4 or config.patch_size != 14 or not config.qkv_bias:
        name = f"vit_{'giant' if swiglu else 'small'}_patch14_{'reg4_' if registers else ''}dinov2"
        hidden = (int(int(config.hidden_size * config.mlp_ratio) * 2 / 3) + 7) // 8 * 8
        model_args.update(
            patch_size=config.patch_size,
            embed_dim=config.hidden_size,
            depth=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            qkv_bias=config.qkv_bias,
            mlp_ratio=(2 * hidden + 0.5) / config.hidden_size if swiglu else config.mlp_ratio,
        )
        if registers:
            model_args["reg_tokens"] = registers
    return name, model_args


def timm_to_transformers_state_dict(state_dict: dict[str, torch.Tensor], swiglu: bool) -> dict[str, torch.Tensor]:
    """timm DINOv2 state dict -> transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` state dict."""
    state_dict = dict(state_dict)
    if "reg_token" in state_dict:  # no_embed_class: the class position lives in cls_token
        state_dict["pos_embed"] = torch.cat(
            [torch.zeros_like(state_dict["pos_embed"][:, :1]), state_dict["pos_embed"]], 1
        )
    out = remap(state_dict, KEY_MAP + (SWIGLU_MLP_MAP if swiglu else GELU_MLP_MAP), reverse=False)
    out[MASK_TOKEN] = torch.zeros_like(state_dict["cls_token"][0])
    return out


def transformers_to_timm_state_dict(state_dict: dict[str, torch.Tensor], swiglu: bool) -> dict[str, torch.Tensor]:
    """transformers Dinov2 state dict -> timm state dict (the reverse of ``timm_to_transformers_state_dict``)."""
    state_dict = {k: v for k, v in state_dict.items() if k != MASK_TOKEN}
    out = remap(state_dict, KEY_MAP + (SWIGLU_MLP_MAP if swiglu else GELU_MLP_MAP), reverse=True)
    if "reg_token" in out:
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


def from_transformers(hf_model: PreTrainedModel, **model_kwargs) -> VisionTransformer:
    """transformers Dinov2 / Dinov2WithRegisters model -> timm ViT (eval, ``dynamic_img_size=True``
    unless ``model_kwargs`` say otherwise) with the same weights."""
    architecture, model_args = timm_architecture(hf_model.config)
    with torch.device("meta"):  # no random init: every weight is assigned below
        model = timm.create_model(
            architecture, pretrained=False, **{**model_args, "dynamic_img_size": True, **model_kwargs}
        )
    state_dict = transformers_to_timm_state_dict(hf_model.state_dict(), hf_model.config.use_swiglu_ffn)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


# ---------------------------------------------------------------- timm -> transformers

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


def _swiglu_ratio(embed_dim: int, hidden: int) -> int:
    """Integer transformers ``mlp_ratio`` whose SwiGLU hidden size is ``hidden``."""
    for ratio in range(1, 17):
        if (int(int(embed_dim * ratio) * 2 / 3) + 7) // 8 * 8 == hidden:
            return ratio
    raise ValueError(f"no integer transformers mlp_ratio gives a SwiGLU hidden size of {hidden} at width {embed_dim}")


def transformers_config(model: nn.Module):
    """transformers config of a DINOv2-like timm ViT (no classifier head, square image size)."""
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    check_dinov2_like(model, "the model (transformers export of a DINOv2 ViT)")
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
    """timm DINOv2 ViT -> transformers ``Dinov2Model`` (``Dinov2WithRegistersModel``), same weights, eval mode."""
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    config = transformers_config(model)
    with torch.device("meta"):  # no random init: every weight is assigned below
        hf_model = (Dinov2WithRegistersModel if config.model_type == "dinov2_with_registers" else Dinov2Model)(config)
    state_dict = timm_to_transformers_state_dict(model.state_dict(), config.use_swiglu_ffn)
    hf_model.load_state_dict(state_dict, strict=True, assign=True)
    return hf_model.eval()


def image_processor(model: nn.Module, config):
    """DINOv2's own preprocessing (``IMAGE_PROCESSOR``), whatever the model's size."""
    from transformers import BitImageProcessor

    return BitImageProcessor(**IMAGE_PROCESSOR)


# ---------------------------------------------------------------- the record

BIBTEX = """@article{oquab2024dinov2,
  title         = {{DINOv2}: Learning Robust Visual Features without Supervision},
  author        = {Oquab, Maxime and Darcet, Timoth{\\'e}e and Moutakanni, Th{\\'e}o and Vo, Huy V. and Szafraniec, Marc and Khalidov, Vasil and Fernandez, Pierre and Haziza, Daniel and Massa, Francisco and El-Nouby, Alaaeldin and Howes, Russell and Huang, Po-Yao and Xu, Hu and Sharma, Vasu and Li, Shang-Wen and Galuba, Wojciech and Rabbat, Mike and Assran, Mido and Ballas, Nicolas and Synnaeve, Gabriel and Misra, Ishan and Jegou, Herv{\\'e} and Mairal, Julien and Labatut, Patrick and Joulin, Armand and Bojanowski, Piotr},
  journal       = {Transactions on Machine Learning Research},
  year          = {2024},
  eprint        = {2304.07193},
  archivePrefix = {arXiv}
}"""

DINOV2 = Family(
    key="dinov2",
    name="DINOv2",
    tag="dinov2",
    architectures=("vit_*_patch14_dinov2", "vit_*_patch14_reg4_dinov2", "vit_*_dinov2_sinder", "vit_giant_sinder"),
    license="apache-2.0",
    license_note="DINOv2's license (Apache-2.0)",
    bibtex=BIBTEX,
    interpolation_note=(
        "Below that size transformers' plain `Dinov2Model` resamples them without antialiasing, while timm "
        "(and `Dinov2WithRegistersModel`) antialias, so the two libraries give slightly different features there."
    ),
    default_resolution=518,
    transformers=TransformersCounterpart(
        model_types=TRANSFORMERS_MODEL_TYPES,
        model_class="Dinov2Model",
        to_transformers=to_transformers,
        from_transformers=from_transformers,
        image_processor=image_processor,
    ),
    check=check_dinov2_like,
    planted=("planted-gelu", "planted-swiglu"),
    registers_detection_block=-2,
    published_registers=(PublishedRegisters("vit_large_patch14_dinov2", 24, 1024, -2, 150.0, 17, 50),),
)
