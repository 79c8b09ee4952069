"""Repair runs end to end: the run folder, bad data, resume after a real signal, two processes, --compile."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import repair_args
from forked import fork_cli, run_ranks, wait_for_file, wait_forked
from PIL import Image
from safetensors.torch import load_file

from sinder_hub import load_backbone
from sinder_hub.cli import main as cli_main
from sinder_hub.errors import DataError
from sinder_hub.training import RepairConfig, repair

SMALL = dict(
    model="planted-swiglu",
    resolution=224,
    limit_layers=3,
    directions_method="expected",
    held_out=("astronaut", "camera"),
    num_workers=0,
    quiet=True,
)


@pytest.mark.slow
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


@pytest.mark.slow
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


def final_eps(output):
    return torch.load(output / "checkpoint" / "state.pt", weights_only=True)["eps"]


@pytest.mark.slow
def test_resume_after_a_real_signal_ends_with_the_same_eps(train_folder, tmp_path):
    """3 photos, 8 steps: the run cycles through them 2.67 times, is killed mid-pass and resumed across the
    pass boundaries, and ends bit-identical to an uninterrupted run."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted(train_folder.glob("*_a.png"))[:3]:
        (photos / path.name).write_bytes(path.read_bytes())
    extra = ("--save-every", "1", "--max-steps", "8")
    # the uninterrupted run and the resumed one in this process, the one that gets the signal in a forked
    # copy of it; one thread in all three, as the fork has (the same kernels, the same sums)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli_main(repair_args(photos, tmp_path / "full", *extra)) == 0
        interrupted = tmp_path / "interrupted"
        stderr = tmp_path / "stderr.txt"
        pid = fork_cli(repair_args(photos, interrupted, *extra), tmp_path / "stdout.txt", stderr)
        checkpoint = interrupted / "checkpoint" / "state.pt"
        wait_for_file(pid, checkpoint)
        os.kill(pid, signal.SIGTERM)
        assert wait_forked(pid) == 130, stderr.read_text()
        assert "interrupted by SIGTERM" in stderr.read_text()
        stopped_at = torch.load(checkpoint, weights_only=True)["state"]["step"]
        assert 0 < stopped_at < 8
        assert not (interrupted / "model.safetensors").exists()
        assert (interrupted / "INCOMPLETE").exists() and not (interrupted / ".lock").exists()
        assert cli_main(repair_args(photos, interrupted, *extra, "--resume")) == 0
    finally:
        torch.set_num_threads(threads)
    assert not (interrupted / "INCOMPLETE").exists()
    full, resumed = final_eps(tmp_path / "full"), final_eps(interrupted)
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    full_report = json.loads((tmp_path / "full" / "repair_report.json").read_text())
    resumed_report = json.loads((interrupted / "repair_report.json").read_text())
    assert full_report["data_passes"] == pytest.approx(8 / 3, abs=1e-4)
    for key in ("steps", "updates", "images", "loss_layer_histogram", "clear_rate_curve", "data_passes"):
        assert full_report[key] == resumed_report[key], key


@pytest.mark.slow
def test_two_processes_equal_one_process_with_two_images_per_step(train_folder, tmp_path):
    """Two ranks of one image each per step (forked copies of this process with the environment
    ``accelerate launch --multi_gpu --num_processes 2`` gives its processes on a CPU: tests/forked.py)
    end with the ε of one process taking both images per step."""
    extra = ("--max-steps", "6", "--save-every", "0")
    # one thread everywhere, so that both runs use the same matmul kernels and summation order
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the one-process run in this process
        assert cli_main(repair_args(train_folder, tmp_path / "one", *extra, "--images-per-step", "2")) == 0
    finally:
        torch.set_num_threads(threads)
    codes, _, stderr = run_ranks(repair_args(train_folder, tmp_path / "two", *extra), 2, tmp_path / "ranks")
    assert codes == [0, 0], "".join(stderr)[-3000:]
    one, two = final_eps(tmp_path / "one"), final_eps(tmp_path / "two")
    assert any(bool(v.any()) for v in one.values())
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-5, atol=1e-8), name
    report_one = json.loads((tmp_path / "one" / "repair_report.json").read_text())
    report_two = json.loads((tmp_path / "two" / "repair_report.json").read_text())
    assert report_two["hardware"]["num_processes"] == 2
    for key in ("steps", "updates", "images", "loss_layer_histogram", "clear_rate_curve"):
        assert report_one[key] == report_two[key], key


@pytest.mark.slow
def test_compiled_repair_follows_the_eager_repair(train_folder, tmp_path):
    """A whole run with ``--compile`` (float32, TF32 setting on a CPU = float32): the same images give
    a loss at the same blocks as the eager run for 12 steps, and ε ends within 1e-4 relative."""
    config = dict(SMALL, data=str(train_folder), max_steps=12, held_out=("astronaut",), precision="fp32")
    eager = repair(RepairConfig(**config, output=str(tmp_path / "eager"))).report.to_json()
    compiled = repair(RepairConfig(**config, output=str(tmp_path / "compiled"), compile=True)).report.to_json()
    assert compiled["loss_layer_histogram"] == eager["loss_layer_histogram"]
    assert compiled["images"] == eager["images"] and eager["updates"] >= 6
    assert (
        compiled["hyperparameters"]["compile"] is True and compiled["hyperparameters"]["compile_backend"] == "inductor"
    )
    eager_eps, compiled_eps = final_eps(tmp_path / "eager"), final_eps(tmp_path / "compiled")
    scale = torch.cat([e.flatten() for e in eager_eps.values()]).norm()
    difference = torch.cat([(compiled_eps[n] - eager_eps[n]).flatten() for n in eager_eps]).norm()
    print(f"ε after 12 steps, compiled vs eager scan: {difference / scale:.2e} relative")
    assert difference / scale < 1e-4
