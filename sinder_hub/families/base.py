"""What a family record holds, and the key-map machinery every family's transformers counterpart uses.

A key map is a tuple of ``(timm pattern, transformers patterns)``: ``"{}"`` is a block index, and
several transformers targets split (timm -> transformers) or concatenate (back) dim 0, as a fused
``attn.qkv`` does with ``q_proj`` / ``k_proj`` / ``v_proj``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TransformersCounterpart:
    """A family's stock transformers class and the functions that convert to and from it."""

    model_types: tuple[str, ...]  # transformers ``config.model_type`` values of the family
    model_class: str  # ``Dinov2Model``, ``CLIPVisionModel``...: named on model cards
    to_transformers: Callable[[nn.Module], nn.Module]  # timm model -> transformers model, same weights
    from_transformers: Callable[..., nn.Module]  # transformers model (+ timm model kwargs) -> timm model
    image_processor: Callable[[nn.Module, object], object]  # (timm model, transformers config) -> processor
    final_norm: str | None = None  # a norm to apply to ``last_hidden_state`` to get timm's features (CLIP's)


@dataclass(frozen=True)
class PublishedRegisters:
    """Test-time registers as their authors published them for one model (Jiang et al., 2025)."""

    architecture: str
    depth: int
    width: int
    detection_block: int  # from the end: -1 the last block, -2 the second-to-last
    threshold: float
    highest_layer: int
    top_k: int


@dataclass(frozen=True)
class Family:
    """One ViT family: how it is recognised, what its model card says, and what it has besides timm.

    ``architectures``: ``fnmatch`` patterns of its timm names (``*_sinder`` names included);
    ``license`` / ``license_note``: the hub licence id and the sentence on the card; ``bibtex``: the
    family's citation (``None``: none is borrowed); ``interpolation_note``: what the card says about
    input sizes other than the training one; ``default_resolution``: input size when a model does not say;
    ``class_token``: whether its models have one; ``extra_tokens``: what its prefix tokens besides the class
    token are called (``register``, ``storage``) and ``builtin_extra_tokens`` how many every model of the
    family has; ``absolute_positions``: whether it has an absolute position embedding (DINOv3: RoPE only);
    ``transformers``: its stock transformers counterpart, if any; ``check``: what a model
    of this family must be beyond timm's anatomy (``BackboneError`` otherwise); ``planted``: its
    planted-defect fixtures; ``registers_detection_block``: where test-time registers look for outliers
    by default (from the end) and ``published_registers``: the authors' own configurations.
    """

    key: str
    name: str
    tag: str | None
    architectures: tuple[str, ...]
    license: str
    license_note: str
    bibtex: str | None
    interpolation_note: str
    default_resolution: int
    class_token: bool = True
    extra_tokens: str = "register"
    builtin_extra_tokens: int = 0
    absolute_positions: bool = True
    transformers: TransformersCounterpart | None = None
    check: Callable[[nn.Module, str], None] | None = None
    planted: tuple[str, ...] = ()
    registers_detection_block: int = -1
    published_registers: tuple[PublishedRegisters, ...] = ()

    def matches(self, architecture: str) -> bool:
        """Whether a timm name (without its pretrained tag) belongs to this family."""
        return any(fnmatch.fnmatchcase(architecture, pattern) for pattern in self.architectures)


ABSOLUTE_POSITIONS_NOTE = "Check features at other input sizes against the original model before relying on them."
# torchvision's (and timm's) interpolation names -> PIL resample codes, for image processors
RESAMPLE = {"nearest": 0, "nearest-exact": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def refuse(source: str, target: str, found: list[str], expected: str) -> None:
    """``BackboneError`` when ``found`` lists what keeps ``source`` from being exported as ``target``."""
    from ..errors import BackboneError

    if found:
        raise BackboneError(
            f"{source} cannot be exported as transformers' {target} ({'; '.join(found)}): expected {expected}"
        )


def square_size(model: nn.Module, target: str, source: str) -> int:
    """The model's image size, refused unless square (transformers configs hold one number)."""
    height, width = model.patch_embed.img_size
    refuse(source, target, [f"image size {height}x{width}"] if height != width else [], "a square image size")
    return height


def processor_settings(model: nn.Module, size: int) -> dict:
    """transformers image-processor settings from a timm model's ``pretrained_cfg`` (mean, std and
    interpolation as every tool reads them, ``data.normalization_of``; crop_pct) at ``size``: resize the
    short side to ``size / crop_pct``, centre-crop ``size``."""
    from ..data import normalization_of

    cfg = getattr(model, "pretrained_cfg", None) or {}
    normalization = normalization_of(model)
    return dict(
        do_resize=True,
        size={"shortest_edge": round(size / cfg.get("crop_pct", 1.0))},
        resample=RESAMPLE[normalization.interpolation],
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(normalization.mean),
        image_std=list(normalization.std),
        do_convert_rgb=True,
    )


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{\}", r"(\d+)") + "(.*)")


def remap(state_dict: dict[str, torch.Tensor], key_map, reverse: bool) -> dict[str, torch.Tensor]:
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
