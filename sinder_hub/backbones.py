"""Loading any DINOv2-like backbone as a timm ``VisionTransformer`` (eval mode, ``dynamic_img_size=True``).

Specs (see ``load_backbone``): a timm name, an ``hf-hub:`` id, a ``.safetensors`` file in timm layout, a
folder written by timm's ``save_for_hf``, a ``.pth``/``.pt`` checkpoint in the authors' / Meta DINOv2
layout, a transformers Dinov2 / Dinov2WithRegisters folder, or ``planted-gelu`` / ``planted-swiglu``.
Weights always load strictly: a missing, unexpected or mis-shaped key is a ``BackboneError``.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import safetensors.torch
import timm
import torch
from timm.layers import LayerScale
from timm.models._hub import load_model_config_from_path, load_state_dict_from_path
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from .errors import BackboneError

ACCEPTED_SPECS = (
    "a timm name: vit_{small,base,large,giant}_patch14_dinov2, vit_*_patch14_reg4_dinov2 (optionally with a "
    "pretrained tag such as .lvd142m) or their *_sinder counterparts",
    "an hf-hub:<user>/<repo> id",
    "a .safetensors file in timm layout (with architecture=)",
    "a folder written by timm's save_for_hf (config.json + model.safetensors)",
    "a .pth/.pt checkpoint in the authors' / Meta DINOv2 layout",
    "a transformers Dinov2 / Dinov2WithRegisters folder",
    "planted-gelu / planted-swiglu",
)
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
        fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1])
    registers = max((state_dict[k].shape[1] for k in STRAY_REGISTER_KEYS if k in state_dict), default=0)
    size = DINOV2_SIZES.get(embed_dim)
    architecture = dinov2_architecture(embed_dim, depth, size[2] if size else 0, swiglu, registers)
    if architecture is None:
        raise BackboneError(
            f"{source}: embed dim {embed_dim}, depth {depth}, {'SwiGLU' if swiglu else 'GELU'} MLP and "
            f"{registers} register tokens match no stock vit_*_patch14_dinov2; pass architecture= "
            "(and model kwargs such as embed_dim=, depth=, num_heads=)")
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
        "14-px patches, a class token and layer scale, like vit_*_patch14_dinov2")


def load_strict(model: VisionTransformer, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(strict=True)`` with a ``BackboneError`` naming the first bad key."""
    architecture = model.pretrained_cfg.get("architecture", type(model).__name__)
    expected = model.state_dict()
    for key, value in expected.items():
        if key in state_dict and state_dict[key].shape != value.shape:
            raise BackboneError(
                f"{source}: checkpoint shape mismatch at {key}: {tuple(state_dict[key].shape)}, "
                f"but {architecture} expects {tuple(value.shape)}")
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise BackboneError(
            f"{source} does not fit {architecture}: missing keys {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    model.load_state_dict(state_dict, strict=True)


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(path, device="cpu")
    return unwrap_checkpoint(torch.load(path, map_location="cpu", weights_only=True))


def _from_file(path: Path, architecture: str | None, pretrained: bool, model_kwargs: dict) -> VisionTransformer:
    if path.suffix not in (".safetensors", ".pth", ".pt"):
        raise BackboneError(f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors, .pth or .pt")
    if path.suffix == ".safetensors" and architecture is None:
        raise BackboneError(
            f"{path}: a .safetensors file does not name its architecture; pass architecture= "
            "(e.g. 'vit_giant_patch14_dinov2') or load the save_for_hf folder that contains it")
    state_dict = _read_checkpoint(path)
    architecture = architecture or infer_architecture(state_dict, str(path))
    model = _create(architecture, False, model_kwargs, str(path))
    if pretrained:
        load_strict(model, dinov2_filter_fn(state_dict, model), str(path))
    return model


def _from_folder(path: Path, pretrained: bool, model_kwargs: dict) -> VisionTransformer:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise BackboneError(f"{path}: no config.json; expected a timm save_for_hf or transformers Dinov2 folder")
    config = json.loads(config_file.read_text())
    if config.get("model_type") in TRANSFORMERS_MODEL_TYPES:
        return _from_transformers_folder(path, pretrained, model_kwargs)
    if "architecture" not in config:
        raise BackboneError(
            f"{config_file}: neither a timm config (no 'architecture') nor a transformers "
            f"{'/'.join(TRANSFORMERS_MODEL_TYPES)} config (model_type {config.get('model_type')!r})")
    pretrained_cfg, architecture, model_args = load_model_config_from_path(path)
    model_kwargs = {**(model_args or {}), **model_kwargs, "pretrained_cfg": pretrained_cfg}
    model = _create(architecture, False, model_kwargs, str(path))
    if pretrained:
        load_strict(model, dinov2_filter_fn(load_state_dict_from_path(path), model), str(path))
    return model


def _from_transformers_folder(path: Path, pretrained: bool, model_kwargs: dict) -> VisionTransformer:
    from transformers import AutoConfig, AutoModel

    from .convert import from_transformers

    if not pretrained:
        return from_transformers(AutoModel.from_config(AutoConfig.from_pretrained(path)), **model_kwargs)
    hf_model, info = AutoModel.from_pretrained(path, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise BackboneError(f"{path}: transformers weights do not fit their config: {bad}")
    return from_transformers(hf_model, **model_kwargs)


def _create(name: str, pretrained: bool, model_kwargs: dict, source: str) -> VisionTransformer:
    """``timm.create_model`` of a DINOv2-like ``name``; checked on the meta device before a download."""
    local = not name.startswith("hf-hub:")
    if local and not timm.is_model(name):
        if name != source:
            raise BackboneError(f"{source}: unknown timm architecture {name!r}")
        raise BackboneError(f"unknown backbone {source!r}; accepted: " + "; ".join(ACCEPTED_SPECS))
    if local and pretrained:
        _check_on_meta(name, source)
    try:
        model = timm.create_model(name, pretrained=pretrained, **{"dynamic_img_size": True, **model_kwargs})
    except TypeError as error:  # e.g. a CNN rejects dynamic_img_size
        if local:
            _check_on_meta(name, source)
        raise BackboneError(f"{source}: {error}") from error
    check_dinov2_like(model, source)
    return model


def _check_on_meta(name: str, source: str) -> None:
    with torch.device("meta"):
        check_dinov2_like(timm.create_model(name, pretrained=False), source)


def _planted(spec: str, model_kwargs: dict) -> VisionTransformer:
    from .testing import PLANTED_VARIANTS, planted_backbone

    if spec not in PLANTED_VARIANTS:
        raise BackboneError(f"unknown planted backbone {spec!r}; known: {', '.join(PLANTED_VARIANTS)}")
    return planted_backbone(spec, **model_kwargs)


def load_backbone(spec: str | Path, architecture: str | None = None, pretrained: bool = True,
                  **model_kwargs) -> VisionTransformer:
    """A DINOv2-like timm ``VisionTransformer`` in eval mode, created with ``dynamic_img_size=True``.

    ``spec``: one of ``ACCEPTED_SPECS``. ``architecture``: timm name for a checkpoint file (required for
    ``.safetensors``, inferred from shapes for ``.pth``/``.pt``). ``pretrained=False`` builds the same
    architecture with random weights. ``model_kwargs`` go to ``timm.create_model`` (they override
    ``dynamic_img_size`` and a folder's saved ``model_args``). Raises ``BackboneError``.
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    is_path = not spec.startswith(("planted-", "hf-hub:")) and (
        path.suffix in (".safetensors", ".pth", ".pt") or "/" in spec or spec.startswith(".") or path.exists())
    if architecture is not None and (not is_path or path.is_dir()):
        raise BackboneError(f"architecture= applies to checkpoint files only; {spec!r} names its own architecture")
    if spec.startswith("planted-"):
        model = _planted(spec, model_kwargs)
    elif not is_path:
        model = _create(spec, pretrained, model_kwargs, spec)
    elif not path.exists():
        raise BackboneError(f"{path} does not exist (expected a checkpoint file or a model folder)")
    elif path.is_dir():
        model = _from_folder(path, pretrained, model_kwargs)
    else:
        model = _from_file(path, architecture, pretrained, model_kwargs)
    return model.eval()
