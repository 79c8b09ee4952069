"""``evaluate`` never reuses or prints a figure of other data, and one command at a time writes an ``--out``:
cells keyed by the contents of every file they read, a lock on ``--out``, empty or too small splits and
impossible resolutions refused in one line before any model loads (issue #24, round 3)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from cli_checks import cli, one_error_line, snapshot
from forked import fork_cli, wait_for_file, wait_forked
from PIL import Image
from tiny import stand_in_backbones, tiny_vit

import sinder_hub.backbones
from sinder_hub.synthetic import make_shapes_dataset, make_voc2012

SIZE = 28


@pytest.fixture(scope="module")
def bitmaps(tmp_path_factory):
    """The shapes classification set as uncompressed BMPs: rewriting an image keeps its file size."""
    source = make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_per_class=2, size=SIZE) / "classification"
    root = tmp_path_factory.mktemp("bitmaps")
    for path in sorted(source.rglob("*.png")):
        target = root / path.relative_to(source).with_suffix(".bmp")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("RGB").save(target)
    return root


@pytest.fixture
def loads(monkeypatch):
    """The specs ``load_backbone`` was asked for; the backbones are tiny random ViTs seeded by the spec."""
    return stand_in_backbones(monkeypatch, SIZE)


def evaluate(data, out, *args, task="knn") -> int:
    argv = ["evaluate", "--task", task, "--data", str(data), "--resolution", str(SIZE), "--workers", "0"]
    return cli([*argv, "--out", str(out), *map(str, args)])


def figures_of(document: dict) -> dict[str, float]:
    """``{variant label: top-1}`` of a one-cell knn results.json."""
    return {
        variant["label"]: next(iter(variant["cells"].values()))["result"]["top1"] for variant in document["variants"]
    }


def figures(out: Path) -> dict[str, float]:
    return figures_of(json.loads((out / "results.json").read_text()))


def rewrite_keeping_size_and_time(image: Path, contents: Path) -> None:
    """Give ``image`` the pixels of ``contents`` (same size in pixels and bytes) and its old modification time."""
    before = image.stat()
    Image.open(contents).save(image)
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = image.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


@pytest.mark.slow
def test_a_cell_on_rewritten_images_is_computed_again(bitmaps, tmp_path, loads, capsys):
    """Same names, count, sizes and times, other contents: the original's cell is run again, and its figure
    is the one a fresh run on the new contents gives, not the old one."""
    data = tmp_path / "data"
    shutil.copytree(bitmaps, data)
    out = tmp_path / "out"
    assert evaluate(data, out, "--model", "a") == 0
    old = json.loads((out / "results.json").read_text())
    for folder in sorted((data / "val").iterdir()):  # every val image becomes a training image of its class
        for image, train in zip(sorted(folder.iterdir()), sorted((data / "train" / folder.name).iterdir())):
            rewrite_keeping_size_and_time(image, train)
    capsys.readouterr()
    loads[:] = []
    assert evaluate(data, out, "--model", "a", "--compare", "x") == 0
    assert loads == ["a", "x"] and "reusing" not in capsys.readouterr().out
    assert evaluate(data, tmp_path / "fresh", "--model", "a", "--compare", "x") == 0
    new, fresh = figures(out), figures(tmp_path / "fresh")
    assert new == fresh and new["original"] != figures_of(old)["original"]
    assert json.loads((out / "results.json").read_text())["data_sha256"] != old["data_sha256"]
    loads[:] = []
    assert evaluate(data, out, "--model", "a", "--compare", "x") == 0  # unchanged data: reused
    assert loads == [] and figures(out) == fresh


@pytest.mark.slow
def test_a_folder_variant_whose_weights_changed_is_run_again(bitmaps, tmp_path, loads, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text('{"architecture": "vit_small_patch14_dinov2"}')
    (folder / "model.safetensors").write_bytes(b"first")
    out = tmp_path / "out"
    assert evaluate(bitmaps, out, "--model", "a", "--compare", f"sinder={folder}") == 0
    loads[:] = []
    assert evaluate(bitmaps, out, "--model", "a", "--compare", f"sinder={folder}") == 0
    assert loads == []
    (folder / "model.safetensors").write_bytes(b"other")  # same size, other weights
    assert evaluate(bitmaps, out, "--model", "a", "--compare", f"sinder={folder}") == 0
    assert loads == [str(folder)]


@pytest.mark.slow
def test_a_second_evaluate_on_a_busy_out_stops_in_one_line_touching_nothing(bitmaps, tmp_path, monkeypatch, capsys):
    """Two real processes: the first holds ``--out`` (stopped while loading its model); the second gets one
    ``error:`` line, exit 2, loads nothing and leaves the folder as it was; the first then finishes."""
    out, loading, go = tmp_path / "out", tmp_path / "loading", tmp_path / "go"
    parent = os.getpid()

    def load(spec: str):
        assert os.getpid() != parent, "the second command loaded a model"
        loading.touch()
        deadline = time.monotonic() + 120
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return tiny_vit(seed=len(spec), img_size=SIZE)

    monkeypatch.setattr(sinder_hub.backbones, "load_backbone", load)
    args = ["evaluate", "--task", "knn", "--data", str(bitmaps), "--resolution", str(SIZE), "--workers", "0"]
    first = fork_cli([*args, "--out", str(out), "--model", "a"], tmp_path / "first.out", tmp_path / "first.err")
    try:
        wait_for_file(first, loading)
        before = snapshot(out)
        assert ".lock" in before
        line = one_error_line(capsys, cli([*args, "--out", str(out), "--model", "a"]), 2, f"--out {out}", "locked by")
        assert f"process {first}" in line and snapshot(out) == before
    finally:
        go.touch()
        code = wait_forked(first)
    assert code == 0, (tmp_path / "first.err").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "results.png"]


@pytest.fixture
def voc(tmp_path):
    return make_voc2012(tmp_path / "voc", n_train=3, n_val=2, shape=(SIZE, SIZE))


@pytest.mark.parametrize("task", ["linseg", "kmeans"])
def test_an_empty_split_is_refused_before_any_model(voc, tmp_path, capsys, no_model, task):
    (voc / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    code = evaluate(voc, tmp_path / "out", "--model", "a", task=task)
    one_error_line(capsys, code, 2, f"--data {voc}", "val split", "holds no images", task)
    assert not (tmp_path / "out").exists()


def test_more_clusters_than_patch_tokens_are_refused_before_any_model(voc, tmp_path, capsys, no_model):
    # 2 val images at 28 px of 14-px patches: at least 8 tokens
    code = evaluate(voc, tmp_path / "out", "--model", "planted-gelu", "--clusters", "9", task="kmeans")
    one_error_line(capsys, code, 2, "--clusters 9", "8 patch tokens", "val split")


@pytest.mark.parametrize(
    ("resolution", "message"),
    [("30", "not a multiple of the 14-px patches of original (planted-gelu)"), ("10000", "at most 2048 px")],
)
def test_a_resolution_the_variants_cannot_take_is_refused_before_any_model(
    bitmaps, tmp_path, capsys, no_model, resolution, message
):
    argv = ["evaluate", "--task", "knn", "--data", str(bitmaps), "--workers", "0", "--out", str(tmp_path / "out")]
    code = cli([*argv, "--model", "planted-gelu", "--resolution", resolution])
    one_error_line(capsys, code, 2, f"--resolution {resolution}", message)
    code = cli([*argv, "--model", "planted-gelu", "--compare", "vit_base_patch16_224", "--resolution", "28"])
    one_error_line(capsys, code, 2, "--resolution 28", "16-px patches of vit_base_patch16_224")
    assert not (tmp_path / "out").exists()


def test_an_out_inside_the_data_or_a_model_folder_is_refused_before_any_model(bitmaps, tmp_path, capsys, no_model):
    """Results written into a class folder would become training images; into a model folder, part of its digest."""
    data = tmp_path / "data"
    shutil.copytree(bitmaps, data)
    inside = data / "train" / "disc" / "eval"
    one_error_line(
        capsys, evaluate(data, inside, "--model", "a"), 2, f"--out {inside} lies inside the --data", "another folder"
    )
    model = tmp_path / "run"
    model.mkdir()
    (model / "config.json").write_text('{"architecture": "vit_small_patch14_dinov2"}')
    code = evaluate(data, model, "--model", "a", "--compare", f"sinder={model}")
    one_error_line(capsys, code, 2, f"--out {model} is the --compare {model}")
    assert snapshot(data) == snapshot(bitmaps) and sorted(p.name for p in model.iterdir()) == ["config.json"]


def test_a_tilde_in_out_and_data_means_the_home_folder(bitmaps, tmp_path, loads, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(bitmaps, tmp_path / "data")
    assert evaluate("~/data", "~/eval", "--model", "a") == 0
    assert (tmp_path / "eval" / "results.json").is_file() and not (tmp_path / "~").exists()
