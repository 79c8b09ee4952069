"""The ViT families sinder-hub knows, one record each (timm's per-family config idiom).

A ``Family`` says how a family is recognised (its timm names, its transformers ``model_type``),
what its model card says (name, tags, licence, citation, a note on input sizes), its default
resolution, its transformers counterpart (class, conversions both ways, image processor) if it has
one, what a model of it must be, its planted-defect fixtures and its test-time-register defaults.
``describe`` finds the record of a model, a timm name or a transformers ``model_type``; anything
else is ``GENERIC``, whose card names the model and borrows no family's words or citation.
Code that serves all families reads the record and never branches on a family's name.
"""

from __future__ import annotations

from torch import nn

from .base import ABSOLUTE_POSITIONS_NOTE, Family, PublishedRegisters, TransformersCounterpart
from .clip import CLIP
from .dinov2 import DINOV2
from .dinov3 import DINOV3
from .timm_only import DEIT3, EVA02, SIGLIP

GENERIC = Family(
    key="vit",
    name="vision transformer",
    tag=None,
    architectures=("*",),
    license="other",
    license_note="the license of the original weights (see their model card)",
    bibtex=None,
    interpolation_note=ABSOLUTE_POSITIONS_NOTE,
    default_resolution=224,
)
# in the order they are tried; GENERIC matches anything and comes last
FAMILIES: tuple[Family, ...] = (DINOV2, DINOV3, CLIP, SIGLIP, DEIT3, EVA02)


def architecture_of(model: nn.Module) -> str | None:
    """The timm architecture a model was created as (``pretrained_cfg["architecture"]``), if known."""
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture")


def describe(what: nn.Module | str | None, model_type: str | None = None) -> Family:
    """The family of a timm model, a timm name (``hf-hub:`` ids and pretrained tags allowed) or a
    transformers ``model_type``; ``GENERIC`` when none matches."""
    if model_type is not None:
        for family in FAMILIES:
            if family.transformers is not None and model_type in family.transformers.model_types:
                return family
    name = architecture_of(what) if isinstance(what, nn.Module) else what
    name = (name or "").removeprefix("hf-hub:").removeprefix("timm/").split(".")[0].lower()
    return next((family for family in FAMILIES if family.matches(name)), GENERIC)


def with_transformers_counterpart() -> tuple[Family, ...]:
    return tuple(family for family in FAMILIES if family.transformers is not None)


def planted_family(variant: str) -> Family:
    """The family of a planted-defect fixture (``planted-swiglu`` -> DINOv2)."""
    return next((family for family in FAMILIES if variant in family.planted), GENERIC)


__all__ = [
    "CLIP",
    "DEIT3",
    "DINOV2",
    "DINOV3",
    "EVA02",
    "FAMILIES",
    "GENERIC",
    "SIGLIP",
    "Family",
    "PublishedRegisters",
    "TransformersCounterpart",
    "architecture_of",
    "describe",
    "planted_family",
    "with_transformers_counterpart",
]
