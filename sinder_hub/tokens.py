"""Running a timm ViT block by block and cutting its tokens into a patch grid."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def grid_size(model: nn.Module, image_hw: tuple[int, int]) -> tuple[int, int]:
    """Patch-grid size ``(H, W)`` of an image of size ``image_hw`` (pixels)."""
    patch_h, patch_w = model.patch_embed.patch_size
    return image_hw[0] // patch_h, image_hw[1] // patch_w


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Tokens that enter block 0: ``[B, 3, h, w]`` images -> ``[B, N, D]``."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def prepare_blocks(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[Callable]]:
    """Tokens entering block 0 and one callable per block, ``[B, N, D] -> [B, N, D]``.

    The callables carry what a block needs besides its tokens for these images (nothing
    for a plain ``VisionTransformer``), so callers can run, scan or differentiate the
    blocks one at a time.
    """
    return embed(model, images), list(model.blocks)


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
    patches = tokens[..., model.num_prefix_tokens:, :]
    if patches.shape[-2] != H * W:
        raise ValueError(
            f"expected {H}x{W}={H * W} patch tokens for an image of {image_hw[0]}x{image_hw[1]} px "
            f"after {model.num_prefix_tokens} prefix tokens, got {patches.shape[-2]}"
        )
    return patches.unflatten(-2, (H, W))
