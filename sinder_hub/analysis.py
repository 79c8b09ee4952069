"""Singular defect directions from the weights alone (paper §3, eq. 1–4).

Each transformer block is linearised for a single token:

- attention block (eq. 1): ``A = diag(ls1) · W_proj · W_v · diag(norm1.weight) · P``
- MLP block (eq. 2):       ``C = diag(ls2) · W_fc2 · C2 · diag(norm2.weight) · P``
- whole layer (eq. 3):     ``E = (I + C)(I + A)``
- composition (eq. 4):     ``G_i = E_i · … · E_0``

with ``P = I - 11ᵀ/D`` the layer-norm centering (``P = I`` for an RMSNorm) and ``C2`` a
linear stand-in for the MLP's non-linear hidden layer. The singular defect direction of
layer ``i`` is the leading left singular vector of ``G_i``. Biases are left out, as in the
authors' code. A missing layer scale is the identity. Which tensors play these roles in
each block family (DINOv2, DeiT-III, CLIP, SigLIP, DINOv3, EVA02) is read by
``sinder_hub.families.describe_model``.

``W_fc2 · C2`` comes in two flavours:

- ``method="sampled"`` (the authors'): least squares ``M X ≈ mlp(X) - b_fc2`` on
  ``samples`` standard-normal inputs, no bias column, through the block's own MLP module
  (so every activation, gate and inner norm is what the block computes). Since ``fc2`` is
  linear this is ``W_fc2`` times the authors' fit of the hidden layer. Solved through the
  D×D normal equations accumulated in float64 over chunks, so memory stays
  ``O(chunk · M)``.
- ``method="expected"`` (ours): the population least-squares map. For ``x ~ N(0, I)``,
  ``E[x xᵀ] = I`` and Stein's lemma gives ``E[x hidden(x)ᵀ] = E[∇ hidden(x)]ᵀ``, which
  for ``act(w·x + b)`` and ``act(u·x + h1) · (v·x + h2)`` (packed or split SwiGLU)
  reduces to one-dimensional Gaussian expectations per hidden unit, computed by
  Gauss–Hermite quadrature. An MLP with an inner norm has no such form: ``BackboneError``.
  The sampled map converges to it as the sample count grows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.linalg
import torch
from torch import nn

from .anatomy import BlockDescription, Norm, describe_model, get_path
from .errors import BackboneError
from .singular_values import SingularValueLinear

METHODS = ("sampled", "expected")


@dataclass
class BlockMaps:
    """Linear stand-ins of one block, all ``[D, D]`` float64 (identity not included in A, C)."""

    A: torch.Tensor
    C: torch.Tensor
    E: torch.Tensor


def _weight(layer: nn.Module) -> torch.Tensor:
    """A linear layer's current weight ``[out, in]`` as float64 (``W(ε)`` in singular-value form)."""
    weight = layer.current_weight() if isinstance(layer, SingularValueLinear) else layer.weight
    return weight.detach().double()


def _bias(layer: nn.Module) -> torch.Tensor:
    """A linear layer's bias ``[out]`` as float64 (zeros without one)."""
    if layer.bias is None:
        return torch.zeros(layer.weight.shape[0], dtype=torch.float64, device=layer.weight.device)
    return layer.bias.detach().double()


def _scale(block: nn.Module, path: str | None, dim: int, like: torch.Tensor) -> torch.Tensor:
    """The ``[D]`` layer scale at ``path`` (ones when the block has none)."""
    if path is None:
        return torch.ones(dim, dtype=like.dtype, device=like.device)
    return get_path(block, path).detach().to(like)


def _norm_map(block: nn.Module, norm: Norm, dim: int, like: torch.Tensor) -> torch.Tensor:
    """``diag(norm.weight) · P`` of a pre-norm: ``[D, D]`` (``P`` the centering for a LayerNorm, else ``I``)."""
    weight = getattr(block, norm.path).weight
    weight = torch.ones(dim, dtype=like.dtype, device=like.device) if weight is None else weight.detach().to(like)
    eye = torch.eye(dim, dtype=like.dtype, device=like.device)
    P = eye - 1.0 / dim if norm.centred else eye
    return weight[:, None] * P


def _sampled_mlp_map(
    block: nn.Module, described: BlockDescription, dim: int, samples: int, generator: torch.Generator, chunk: int = 8192
) -> torch.Tensor:
    """Least squares ``M X ≈ mlp(X) - b_fc2`` on standard-normal ``X [n, D]``: ``M [D, D]`` float64."""
    mlp, fc2 = get_path(block, described.mlp), get_path(block, described.mlp_output)
    device, dtype = fc2.weight.device, fc2.weight.dtype
    xtx = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    xty = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        x = torch.randn(n, dim, generator=generator, dtype=torch.float32, device=generator.device).to(device, dtype)
        y = mlp(x)
        if fc2.bias is not None:
            y = y - fc2.bias
        xtx += (x.T @ x).double()
        xty += (x.T @ y).double()
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


def _expected_hidden_map(block: nn.Module, described: BlockDescription) -> torch.Tensor:
    """Population least-squares map of the hidden layer, ``E[∇ hidden(x)]`` for ``x ~ N(0, I)``: ``[M, D]`` float64."""
    mlp = get_path(block, described.mlp)
    layers = [get_path(block, path) for path in described.mlp_inputs]
    weight, bias = torch.cat([_weight(layer) for layer in layers]), torch.cat([_bias(layer) for layer in layers])
    if not described.mlp_gated:
        _, mean_slope, _ = _gaussian_expectations(mlp.act, bias, weight.norm(dim=1))
        return mean_slope[:, None] * weight
    (u, v), (h1, h2) = weight.chunk(2, dim=0), bias.chunk(2, dim=0)
    # hidden = act(a) · c with a = u·x + h1 (gate), c = v·x + h2; E[c | a] = h2 + β (a - h1)
    var_a = (u * u).sum(dim=1)
    beta = (u * v).sum(dim=1) / var_a.clamp_min(torch.finfo(torch.float64).tiny)
    mean_act, mean_slope, slope_times_offset = _gaussian_expectations(mlp.act, h1, var_a.sqrt())
    gate_coef = mean_slope * h2 + beta * slope_times_offset  # E[act'(a) · c]
    return gate_coef[:, None] * u + mean_act[:, None] * v


def _expected_mlp_map(block: nn.Module, described: BlockDescription, where: str) -> torch.Tensor:
    """``W_fc2 · E[∇ hidden(x)]``: ``[D, D]`` float64; ``BackboneError`` for an MLP with an inner norm."""
    if not described.expected_supported:
        norm = type(get_path(block, described.mlp).norm).__name__
        raise BackboneError(
            f"{where}.mlp: method='expected' needs an MLP whose hidden layer is elementwise or a gate "
            f"(1-D Gaussian expectations); this {described.mlp_kind} MLP has an inner {norm}: use method='sampled'"
        )
    return _weight(get_path(block, described.mlp_output)) @ _expected_hidden_map(block, described)


@torch.no_grad()
def block_linear_maps(
    model: nn.Module,
    method: str = "sampled",
    samples: int = 100_000,
    generator: torch.Generator | None = None,
) -> list[BlockMaps]:
    """Linearise every block of a timm ViT or Eva (eq. 1–3): ``depth`` x ``BlockMaps`` of ``[D, D]`` maps.

    Raises ``BackboneError`` for a block that ``families.describe_block`` does not support, or for
    ``method="expected"`` on an MLP with an inner norm.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    described = describe_model(model)
    if generator is None:  # on the weights' device: drawing 100k x D normals on the CPU would dominate on a GPU
        device = get_path(model.blocks[0], described.blocks[0].proj).weight.device
        generator = torch.Generator(device=device).manual_seed(0)
    maps = []
    for index, (block, layout) in enumerate(zip(model.blocks, described.blocks)):
        start, stop = layout.value_rows
        W_v = _weight(get_path(block, layout.value))[start:stop]
        W_proj = _weight(get_path(block, layout.proj))
        dim = W_proj.shape[0]
        eye = torch.eye(dim, dtype=W_proj.dtype, device=W_proj.device)
        ls1 = _scale(block, layout.layer_scale1, dim, W_proj)
        ls2 = _scale(block, layout.layer_scale2, dim, W_proj)
        A = ls1[:, None] * (W_proj @ W_v) @ _norm_map(block, layout.norm1, dim, W_proj)  # eq. 1
        if method == "sampled":
            mlp_map = _sampled_mlp_map(block, layout, dim, samples, generator)
        else:
            mlp_map = _expected_mlp_map(block, layout, f"blocks.{index}")
        C = ls2[:, None] * mlp_map @ _norm_map(block, layout.norm2, dim, W_proj)  # eq. 2
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


class LeadingSingularVector(NamedTuple):
    """What ``leading_left_singular_vector`` found, and how."""

    vector: torch.Tensor  # [D] unit, largest-magnitude entry positive
    steps: int  # Lanczos steps taken, each one product with M Mᵀ
    fallback: bool  # True when Lanczos did not pass its residual check and a dense eigh gave the vector


CHECK_EVERY = 8  # Lanczos steps between convergence checks, each one host-device synchronisation


def _ritz_pair(alpha: np.ndarray, beta: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    """Largest eigenpair ``(θ, y [k])`` of the Lanczos tridiagonal ``T_k`` (diagonal ``alpha``, off-diagonal
    ``beta``)."""
    values, vectors = scipy.linalg.eigh_tridiagonal(alpha[:k], beta[: k - 1], select="i", select_range=(k - 1, k - 1))
    return float(values[0]), vectors[:, 0]


@torch.no_grad()
def leading_left_singular_vector(
    M: torch.Tensor, init: torch.Tensor | None = None, tol: float = 1e-13, max_steps: int = 256
) -> LeadingSingularVector:
    """Leading left singular vector of ``M [D, D]``: the top eigenvector of ``M Mᵀ``.

    Lanczos on ``M Mᵀ``, applied as ``M (Mᵀ q)``, with full reorthogonalisation (classical
    Gram–Schmidt, twice). It starts from a fixed random vector plus ``init [D]`` (the previous
    block's vector) when given: the random half gives the start a component along every
    eigenvector, so a warm start that is an eigenvector of a lower eigenvalue cannot trap it
    there. A step is two mat-vecs with ``M`` and four with the basis, no host-device
    synchronisation. Every
    ``CHECK_EVERY`` steps the top Ritz pair of the tridiagonal ``T_k`` is computed on the host;
    once its Lanczos residual is small, the float64 residual is checked explicitly:

        ‖M Mᵀ u − λ u‖ ≤ tol · λ,  λ = ‖Mᵀ u‖².

    Then an eigenvalue of ``M Mᵀ`` lies within ``tol · λ`` of ``λ`` and, by the sin θ theorem,
    ``sin ∠(u, u₁) ≤ tol · λ / (λ − λ₂) ≈ tol / (1 − σ₂² / σ₁²)``: with the default ``1e-13``,
    at most 5e-8 rad where the top two singular values are 1e-6 apart (relative), 5e-7 rad
    at 1e-7. Where nothing passes within ``max_steps`` steps (a near-degenerate top pair),
    the top eigenpair of ``M Mᵀ`` is computed densely (``fallback``). The sign is fixed so
    that the largest entry is positive.
    """
    D = M.shape[0]
    n = min(max_steps, D)
    x = torch.randn(D, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(M)
    x = x / x.norm()
    if init is not None:
        x = x + init.to(M) / init.norm()
    Q = M.new_zeros(n + 1, D)  # Lanczos vectors q_0 … q_n as rows
    alpha, beta = M.new_zeros(n), M.new_zeros(n)  # T_k's diagonal and off-diagonal
    Q[0] = x / x.norm()
    tiny = torch.finfo(M.dtype).tiny
    Mt = M.T
    for j in range(n):  # no host-device synchronisation in a step
        w = M @ (Mt @ Q[j])
        basis = Q[: j + 1]
        basis_t = basis.T
        h1 = basis @ w
        w = torch.addmv(w, basis_t, h1, alpha=-1)
        h2 = basis @ w
        w = torch.addmv(w, basis_t, h2, alpha=-1)
        torch.add(h1[j], h2[j], out=alpha[j])
        torch.linalg.vector_norm(w, out=beta[j])
        torch.div(w, beta[j].clamp_min(tiny), out=Q[j + 1])
        k = j + 1
        if k % CHECK_EVERY and k < n:
            continue
        a, b = torch.stack([alpha[:k], beta[:k]]).cpu().numpy()
        # β_i ≈ 0: K_{i+1} is invariant and holds the top eigenvector; the vectors after it are noise
        broken = np.flatnonzero(b <= tol * np.maximum.accumulate(a))
        last = k == n or broken.size > 0
        if broken.size:
            k = int(broken[0]) + 1
        theta, y = _ritz_pair(a, b, k)
        if abs(b[k - 1] * y[-1]) <= tol * theta or last:  # ‖M Mᵀ Q_k y − θ Q_k y‖ = |β_k y_k|
            u = torch.from_numpy(y).to(M) @ Q[:k]
            u = u / u.norm()
            z = Mt @ u
            value = z @ z
            residual, value = torch.stack([(M @ z - value * u).norm(), value]).tolist()
            if residual <= tol * value:
                return LeadingSingularVector(u * torch.sign(u[u.abs().argmax()]), j + 1, False)
        if last:
            break
    u = _top_eigenvector(M @ M.T)
    u = u / u.norm()
    return LeadingSingularVector(u * torch.sign(u[u.abs().argmax()]), j + 1, True)


@torch.no_grad()
def chain_singular_vectors(E: Sequence[torch.Tensor]) -> list[LeadingSingularVector]:
    """Leading left singular vector of every ``G_i = E_i · … · E_0`` (eq. 4), for ``depth`` x ``E_i [D, D]``.

    Each block's Lanczos run is warm-started from the previous block's vector.
    """
    G = torch.eye(E[0].shape[0], dtype=torch.float64, device=E[0].device)
    results, init = [], None
    for E_i in E:
        G = E_i @ G  # eq. 4
        G = G / G.norm()  # the scale of G_i is irrelevant to its singular vectors
        results.append(leading_left_singular_vector(G, init=init))
        init = results[-1].vector
    return results


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
    return torch.stack([result.vector for result in chain_singular_vectors([m.E for m in maps])]).float()
