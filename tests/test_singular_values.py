"""§4.2: the singular-value parametrisation, its merge, and its no-rebuild fast path."""

import pytest
import torch
from torch import nn

from sinder_hub.singular_values import (
    SingularValueLinear,
    merge_singular_values,
    parametrize_singular_values,
    singular_value_parameters,
)
from sinder_hub.tokens import block_outputs
from tiny import tiny_vit

IMAGES = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_zero_eps_is_bit_identical_and_merge_keeps_names(mlp):
    model = tiny_vit(mlp=mlp, reg_tokens=4 if mlp == "swiglu" else 0)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model.forward_features(IMAGES)
    eps = parametrize_singular_values(model)
    # every linear of every block; only ε trainable; qkv has one ε per value row
    assert len(eps) == 4 * len(model.blocks)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == list(eps)
    assert eps["blocks.0.attn.qkv.eps"].shape == (32,)
    with torch.no_grad():
        assert torch.equal(model.forward_features(IMAGES), before)
    with torch.enable_grad():
        assert torch.equal(model.forward_features(IMAGES), before)  # W₀ + U·0·Vᵀ = W₀ exactly
    merge_singular_values(model)
    merged = model.state_dict()
    assert list(merged) == list(reference)
    for key, value in reference.items():
        assert torch.equal(merged[key], value), key
    assert all(isinstance(m, nn.Linear) for m in model.blocks[0].modules() if "Linear" in type(m).__name__)


def test_nonzero_eps_equals_explicit_svd_form_and_merges():
    model = tiny_vit(mlp="swiglu")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    eps = parametrize_singular_values(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in eps.values():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    with torch.no_grad():
        out = model.forward_features(IMAGES)
    # explicit U diag(S + ε) Vᵀ on a copy of the original weights
    explicit = tiny_vit(mlp="swiglu")
    explicit.load_state_dict(original)
    with torch.no_grad():
        for name, p in eps.items():
            prefix = name[: -len(".eps")]
            weight = explicit.get_parameter(prefix + ".weight")
            rows = slice(64, 96) if prefix.endswith("qkv") else slice(None)
            U, S, Vh = torch.linalg.svd(original[prefix + ".weight"][rows].double(), full_matrices=False)
            weight[rows] = (U @ torch.diag(S + p.double()) @ Vh).float()
        expected = explicit.forward_features(IMAGES)
    assert torch.allclose(out, expected, atol=1e-4 * expected.abs().max().item())
    # q and k rows never change
    layer = model.blocks[1].attn.qkv
    assert torch.equal(layer.merged_weight()[:64], original["blocks.1.attn.qkv.weight"][:64])
    merge_singular_values(model)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(IMAGES), out, atol=1e-6 * out.abs().max().item())


def test_frozen_blocks_do_not_factorize_and_cache_follows_eps():
    model = tiny_vit()
    eps = parametrize_singular_values(model)
    with torch.no_grad():
        block_outputs(model, IMAGES)
    layers = [m for m in model.modules() if isinstance(m, SingularValueLinear)]
    assert all(layer.U is None for layer in layers)  # no SVD without autograd
    # autograd through block 2 only: only block 2 factorises; gradient reaches only its ε
    with torch.no_grad():
        hidden = block_outputs(model, IMAGES)[1]
    model.blocks[2](hidden).square().sum().backward()
    assert {name for name, p in eps.items() if p.grad is not None} == set(singular_value_parameters(model, range(2, 3)))
    assert all((layer.U is not None) == (layer in list(model.blocks[2].modules())) for layer in layers)
    # an in-place update of ε (what the optimiser does) invalidates the cached weight
    fc1 = model.blocks[2].mlp.fc1
    with torch.no_grad():
        cached = fc1(hidden).clone()
        fc1.eps.add_(1.0)
        moved = fc1(hidden)
    assert not torch.allclose(cached, moved)
    with torch.no_grad():
        expected = nn.functional.linear(hidden, fc1.merged_weight(), fc1.bias)
    assert torch.equal(moved, expected)


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_fast_backward_equals_autograd_through_the_rebuild(mlp):
    """∂L/∂ε from the two projections equals autograd through U diag(S + ε) Vᵀ (the authors' way)."""
    from sinder_hub.singular_values import reference_mode

    grads = {}
    for mode in ("fast", "reference"):
        model = tiny_vit(mlp=mlp)
        eps = parametrize_singular_values(model)
        with torch.no_grad():
            for k, p in enumerate(eps.values()):
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(k)))
        if mode == "reference":
            with reference_mode():
                out = model.forward_features(IMAGES)
        else:
            out = model.forward_features(IMAGES)
        (out.square().mean() + out[:, 3].sum()).backward()
        grads[mode] = {name: p.grad.clone() for name, p in eps.items()}
    for name, reference in grads["reference"].items():
        assert torch.allclose(grads["fast"][name], reference, rtol=1e-4, atol=1e-6 * reference.abs().max()), name


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (24, 24)])
def test_factorization_is_an_svd_also_for_rank_deficient_weights(shape):
    """eigh of the Gram matrix + QR: orthonormal factors, descending S, W reproduced (float64, 1e-12)."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64)
    weight[:, :4] = 0.0  # rank deficient: singular values that are exactly zero
    weight[:, 4] = 1e-6 * weight[:, 5]  # and a tiny one
    linear = nn.Linear(shape[1], shape[0], dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(weight)
    layer = SingularValueLinear(linear)
    layer.factorize()
    U, S, Vh = layer.U, layer.S, layer.Vh
    rank = min(shape)
    assert U.shape == (shape[0], rank) and Vh.shape == (rank, shape[1]) and S.shape == (rank,)
    eye = torch.eye(rank, dtype=torch.float64)
    assert torch.allclose(U.T @ U, eye, atol=1e-12) and torch.allclose(Vh @ Vh.T, eye, atol=1e-12)
    assert bool((S[:-1] >= S[1:] - 1e-12 * S[0]).all()) and bool((S >= 0).all())  # descending up to round-off
    assert torch.allclose(S, torch.linalg.svdvals(weight), atol=1e-12 * S[0])
    assert torch.allclose(U @ torch.diag(S) @ Vh, weight, atol=1e-12 * S[0])
