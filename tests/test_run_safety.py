"""A flag or a typo never deletes a model or a run; full disks and read-only folders end in one line;
``--resume`` notices other weights and another number of processes (issue 17, points 1, 2, 6, 7)."""

import contextlib
import errno
import shutil
import subprocess
from pathlib import Path

import pytest
import safetensors
import timm.models._hub
import torch
from cli_checks import Interrupted, cli, error_line, snapshot
from test_repair_runs import TINY as TINY_RUN

from sinder_hub.convert import save_timm
from sinder_hub.data import TRAIN_SAMPLES, sample_images
from sinder_hub.errors import RunFolderError
from sinder_hub.planted import planted_backbone
from sinder_hub.training import RepairConfig, repair
from sinder_hub.training.state import read_checkpoint

pytestmark = pytest.mark.slow  # models end to end, subprocesses or a browser: make test-fast skips this file

ARGS = ["--resolution", "224", "--limit-layers", "3", "--directions-method", "expected", "--held-out", "astronaut",
        "--num-workers", "0", "--quiet", "--save-every", "0", "--max-steps", "3"]  # fmt: skip
TINY = {key: value for key, value in TINY_RUN.items() if key != "model"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for name, image in list(sample_images(TRAIN_SAMPLES).items())[:3]:
        image.resize((224, 224)).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def finished(photos, tmp_path_factory):
    """A finished run of planted-swiglu, with a user's file inside its checkpoint/ folder."""
    output = tmp_path_factory.mktemp("finished") / "run"
    assert cli(["repair", "--model", "planted-swiglu", "--data", str(photos), "--output", str(output), *ARGS]) == 0
    (output / "checkpoint" / "my-notes.txt").write_text("mine")
    return output


def timm_folder(path: Path, seed: int) -> Path:
    save_timm(planted_backbone("planted-swiglu", seed=seed), path)
    return path


def test_overwrite_never_deletes_the_model_it_was_asked_to_repair(photos, tmp_path, capsys):
    model = timm_folder(tmp_path / "model", seed=2)
    before = snapshot(model)
    for output in (model, model.parent):  # the model's folder, and a folder containing it
        argv = ["repair", "--model", str(model), "--data", str(photos), "--output", str(output), "--overwrite"]
        assert cli([*argv, *ARGS]) == 2
        line = error_line(capsys)
        assert "the --model" in line and "write the run into another folder" in line
    assert snapshot(model) == before


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "planted-swigul"], "unknown planted backbone"),  # a typo: no model
        (["--model", "planted-swiglu", "--resolution", "500"], "--resolution 500"),  # fails once the model loaded
    ],
)
def test_a_bad_overwrite_leaves_the_previous_run_as_it_was(finished, photos, capsys, extra, message):
    before = snapshot(finished)
    argv = ["repair", "--data", str(photos), "--output", str(finished), "--overwrite", *ARGS, *extra]
    assert cli(argv) == 2
    assert message in error_line(capsys)
    assert snapshot(finished) == before  # model, report, pictures, checkpoint and the user's file


def test_overwrite_replaces_only_the_run_files_by_name(finished, photos, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "notes.txt").write_text("mine too")
    old_state = (run / "checkpoint/state.pt").read_bytes()
    argv = ["repair", "--model", "planted-swiglu", "--data", str(photos), "--output", str(run), "--overwrite"]
    assert cli([*argv, *ARGS, "--seed", "1"]) == 0
    assert (run / "checkpoint/my-notes.txt").read_text() == "mine"
    assert (run / "notes.txt").read_text() == "mine too"
    assert (run / "checkpoint/state.pt").read_bytes() != old_state


class DiskFull(RuntimeError):
    pass


def test_a_full_disk_while_checkpointing_is_one_line_and_a_plain_start_works_again(
    photos, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4736 vs 4629")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", full_disk)
        assert cli(["repair", "--model", "planted-swiglu", "--data", str(photos), "--output", str(run), *ARGS]) == 1
    line = error_line(capsys)
    assert f"cannot write the checkpoint {run / 'checkpoint/state.pt'}" in line and "No space left" in line
    assert not run.exists()  # nothing was computed that a resume could use: no trace, no INCOMPLETE loop
    assert cli(["repair", "--model", "planted-swiglu", "--data", str(photos), "--output", str(run), *ARGS]) == 0


def test_a_full_disk_while_writing_the_model_leaves_no_model_and_resume_finishes(photos, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    save_for_hf = timm.models._hub.save_for_hf

    def full_disk(model, folder, **kwargs):
        save_for_hf(model, folder, **kwargs)  # the staged files are written, then the disk fills
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    argv = ["repair", "--model", "planted-swiglu", "--data", str(photos), "--output", str(run), *ARGS]
    with monkeypatch.context() as patch:
        patch.setattr(timm.models._hub, "save_for_hf", full_disk)
        assert cli(argv) == 1
    line = error_line(capsys)
    assert f"cannot write the repaired model {run / 'model.safetensors'}" in line and "free some space" in line
    assert sorted(p.name for p in run.iterdir()) == ["INCOMPLETE", "checkpoint"]  # nothing half-written
    assert cli(argv) == 2 and "--resume" in error_line(capsys)
    assert cli([*argv, "--resume"]) == 0
    assert (run / "model.safetensors").is_file() and not (run / "INCOMPLETE").exists()


@contextlib.contextmanager
def read_only_folder(path: Path):
    """A read-only tmpfs at ``path`` (root ignores permission bits); skips where mounting is not allowed."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_a_read_only_output_is_one_line_before_any_model(photos, tmp_path, capsys, no_model):
    with read_only_folder(tmp_path / "ro") as folder:
        argv = ["repair", "--model", "planted-swiglu", "--data", str(photos), "--output", str(folder / "run"), *ARGS]
        assert cli(argv) == 1
        line = error_line(capsys)
        assert f"cannot create the run folder {folder / 'run'}: Read-only file system" in line
        assert "choose another output folder" in line


def test_resume_refuses_other_weights_at_the_same_path(photos, tmp_path, capsys):
    model = timm_folder(tmp_path / "model", seed=2)
    run = tmp_path / "run"
    config = dict(TINY, model=str(model), data=str(photos), output=str(run), max_steps=3)
    assert repair(RepairConfig(**config), stop=Interrupted()).interrupted_by == "SIGTERM"
    shutil.rmtree(model)
    timm_folder(model, seed=3)  # same path, other weights
    argv = ["repair", "--model", str(model), "--data", str(photos), "--output", str(run), *ARGS, "--resume"]
    assert cli(argv) == 2
    line = error_line(capsys)
    assert f"the weights of --model {model} changed since the checkpoint was written" in line
    assert (run / "INCOMPLETE").exists() and (run / "checkpoint/state.pt").exists()  # the run is kept


def test_resume_refuses_another_number_of_processes(photos, tmp_path):
    run = tmp_path / "run"
    config = RepairConfig(**TINY, model="planted-swiglu", data=str(photos), output=str(run), max_steps=3)
    repair(config, stop=Interrupted())
    from sinder_hub.data import list_images
    from sinder_hub.training.state import data_digest, select_images

    digest = data_digest(select_images(list_images(photos), config.num_images))
    read_checkpoint(run / "checkpoint/state.pt", config, digest, num_processes=1)
    with pytest.raises(RunFolderError, match="written by a run on 1 processes and this one has 2"):
        read_checkpoint(run / "checkpoint/state.pt", config, digest, num_processes=2)


def test_disk_errors_name_the_cause_and_the_way_out():
    from sinder_hub.files import output_error

    error = output_error("out/model.safetensors", "write", OSError(errno.EROFS, "Read-only file system"))
    assert (
        str(error)
        == "cannot write out/model.safetensors: Read-only file system; the file system is read-only; choose another output folder"
    )
    error = output_error("out", "write", DiskFull("No space left on device"))
    assert "No space left on device" in str(error) and "free some space" in str(error)
