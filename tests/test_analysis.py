"""Eq. 1-4: linearised blocks and singular defect directions on hand-built and tiny random ViTs."""

import math

import pytest
import torch
from torch import nn

from sinder_hub import BackboneError, block_linear_maps, leading_left_singular_vector, singular_defect_directions
from sinder_hub.analysis import _expected_hidden_map, _expected_mlp_map, _sampled_mlp_map
from sinder_hub.families import describe_block
from tiny import tiny_vit


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
        model.blocks[0].attn.qkv.weight[2 * dim:] = torch.eye(dim)
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
    u, _ = leading_left_singular_vector(M)
    assert angle_deg(u, torch.linalg.svd(M)[0][:, 0]).item() < 1e-5
    # near-degenerate top pair: subspace iteration falls back to a dense solve, still exact
    U, _, Vh = torch.linalg.svd(M)
    S = torch.linspace(1.0, 0.5, 64, dtype=torch.float64)
    S[1] = 1.0 - 1e-9
    u, _ = leading_left_singular_vector(U @ torch.diag(S) @ Vh)
    assert angle_deg(u, U[:, 0]).item() < 1e-2
    # the sign convention: largest entry positive, so u and -M give the same answer
    assert torch.equal(leading_left_singular_vector(-M)[0], leading_left_singular_vector(M)[0])


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
    block, layout = small_mlp_block(kind)
    expected = _expected_mlp_map(block, layout, "block 0")
    errors = []
    for samples in (2_000, 32_000, 512_000):
        gen = torch.Generator().manual_seed(0)
        sampled = _sampled_mlp_map(block, layout, 12, samples, gen)
        errors.append(((sampled - expected).norm() / expected.norm()).item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.25 * errors[0]  # 256x the samples: ideally 16x smaller, at least 4x
    assert errors[2] < 0.01


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
