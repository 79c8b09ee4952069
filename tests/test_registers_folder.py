"""A test-time-registers folder: ``sinder-hub registers`` writes it with the run-folder rules, ``load_backbone``
takes it as a model spec, ``diagnose --compare`` puts it beside the original and a repair, and what
cannot hold hooks (export, repair, push) refuses it in one line."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from sinder_hub import load_backbone
from sinder_hub.cli import main as cli
from sinder_hub.convert import save_timm
from sinder_hub.data import HELD_OUT_SAMPLES, TRAIN_SAMPLES, sample_images
from sinder_hub.planted import PLANTED_BLOCK, planted_backbone
from sinder_hub.registers import registers_of

pytestmark = pytest.mark.slow  # models end to end, subprocesses or a browser: make test-fast skips this file

FOUR = ("astronaut", "camera")


def one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for name, image in list(sample_images(TRAIN_SAMPLES).items())[:6]:
        image.resize((224, 224)).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def registers_folder(photos, tmp_path_factory) -> Path:
    """planted-swiglu's registers, searched on 6 photos, measured on two held-out images."""
    model = tmp_path_factory.mktemp("base") / "model"
    save_timm(planted_backbone("planted-swiglu"), model)
    output = tmp_path_factory.mktemp("ttr") / "ttr"
    argv = ["registers", "--model", str(model), "--images", str(photos), "--output", str(output),
            "--held-out", *FOUR]  # fmt: skip
    assert cli(argv) == 0
    return output


def test_a_registers_run_writes_its_folder_and_finds_the_planted_units(registers_folder):
    assert sorted(p.name for p in registers_folder.iterdir()) == [
        "before_after_astronaut.png", "before_after_camera.png", "registers_report.json", "test_time_registers.json",
    ]  # fmt: skip
    found = json.loads((registers_folder / "test_time_registers.json").read_text())
    hidden = planted_backbone("planted-swiglu").blocks[PLANTED_BLOCK].mlp.fc2.in_features
    units = {(n["layer"], n["unit"]) for n in found["neurons"]}
    assert {(PLANTED_BLOCK, hidden - 2), (PLANTED_BLOCK, hidden - 1)} <= units
    report = json.loads((registers_folder / "registers_report.json").read_text())
    held = report["held_out"]
    assert held["before"]["total"] > 0 and held["after"]["total"] <= 0.1 * held["before"]["total"]
    assert held["normal_token_cosine"] > 0.99 and report["base_sha256"] == found["base_sha256"]


def test_the_folder_is_a_model_spec(registers_folder):
    model = load_backbone(registers_folder)
    assert registers_of(model) is not None
    image = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = model.forward_features(image)
    assert tokens.shape == (2, 1 + 16 * 16, model.embed_dim)  # the register is never in an output


def test_a_second_run_into_the_folder_is_refused(registers_folder, photos, capsys, no_model):
    before = sorted((p.name, p.stat().st_mtime_ns) for p in registers_folder.iterdir())
    argv = ["registers", "--model", "planted-swiglu", "--images", str(photos), "--output", str(registers_folder)]
    assert cli(argv) == 2
    assert "already holds a test-time registers run" in one_line(capsys)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in registers_folder.iterdir()) == before


def test_other_weights_under_the_base_path_are_refused(registers_folder, tmp_path):
    copied = tmp_path / "ttr"
    shutil.copytree(registers_folder, copied)
    found = json.loads((copied / "test_time_registers.json").read_text())
    other = tmp_path / "other"
    save_timm(planted_backbone("planted-swiglu", seed=3), other)
    found["base_model"] = str(other)
    (copied / "test_time_registers.json").write_text(json.dumps(found))
    with pytest.raises(Exception, match="the neurons were found on weights with sha256"):
        load_backbone(copied)


def test_what_cannot_hold_hooks_refuses_a_registers_folder(registers_folder, photos, tmp_path, capsys):
    assert cli(["export", str(registers_folder), "--to", str(tmp_path / "out"), "--format", "timm"]) == 2
    assert "carries test-time registers, which are hooks, not weights" in one_line(capsys)
    assert not (tmp_path / "out").exists()
    assert cli(["push", str(registers_folder), "--repo-id", "alice/x", "--dry-run"]) == 2
    assert "holds test-time registers" in one_line(capsys)
    argv = ["repair", "--model", str(registers_folder), "--data", str(photos), "--output", str(tmp_path / "run"),
            "--resolution", "224", "--directions-method", "expected", "--quiet", "--num-workers", "0"]  # fmt: skip
    assert cli(argv) == 2
    assert "carries test-time registers" in one_line(capsys)
    assert not (tmp_path / "run").exists()


def test_diagnose_compares_three_variants(registers_folder, tmp_path, capsys):
    model = planted_backbone("planted-swiglu")
    fc2 = model.blocks[PLANTED_BLOCK].mlp.fc2  # a hand repair: the trigger's top singular triplet removed
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(fc2.weight, full_matrices=False)
        fc2.weight -= s[0] * torch.outer(u[:, 0], vh[0])
    save_timm(model, tmp_path / "repaired")
    out, held_out = tmp_path / "out", tmp_path / "held-out"
    held_out.mkdir()
    for name, image in sample_images(HELD_OUT_SAMPLES[:3]).items():  # images the search never saw
        image.resize((224, 224)).save(held_out / f"{name}.png")
    argv = ["diagnose", "--model", "planted-swiglu", "--compare", f"sinder={tmp_path / 'repaired'}",
            f"registers={registers_folder}", "--method", "expected", "--out", str(out), "--images", str(held_out)]  # fmt: skip
    assert cli(argv) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("variants at the last block") :].splitlines()
    assert [row.split()[0] for row in table[2:5]] == ["original", "sinder", "registers"]
    report = json.loads((out / "report.json").read_text())
    assert list(report) == ["original", "sinder", "registers"]
    original, registers = report["original"]["blocks"][-1], report["registers"]["blocks"][-1]
    assert original["defects_per_image"] >= 1 and registers["defects_per_image"] < 0.2 * original["defects_per_image"]
    assert report["original"]["to_first"]["normal_token_cosine"] == pytest.approx(1.0)
    assert report["registers"]["to_first"]["normal_token_cosine"] > 0.99
    for picture in ("norm_pca.png", "angles.png", "variants.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
