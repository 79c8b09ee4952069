"""Eq. 1-4: linearised blocks and singular defect directions on hand-built and tiny random ViTs."""

import math

import numpy as np
import pytest
import scipy.linalg
import timm
import torch
from tiny import assert_sampled_map_converges_to_expected, tiny_vit
from torch import nn

from sinder_hub import BackboneError, block_linear_maps, leading_left_singular_vector, singular_defect_directions
from sinder_hub.analysis import (
    CHECK_EVERY,
    _expected_hidden_map,
    _sampled_mlp_map,
    chain_singular_vectors,
)
from sinder_hub.anatomy import describe_block
from sinder_hub.planted import planted_backbone


def angle_deg(a, b):
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).abs().clamp(max=1)
    return torch.rad2deg(torch.acos(cos))


def model_with_known_direction(dim=32, sigma=5.0):
    """Block 0's attention is ``I + σ u uᵀ`` (u ⟂ 1); everything else contributes nothing."""
    model = tiny_vit(embed_dim=dim, depth=2)
    u = torch.randn(dim, generator=torch.Generator().manual_seed(1))
    u = u - u.mean()
    u = u / u.norm()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.zero_()
            block.attn.proj.weight.zero_()
            block.mlp.fc2.weight.zero_()
            block.ls1.gamma.fill_(1.0)
            block.norm1.weight.fill_(1.0)
        model.blocks[0].attn.qkv.weight[2 * dim :] = torch.eye(dim)
        model.blocks[0].attn.proj.weight.copy_(sigma * torch.outer(u, u))
    return model, u


@pytest.mark.parametrize("method", ["sampled", "expected"])
def test_direction_of_a_block_with_known_leading_singular_vector(method):
    model, u = model_with_known_direction()
    maps = block_linear_maps(model, method=method, samples=2000)
    assert torch.allclose(maps[0].A, 5.0 * torch.outer(u, u).double(), atol=1e-6)
    assert torch.allclose(maps[0].C, torch.zeros_like(maps[0].C))
    directions = singular_defect_directions(model, method=method, samples=2000)
    assert directions.shape == (2, 32)
    assert torch.allclose(directions.norm(dim=1), torch.ones(2))
    assert angle_deg(directions, u).max().item() < 1e-3  # both blocks: G_1 = G_0 = I + 5 u uᵀ


def test_leading_left_singular_vector_matches_svd_also_when_degenerate():
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(64, 64, generator=gen, dtype=torch.float64)
    u, *_ = leading_left_singular_vector(M)
    assert angle_deg(u, torch.linalg.svd(M)[0][:, 0]).item() < 1e-5
    # near-degenerate top pair: Lanczos runs until its Krylov space is the whole space (D = 64), still exact
    U, _, Vh = torch.linalg.svd(M)
    S = torch.linspace(1.0, 0.5, 64, dtype=torch.float64)
    S[1] = 1.0 - 1e-9
    u, *_ = leading_left_singular_vector(U @ torch.diag(S) @ Vh)
    assert angle_deg(u, U[:, 0]).item() < 1e-2
    # the sign convention: largest entry positive, so u and -M give the same answer
    assert torch.equal(leading_left_singular_vector(-M)[0], leading_left_singular_vector(M)[0])


def angle_rad(a, b):
    """Angle between unit vectors up to sign, ``2 asin(|a ∓ b| / 2)``: exact near 0, where ``acos`` is not."""
    diff = torch.minimum((a - b).norm(dim=-1), (a + b).norm(dim=-1))
    return 2 * torch.asin((diff / 2).clamp(max=1))


def relative_residual(M, u):
    """``‖M Mᵀ u − λ u‖ / λ`` with ``λ = ‖Mᵀ u‖²``, float64."""
    M, u = M.double(), u.double()
    value = (M.T @ u).norm() ** 2
    return ((M @ (M.T @ u) - value * u).norm() / value).item()


def clustered_matrix(D=300, gap=1e-6, seed=0):
    """``U diag(S) Vᵀ`` [D, D] float64 with the spectrum of a random ViT's ``G_i``: the singular values of
    ``I + 1e-4 · N(0, 1/D)`` (all within 2e-4 of 1, a semicircle edge at the top), the top one moved to
    ``(1 + gap) · σ₂``."""
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
    noise = torch.randn(D, D, generator=gen, dtype=torch.float64) / D**0.5
    S = torch.linalg.svdvals(torch.eye(D, dtype=torch.float64) + 1e-4 * noise)
    S[0] = S[1] * (1 + gap)
    return U @ torch.diag(S) @ V.T, U


@pytest.mark.parametrize("gap", [1e-3, 1e-5, 1e-6])
def test_lanczos_matches_svd_on_clustered_spectra(gap):
    """Separated top pair (relative gap ≥ 1e-6) in a cluster of width 4e-4: the Lanczos vector is within
    tol / gap(σ₁², σ₂²) = 1e-13 / 2e-6 = 5e-8 rad of the SVD's, long before the Krylov space fills ℝ^D."""
    M, _ = clustered_matrix(gap=gap)
    found = leading_left_singular_vector(M)
    assert not found.fallback and found.steps < 200
    assert relative_residual(M, found.vector) <= 1e-13
    assert angle_rad(found.vector, torch.linalg.svd(M)[0][:, 0]).item() < 1e-7


@pytest.mark.parametrize("gap", [1e-9, 0.0])
def test_lanczos_on_near_degenerate_top_pair_meets_the_residual_criterion(gap):
    """An unresolvable top pair: the direction within it is ill-defined, but the residual criterion holds
    and the vector lies in the top pair's singular subspace."""
    M, U = clustered_matrix(gap=gap)
    u = leading_left_singular_vector(M).vector
    assert relative_residual(M, u) <= 1e-13
    assert (u - U[:, :2] @ (U[:, :2].T @ u)).norm().item() < 1e-6


def test_warm_start_converges_faster_and_cannot_be_trapped():
    M, U = clustered_matrix(gap=1e-5)
    cold = leading_left_singular_vector(M)
    warm = leading_left_singular_vector(M, init=cold.vector)
    assert warm.steps < cold.steps
    assert angle_rad(warm.vector, cold.vector).item() < 1e-8
    # an exact eigenvector of a lower eigenvalue as the start: Lanczos from it alone would stop at once
    U0, _, Vh = torch.linalg.svd(torch.randn(200, 200, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    M = U0 @ torch.diag(torch.linspace(10.0, 1.0, 200, dtype=torch.float64)) @ Vh
    found = leading_left_singular_vector(M, init=U0[:, 3])
    assert angle_rad(found.vector, U0[:, 0]).item() < 1e-10


def test_fallback_when_lanczos_does_not_converge():
    M, _ = clustered_matrix(gap=1e-6)
    found = leading_left_singular_vector(M, max_steps=2 * CHECK_EVERY)
    assert found.fallback and found.steps == 2 * CHECK_EVERY
    assert found.vector.abs().argmax() == found.vector.argmax()  # sign convention also on this path
    assert relative_residual(M, found.vector) <= 1e-13
    assert angle_rad(found.vector, torch.linalg.svd(M)[0][:, 0]).item() < 1e-7


def previous_leading_left_singular_vector(M, init=None, rank=8, tol=1e-10, max_iter=15):
    """The algorithm before Lanczos, verbatim: subspace iteration with 8 vectors, dense fallback."""
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
        _, vec = scipy.linalg.eigh((M @ M.T).numpy(), subset_by_index=[D - 1, D - 1], driver="evr")
        u = torch.from_numpy(vec[:, 0]).to(M)
        basis = torch.cat([u[:, None], basis[:, 1:]], dim=1)
    u = u / u.norm()
    return u * torch.sign(u[u.abs().argmax()]), basis


def assert_agrees_with_previous_algorithm(maps):
    """Per block of the chain: the residual criterion, and within the sin θ bound tol / (1 − σ₂²/σ₁²) of the
    previous algorithm (+1e-8 for its own error), with the same sign: below 1e-6 rad wherever σ₁ is
    separated (relative gap above 1e-6)."""
    found = chain_singular_vectors([m.E for m in maps])
    G = torch.eye(maps[0].E.shape[0], dtype=torch.float64)
    basis = None
    for block_maps, result in zip(maps, found):
        G = block_maps.E @ G
        G = G / G.norm()
        previous, basis = previous_leading_left_singular_vector(G, init=basis)
        s = torch.linalg.svdvals(G)
        bound = 1e-13 / (1 - (s[1] / s[0]) ** 2).item() + 1e-8
        assert not result.fallback
        assert relative_residual(G, result.vector) <= 1e-13
        assert (result.vector - previous).norm().item() <= (min(bound, 1e-6) if s[1] < (1 - 1e-6) * s[0] else bound)
    return found


def test_agrees_with_previous_algorithm_on_the_planted_chain():
    maps = block_linear_maps(planted_backbone("planted-swiglu"), method="expected")
    found = assert_agrees_with_previous_algorithm(maps)
    assert all(result.steps <= CHECK_EVERY for result in found[4:])  # from the planted block on: dominant σ₁


def test_agrees_with_previous_algorithm_on_a_random_vit_chain():
    """timm's random DINOv2 (layer scale 1e-5): every G_i is I + O(1e-5), its top singular values 1e-7 apart,
    where the previous subspace iteration always fell back to the dense solve."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=4, num_classes=0).eval()
    found = assert_agrees_with_previous_algorithm(block_linear_maps(model, method="expected"))
    assert all(result.steps < 384 for result in found)  # D = 384: the Krylov space never fills ℝ^D


def small_mlp_block(kind, dim=12):
    """Block 0 of a tiny DINOv2-style ViT with a GELU or packed SwiGLU MLP, MLP weights ~ N(0, 0.5²)."""
    block = tiny_vit(mlp=kind, embed_dim=dim, depth=1).blocks[0]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in block.mlp.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return block, describe_block(block)


@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
def test_sampled_least_squares_converges_to_expected_map(kind):
    """Stein's lemma: the population least-squares map is E[∇ hidden(x)]; sampling error ~ 1/√n."""
    assert_sampled_map_converges_to_expected(*small_mlp_block(kind))


def test_sampled_map_is_fc2_times_the_authors_hidden_fit():
    """Fitting the whole MLP minus fc2's bias equals ``W_fc2`` times the least squares of the hidden layer."""
    block, layout = small_mlp_block("swiglu")
    x = torch.randn(5000, 12, generator=torch.Generator().manual_seed(0))
    x1, x2 = block.mlp.fc1(x).chunk(2, dim=-1)
    hidden_fit = torch.linalg.lstsq(x.double(), (nn.functional.silu(x1) * x2).double()).solution.T
    sampled = _sampled_mlp_map(block, layout, 12, 5000, torch.Generator().manual_seed(0))
    assert torch.allclose(sampled, block.mlp.fc2.weight.double() @ hidden_fit, atol=1e-5)


def test_expected_map_of_gelu_unit_matches_closed_form():
    """For GELU(a) = a Φ(a), E[GELU'(a)] with a ~ N(b, s²) has a closed form."""
    block, layout = small_mlp_block("gelu")
    w, b = block.mlp.fc1.weight.double(), block.mlp.fc1.bias.double()
    s = w.norm(dim=1)
    # E[Φ(a) + a φ(a)] = Φ(b/√(1+s²)) + b φ(b/√(1+s²)) / (1+s²)^{3/2}
    r = torch.sqrt(1 + s**2)
    phi = torch.exp(-0.5 * (b / r) ** 2) / math.sqrt(2 * math.pi)
    Phi = 0.5 * (1 + torch.erf(b / r / math.sqrt(2)))
    closed = Phi + b * phi / r**3
    expected = _expected_hidden_map(block, layout)
    assert torch.allclose(expected, closed[:, None] * w, atol=1e-10)


@pytest.mark.parametrize("mlp,reg", [("gelu", 0), ("swiglu", 0), ("gelu", 4), ("swiglu", 4)])
def test_directions_on_tiny_vits(mlp, reg):
    model = tiny_vit(mlp=mlp, reg_tokens=reg)
    a = singular_defect_directions(model, samples=20_000, generator=torch.Generator().manual_seed(1))
    b = singular_defect_directions(model, samples=20_000, generator=torch.Generator().manual_seed(1))
    expected = singular_defect_directions(model, method="expected")
    assert torch.equal(a, b)  # seeded
    assert a.shape == expected.shape == (3, 32)
    assert torch.allclose(expected.norm(dim=1), torch.ones(3))
    # E_i from the maps composes to the same directions (eq. 4)
    maps = block_linear_maps(model, method="expected")
    G = maps[1].E @ maps[0].E
    assert angle_deg(leading_left_singular_vector(G)[0].float(), expected[1]).item() < 1e-3


def test_unsupported_blocks_are_refused():
    model = tiny_vit()
    model.blocks[1].mlp = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(BackboneError, match="blocks.1.mlp: expected a timm Mlp, GluMlp or SwiGLU, got Sequential"):
        singular_defect_directions(model, method="expected")
    with pytest.raises(ValueError, match="method must be one of"):
        singular_defect_directions(model, method="exact")
