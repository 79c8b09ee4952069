"""What a frozen backbone gives each protocol: encoders, functions of normalised ``[B, 3, H, W]`` images.

- ``class_token_encoder(model)``: ``[B, D]``, the model's own pooled feature after the final norm
  (the class token; timm's pooling for models without one, e.g. SigLIP's attention pool): k-NN,
  and the linear probe's ``class`` input;
- ``class_and_mean_encoder(model)``: ``[B, 2D]``, that feature and the mean of the final-normed
  patch tokens (DINOv2's ``avgpool`` linear input);
- ``patch_token_encoder(model, layers)``: ``[B, h, w, L·D]``, the final-normed patch tokens of the
  last ``L`` blocks, concatenated (DINOv2's linear segmentation: ``get_intermediate_layers`` with
  its default ``norm=True``); linseg and kmeans;
- ``depth_token_encoder(model, layers)``: ``[B, h, w, 2·L·D]``, each raw (not normed) patch token
  beside the class token of its block, blocks as DINOv2's depth heads take them
  (``depth_layer_indices``); models without a class token use the mean patch token.

Any function of that shape works (tests use hand-crafted colour features). ``Encoder`` carries
the ``patch_size`` whole images are sized to (plain functions: 14). Features come back as float32
on the model's device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..anatomy import has_class_token
from ..data import normalization_of
from ..tokens import patch_grid

PRECISIONS = ("fp32", "bf16")
# DINOv2's depth heads (dinov2/hub/depthers.py): the blocks of "Linear 4" per depth (ViT-S/B, L, g)
DINOV2_DEPTH_LAYERS = {12: (2, 5, 8, 11), 24: (4, 11, 17, 23), 40: (9, 19, 29, 39)}


class Encoder:
    """A function of normalised ``[B, 3, H, W]`` images, the patch size it works on and the normalisation
    its images get (``data.Normalization``; ``None``: ImageNet's, as for plain functions)."""

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor], patch_size: int = 14, normalization=None):
        self.function = function
        self.patch_size = patch_size
        self.normalization = normalization_of(normalization)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.function(images)


def as_encoder(function) -> Encoder:
    return function if isinstance(function, Encoder) else Encoder(function, getattr(function, "patch_size", 14))


def _runner(model: nn.Module, precision: str):
    """``run(fn, images)``: ``fn(images on the model's device)`` in inference mode, bf16 autocast if asked."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    device = next(model.parameters()).device

    def run(function, images: torch.Tensor):
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            return function(images.to(device))

    return run


def _patch(model: nn.Module) -> int:
    size = model.patch_embed.patch_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def class_token_encoder(model: nn.Module, precision: str = "fp32") -> Encoder:
    """``[B, 3, R, R]`` images -> the model's own pooled feature ``[B, D]``: the final-normed class token
    (DINOv2's k-NN feature), or timm's pooling for models without one (SigLIP's attention pool)."""
    run = _runner(model, precision)

    def encode(images: torch.Tensor) -> torch.Tensor:
        return run(lambda x: model.forward_head(model.forward_features(x), pre_logits=True), images).float()

    return Encoder(encode, _patch(model), normalization_of(model))


def class_and_mean_encoder(model: nn.Module, precision: str = "fp32") -> Encoder:
    """``[B, 3, R, R]`` -> ``[B, 2D]``: the pooled feature beside the mean final-normed patch token."""
    run = _runner(model, precision)

    def both(images: torch.Tensor) -> torch.Tensor:
        tokens = model.forward_features(images)
        pooled = model.forward_head(tokens, pre_logits=True)
        patches = patch_grid(model, tokens, tuple(images.shape[-2:])).flatten(1, 2)
        return torch.cat([pooled, patches.mean(dim=1)], dim=-1)

    return Encoder(lambda images: run(both, images).float(), _patch(model), normalization_of(model))


def _blocks(model: nn.Module, images: torch.Tensor, indices: list[int], norm: bool):
    """``[(patch tokens [B, h, w, D], class token [B, D])]`` after the blocks ``indices``."""
    with_prefix = getattr(model, "num_prefix_tokens", 0) > 0
    outputs = model.forward_intermediates(
        images,
        indices=indices,
        norm=norm,
        output_fmt="NCHW",
        intermediates_only=True,
        return_prefix_tokens=with_prefix,
    )
    blocks = []
    for output in outputs:
        spatial, prefix = output if with_prefix else (output, None)
        spatial = spatial.permute(0, 2, 3, 1)
        cls = prefix[:, 0] if prefix is not None and has_class_token(model) else spatial.mean(dim=(1, 2))
        blocks.append((spatial, cls))
    return blocks


def last_layer_indices(depth: int, layers: int) -> list[int]:
    """The last ``layers`` blocks (linseg's Linear 1 / Linear 4)."""
    if layers > depth:
        raise ValueError(f"{layers} layers asked of a backbone with {depth} blocks")
    return list(range(depth - layers, depth))


def depth_layer_indices(depth: int, layers: int) -> list[int]:
    """Blocks of DINOv2's depth heads: the last one (Linear 1), or four spread ones (Linear 4: DINOv2's table
    for 12, 24 and 40 blocks, else the ends of four equal quarters)."""
    if layers == 1:
        return [depth - 1]
    if layers > depth:
        raise ValueError(f"{layers} layers asked of a backbone with {depth} blocks")
    return list(DINOV2_DEPTH_LAYERS.get(depth, [round((i + 1) * depth / layers) - 1 for i in range(layers)]))


def patch_token_encoder(model: nn.Module, layers: int = 1, precision: str = "fp32") -> Encoder:
    """``[B, 3, H, W]`` -> final-normed patch tokens of the last ``layers`` blocks, ``[B, H/p, W/p, layers·D]``."""
    run = _runner(model, precision)
    indices = last_layer_indices(len(model.blocks), layers)

    def encode(images: torch.Tensor) -> torch.Tensor:
        if layers == 1:
            return run(lambda x: patch_grid(model, model.forward_features(x), tuple(x.shape[-2:])), images).float()
        blocks = run(lambda x: _blocks(model, x, indices, norm=True), images)
        return torch.cat([spatial for spatial, _ in blocks], dim=-1).float()

    return Encoder(encode, _patch(model), normalization_of(model))


def depth_token_encoder(model: nn.Module, layers: int = 1, precision: str = "fp32") -> Encoder:
    """``[B, 3, H, W]`` -> ``[B, H/p, W/p, 2·layers·D]``: raw patch tokens, each beside its block's class token."""
    run = _runner(model, precision)
    indices = depth_layer_indices(len(model.blocks), layers)

    def encode(images: torch.Tensor) -> torch.Tensor:
        blocks = run(lambda x: _blocks(model, x, indices, norm=False), images)
        parts = []
        for spatial, cls in blocks:
            parts += [spatial, cls[:, None, None, :].expand_as(spatial)]
        return torch.cat(parts, dim=-1).float()

    return Encoder(encode, _patch(model), normalization_of(model))
