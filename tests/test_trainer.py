"""One image's loss: the fast step == the naive step (float64), the window, kernels, families, the compiled scan."""

from pathlib import Path

import pytest
import torch

from sinder_hub import load_backbone, parametrize_singular_values, singular_defect_directions
from sinder_hub.data import TRAIN_SAMPLES, sample_images, sinder_transform
from sinder_hub.training import RepairConfig, fast_image_loss, naive_image_loss, set_precision

REPO = Path(__file__).resolve().parents[1]
# the compiled step's tests compile with aot_eager: dynamo traces and AOT autograd differentiates the
# same graphs as with inductor, without a minute of generated C++ per model and precision on a CPU;
# inductor's kernels run in tests/test_trainer_runs.py::test_compiled_repair_follows_the_eager_repair
COMPILED_IN_TESTS = "aot_eager"


@pytest.fixture(scope="module")
def planted_state():
    model = load_backbone("planted-swiglu")
    return model.state_dict(), singular_defect_directions(model, method="expected")


def float64_copy(variant: str, state_dict: dict):
    """A float64 copy of ``variant`` with ``state_dict``, in singular-value form: ``(model, {name: ε})``."""
    model = load_backbone(variant, pretrained=False)
    model.load_state_dict(state_dict)
    model.double()
    return model, parametrize_singular_values(model)


def astronaut_224() -> torch.Tensor:
    """The held-out astronaut at 224 px, float64: ``[1, 3, 224, 224]``."""
    return sinder_transform(224)(sample_images(["astronaut"])["astronaut"])[None].double()


def one_step(image_loss, variant, state_dict, directions, config, force_block=None):
    """``image_loss`` once on a fresh float64 copy, the astronaut: ``(ImageLoss, {name: ε gradient}, model)``."""
    model, eps = float64_copy(variant, state_dict)
    result = image_loss(model, astronaut_224(), directions, config, set_precision("fp32"), force_block=force_block)
    return result, {n: p.grad for n, p in eps.items() if p.grad is not None}, model


def assert_same_gradients(grads: dict, reference: dict, rtol: float) -> None:
    """The same ε received a gradient, and each equals the reference to ``rtol`` (relative 2-norm)."""
    assert set(grads) == set(reference)
    for n, expected in reference.items():
        assert ((grads[n] - expected).norm() / expected.norm()).item() < rtol, n


def run_steps(image_loss, planted_state, images, steps, config):
    """The authors' batch-size-1 loop in float64, with ``image_loss`` computing each image's gradient."""
    state_dict, directions = planted_state
    model, eps = float64_copy("planted-swiglu", state_dict)
    optimizer = torch.optim.SGD(eps.values(), lr=config.lr, momentum=config.momentum)
    autocast = set_precision("fp32")
    trace = []
    for k in range(steps):
        optimizer.zero_grad(set_to_none=True)
        result = image_loss(model, images[k % len(images)], directions, config, autocast)
        trace.append((result.block, result.loss))
        if result.block is not None:
            optimizer.step()
    return trace, {name: p.detach().clone() for name, p in eps.items()}


@pytest.mark.slow
def test_fast_step_equals_naive_step_after_20_steps(planted_state):
    """Same loss layer every step, losses to 1e-9 and ε to 1e-7 relative in float64: the two differ only by round-off.

    (In float32 the ε of the two agree to about 2e-6 absolute on values up to 0.25: the fast
    backward sums ∂L/∂ε from projections, the naive one through the dense ∂L/∂W.)
    """
    transform = sinder_transform(224)
    images = [transform(image)[None].double() for image in sample_images(TRAIN_SAMPLES).values()]
    config = RepairConfig(limit_layers=3, lr=0.001)
    fast_trace, fast_eps = run_steps(fast_image_loss, planted_state, images, 20, config)
    naive_trace, naive_eps = run_steps(naive_image_loss, planted_state, images, 20, config)
    assert sum(block is not None for block, _ in fast_trace) >= 10  # most steps do update
    assert [b for b, _ in fast_trace] == [b for b, _ in naive_trace]  # same loss layer every step
    for (_, fast_loss), (_, naive_loss) in zip(fast_trace, naive_trace):
        assert fast_loss == pytest.approx(naive_loss, rel=1e-9)
    scale = max(e.abs().max().item() for e in naive_eps.values())
    worst = max((fast_eps[n] - naive_eps[n]).abs().max().item() for n in fast_eps) / scale
    print(f"max |ε_fast - ε_naive| / max |ε| after 20 float64 steps: {worst:.2e}")
    assert worst < 1e-7  # measured 9e-9: the planted trigger is a steep step that amplifies round-off
    assert any(bool(e.any()) for e in fast_eps.values())


@pytest.mark.slow
def test_fast_step_differentiates_and_factorises_only_the_window(planted_state):
    """A loss at block 6 with a 3-block window: gradients and SVDs in blocks 4–6 only, equal to the naive
    step's and to those of the same step with gradient checkpointing."""
    from sinder_hub.singular_values import SingularValueLinear

    state_dict, directions = planted_state
    config = RepairConfig(limit_layers=3)
    grads = {}
    for name, image_loss in (("fast", fast_image_loss), ("naive", naive_image_loss)):
        result, grads[name], model = one_step(image_loss, "planted-swiglu", state_dict, directions, config, 6)
        assert result.block == 6 and result.defects >= 3
        if name == "fast":
            touched = {int(n.split(".")[1]) for n in grads[name]}
            factorised = {
                i
                for i, block in enumerate(model.blocks)
                if any(m.U is not None for m in block.modules() if isinstance(m, SingularValueLinear))
            }
            assert touched == factorised == {4, 5, 6}
    # gradient checkpointing recomputes the same blocks with the same kernels: the same gradients
    config.checkpoint_blocks = True
    result, checkpointed, _ = one_step(fast_image_loss, "planted-swiglu", state_dict, directions, config, 6)
    assert result.block == 6
    assert_same_gradients(checkpointed, grads["fast"], rtol=1e-12)
    # float64 round-off, amplified by the planted trigger's steep step (block 4's fc1): measured ≤ 2.6e-6
    # on the astronaut through the PIL pixel path (≤ 2.6e-7 through the earlier tensor resize)
    assert_same_gradients(grads["fast"], grads["naive"], rtol=1e-5)


def test_data_plan_cycles_through_the_images_like_the_authors_loop():
    """Step t takes images (t·K·P … t·K·P + K·P − 1) mod N; process r the slots r·K … r·K + K − 1."""
    from sinder_hub.training import DataPlan

    one = DataPlan(num_images=7, images_per_step=1, processes=1)
    assert one.sequence(0, 0, 16) == [t % 7 for t in range(16)]  # the authors' image t mod N
    assert one.passes(14) == 2.0
    plan = DataPlan(num_images=5, images_per_step=2, processes=3)
    assert plan.images(0, 0) == [0, 1] and plan.images(0, 1) == [2, 3] and plan.images(0, 2) == [4, 0]
    assert plan.images(1, 0) == [1, 2] and plan.images(1, 2) == [0, 1]
    # all processes together read the images in the one-process order
    together = [i for step in range(4) for rank in range(3) for i in plan.images(step, rank)]
    assert together == [g % 5 for g in range(24)]
    assert plan.sequence(1, 2, 4) == plan.images(2, 1) + plan.images(3, 1)  # a resumed process picks up at its step


def test_skip_less_than_zero_needs_one_defect_as_in_the_authors_code():
    from sinder_hub.training import gives_loss

    for skip in (0, 1):
        config = RepairConfig(skip_less_than=skip)
        assert not gives_loss(0, config) and gives_loss(1, config)
    assert not gives_loss(2, RepairConfig(skip_less_than=3)) and gives_loss(3, RepairConfig(skip_less_than=3))


@pytest.mark.slow
def test_limit_layers_zero_trains_every_block_up_to_the_loss_in_both_steps(planted_state):
    """``limit_layers = 0`` is "no limit" (the authors' ``if args.limit_layers:``): a loss at block 6 moves
    blocks 0–6, and the fast and naive steps give the same gradients (float64)."""
    state_dict, directions = planted_state
    config = RepairConfig(limit_layers=0)
    grads = {}
    for name, image_loss in (("fast", fast_image_loss), ("naive", naive_image_loss)):
        result, grads[name], _ = one_step(image_loss, "planted-swiglu", state_dict, directions, config, 6)
        assert result.block == 6
        assert {int(n.split(".")[1]) for n in grads[name]} == set(range(7)), name
    # float64 round-off through the planted trigger at block 4: measured ≤ 2.6e-6 (blocks.4.mlp.fc1)
    assert_same_gradients(grads["fast"], grads["naive"], rtol=1e-5)


@pytest.mark.slow
def test_kernel_5_fast_step_equals_naive_step(planted_state):
    """The 5x5 kernel through both steps: same loss block and loss, same gradients (float64)."""
    state_dict, directions = planted_state
    config = RepairConfig(limit_layers=3, kernel=5)
    (fast, fast_grads, _), (naive, naive_grads, _) = (
        one_step(image_loss, "planted-swiglu", state_dict, directions, config)
        for image_loss in (fast_image_loss, naive_image_loss)
    )
    assert fast.block == naive.block is not None
    assert fast.loss == pytest.approx(naive.loss, rel=1e-9)
    assert_same_gradients(fast_grads, naive_grads, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["planted-deit3", "planted-clip", "planted-dinov3"])
def test_fast_step_equals_naive_step_on_other_families(variant):
    """Layer scale or none, QuickGELU, Eva with RoPE and split SwiGLU: the same loss and ε gradients from
    the fast and the naive step for a loss at the planted block 4 with a 3-block window (float64); for Eva,
    the other model class, also from the compiled step (timm's VisionTransformer is compiled in the tests
    of planted-swiglu below). Compiled with ``aot_eager`` (COMPILED_IN_TESTS)."""
    from sinder_hub.training import compiled_image_loss

    original = load_backbone(variant)
    directions = singular_defect_directions(original, method="expected")
    config = RepairConfig(limit_layers=3, compile_backend=COMPILED_IN_TESTS)
    image_losses = {"fast": fast_image_loss, "naive": naive_image_loss}
    if variant == "planted-dinov3":
        image_losses["compiled"] = compiled_image_loss
    results = {
        name: one_step(image_loss, variant, original.state_dict(), directions, config, 4)
        for name, image_loss in image_losses.items()
    }
    (naive, naive_grads, _) = results.pop("naive")
    assert naive.block == 4 and naive.defects >= 3
    for name, (result, grads, _) in results.items():
        assert result.block == 4, name
        assert result.loss == pytest.approx(naive.loss, rel=1e-9), name
        assert {int(n.split(".")[1]) for n in grads} == {2, 3, 4}, name
        assert_same_gradients(grads, naive_grads, rtol=1e-6)


@pytest.mark.slow
def test_compiled_scan_gives_the_naive_gradients(planted_state):
    """``--compile``: the detection scan runs compiled without autograd, the window again with autograd.

    Forced loss at block 6 (window 4–6) and the first natural loss block, float64 on the CPU:
    the same loss block and defects as the naive step, gradients equal up to the compiled
    kernels' rounding (measured ≤ 1e-9 relative with inductor), SVDs only in the window."""
    from sinder_hub.singular_values import SingularValueLinear
    from sinder_hub.training import compiled_image_loss

    state_dict, directions = planted_state
    for force_block in (6, None):
        config = RepairConfig(limit_layers=3, compile=True, compile_backend=COMPILED_IN_TESTS)
        compiled, compiled_grads, model = one_step(
            compiled_image_loss, "planted-swiglu", state_dict, directions, config, force_block
        )
        naive, naive_grads, _ = one_step(
            naive_image_loss, "planted-swiglu", state_dict, directions, config, force_block
        )
        assert compiled.block == naive.block and compiled.defects == naive.defects >= 3
        assert compiled.loss == pytest.approx(naive.loss, rel=1e-9)
        assert_same_gradients(compiled_grads, naive_grads, rtol=1e-5)
        window = set(range(compiled.block - 2, compiled.block + 1))
        assert {int(n.split(".")[1]) for n in compiled_grads} == window
        assert {
            i
            for i, block in enumerate(model.blocks)
            if any(m.U is not None for m in block.modules() if isinstance(m, SingularValueLinear))
        } == window


@pytest.mark.slow
@pytest.mark.parametrize("count_batch", [1, 5, 12])
def test_count_batch_changes_when_counts_are_read_not_the_loss_block(planted_state, count_batch):
    """Reading the counts every 1, 5 or 12 (all) blocks finds the same first loss block as the
    eager scan, with ``limit_layers = 0`` (the window is every block up to it), and the same gradients."""
    from sinder_hub.training import compiled_image_loss

    state_dict, directions = planted_state
    config = RepairConfig(limit_layers=0, compile=True, count_batch=count_batch, compile_backend=COMPILED_IN_TESTS)
    compiled, compiled_grads, _ = one_step(compiled_image_loss, "planted-swiglu", state_dict, directions, config)
    fast, fast_grads, _ = one_step(fast_image_loss, "planted-swiglu", state_dict, directions, config)
    assert compiled.block == fast.block is not None
    assert_same_gradients(compiled_grads, fast_grads, rtol=1e-5)
