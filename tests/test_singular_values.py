"""§4.2: the singular-value parametrisation, its merge, and its no-rebuild fast path."""

import pytest
import torch
from tiny import tiny_vit
from torch import nn

from sinder_hub.singular_values import (
    SingularValueLinear,
    merge_singular_values,
    parametrize_singular_values,
    reference_mode,
    singular_value_parameters,
    sync_singular_values,
)
from sinder_hub.tokens import block_outputs

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
        assert torch.equal(model.forward_features(IMAGES), before)  # unfactorised layers keep W₀ exactly
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


def test_frozen_blocks_do_not_factorize_and_weight_follows_eps():
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
    # an in-place update of ε (what the optimiser does) moves the weight the next forward uses
    fc1 = model.blocks[2].mlp.fc1
    with torch.no_grad():
        before = fc1(hidden).clone()
        fc1.eps.add_(1.0)
        moved = fc1(hidden)
    assert not torch.allclose(before, moved)
    with torch.no_grad():
        assert torch.equal(moved, nn.functional.linear(hidden, fc1.weight, fc1.bias))
        merged = nn.functional.linear(hidden, fc1.merged_weight(), fc1.bias)
    assert torch.allclose(moved, merged, rtol=0, atol=1e-5 * merged.abs().max())


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


def random_layer(shape: tuple[int, int], rows: tuple[int, int] | None, seed: int = 4):
    """A float32 ``SingularValueLinear`` over a random ``nn.Linear`` of ``shape`` ``[out, in]``, and a copy of ``W₀``."""
    torch.manual_seed(seed)
    linear = nn.Linear(shape[1], shape[0])
    return SingularValueLinear(linear, rows), linear.weight.detach().clone()


def float64_weight(layer: SingularValueLinear, original: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``U diag(S + ε) Vᵀ`` on the layer's rows (``W₀`` elsewhere), in float64 from its factors: ``[out, in]``."""
    start, stop = layer.rows
    exact = original.double()
    exact[start:stop] = (layer.U.double() * (layer.S.double() + eps.double())) @ layer.Vh.double()
    return exact


@pytest.mark.parametrize("shape, rows", [((256, 512), None), ((512, 256), None), ((768, 256), (512, 768))])
def test_weight_depends_on_eps_alone_and_the_merge_is_float64(shape, rows):
    """300 optimiser steps, each applied to ``weight``: the weight is then bit for bit the one a fresh layer
    computes from the final ε in one jump (a resumed run), within float32 rounding of the float64 formula;
    ``merged_weight()`` is that formula cast to float32, rows outside exactly ``W₀``."""
    layer, original = random_layer(shape, rows)
    optimizer = torch.optim.SGD([layer.eps], lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(5)
    for _ in range(300):
        layer.eps.grad = torch.randn(layer.eps.shape, generator=gen)
        optimizer.step()
        layer.current_weight()  # one update at a time, as the forward of each training step applies it
    assert layer.eps.abs().max() > 0.05  # the updates did move the weight
    jumped, _ = random_layer(shape, rows)
    with torch.no_grad():
        jumped.eps.copy_(layer.eps)
    assert torch.equal(jumped.current_weight(), layer.weight)
    exact = float64_weight(layer, original, layer.eps.detach())
    error = ((layer.weight.double() - exact).norm() / exact.norm()).item()
    start, stop = layer.rows
    factor_error = (
        (float64_weight(layer, original, torch.zeros_like(layer.eps)) - original.double()).norm()
        / original.double().norm()
    ).item()
    print(f"{shape} rows {rows}: weight vs float64 formula {error:.1e}, factors vs W₀ {factor_error:.1e} (relative)")
    assert error < 1e-6 and factor_error < 1e-6  # float32 factors and product
    merged = layer.merged_weight()
    assert torch.equal(merged, exact.float())
    assert torch.equal(merged[:start], original[:start]) and torch.equal(merged[stop:], original[stop:])
    assert torch.equal(layer.to_linear().weight, merged)


def test_a_moved_layer_keeps_no_second_weight_on_its_device():
    """After forwards with ε ≠ 0 the layer holds ``weight`` and the factors only (no cached second weight, no
    ``W₀``), and the state-dict keys are those of before plus the factors."""
    layer, _ = random_layer((96, 32), (64, 96))
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(6))
    assert list(layer.state_dict()) == ["eps", "weight", "bias"]
    layer(x).square().sum().backward()
    with torch.no_grad():
        layer.eps.add_(0.1)
        layer(x)
    assert list(layer.state_dict()) == ["eps", "weight", "bias", "U", "S", "Vh"]
    layer.to("meta")
    tensors = {
        **dict(layer.named_parameters()),
        **dict(layer.named_buffers()),
        **{name: value for name, value in vars(layer).items() if isinstance(value, torch.Tensor)},
    }
    on_device = {name for name, tensor in tensors.items() if tensor.device.type == "meta"}
    assert on_device == {"eps", "weight", "bias", "U", "S", "Vh", "eps_applied"}
    weight_sized = {name for name in on_device if tensors[name].numel() >= 32 * 32}  # W₀[rows] is 32 x 32
    assert weight_sized == {"weight", "U", "Vh"}


def train(model: nn.Module, eps: dict, steps: int) -> None:
    """``steps`` SGD steps (momentum) of a made-up loss on ``IMAGES``."""
    optimizer = torch.optim.SGD(eps.values(), lr=0.02, momentum=0.9)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        out = model.forward_features(IMAGES)
        (out.square().mean() + out[:, 3].sum()).backward()
        optimizer.step()


def test_reference_mode_equals_the_fast_path_after_updates():
    """After updates, the rebuild of reference mode gives the fast path's outputs bit for bit and its
    ε gradients (float32, measured 3.4e-7 of the largest)."""
    model = tiny_vit(mlp="swiglu")
    eps = parametrize_singular_values(model)
    train(model, eps, 5)
    outputs, grads = {}, {}
    for mode in ("fast", "reference"):
        for p in eps.values():
            p.grad = None
        if mode == "reference":
            with reference_mode():
                outputs[mode] = model.forward_features(IMAGES)
        else:
            outputs[mode] = model.forward_features(IMAGES)
        (outputs[mode].square().mean() + outputs[mode][:, 3].sum()).backward()
        grads[mode] = {name: p.grad.clone() for name, p in eps.items()}
    assert torch.equal(outputs["fast"], outputs["reference"])
    worst = max(((grads["fast"][n] - g).abs().max() / g.abs().max()).item() for n, g in grads["reference"].items())
    print(f"max |∂ε fast - ∂ε reference| / max |∂ε reference|: {worst:.1e}")
    assert worst <= 1e-6


def test_resumed_eps_computes_what_training_reached():
    """ε copied into a freshly parametrised model (the trainer's resume) gives bit for bit the outputs and the
    merge of the model trained step by step to that ε: the weights are a function of ε alone."""
    trained = tiny_vit()
    eps = parametrize_singular_values(trained)
    train(trained, eps, 30)
    resumed = tiny_vit()
    resumed_eps = parametrize_singular_values(resumed)
    with torch.no_grad():
        for name, parameter in resumed_eps.items():
            parameter.copy_(eps[name])
        assert torch.equal(resumed.forward_features(IMAGES), trained.forward_features(IMAGES))
    layers = [m for m in trained.modules() if isinstance(m, SingularValueLinear)]
    for layer, again in zip(layers, [m for m in resumed.modules() if isinstance(m, SingularValueLinear)]):
        assert torch.equal(layer.merged_weight(), again.merged_weight())


def test_sync_singular_values_applies_pending_changes():
    """A change of ε reaches ``weight`` at the next eager forward, ``sync_singular_values`` or ``state_dict()``."""
    from sinder_hub import sync_singular_values as exported

    assert exported is sync_singular_values
    model = tiny_vit()
    eps = parametrize_singular_values(model)
    qkv = model.blocks[1].attn.qkv
    original = qkv.weight.clone()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in eps.values():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    assert torch.equal(qkv.weight, original) and qkv.U is None  # nothing applied yet
    sync_singular_values(model)
    assert torch.equal(qkv.weight[:64], original[:64]) and not torch.equal(qkv.weight[64:], original[64:])
    assert torch.allclose(qkv.weight, qkv.merged_weight(), rtol=0, atol=1e-6)
    synced = qkv.weight.clone()
    with torch.no_grad():
        model.forward_features(IMAGES)
    assert torch.equal(qkv.weight, synced)  # nothing pending: the forward leaves the weight as it is
    with torch.no_grad():
        qkv.eps.add_(0.1)
    saved = model.state_dict()["blocks.1.attn.qkv.weight"]
    assert torch.allclose(saved, qkv.merged_weight(), rtol=0, atol=1e-6) and not torch.equal(saved, synced)


def test_compiled_forward_reads_the_weight_as_synced():
    """A compiled forward (one graph) does not check ε: it sees a change after ``sync_singular_values``."""
    layer, _ = random_layer((6, 8), (2, 6))
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        before = compiled(x)
        layer.eps.add_(0.5)
        assert torch.equal(compiled(x), before)  # pending: not applied by compiled code
        sync_singular_values(layer)
        after = compiled(x)
        assert not torch.equal(after, before) and torch.equal(after, layer(x))
    compiled(x).square().sum().backward()
    grad = layer.eps.grad.clone()
    layer.eps.grad = None
    layer(x).square().sum().backward()
    assert torch.equal(grad, layer.eps.grad)
