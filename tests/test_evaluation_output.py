"""``evaluate --out DIR`` treats the folder as the user's: never overwritten silently, refused before any slow work,
written atomically, a full or read-only disk in one line (exit 1), finished variants reused."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from cli_checks import cli, one_error_line
from tiny import stand_in_backbones

from sinder_hub.synthetic import make_shapes_dataset

SIZE = 28


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_per_class=2, size=SIZE) / "classification"


@pytest.fixture
def loads(monkeypatch):
    """The specs ``load_backbone`` was asked for; the backbones are tiny random ViTs seeded by the spec."""
    return stand_in_backbones(monkeypatch, SIZE)


def evaluate(shapes, out, *args) -> int:
    argv = ["evaluate", "--task", "knn", "--data", str(shapes), "--resolution", str(SIZE), "--workers", "0"]
    return cli([*argv, "--out", str(out), *map(str, args)])


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_one_more_variant_reuses_the_finished_ones(shapes, tmp_path, loads, capsys):
    out = tmp_path / "out"
    weights = tmp_path / "run.safetensors"
    weights.write_bytes(b"first")
    assert evaluate(shapes, out, "--model", "a", "--compare", f"sinder={weights}") == 0
    first = json.loads((out / "results.json").read_text())
    assert loads == ["a", str(weights)]
    assert evaluate(shapes, out, "--model", "a", "--compare", f"sinder={weights}", "reg4=ccc") == 0
    assert loads[2:] == ["ccc"]  # only the new variant is loaded and run
    second = json.loads((out / "results.json").read_text())
    assert second["variants"][:2] == first["variants"] and [v["label"] for v in second["variants"]] == [
        "original",
        "sinder",
        "reg4",
    ]
    assert "original: reusing its finished results" in capsys.readouterr().out
    weights.write_bytes(b"second")  # the same spec with other weights: its figures are made again
    assert evaluate(shapes, out, "--model", "a", "--compare", f"sinder={weights}", "reg4=ccc") == 0
    assert loads[3:] == [str(weights)]
    assert (
        json.loads((out / "results.json").read_text())["variants"][1]["weights_sha256"]
        != first["variants"][1]["weights_sha256"]
    )
    table = (out / "results.md").read_text()
    assert table.count("\n| ") == 3 and "| reg4 (`ccc`) |" in table


def test_foreign_edited_or_other_results_are_refused_before_any_model(shapes, tmp_path, loads, capsys, monkeypatch):
    out = tmp_path / "out"
    assert evaluate(shapes, out, "--model", "a", "--compare", "b") == 0
    capsys.readouterr()
    before, loads[:] = listing(out), []
    refusals = [
        (("--model", "a", "--compare", "b", "--resolution", "42"), "holds results made with resolution = 28, not 42"),
        (("--model", "a"), "holds results of the variant b (b), which this command does not list"),
        (("--model", "a", "--compare", "c=b"), "holds results of the variant b (b)"),
        (("--model", "a", "--compare", "b", "--task", "knn", "linear"), "holds results made with cells ="),
    ]
    for args, message in refusals:
        one_error_line(capsys, evaluate(shapes, out, *args), 2, f"--out {out} {message}", "--overwrite")
    (out / "results.md").write_text((out / "results.md").read_text() + "my note\n")
    one_error_line(
        capsys, evaluate(shapes, out, "--model", "a", "--compare", "b"), 2, "holds a results.md that was changed"
    )
    assert loads == [] and listing(out)["results.json"] == before["results.json"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text('{"accuracy": 1}')
    one_error_line(capsys, evaluate(shapes, other, "--model", "a"), 2, "results.json that sinder-hub evaluate did not")
    (other / "results.json").unlink()
    (other / "results.png").write_bytes(b"my picture")
    one_error_line(capsys, evaluate(shapes, other, "--model", "a"), 2, "holds results.png but no results.json")
    assert listing(other) == {"results.png": b"my picture"} and loads == []
    assert evaluate(shapes, other, "--model", "a", "--overwrite") == 0
    assert sorted(listing(other)) == ["results.json", "results.md", "results.png"]
    (tmp_path / "file").write_text("x")
    one_error_line(capsys, evaluate(shapes, tmp_path / "file", "--model", "a"), 2, "is a file; expected a folder")


def test_a_read_only_folder_fails_in_one_line_before_any_model(shapes, tmp_path, loads, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "write_bytes", read_only)
    one_error_line(capsys, evaluate(shapes, out, "--model", "a"), 1, "--out", "Read-only file system")
    assert loads == [] and list(out.iterdir()) == []


def test_a_full_disk_fails_in_one_line_and_keeps_the_previous_results(shapes, tmp_path, loads, capsys, monkeypatch):
    out = tmp_path / "out"
    assert evaluate(shapes, out, "--model", "a") == 0
    capsys.readouterr()
    before = listing(out)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    code = evaluate(shapes, out, "--model", "a", "--compare", "b")
    line = one_error_line(capsys, code, 1, "results.md", "No space left on device")
    assert "Traceback" not in line and listing(out) == before  # atomic: nothing half-written, no temporary left
