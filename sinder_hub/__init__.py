"""sinder-hub: repair the singular defects of vision transformers, DINOv2 first (SINDER, ECCV 2024)."""

from . import models
from .analysis import BlockMaps, block_linear_maps, leading_left_singular_vector, singular_defect_directions
from .backbones import BackboneError, load_backbone
from .defects import NeighborLoss, defect_logits, defect_mask, neighbor_loss
from .singular_values import (
    SingularValueLinear,
    merge_singular_values,
    parametrize_singular_values,
    singular_value_parameters,
    sync_singular_values,
)

__version__ = "0.1.0"
__all__ = [
    "BackboneError",
    "BlockMaps",
    "NeighborLoss",
    "SingularValueLinear",
    "block_linear_maps",
    "defect_logits",
    "defect_mask",
    "leading_left_singular_vector",
    "load_backbone",
    "merge_singular_values",
    "models",
    "neighbor_loss",
    "parametrize_singular_values",
    "singular_defect_directions",
    "singular_value_parameters",
    "sync_singular_values",
]
