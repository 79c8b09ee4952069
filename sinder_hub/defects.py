"""Finding defective tokens and the neighbour loss that repairs them (paper §4.1, eq. 5–8).

All functions take one image's patch tokens as an ``[H, W, D]`` grid (class and
register tokens already removed) and a block's singular defect direction ``[D]``.
Constants and details follow the authors' implementation (REFERENCE-NOTES):

- logit ``l_t = -|x̂_t · ν̂|`` (eq. 5 with a minus sign), defects are tokens whose logit
  is below ``mean - mask_thr · std`` over the grid (``std`` unbiased, as ``torch.std``);
  tokens within ``kernel // 2`` of the grid border are never defects;
- neighbour weights ``softmax(l / τ)`` over the ``kernel x kernel`` window (centre
  included), times a Gaussian kernel, renormalised (eq. 6); targets are the weighted
  means of the window (eq. 7); weights and targets carry no gradient;
- loss = mean over defects of ``‖x_t − x̃_t‖₂`` divided by ``α``, the mean token norm
  over the grid's interior, also without gradient (eq. 8; the paper omits ``α``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The authors' Gaussian windows (REFERENCE-NOTES): 3x3 is the outer product of [1, 2, 1];
# 5x5 is the standard table with centre 41 (NOT the outer product of [1, 4, 7, 4, 1]).
GAUSSIAN_KERNELS = {
    3: torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]),
    5: torch.tensor(
        [
            [1.0, 4.0, 7.0, 4.0, 1.0],
            [4.0, 16.0, 26.0, 16.0, 4.0],
            [7.0, 26.0, 41.0, 26.0, 7.0],
            [4.0, 16.0, 26.0, 16.0, 4.0],
            [1.0, 4.0, 7.0, 4.0, 1.0],
        ]
    ),
}


def gaussian_kernel(kernel: int) -> torch.Tensor:
    """The authors' Gaussian window normalised to sum 1 (3: /16, 5: /273): ``[kernel, kernel]``."""
    if kernel not in GAUSSIAN_KERNELS:
        raise ValueError(f"kernel must be one of {sorted(GAUSSIAN_KERNELS)}, got {kernel}")
    window = GAUSSIAN_KERNELS[kernel]
    return window / window.sum()


def _check_grid(tokens: torch.Tensor, direction: torch.Tensor) -> None:
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be an [H, W, D] grid, got shape {tuple(tokens.shape)}")
    if direction.shape != tokens.shape[-1:]:
        raise ValueError(
            f"direction must have shape [{tokens.shape[-1]}] to match the tokens, got {tuple(direction.shape)}"
        )


def defect_logits(tokens: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Eq. 5 with the authors' sign: ``-|x̂_t · ν̂|`` for ``[H, W, D]`` tokens -> ``[H, W]``."""
    _check_grid(tokens, direction)
    cosine = F.normalize(tokens, dim=-1) @ F.normalize(direction.to(tokens), dim=0)
    return -cosine.abs()


def defect_mask(
    tokens: torch.Tensor, direction: torch.Tensor, mask_thr: float = 4.0, kernel: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Defective tokens of one grid (eq. 5): ``(mask [H, W] bool, logits [H, W])``."""
    with torch.no_grad():
        logits = defect_logits(tokens, direction)
        mask = logits < logits.mean() - mask_thr * logits.std()
        border = kernel // 2
        if border:
            interior = torch.zeros_like(mask)
            interior[border:-border, border:-border] = True
            mask &= interior
    return mask, logits


@dataclass
class NeighborLoss:
    """Eq. 8 for one grid. ``loss`` is differentiable w.r.t. the tokens, the rest is constant."""

    loss: torch.Tensor  # [] scalar
    mask: torch.Tensor  # [H, W] bool, the defective tokens
    targets: torch.Tensor  # [n_defects, D], eq. 7, in mask order (row-major)
    alpha: torch.Tensor  # [] mean token norm of the grid's interior


def neighbor_targets(
    tokens: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor, kernel: int = 3, temperature: float = 0.1
) -> torch.Tensor:
    """Weighted neighbour means of the defective tokens (eq. 6–7): ``[n_defects, D]``."""
    H, W, D = tokens.shape
    pad = kernel // 2
    rows, cols = mask.nonzero(as_tuple=True)
    offsets = torch.arange(-pad, pad + 1, device=tokens.device)
    win_r = (rows[:, None, None] + offsets[None, :, None]).expand(-1, kernel, kernel)
    win_c = (cols[:, None, None] + offsets[None, None, :]).expand(-1, kernel, kernel)
    weights = torch.softmax(logits[win_r, win_c].flatten(1) / temperature, dim=1)  # eq. 6
    weights = weights * gaussian_kernel(kernel).to(weights).flatten()[None, :]
    weights = weights / weights.sum(dim=1, keepdim=True)
    neighbours = tokens[win_r, win_c].flatten(1, 2)  # [n, k*k, D]
    return torch.einsum("nk,nkd->nd", weights, neighbours)  # eq. 7


def neighbor_loss(
    tokens: torch.Tensor,
    direction: torch.Tensor,
    mask_thr: float = 4.0,
    kernel: int = 3,
    temperature: float = 0.1,
) -> NeighborLoss | None:
    """The neighbour loss of one ``[H, W, D]`` grid (eq. 5–8), or ``None`` with no defects."""
    mask, logits = defect_mask(tokens, direction, mask_thr=mask_thr, kernel=kernel)
    if not bool(mask.any()):
        return None
    with torch.no_grad():
        targets = neighbor_targets(tokens.detach(), logits, mask, kernel=kernel, temperature=temperature)
        pad = kernel // 2
        interior = tokens.detach()[pad : tokens.shape[0] - pad, pad : tokens.shape[1] - pad]
        alpha = interior.norm(dim=-1).mean()
    distances = (tokens[mask] - targets).norm(dim=-1)
    return NeighborLoss(loss=distances.mean() / alpha, mask=mask, targets=targets, alpha=alpha)
