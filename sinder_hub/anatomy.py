"""What SINDER needs to know about a ViT block family, read from the timm modules.

SINDER touches a transformer block in three ways: the analysis (eq. 1–4) reads the
pre-attention and pre-MLP norms, the value and output projections, the layer scales and
the MLP; the trainer moves the singular values of the value projection, the attention
output projection and the MLP's linear layers (never queries or keys); detection drops
the prefix tokens (class, registers / storage tokens) and cuts the rest into the patch
grid. ``describe_block`` and ``describe_model`` read all of it from timm's modules, once
for every family, and raise ``BackboneError`` naming the module and what is missing
when a block is not one SINDER can handle.

Supported blocks (timm 1.0.x):

- ``VisionTransformer`` / ``Block`` (DINOv2, DeiT-III, CLIP, SigLIP, AugReg ViT): fused
  ``attn.qkv`` (value rows ``[2D, 3D)``), ``attn.proj``, layer scale ``ls1.gamma`` /
  ``ls2.gamma`` or none (``Identity``);
- ``Eva`` / ``EvaBlock`` (DINOv3, EVA02): fused ``attn.qkv`` with or without separate
  ``q_bias`` / ``v_bias``, or separate ``attn.q_proj`` / ``k_proj`` / ``v_proj``;
  ``attn.proj``; layer scale ``gamma_1`` / ``gamma_2`` or none; RoPE (it acts on queries
  and keys only, so it never enters the value path).

MLPs: ``Mlp`` (any elementwise activation of ``ACTIVATIONS``), ``GluMlp`` (packed SwiGLU,
``fc1`` holds both halves) and ``SwiGLU`` (split ``fc1_g`` / ``fc1_x``), each with or
without an inner norm before ``fc2``. Norms: ``LayerNorm`` (centring and scale) or
``RmsNorm`` (scale only). Attention with an inner norm (``scale_attn_inner``) or an output
gate is refused: neither is linear in the value path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import GELU, GELUTanh, GluMlp, LayerScale, Mlp, QuickGELU, RmsNorm, SwiGLU
from timm.models.eva import Eva, EvaAttention, EvaBlock
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from .errors import BackboneError

# activation module -> MLP kind name; every one is elementwise, so the expected linearisation applies
ACTIVATIONS: tuple[tuple[type, str], ...] = (
    (QuickGELU, "quick_gelu"),
    (GELUTanh, "gelu_tanh"),
    (GELU, "gelu"),
    (nn.GELU, "gelu"),
    (nn.SiLU, "silu"),
    (nn.ReLU, "relu"),
)
LAYER_NORMS = (nn.LayerNorm,)  # timm's LayerNorm / LayerNormFp32 subclass it
RMS_NORMS = (RmsNorm,)


@dataclass(frozen=True)
class Norm:
    """A pre-norm: ``path`` in the block, ``centred`` for LayerNorm (``P = I - 11ᵀ/D``), not for RMSNorm."""

    path: str
    centred: bool


@dataclass(frozen=True)
class BlockDescription:
    """One transformer block, as SINDER sees it. Paths are relative to the block.

    - ``norm1`` / ``norm2``: pre-attention / pre-MLP norms;
    - ``value``: the linear layer holding the value projection and ``value_rows`` ``(start, stop)``,
      the rows of its weight that are the value part (all rows for a separate ``v_proj``);
    - ``proj``: the attention output projection;
    - ``layer_scale1`` / ``layer_scale2``: paths of the ``[D]`` layer-scale tensors, ``None`` without;
    - ``mlp``: the MLP module, ``mlp_kind`` ``"<activation>"`` for a plain MLP or
      ``"swiglu_packed"`` / ``"swiglu_split"`` (``"<activation>_glu_packed"`` etc. for other gates),
      ``mlp_inputs`` its first linear layers (one, or gate then value for a split SwiGLU),
      ``mlp_output`` its last one, ``mlp_inner_norm`` whether a norm sits before ``mlp_output``;
    - ``qkv_bias_read_by_attention``: Eva's fused qkv with separate ``q_bias`` / ``v_bias``, where the
      attention reads ``qkv.weight`` itself (``F.linear``) instead of calling ``qkv``.
    """

    kind: str
    norm1: Norm
    norm2: Norm
    value: str
    value_rows: tuple[int, int]
    proj: str
    layer_scale1: str | None
    layer_scale2: str | None
    mlp: str
    mlp_kind: str
    mlp_inputs: tuple[str, ...]
    mlp_output: str
    mlp_inner_norm: bool
    qkv_bias_read_by_attention: bool

    @property
    def movable(self) -> tuple[tuple[str, tuple[int, int] | None], ...]:
        """``(path, rows)`` of every linear layer whose singular values may move, in forward order.

        ``rows`` limits the move to the value rows of a fused qkv (``None``: the whole layer).
        Queries and keys never move.
        """
        value_rows = None if self.value.endswith("v_proj") else self.value_rows
        return (
            (self.value, value_rows),
            (self.proj, None),
            *((p, None) for p in self.mlp_inputs),
            (self.mlp_output, None),
        )

    @property
    def mlp_gated(self) -> bool:
        """Whether the MLP's hidden layer is ``act(gate) · value`` (SwiGLU and other GLUs), gate rows first."""
        return self.mlp_kind.startswith("swiglu") or "_glu_" in self.mlp_kind

    @property
    def expected_supported(self) -> bool:
        """Whether the MLP has the 1-D Gaussian form ``method="expected"`` needs (no inner norm)."""
        return not self.mlp_inner_norm


@dataclass(frozen=True)
class ModelDescription:
    """A whole backbone: its family, tokens and blocks.

    ``num_prefix_tokens`` = class token (0 or 1) + ``num_registers`` (registers / storage tokens);
    the patch tokens follow them. ``rope``: blocks need the model's rotary embedding (Eva).
    """

    family: str
    patch_size: tuple[int, int]
    class_token: bool
    num_registers: int
    num_prefix_tokens: int
    rope: bool
    blocks: tuple[BlockDescription, ...]


def _activation_kind(act: nn.Module, where: str) -> str:
    for cls, name in ACTIVATIONS:
        if isinstance(act, cls):
            if name == "gelu" and getattr(act, "approximate", "none") == "tanh":
                return "gelu_tanh"
            return name
    known = ", ".join(sorted({name for _, name in ACTIVATIONS}))
    raise BackboneError(f"{where}.act: unsupported activation {type(act).__name__} (known: {known})")


def _norm(block: nn.Module, path: str, where: str) -> Norm:
    norm = getattr(block, path, None)
    if isinstance(norm, LAYER_NORMS):
        return Norm(path, centred=True)
    if isinstance(norm, RMS_NORMS):
        return Norm(path, centred=False)
    raise BackboneError(f"{where}.{path}: expected a LayerNorm or RmsNorm pre-norm, got {type(norm).__name__}")


def _is_linear(module: nn.Module | None) -> bool:
    # a SingularValueLinear (sinder_hub.singular_values) keeps nn.Linear's weight and bias names
    return (
        module is not None
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and (isinstance(module, nn.Linear) or hasattr(module, "eps"))
    )


def _mlp(block: nn.Module, where: str) -> tuple[str, tuple[str, ...], bool]:
    """``(mlp_kind, mlp_inputs, mlp_inner_norm)`` of ``block.mlp``."""
    mlp = block.mlp
    inner_norm = not isinstance(getattr(mlp, "norm", None), nn.Identity)
    if isinstance(mlp, SwiGLU):
        act = _activation_kind(mlp.act, f"{where}.mlp")
        return ("swiglu_split" if act == "silu" else f"{act}_glu_split"), ("mlp.fc1_g", "mlp.fc1_x"), inner_norm
    if isinstance(mlp, GluMlp):
        act = _activation_kind(mlp.act, f"{where}.mlp")
        if mlp.gate_last:
            raise BackboneError(f"{where}.mlp: GluMlp with gate_last=True (value half first) is not supported")
        return ("swiglu_packed" if act == "silu" else f"{act}_glu_packed"), ("mlp.fc1",), inner_norm
    if type(mlp) is Mlp:
        if not _is_linear(mlp.fc1):
            raise BackboneError(f"{where}.mlp: a convolutional Mlp is not supported (fc1 is {type(mlp.fc1).__name__})")
        return _activation_kind(mlp.act, f"{where}.mlp"), ("mlp.fc1",), inner_norm
    raise BackboneError(f"{where}.mlp: expected a timm Mlp, GluMlp or SwiGLU, got {type(mlp).__name__}")


def _attention(block: nn.Module, where: str) -> tuple[str, tuple[int, int], bool]:
    """``(value, value_rows, qkv_bias_read_by_attention)`` of ``block.attn``."""
    attn = block.attn
    if not isinstance(attn, (Attention, EvaAttention)):
        raise BackboneError(f"{where}.attn: expected a timm Attention or EvaAttention, got {type(attn).__name__}")
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
        raise BackboneError(f"{where}.attn.norm: an inner attention norm (scale_attn_inner) is not supported")
    if getattr(attn, "gate", None) is not None:
        raise BackboneError(f"{where}.attn.gate: gated attention is not supported")
    if not _is_linear(getattr(attn, "proj", None)):
        raise BackboneError(f"{where}.attn: no output projection `proj`")
    qkv = getattr(attn, "qkv", None)
    if qkv is not None:
        if not _is_linear(qkv):
            raise BackboneError(f"{where}.attn.qkv: expected a linear layer, got {type(qkv).__name__}")
        rows, dim = qkv.weight.shape
        if rows % 3:
            raise BackboneError(f"{where}.attn.qkv: weight {tuple(qkv.weight.shape)} is not three stacked projections")
        third = rows // 3
        separate_bias = getattr(attn, "q_bias", None) is not None and not getattr(attn, "qkv_bias_separate", False)
        return "attn.qkv", (2 * third, rows), separate_bias
    v_proj = getattr(attn, "v_proj", None)
    if not _is_linear(v_proj):
        raise BackboneError(f"{where}.attn: neither a fused `qkv` nor a separate `v_proj` linear layer")
    return "attn.v_proj", (0, v_proj.weight.shape[0]), False


def describe_block(block: nn.Module, where: str = "block") -> BlockDescription:
    """``BlockDescription`` of a timm ``Block`` or ``EvaBlock``; ``where`` names it in errors (``"blocks.3"``).

    Raises ``BackboneError`` naming the module and what is missing for any other block.
    """
    if isinstance(block, Block):
        kind = "vit"
        scales = []
        for name in ("ls1", "ls2"):
            scale = getattr(block, name)
            if isinstance(scale, LayerScale):
                scales.append(f"{name}.gamma")
            elif isinstance(scale, nn.Identity):
                scales.append(None)
            else:
                raise BackboneError(
                    f"{where}.{name}: expected a timm LayerScale or Identity, got {type(scale).__name__}"
                )
    elif isinstance(block, EvaBlock):
        kind = "eva"
        scales = [name if getattr(block, name) is not None else None for name in ("gamma_1", "gamma_2")]
    else:
        raise BackboneError(
            f"{where}: {type(block).__name__} is not a supported block (expected timm's vision_transformer.Block "
            "or eva.EvaBlock: pre-norm attention and MLP, each on the residual)"
        )
    value, value_rows, bias_read = _attention(block, where)
    mlp_kind, mlp_inputs, inner_norm = _mlp(block, where)
    return BlockDescription(
        kind=kind,
        norm1=_norm(block, "norm1", where),
        norm2=_norm(block, "norm2", where),
        value=value,
        value_rows=value_rows,
        proj="attn.proj",
        layer_scale1=scales[0],
        layer_scale2=scales[1],
        mlp="mlp",
        mlp_kind=mlp_kind,
        mlp_inputs=mlp_inputs,
        mlp_output="mlp.fc2",
        mlp_inner_norm=inner_norm,
        qkv_bias_read_by_attention=bias_read,
    )


def describe_model(model: nn.Module, source: str = "the model") -> ModelDescription:
    """``ModelDescription`` of a timm ``VisionTransformer`` or ``Eva``; ``BackboneError`` otherwise.

    ``source`` names the model in errors.
    """
    if isinstance(model, VisionTransformer):
        family, rope = "vit", False
        registers = model.num_reg_tokens
    elif isinstance(model, Eva):
        family, rope = "eva", model.rope is not None
        registers = 0 if model.reg_token is None else model.reg_token.shape[1]
    else:
        raise BackboneError(
            f"{source}: a {type(model).__name__} is not a supported backbone (expected a timm VisionTransformer "
            "or Eva with pre-norm blocks, such as DINOv2, DeiT-III, CLIP, SigLIP, DINOv3 or EVA02)"
        )
    class_token = model.cls_token is not None
    if model.num_prefix_tokens != int(class_token) + registers:
        raise BackboneError(
            f"{source}: {model.num_prefix_tokens} prefix tokens, but class token {int(class_token)} "
            f"+ {registers} registers"
        )
    blocks = tuple(describe_block(block, f"{source}: blocks.{index}") for index, block in enumerate(model.blocks))
    if not blocks:
        raise BackboneError(f"{source}: no transformer blocks")
    return ModelDescription(
        family=family,
        patch_size=tuple(model.patch_embed.patch_size),
        class_token=class_token,
        num_registers=registers,
        num_prefix_tokens=model.num_prefix_tokens,
        rope=rope,
        blocks=blocks,
    )


def has_class_token(model: nn.Module) -> bool:
    """Whether token 0 of ``model``'s output is a class token (SigLIP and ``class_token=False`` models have none)."""
    return getattr(model, "cls_token", None) is not None


def get_path(block: nn.Module, path: str) -> nn.Module | torch.Tensor:
    """The module or tensor at a dotted ``path`` of a block (``"attn.qkv"``, ``"ls1.gamma"``, ``"gamma_1"``)."""
    target = block
    for part in path.split("."):
        target = getattr(target, part)
    return target
