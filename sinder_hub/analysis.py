"""Singular defect directions from the weights alone (paper §3, eq. 1–4).

Each transformer block is linearised for a single token:

- attention block (eq. 1): ``A = diag(ls1) · W_proj · W_v · diag(norm1.weight) · P``
- MLP block (eq. 2):       ``C = diag(ls2) · W_fc2 · C2 · diag(norm2.weight) · P``
- whole layer (eq. 3):     ``E = (I + C)(I + A)``
- composition (eq. 4):     ``G_i = E_i · … · E_0``

with ``P = I - 11ᵀ/D`` the layer-norm centering and ``C2`` a linear stand-in for
the MLP's non-linear hidden layer. The singular defect direction of layer ``i`` is the
leading left singular vector of ``G_i``. Biases are left out, as in the authors' code.

``C2`` comes in two flavours:

- ``method="sampled"`` (the authors'): least squares ``C2 X ≈ hidden(X)`` on
  ``samples`` standard-normal inputs, no bias column. Solved through the D×D normal
  equations accumulated in float64 over chunks, so memory stays ``O(chunk · M)``.
- ``method="expected"`` (ours): the population least-squares map. For ``x ~ N(0, I)``,
  ``E[x xᵀ] = I`` and Stein's lemma gives ``E[x hidden(x)ᵀ] = E[∇ hidden(x)]ᵀ``, which
  for ``act(w·x + b)`` and ``act(u·x + h1) · (v·x + h2)`` reduces to one-dimensional
  Gaussian expectations per hidden unit, computed by Gauss–Hermite quadrature.
  The sampled map converges to it as the sample count grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from timm.layers import GluMlp, Mlp
from torch import nn

METHODS = ("sampled", "expected")


@dataclass
class BlockMaps:
    """Linear stand-ins of one block, all ``[D, D]`` float64 (identity not included in A, C)."""

    A: torch.Tensor
    C: torch.Tensor
    E: torch.Tensor


def _diag_weight(module: nn.Module, name: str, dim: int, like: torch.Tensor) -> torch.Tensor:
    """The per-channel scale of a LayerScale / LayerNorm (ones when it has none)."""
    weight = getattr(module, name, None)
    if weight is None:
        return torch.ones(dim, dtype=like.dtype, device=like.device)
    return weight.detach().to(like)


def _centering(dim: int, like: torch.Tensor) -> torch.Tensor:
    """Layer-norm centering ``P = I - 11ᵀ/D``."""
    eye = torch.eye(dim, dtype=like.dtype, device=like.device)
    return eye - 1.0 / dim


def _check_block(index: int, block: nn.Module) -> None:
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    if attn is None or not isinstance(getattr(attn, "qkv", None), nn.Linear):
        raise ValueError(f"block {index}: expected a timm Attention with a fused `qkv` nn.Linear, got {type(attn).__name__}")
    if not isinstance(mlp, (Mlp, GluMlp)):
        raise ValueError(f"block {index}: expected a timm Mlp (GELU) or GluMlp/SwiGLUPacked MLP, got {type(mlp).__name__}")
    if not isinstance(mlp.norm, nn.Identity):
        raise ValueError(f"block {index}: MLPs with an inner norm ({type(mlp.norm).__name__}) are not supported")


def _mlp_hidden(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP's non-linear hidden layer: ``[n, D]`` -> ``[n, M]`` (fc1 bias included)."""
    h = mlp.fc1(x)
    if isinstance(mlp, GluMlp):
        x1, x2 = h.chunk(2, dim=-1)
        return x1 * mlp.act(x2) if mlp.gate_last else mlp.act(x1) * x2
    return mlp.act(h)


def _sampled_hidden_map(mlp: nn.Module, dim: int, samples: int, generator: torch.Generator, chunk: int = 8192) -> torch.Tensor:
    """Least squares ``C2 X ≈ hidden(X)`` on standard-normal ``X``: ``[M, D]`` float64."""
    device = mlp.fc1.weight.device
    xtx = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    xty = None
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        x = torch.randn(n, dim, generator=generator, dtype=torch.float32, device=generator.device).to(device)
        y = _mlp_hidden(mlp, x)
        xtx += (x.T @ x).double()
        xty_chunk = (x.T @ y).double()
        xty = xty_chunk if xty is None else xty + xty_chunk
    return torch.linalg.solve(xtx, xty).T


def _gaussian_expectations(act: nn.Module, mean: torch.Tensor, std: torch.Tensor, nodes: int = 96):
    """``E[act(a)]``, ``E[act'(a)]`` and ``E[act'(a) · (a - mean)]`` for ``a ~ N(mean, std²)``, per unit."""
    t, w = np.polynomial.hermite_e.hermegauss(nodes)
    t = torch.as_tensor(t, dtype=torch.float64, device=mean.device)
    w = torch.as_tensor(w / math.sqrt(2 * math.pi), dtype=torch.float64, device=mean.device)
    offset = std[:, None] * t[None, :]
    a = (mean[:, None] + offset).requires_grad_(True)
    with torch.enable_grad():
        value = act(a)
        (slope,) = torch.autograd.grad(value.sum(), a)
    value = value.detach()
    return value @ w, slope @ w, (slope * offset) @ w


def _expected_hidden_map(mlp: nn.Module) -> torch.Tensor:
    """Population least-squares map ``E[∇ hidden(x)]`` for ``x ~ N(0, I)``: ``[M, D]`` float64."""
    weight = mlp.fc1.weight.detach().double()
    bias = mlp.fc1.bias.detach().double() if mlp.fc1.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    if not isinstance(mlp, GluMlp):
        std = weight.norm(dim=1)
        _, mean_slope, _ = _gaussian_expectations(mlp.act, bias, std)
        return mean_slope[:, None] * weight
    (w1, w2), (b1, b2) = weight.chunk(2, dim=0), bias.chunk(2, dim=0)
    (u, h1, v, h2) = (w2, b2, w1, b1) if mlp.gate_last else (w1, b1, w2, b2)
    # hidden = act(a) · c with a = u·x + h1 (gate), c = v·x + h2; E[c | a] = h2 + β (a - h1)
    var_a = (u * u).sum(dim=1)
    beta = (u * v).sum(dim=1) / var_a.clamp_min(torch.finfo(torch.float64).tiny)
    mean_act, mean_slope, slope_times_offset = _gaussian_expectations(mlp.act, h1, var_a.sqrt())
    gate_coef = mean_slope * h2 + beta * slope_times_offset  # E[act'(a) · c]
    return gate_coef[:, None] * u + mean_act[:, None] * v


@torch.no_grad()
def block_linear_maps(
    model: nn.Module,
    method: str = "sampled",
    samples: int = 100_000,
    generator: torch.Generator | None = None,
) -> list[BlockMaps]:
    """Linearise every block of a timm ViT (eq. 1–3): ``depth`` x ``BlockMaps`` of ``[D, D]`` maps."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if generator is None:  # on the weights' device: drawing 100k x D normals on the CPU would dominate on a GPU
        generator = torch.Generator(device=model.blocks[0].attn.qkv.weight.device).manual_seed(0)
    maps = []
    for index, block in enumerate(model.blocks):
        _check_block(index, block)
        qkv = block.attn.qkv.weight.detach().double()
        dim = qkv.shape[1]
        P = _centering(dim, qkv)
        eye = torch.eye(dim, dtype=qkv.dtype, device=qkv.device)
        W_v = qkv[2 * dim:]
        W_proj = block.attn.proj.weight.detach().double()
        ls1 = _diag_weight(block.ls1, "gamma", dim, qkv)
        ls2 = _diag_weight(block.ls2, "gamma", dim, qkv)
        n1 = _diag_weight(block.norm1, "weight", dim, qkv)
        n2 = _diag_weight(block.norm2, "weight", dim, qkv)
        A = ls1[:, None] * (W_proj @ W_v) * n1[None, :] @ P  # eq. 1
        if method == "sampled":
            C2 = _sampled_hidden_map(block.mlp, dim, samples, generator)
        else:
            C2 = _expected_hidden_map(block.mlp)
        W_fc2 = block.mlp.fc2.weight.detach().double()
        C = ls2[:, None] * (W_fc2 @ C2) * n2[None, :] @ P  # eq. 2
        E = (eye + C) @ (eye + A)  # eq. 3
        maps.append(BlockMaps(A=A, C=C, E=E))
    return maps


def _top_eigenvector(gram: torch.Tensor) -> torch.Tensor:
    """Eigenvector of the largest eigenvalue of a symmetric ``[D, D]`` matrix: LAPACK's MRRR
    for that pair alone on a CPU, a full ``eigh`` on a GPU (where it is fast)."""
    if gram.is_cuda:
        return torch.linalg.eigh(gram)[1][:, -1]
    D = gram.shape[0]
    _, vec = scipy.linalg.eigh(gram.cpu().numpy(), subset_by_index=[D - 1, D - 1], driver="evr")
    return torch.from_numpy(vec[:, 0]).to(gram)


def leading_left_singular_vector(
    M: torch.Tensor, init: torch.Tensor | None = None, rank: int = 8, tol: float = 1e-10, max_iter: int = 15
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading left singular vector of ``M [D, D]``: ``(u [D], basis [D, rank])``.

    Subspace iteration on ``M Mᵀ`` with ``rank`` vectors and Rayleigh–Ritz, warm-started
    from ``init`` (the previous block's ``basis``). When the top singular values are too
    close for it to converge in ``max_iter`` steps (relative residual above ``tol``, as in
    early blocks), the top eigenpair of ``M Mᵀ`` is computed exactly. The sign is fixed so that the largest entry is positive.
    """
    D = M.shape[0]
    rank = min(rank, D)
    if init is None:
        gen = torch.Generator().manual_seed(0)
        init = torch.randn(D, rank, generator=gen, dtype=torch.float64)
    basis, _ = torch.linalg.qr(init.to(M))
    for _ in range(max_iter):
        basis, _ = torch.linalg.qr(M @ (M.T @ basis))
        projected = M.T @ basis
        values, vecs = np.linalg.eigh((projected.T @ projected).cpu().numpy())
        basis = basis @ torch.from_numpy(vecs[:, ::-1].copy()).to(basis)
        u, top = basis[:, 0], float(values[-1])
        residual = M @ (M.T @ u) - top * u
        if residual.norm() <= tol * top:
            break
    else:
        u = _top_eigenvector(M @ M.T)
        basis = torch.cat([u[:, None], basis[:, 1:]], dim=1)
    u = u / u.norm()
    return u * torch.sign(u[u.abs().argmax()]), basis


@torch.no_grad()
def singular_defect_directions(
    model: nn.Module,
    samples: int = 100_000,
    generator: torch.Generator | None = None,
    method: str = "sampled",
) -> torch.Tensor:
    """Singular defect direction of every block (eq. 4): ``[depth, D]`` float32 unit rows.

    ``method="sampled"`` reproduces the authors' least-squares linearisation of the MLP
    (seeded by ``generator``, default: seed 0 on the weights' device, so a CPU and a GPU
    draw different samples); ``method="expected"`` uses its
    noise-free population limit.
    """
    maps = block_linear_maps(model, method=method, samples=samples, generator=generator)
    G = torch.eye(maps[0].E.shape[0], dtype=torch.float64, device=maps[0].E.device)
    directions, basis = [], None
    for block_maps in maps:
        G = block_maps.E @ G
        G = G / G.norm()  # the scale of G_i is irrelevant to its singular vectors
        u, basis = leading_left_singular_vector(G, init=basis)
        directions.append(u)
    return torch.stack(directions).float()
