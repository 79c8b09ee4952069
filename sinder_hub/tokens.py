"""Running a timm ViT (``VisionTransformer`` or ``Eva``) block by block and cutting its tokens into a patch grid.

Eva models (DINOv3, EVA02) give their blocks a rotary position embedding (RoPE) besides the
tokens; ``prepare_blocks`` binds it to each block. Prefix tokens (class token, registers /
DINOv3's storage tokens; none for SigLIP) come first, ``model.num_prefix_tokens`` of them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from timm.models.eva import Eva
from torch import nn


def grid_size(model: nn.Module, image_hw: tuple[int, int]) -> tuple[int, int]:
    """Patch-grid size ``(H, W)`` of an image of size ``image_hw`` (pixels)."""
    patch_h, patch_w = model.patch_embed.patch_size
    return image_hw[0] // patch_h, image_hw[1] // patch_w


def _embed_with_rope(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens that enter block 0, ``[B, N, D]``, and the rotary embedding of an Eva model (else ``None``)."""
    x = model.patch_embed(images)
    if isinstance(model, Eva):  # as Eva.forward_features: _pos_embed also applies patch dropout
        x, rope = model._pos_embed(x)
    else:
        x, rope = model.patch_drop(model._pos_embed(x)), None
    return model.norm_pre(x), rope


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Tokens that enter block 0: ``[B, 3, h, w]`` images -> ``[B, N, D]``."""
    return _embed_with_rope(model, images)[0]


def prepare_blocks(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[Callable]]:
    """Tokens entering block 0 and one callable per block, ``[B, N, D] -> [B, N, D]``.

    The callables carry what a block needs besides its tokens for these images (nothing
    for a plain ``VisionTransformer``; an Eva block gets the RoPE of this image size, its
    own slice of it with ``rope_mixed``), so callers can run, scan or differentiate the
    blocks one at a time.
    """
    x, rope = _embed_with_rope(model, images)
    if rope is None:
        return x, list(model.blocks)
    if getattr(model, "rope_mixed", False):  # per-block embeddings, as in Eva.forward_features
        return x, [partial(block, rope=rope[index]) for index, block in enumerate(model.blocks)]
    return x, [partial(block, rope=rope) for block in model.blocks]


def block_outputs(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Raw residual stream after every block (no final norm): ``depth x [B, N, D]``."""
    x, blocks = prepare_blocks(model, images)
    outputs = []
    for block in blocks:
        x = block(x)
        outputs.append(x)
    return outputs


def patch_grid(model: nn.Module, tokens: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """Drop class and register tokens: ``[..., N, D]`` -> ``[..., H, W, D]``."""
    H, W = grid_size(model, image_hw)
    patches = tokens[..., model.num_prefix_tokens :, :]
    if patches.shape[-2] != H * W:
        raise ValueError(
            f"expected {H}x{W}={H * W} patch tokens for an image of {image_hw[0]}x{image_hw[1]} px "
            f"after {model.num_prefix_tokens} prefix tokens, got {patches.shape[-2]}"
        )
    return patches.unflatten(-2, (H, W))
