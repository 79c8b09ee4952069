"""Repair runs are safe with a user's files: flags checked before any model, run folders never
overwritten by accident, locks, honest outcomes, checkpoints never unpickled, atomic final files."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_checks import Interrupted, cli, error_line, repair_args, snapshot
from forked import fork_cli, wait_forked
from PIL import Image

import sinder_hub.analysis
import sinder_hub.backbones
from sinder_hub.data import TRAIN_SAMPLES, sample_images
from sinder_hub.training import RepairConfig, repair

TINY = dict(
    model="planted-swiglu",
    resolution=224,
    limit_layers=3,
    directions_method="expected",
    held_out=("astronaut",),
    num_workers=0,
    quiet=True,
    save_every=0,
)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Four training photos at 224 px."""
    folder = tmp_path_factory.mktemp("photos")
    for name, image in list(sample_images(TRAIN_SAMPLES).items())[:4]:
        image.resize((224, 224)).save(folder / f"{name}.png")
    return folder


def tiny_args(photos, output, *extra):
    """``repair_args`` for three steps without checkpoints on the way."""
    return repair_args(photos, output, "--max-steps", "3", "--save-every", "0", *extra)


@pytest.mark.parametrize(
    "extra, named",
    [
        (("--resolution", "0"), "--resolution 0"),
        (("--lr", "-1"), "--lr -1"),
        (("--lr", "nan"), "--lr nan"),
        (("--images-per-step", "0"), "--images-per-step 0"),
        (("--kernel", "4"), "--kernel 4"),
        (("--temperature", "0"), "--temperature 0"),
        (("--num-images", "0"), "--num-images 0"),
        (("--momentum", "1"), "--momentum 1"),
        (("--held-out", "lena"), "--held-out lena"),
        (("--lr", "abc"), "--lr"),
        (("--precision", "fp16"), "--precision"),
        (("--compile", "--compile-backend", "cudagraphs"), "--compile-backend"),
        (("--resume",), "no checkpoint"),
        (("--resume", "--overwrite"), "exclude each other"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2_before_any_model(photos, tmp_path, capsys, no_model, extra, named):
    assert cli(tiny_args(photos, tmp_path / "run", *extra)) == 2
    line = error_line(capsys)
    assert named in line, line
    assert not (tmp_path / "run").exists()  # no folder for a run that could not start


def test_bad_paths_are_one_line_and_exit_2_before_any_model(photos, tmp_path, capsys, no_model):
    image = next(photos.glob("*.png"))
    assert cli(tiny_args(image, tmp_path / "run")) == 2  # an image file as --data
    assert str(image) in error_line(capsys)
    (tmp_path / "file").write_text("x")
    assert cli(tiny_args(photos, tmp_path / "file")) == 2  # --output is a file
    assert "is a file" in error_line(capsys)
    assert cli(["repair", "--output", str(tmp_path / "run")]) == 2  # no --data
    assert "--data" in error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resolution_not_a_multiple_of_the_patch_size_fails_before_the_directions(photos, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        sinder_hub.analysis,
        "singular_defect_directions",
        lambda *a, **k: (_ for _ in ()).throw(AssertionError("directions computed")),
    )
    assert cli(tiny_args(photos, tmp_path / "run", "--resolution", "500")) == 2
    line = error_line(capsys)
    assert "--resolution 500" in line and "14-px patch" in line and "504" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_existing_run_is_never_replaced_unless_asked(photos, tmp_path, capsys):
    output = tmp_path / "run"
    assert cli(tiny_args(photos, output)) == 0
    before = snapshot(output)
    assert "repair_report.json" in before and "INCOMPLETE" not in before and ".lock" not in before
    assert cli(tiny_args(photos, output)) == 2
    assert "already holds a repair run" in error_line(capsys)
    assert snapshot(output) == before
    # --overwrite replaces the run's own files (the stale picture of another held-out image goes) and nothing else
    (output / "notes.txt").write_text("mine")
    assert cli(tiny_args(photos, output, "--overwrite", "--held-out", "camera")) == 0
    after = snapshot(output)
    assert "before_after_astronaut.png" not in after and "before_after_camera.png" in after
    assert after["notes.txt"] == b"mine"
    report = json.loads(after["repair_report.json"])
    assert report["held_out"]["images"] == ["camera"] and report["outcome"]["status"] == "ok"


@pytest.mark.slow
def test_a_locked_folder_is_refused_at_once_and_a_stale_lock_is_taken_over(photos, tmp_path, capsys, monkeypatch):
    output = tmp_path / "run"
    output.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (output / ".lock").write_text(f"{sleeper.pid} {os.uname().nodename}\n")
        monkeypatch.setattr(sinder_hub.backbones, "load_backbone", lambda *a, **k: pytest.fail("model loaded"))
        assert cli(tiny_args(photos, output)) == 2
        assert f"locked by process {sleeper.pid}" in error_line(capsys)
    finally:
        sleeper.kill()
        sleeper.wait()
    monkeypatch.undo()
    assert cli(tiny_args(photos, output)) == 0  # its process is gone: the lock is stale
    assert not (output / ".lock").exists() and (output / "repair_report.json").exists()


@pytest.mark.slow
def test_two_runs_started_together_into_one_folder(photos, tmp_path):
    """Exactly one of two simultaneous runs writes the folder; the other stops at once with one line, exit 2."""
    output = tmp_path / "run"
    logs = [(tmp_path / f"out{k}.txt", tmp_path / f"err{k}.txt") for k in range(2)]
    pids = [fork_cli(tiny_args(photos, output), out, err) for out, err in logs]
    results = [(wait_forked(pid), out.read_text(), err.read_text()) for pid, (out, err) in zip(pids, logs)]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, _, err in results if code == 2).strip().splitlines()
    assert len(loser) == 1 and ("locked by process" in loser[0] or "already holds" in loser[0]), loser
    assert sum("wrote" in out for _, out, _ in results) == 1
    report = json.loads((output / "repair_report.json").read_text())
    assert report["steps"] == 3 and not (output / "INCOMPLETE").exists() and not (output / ".lock").exists()


def interrupted_run(photos, output, monkeypatch, **overrides):
    result = repair(
        RepairConfig(**TINY, data=str(photos), output=str(output), max_steps=6, **overrides), stop=Interrupted()
    )
    assert result.interrupted_by == "SIGTERM" and (output / "checkpoint/state.pt").exists()
    assert (output / "INCOMPLETE").exists() and not (output / "repair_report.json").exists()


@pytest.mark.slow
def test_resume_refuses_changed_data_changed_flags_and_a_finished_run(photos, tmp_path, capsys, monkeypatch):
    output = tmp_path / "run"
    data = tmp_path / "data"
    data.mkdir()
    for path in photos.glob("*.png"):
        (data / path.name).write_bytes(path.read_bytes())
    interrupted_run(data, output, monkeypatch)
    args = tiny_args(data, output, "--max-steps", "6", "--resume")
    assert cli([*args[:-3], "--lr", "0.01", *args[-3:]]) == 2
    assert "belongs to a different run (--lr: checkpoint 0.005 vs now 0.01)" in error_line(capsys)
    Image.open(next(photos.glob("*.png"))).save(data / "zz_new.png")
    assert cli(args) == 2
    assert "changed since" in error_line(capsys)
    (data / "zz_new.png").unlink()
    assert cli(args) == 0
    assert cli(args) == 2
    assert "holds a finished run" in error_line(capsys)


@pytest.mark.slow
def test_resume_never_unpickles_and_names_a_truncated_checkpoint(photos, tmp_path, capsys, monkeypatch):
    output = tmp_path / "run"
    interrupted_run(photos, output, monkeypatch)
    checkpoint = output / "checkpoint/state.pt"
    good = checkpoint.read_bytes()
    checkpoint.write_bytes(good[: len(good) // 2])
    assert cli(tiny_args(photos, output, "--max-steps", "6", "--resume")) == 2
    line = error_line(capsys)
    assert f"cannot read checkpoint {checkpoint}" in line

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"config": Payload()}, checkpoint)
    assert cli(tiny_args(photos, output, "--max-steps", "6", "--resume")) == 2
    assert f"cannot read checkpoint {checkpoint}" in error_line(capsys)
    assert not marker.exists()


@pytest.mark.slow
def test_runs_that_change_nothing_or_ruin_the_model_exit_1(photos, tmp_path, capsys):
    torch.set_float32_matmul_precision("medium")
    # no defect anywhere: 0 updates
    assert cli(tiny_args(photos, tmp_path / "clear", "--mask-thr", "1000", "--allow-no-outliers")) == 1
    line = error_line(capsys)
    assert "failed run, no model written" in line and "0 updates: all 3 images were clear" in line
    report = json.loads((tmp_path / "clear/repair_report.json").read_text())
    assert report["outcome"]["status"] == "failed" and not (tmp_path / "clear/model.safetensors").exists()
    assert torch.get_float32_matmul_precision() == "medium"  # the caller's setting is restored
    # every image unreadable: the run stops after one pass
    junk = tmp_path / "junk"
    junk.mkdir()
    for k in range(3):
        (junk / f"{k}.png").write_text("not an image")
    assert cli(tiny_args(junk, tmp_path / "junk-run", "--max-steps", "100")) == 1
    assert "none of the 3 images could be read" in error_line(capsys)
    report = json.loads((tmp_path / "junk-run/repair_report.json").read_text())
    assert report["steps"] == 3 and report["stopped_because"] == "no_readable_images"
    # a huge learning rate ruins the features: degraded, kept only with --allow-degraded
    assert cli(tiny_args(photos, tmp_path / "ruined", "--lr", "1000")) == 1
    line = error_line(capsys)
    assert "degraded run" in line and "normal-token cosine" in line
    assert cli(tiny_args(photos, tmp_path / "kept", "--lr", "1000", "--allow-degraded")) == 0
    assert "warning: degraded" in capsys.readouterr().err
    report = json.loads((tmp_path / "kept/repair_report.json").read_text())
    assert report["outcome"]["status"] == "degraded" and (tmp_path / "kept/model.safetensors").exists()
    torch.set_float32_matmul_precision("highest")


def die_during_final_writes(where: str, offset: int):
    """For a forked run: kill -9 itself once the model (``where="model"``) or the report has ``offset`` bytes."""
    import timm.models._hub

    import sinder_hub.files

    save_for_hf, write_text_atomic = timm.models._hub.save_for_hf, sinder_hub.files.write_text_atomic

    def die_writing(path):
        Path(path).write_bytes(Path(path).read_bytes()[:offset])
        os.kill(os.getpid(), signal.SIGKILL)

    def model_then_die(model, folder, **kwargs):
        save_for_hf(model, folder, **kwargs)
        die_writing(os.path.join(folder, "model.safetensors"))

    def report_then_die(path, text):
        if not str(path).endswith("repair_report.json"):  # INCOMPLETE and the others: written as usual
            return write_text_atomic(path, text)
        with sinder_hub.files.atomic_path(path) as tmp:
            tmp.write_text(text[:offset])
            os.kill(os.getpid(), signal.SIGKILL)

    def prepare():
        if where == "model":
            timm.models._hub.save_for_hf = model_then_die
        else:
            sinder_hub.files.write_text_atomic = report_then_die

    return prepare


@pytest.fixture(scope="module")
def finished_run(photos, tmp_path_factory):
    output = tmp_path_factory.mktemp("finished") / "run"
    assert cli(tiny_args(photos, output)) == 0
    return output


@pytest.mark.slow
@pytest.mark.parametrize("where, offset", [("model", 0), ("model", 5000), ("report", 100)])
def test_a_kill_during_the_final_writes_leaves_a_folder_marked_incomplete(
    photos, finished_run, tmp_path, where, offset
):
    """kill -9 while the model or the report is being written (at a byte offset), over an earlier complete run
    replaced with --overwrite: never a truncated model beside a report; the folder says it is incomplete."""
    import shutil

    from safetensors.torch import load_file

    output = tmp_path / "run"
    shutil.copytree(finished_run, output)
    err = tmp_path / "stderr.txt"
    pid = fork_cli(tiny_args(photos, output, "--overwrite"), tmp_path / "stdout.txt", err,
                   prepare=die_during_final_writes(where, offset))  # fmt: skip
    assert wait_forked(pid) == -signal.SIGKILL, err.read_text()[-2000:]
    assert (output / "INCOMPLETE").exists()
    assert not (output / "repair_report.json").exists()
    if (output / "model.safetensors").exists():  # a model in place is a whole one
        load_file(output / "model.safetensors")
    if offset == 5000:  # the next run cleans up after the kill and completes
        assert cli(tiny_args(photos, output, "--overwrite")) == 0
        assert not (output / "INCOMPLETE").exists() and not list(output.glob(".*tmp*"))
