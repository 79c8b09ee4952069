"""Defect statistics of a ViT's patch tokens (paper §2 and Fig. 2d).

Angles are in degrees, with two conventions:

- between tokens (the paper's pairwise angles): the plain angle ``arccos(cos)`` in
  ``[0, 180]``;
- to a direction (singular or empirical): the acute angle ``arccos(|cos|)`` in
  ``[0, 90]``, because a direction's sign is arbitrary.

Defects are found with ``defects.defect_mask`` (eq. 5: ``|cos|`` outliers beyond
``mask_thr`` standard deviations, never on the grid border). "Normal" tokens are all
other patch tokens of the grid, the border included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .analysis import singular_defect_directions
from .defects import defect_mask
from .tokens import block_outputs, patch_grid


def json_safe(value):
    """``value`` with every NaN or infinite float replaced by ``None`` (lists, tuples and dicts walked), so that
    ``json.dumps(..., allow_nan=False)`` accepts it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def _degrees(cosine: torch.Tensor) -> torch.Tensor:
    return torch.rad2deg(torch.arccos(cosine.clamp(-1.0, 1.0)))


def pairwise_angles(vectors: torch.Tensor) -> torch.Tensor:
    """Plain angles in ``[0, 180]`` between all distinct pairs of ``[n, D]`` vectors: ``[n (n - 1) / 2]``."""
    unit = F.normalize(vectors.double(), dim=-1)
    rows, cols = torch.triu_indices(len(unit), len(unit), offset=1)
    return _degrees((unit @ unit.T)[rows, cols])


def mean_pairwise_angle(vectors: torch.Tensor) -> float | None:
    """Mean plain angle (``[0, 180]``) over distinct pairs of ``[n, D]`` vectors; ``None`` when ``n < 2``."""
    if len(vectors) < 2:
        return None
    return float(pairwise_angles(vectors).mean())


def angle_to_direction(tokens: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Acute angle (``[0, 90]``, sign-invariant) between ``[..., D]`` tokens and a ``[D]`` direction: ``[...]``."""
    cosine = F.normalize(tokens.double(), dim=-1) @ F.normalize(direction.double().to(tokens.device), dim=0)
    return _degrees(cosine.abs())


def _mean_or_none(values: torch.Tensor) -> float | None:
    return float(values.mean()) if values.numel() else None


def _grid_statistics(grid: torch.Tensor, mask: torch.Tensor) -> dict:
    norms = grid.norm(dim=-1)
    return {
        "defects": int(mask.sum()),
        "norm_defective": _mean_or_none(norms[mask]),
        "norm_normal": _mean_or_none(norms[~mask]),
        "within_angle": mean_pairwise_angle(grid[mask]),
        "all_tokens_angle": mean_pairwise_angle(grid.flatten(0, 1)),
    }


def block_statistics(grid: torch.Tensor, direction: torch.Tensor, mask_thr: float = 4.0, kernel: int = 3) -> dict:
    """Statistics of one ``[H, W, D]`` grid against a ``[D]`` direction.

    Returns ``defects`` (count), ``norm_defective`` / ``norm_normal`` (mean token norms,
    ``None`` when empty), ``within_angle`` (mean pairwise angle among the defects, ``None``
    with fewer than two) and ``all_tokens_angle`` (mean pairwise angle among all patch
    tokens, the paper's 72.8° reference).
    """
    mask, _ = defect_mask(grid, direction, mask_thr=mask_thr, kernel=kernel)
    return _grid_statistics(grid, mask)


@torch.inference_mode()
def last_block_grids(model: nn.Module, images: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Raw tokens after the last block, per image: ``{name: [3, h, w]}`` -> ``{name: [H, W, D]}``."""
    device = next(model.parameters()).device
    grids = {}
    for name, image in images.items():
        tokens = block_outputs(model, image[None].to(device))[-1][0]
        grids[name] = patch_grid(model, tokens, tuple(image.shape[-2:])).float().cpu()
    return grids


@dataclass
class _ImageResult:
    """One image at one block: defect ``mask [H, W]``, ``_grid_statistics``, ``defect_tokens [n, D]``, ``angles [H * W]``."""

    name: str
    mask: torch.Tensor
    stats: dict
    defect_tokens: torch.Tensor
    angles: torch.Tensor


@torch.inference_mode()
def defect_report(
    model: nn.Module,
    images: dict[str, torch.Tensor],
    directions: torch.Tensor | None = None,
    mask_thr: float = 4.0,
    kernel: int = 3,
) -> dict:
    """Per-block defect statistics of ``model`` on normalised ``{name: [3, h, w]}`` images (JSON-ready).

    ``directions`` ``[depth, D]`` are the singular defect directions (default: computed
    with ``singular_defect_directions(model)``, the authors' sampled method, seed 0).
    Returns ``{"images", "grid": {name: [H, W]}, "mask_thr", "kernel", "depth", "dim",
    "blocks": [...]}`` where each block entry holds:

    - ``defects`` ``{name: count}`` and ``defects_per_image``;
    - ``norm_defective`` / ``norm_normal``: mean token norms pooled over all images;
    - ``within_angle``: mean over images (with >= 2 defects) of the mean pairwise angle
      among that image's defects; ``all_tokens_angle``: the same over all patch tokens;
    - ``between_angle``: mean pairwise angle between the images' mean defect tokens;
    - ``empirical_direction`` ``[D]``: mean of all defective tokens, normalised, and
      ``angle_singular_empirical``: its acute angle to the singular direction;
    - ``token_angles`` ``{name: [H * W]}`` (row-major): every patch token's acute angle to
      the singular direction; ``defect_positions`` ``{name: [[row, col], ...]}``.

    Entries that need defects are ``None`` where there are none; so is any figure that is not finite
    (``json_safe``).
    """
    if not images:
        raise ValueError("defect_report needs at least one image")
    if directions is None:
        directions = singular_defect_directions(model)
    depth = len(model.blocks)
    if directions.shape[0] != depth:
        raise ValueError(f"got {directions.shape[0]} directions for a model of {depth} blocks")
    device = next(model.parameters()).device
    per_block: list[list[_ImageResult]] = [[] for _ in range(depth)]
    grids = {}
    for name, image in images.items():
        image_hw = tuple(image.shape[-2:])
        outputs = block_outputs(model, image[None].to(device))
        for index, tokens in enumerate(outputs):
            grid = patch_grid(model, tokens[0], image_hw).float().cpu()
            grids[name] = list(grid.shape[:2])
            direction = directions[index].float().cpu()
            mask, _ = defect_mask(grid, direction, mask_thr=mask_thr, kernel=kernel)
            angles = angle_to_direction(grid, direction).flatten()
            per_block[index].append(_ImageResult(name, mask, _grid_statistics(grid, mask), grid[mask], angles))
    blocks = [_block_entry(index, entries, directions[index]) for index, entries in enumerate(per_block)]
    return json_safe(
        {
            "images": list(images),
            "grid": grids,
            "mask_thr": mask_thr,
            "kernel": kernel,
            "depth": depth,
            "dim": int(directions.shape[1]),
            "blocks": blocks,
        }
    )


def _block_entry(index: int, results: list[_ImageResult], direction: torch.Tensor) -> dict:
    """Pool one block's per-image results (see ``defect_report``)."""
    defect_tokens = torch.cat([r.defect_tokens for r in results])
    normal_counts = [int((~r.mask).sum()) for r in results]
    normal_norm_sum = sum(r.stats["norm_normal"] * n for r, n in zip(results, normal_counts) if n)
    within = [r.stats["within_angle"] for r in results if r.stats["within_angle"] is not None]
    all_tokens = [r.stats["all_tokens_angle"] for r in results if r.stats["all_tokens_angle"] is not None]
    image_means = [r.defect_tokens.mean(dim=0) for r in results if len(r.defect_tokens)]
    empirical = F.normalize(defect_tokens.double().mean(dim=0), dim=0) if len(defect_tokens) else None
    return {
        "block": index,
        "defects": {r.name: r.stats["defects"] for r in results},
        "defects_per_image": len(defect_tokens) / len(results),
        "norm_defective": _mean_or_none(defect_tokens.norm(dim=-1)),
        "norm_normal": normal_norm_sum / sum(normal_counts) if sum(normal_counts) else None,
        "within_angle": sum(within) / len(within) if within else None,
        "between_angle": mean_pairwise_angle(torch.stack(image_means)) if image_means else None,
        "all_tokens_angle": sum(all_tokens) / len(all_tokens) if all_tokens else None,
        "empirical_direction": empirical.float().tolist() if empirical is not None else None,
        "angle_singular_empirical": float(angle_to_direction(empirical, direction)) if empirical is not None else None,
        "token_angles": {r.name: [round(a, 3) for a in r.angles.tolist()] for r in results},
        "defect_positions": {r.name: r.mask.nonzero().tolist() for r in results},
    }
