"""The repair trainer: fast step == naive step, the run folder, bad data, resume, multi-process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sinder_hub import load_backbone, parametrize_singular_values, singular_defect_directions
from sinder_hub.data import TRAIN_SAMPLES, sample_images, sinder_transform
from sinder_hub.errors import DataError
from sinder_hub.training import RepairConfig, fast_image_loss, naive_image_loss, repair, set_precision

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(
    model="planted-swiglu",
    resolution=224,
    limit_layers=3,
    directions_method="expected",
    held_out=("astronaut", "camera"),
    num_workers=0,
    quiet=True,
)


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory):
    """The training sample images, each also flipped: 24 PNGs at 256 px."""
    folder = tmp_path_factory.mktemp("train")
    for name, image in sample_images(TRAIN_SAMPLES).items():
        image = image.resize((256, 256))
        image.save(folder / f"{name}_a.png")
        image.transpose(0).save(folder / f"{name}_b.png")
    return folder


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


def test_repair_writes_a_run_folder_that_stock_timm_loads(train_folder, tmp_path):
    import timm

    output = tmp_path / "run"
    result = repair(RepairConfig(**SMALL, data=str(train_folder), output=str(output), max_steps=8))
    report = json.loads((output / "repair_report.json").read_text())
    assert report == json.loads(json.dumps(result.report.to_json()))
    assert report["steps"] == 8 and report["stopped_because"] == "max_steps"
    assert report["images"]["seen"] == 8 == report["images"]["clear"] + report["images"]["with_loss"]
    assert sum(report["loss_layer_histogram"].values()) == report["images"]["with_loss"]
    assert report["hyperparameters"]["lr"] == 0.005 and report["source_model"] == "planted-swiglu"
    assert len(report["source_sha256"]) == 64
    assert set(report["held_out"]["before"]["defects"]) == {"astronaut", "camera"}
    for picture in report["pictures"]:
        assert (output / picture).stat().st_size > 10_000
    stock = timm.create_model(f"local-dir:{output}", pretrained=True)
    ours = load_backbone(str(output))
    saved = load_file(output / "model.safetensors")
    assert set(stock.state_dict()) == set(saved) == set(ours.state_dict())
    for key, value in saved.items():
        assert torch.equal(stock.state_dict()[key], value)


def test_missing_or_empty_data_fails_before_loading_a_model(tmp_path, no_model):
    with pytest.raises(DataError, match="does not exist"):
        repair(RepairConfig(**SMALL, data=str(tmp_path / "nope"), output=str(tmp_path / "run")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images found"):
        repair(RepairConfig(**SMALL, data=str(tmp_path / "empty"), output=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_compile_that_cannot_work_fails_before_loading_a_model(train_folder, tmp_path, no_model, monkeypatch):
    """A broken ``torch.compile`` backend (no C++ compiler, no Triton) is one ``InputError`` before any
    model, and the run folder it created is gone again."""
    from sinder_hub.errors import InputError

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore lines")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.raises(
        InputError,
        match=r"^--compile: torch.compile does not work on this cpu "
        r"\(InvalidCxxCompiler: No working C\+\+ compiler found\); run without",
    ):
        repair(RepairConfig(**SMALL, data=str(train_folder), output=str(tmp_path / "run"), compile=True))
    assert not (tmp_path / "run").exists()


def test_bad_files_are_skipped_logged_and_counted(train_folder, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    good = Image.open(next(train_folder.glob("*.png")))
    good.save(data / "a_good.png")
    good.convert("L").save(data / "b_gray.png")
    good.convert("CMYK").save(data / "c_cmyk.jpg")
    good.convert("RGBA").save(data / "d_alpha.png")
    (data / "e_text.png").write_text("not an image")
    jpeg = data / "f_truncated.jpg"
    good.save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:400])
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(data / "g_tiny.png")
    result = repair(RepairConfig(**SMALL, data=str(data), output=str(tmp_path / "run"), max_steps=14))
    report = result.report.to_json()
    bad = {Path(entry["path"]).name for entry in report["bad_files"]}
    assert bad == {"e_text.png", "f_truncated.jpg", "g_tiny.png"}
    assert len(report["bad_files"]) == 3  # two passes over the 7 files: each bad file counted once
    assert report["data_passes"] == 2.0
    assert report["images"] == {
        "selected": 7,
        "seen": 8,
        "clear": report["images"]["clear"],
        "with_loss": 8 - report["images"]["clear"],
        "skipped_bad": 3,
    }
    assert all(str(data) in entry["problem"] for entry in report["bad_files"])


def repair_command(data, output, *extra):
    return [
        sys.executable,
        str(REPO / "tools" / "repair.py"),
        "--model",
        "planted-swiglu",
        "--data",
        str(data),
        "--output",
        str(output),
        "--resolution",
        "224",
        "--limit-layers",
        "3",
        "--directions-method",
        "expected",
        "--held-out",
        "astronaut",
        "--num-workers",
        "0",
        "--quiet",
        *extra,
    ]


def final_eps(output):
    return torch.load(output / "checkpoint" / "state.pt", weights_only=True)["eps"]


def test_resume_after_a_real_signal_ends_with_the_same_eps(train_folder, tmp_path):
    """6 photos, 16 steps: the run cycles through them 2.67 times, is killed mid-pass and resumed across the
    pass boundaries, and ends bit-identical to an uninterrupted run."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted(train_folder.glob("*_a.png"))[:6]:
        (photos / path.name).write_bytes(path.read_bytes())
    extra = ("--save-every", "2", "--max-steps", "16")
    subprocess.run(repair_command(photos, tmp_path / "full", *extra), check=True, capture_output=True)
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(repair_command(photos, interrupted, *extra), stderr=subprocess.PIPE, text=True)
    checkpoint = interrupted / "checkpoint" / "state.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted by SIGTERM" in stderr
    stopped_at = torch.load(checkpoint, weights_only=True)["state"]["step"]
    assert 0 < stopped_at < 16
    assert not (interrupted / "model.safetensors").exists()
    assert (interrupted / "INCOMPLETE").exists() and not (interrupted / ".lock").exists()
    subprocess.run(repair_command(photos, interrupted, *extra, "--resume"), check=True, capture_output=True)
    assert not (interrupted / "INCOMPLETE").exists()
    full, resumed = final_eps(tmp_path / "full"), final_eps(interrupted)
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    full_report = json.loads((tmp_path / "full" / "repair_report.json").read_text())
    resumed_report = json.loads((interrupted / "repair_report.json").read_text())
    assert full_report["data_passes"] == pytest.approx(16 / 6, abs=1e-4)
    for key in ("steps", "updates", "images", "loss_layer_histogram", "clear_rate_curve", "data_passes"):
        assert full_report[key] == resumed_report[key], key


def test_two_processes_equal_one_process_with_two_images_per_step(train_folder, tmp_path):
    extra = ("--max-steps", "6", "--save-every", "0")
    # one thread everywhere, so that both runs use the same matmul kernels and summation order
    single = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        repair_command(train_folder, tmp_path / "one", *extra, "--images-per-step", "2"),
        check=True,
        capture_output=True,
        env=single,
    )
    env = {**single, "ACCELERATE_USE_CPU": "1"}
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    done = subprocess.run(
        launch + repair_command(train_folder, tmp_path / "two", *extra)[1:],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = final_eps(tmp_path / "one"), final_eps(tmp_path / "two")
    assert any(bool(v.any()) for v in one.values())
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-5, atol=1e-8), name
    report_one = json.loads((tmp_path / "one" / "repair_report.json").read_text())
    report_two = json.loads((tmp_path / "two" / "repair_report.json").read_text())
    assert report_two["hardware"]["num_processes"] == 2
    for key in ("steps", "updates", "images", "loss_layer_histogram", "clear_rate_curve"):
        assert report_one[key] == report_two[key], key


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


@pytest.mark.parametrize("variant", ["planted-deit3", "planted-clip", "planted-dinov3"])
def test_fast_step_equals_naive_step_on_other_families(variant):
    """Layer scale or none, QuickGELU, Eva with RoPE and split SwiGLU: the same loss and ε gradients from
    the fast, the compiled and the naive step for a loss at the planted block 4 with a 3-block window (float64)."""
    from sinder_hub.training import compiled_image_loss

    original = load_backbone(variant)
    directions = singular_defect_directions(original, method="expected")
    config = RepairConfig(limit_layers=3)
    (fast, fast_grads, _), (compiled, compiled_grads, _), (naive, naive_grads, _) = (
        one_step(image_loss, variant, original.state_dict(), directions, config, 4)
        for image_loss in (fast_image_loss, compiled_image_loss, naive_image_loss)
    )
    assert fast.block == compiled.block == naive.block == 4 and fast.defects >= 3
    assert fast.loss == pytest.approx(naive.loss, rel=1e-9) and compiled.loss == pytest.approx(naive.loss, rel=1e-9)
    assert {int(n.split(".")[1]) for n in fast_grads} == {int(n.split(".")[1]) for n in compiled_grads} == {2, 3, 4}
    assert_same_gradients(fast_grads, naive_grads, rtol=1e-6)
    assert_same_gradients(compiled_grads, naive_grads, rtol=1e-6)


def test_compiled_scan_gives_the_naive_gradients(planted_state):
    """``--compile``: the detection scan runs compiled without autograd, the window again with autograd.

    Forced loss at block 6 (window 4–6) and the first natural loss block, float64 on the CPU:
    the same loss block and defects as the naive step, gradients equal up to the compiled
    kernels' rounding (measured ≤ 1e-9 relative), SVDs only in the window."""
    from sinder_hub.singular_values import SingularValueLinear
    from sinder_hub.training import compiled_image_loss

    state_dict, directions = planted_state
    for force_block in (6, None):
        config = RepairConfig(limit_layers=3, compile=True)
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


@pytest.mark.parametrize("count_batch", [1, 5, 12])
def test_count_batch_changes_when_counts_are_read_not_the_loss_block(planted_state, count_batch):
    """Reading the counts every 1, 5 or 12 (all) blocks finds the same first loss block as the
    eager scan, with ``limit_layers = 0`` (the window is every block up to it), and the same gradients."""
    from sinder_hub.training import compiled_image_loss

    state_dict, directions = planted_state
    config = RepairConfig(limit_layers=0, compile=True, count_batch=count_batch)
    compiled, compiled_grads, _ = one_step(compiled_image_loss, "planted-swiglu", state_dict, directions, config)
    fast, fast_grads, _ = one_step(fast_image_loss, "planted-swiglu", state_dict, directions, config)
    assert compiled.block == fast.block is not None
    assert_same_gradients(compiled_grads, fast_grads, rtol=1e-5)


def test_compiled_repair_follows_the_eager_repair(train_folder, tmp_path):
    """A whole run with ``--compile`` (float32, TF32 setting on a CPU = float32): the same images give
    a loss at the same blocks as the eager run for 12 steps, and ε ends within 1e-4 relative."""
    config = dict(SMALL, data=str(train_folder), max_steps=12, held_out=("astronaut",), precision="fp32")
    eager = repair(RepairConfig(**config, output=str(tmp_path / "eager"))).report.to_json()
    compiled = repair(RepairConfig(**config, output=str(tmp_path / "compiled"), compile=True)).report.to_json()
    assert compiled["loss_layer_histogram"] == eager["loss_layer_histogram"]
    assert compiled["images"] == eager["images"] and eager["updates"] >= 6
    assert compiled["hyperparameters"]["compile"] is True
    eager_eps, compiled_eps = final_eps(tmp_path / "eager"), final_eps(tmp_path / "compiled")
    scale = torch.cat([e.flatten() for e in eager_eps.values()]).norm()
    difference = torch.cat([(compiled_eps[n] - eager_eps[n]).flatten() for n in eager_eps]).norm()
    print(f"ε after 12 steps, compiled vs eager scan: {difference / scale:.2e} relative")
    assert difference / scale < 1e-4
