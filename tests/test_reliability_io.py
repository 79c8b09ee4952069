"""Bad inputs end with one line naming the file or flag, and the right exit code, before any model loads.

Commands run in-process through ``sinder_hub.cli.main`` (fast); a few run ``python tools/X.py`` in a
subprocess to show that no traceback reaches the user.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from cli_checks import cli, one_error_line
from PIL import Image
from timm.models import save_for_hf

import sinder_hub.backbones
from sinder_hub import BackboneError, load_backbone
from sinder_hub.cards import build_model_card
from sinder_hub.convert import export
from sinder_hub.errors import RunFolderError
from sinder_hub.hub import push_folder
from sinder_hub.synthetic import make_shapes_dataset

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(embed_dim=192, depth=2, num_heads=3)


def small_vit(seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, dynamic_img_size=True, **SMALL).eval()


@pytest.fixture
def timm_folder(tmp_path):
    folder = tmp_path / "timm"
    save_for_hf(small_vit(), folder, safe_serialization=True)
    return folder


# --- weights -------------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_and_corrupt_weights_name_the_file(tmp_path, timm_folder):
    weights = tmp_path / "w.safetensors"
    safetensors.torch.save_file(small_vit().state_dict(), weights)
    truncate(weights)
    with pytest.raises(
        BackboneError, match=r"w\.safetensors: cannot read the weights, the file is truncated or corrupt"
    ):
        load_backbone(weights, architecture="vit_small_patch14_dinov2", **SMALL)
    pth = tmp_path / "w.pth"
    torch.save(small_vit().state_dict(), pth)
    truncate(pth)
    with pytest.raises(BackboneError, match=r"w\.pth: cannot read the weights"):
        load_backbone(pth)
    pth.write_bytes(b"not a checkpoint at all")
    with pytest.raises(BackboneError, match=r"w\.pth: cannot read the weights"):
        load_backbone(pth)
    truncate(timm_folder / "model.safetensors")
    with pytest.raises(BackboneError, match=r"timm/model\.safetensors: cannot read the weights"):
        load_backbone(timm_folder)


def test_truncated_bin_in_a_folder(tmp_path):
    folder = tmp_path / "bin"
    save_for_hf(small_vit(), folder, safe_serialization=False)
    assert (folder / "pytorch_model.bin").is_file()
    truncate(folder / "pytorch_model.bin")
    with pytest.raises(BackboneError, match=r"bin/pytorch_model\.bin: cannot read the weights"):
        load_backbone(folder)


def test_malicious_pickle_is_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pth"
    torch.save({"cls_token": Payload()}, path)
    with pytest.raises(BackboneError, match=r"evil\.pth: refused: the checkpoint holds objects other than tensors"):
        load_backbone(path)
    assert not marker.exists()


def test_invalid_config_json_names_file_and_position(timm_folder):
    (timm_folder / "config.json").write_text('{"architecture": "vit_small_patch14_dinov2",\n "num_classes": }')
    with pytest.raises(BackboneError, match=r"config\.json: invalid JSON at line 2 column 17"):
        load_backbone(timm_folder)
    (timm_folder / "config.json").write_text("[1, 2]")
    with pytest.raises(BackboneError, match=r"config\.json: expected a JSON object, found a list"):
        load_backbone(timm_folder)


def poisoned(model, key="blocks.1.mlp.fc1.weight", count=12):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state[key].view(-1)[:count] = float("nan")
    return state


def test_nan_weights_are_refused_on_every_path(tmp_path, monkeypatch):
    model = small_vit()
    weights = tmp_path / "model.safetensors"
    safetensors.torch.save_file(poisoned(model), weights)
    with pytest.raises(
        BackboneError, match=r"model\.safetensors: tensor blocks\.1\.mlp\.fc1\.weight has 12 NaN values"
    ):
        load_backbone(weights, architecture="vit_small_patch14_dinov2", **SMALL)
    state = poisoned(model)
    state["cls_token"][0, 0, :3] = float("inf")
    torch.save(state, tmp_path / "model.pth")
    with pytest.raises(BackboneError, match=r"model\.pth: tensor cls_token has 3 infinite values"):
        load_backbone(tmp_path / "model.pth", architecture="vit_small_patch14_dinov2", **SMALL)
    save_for_hf(model, tmp_path / "folder", safe_serialization=True)
    safetensors.torch.save_file(poisoned(model), tmp_path / "folder" / "model.safetensors")
    with pytest.raises(
        BackboneError, match=r"folder/model\.safetensors: tensor blocks\.1\.mlp\.fc1\.weight has 12 NaN"
    ):
        load_backbone(tmp_path / "folder")

    from sinder_hub.convert import to_transformers

    hf_model = to_transformers(model)
    with torch.no_grad():
        hf_model.encoder.layer[1].mlp.fc1.weight.view(-1)[:5] = float("nan")
    hf_model.save_pretrained(tmp_path / "hf")
    with pytest.raises(BackboneError, match=r"hf: tensor encoder\.layer\.1\.mlp\.fc1\.weight has 5 NaN values"):
        load_backbone(tmp_path / "hf")

    def hub_model(name, pretrained, model_kwargs, source):  # stands in for timm's download of a hub model
        broken = small_vit()
        broken.load_state_dict(poisoned(broken, "norm.weight", 1))
        return broken

    monkeypatch.setattr(sinder_hub.backbones, "_create", hub_model)
    with pytest.raises(BackboneError, match=r"hf-hub:someone/broken: tensor norm\.weight has 1 NaN values"):
        load_backbone("hf-hub:someone/broken")


# --- export ----------------------------------------------------------------------------------------


def run_folder(path: Path, seed: int, report: dict, pictures: tuple[str, ...]) -> Path:
    save_for_hf(small_vit(seed), path, safe_serialization=True)
    (path / "repair_report.json").write_text(json.dumps(report))
    for name in pictures:
        Image.new("RGB", (8, 8), (seed * 40, 0, 0)).save(path / f"before_after_{name}.png")
    return path


def listing(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_refuses_a_used_folder_and_overwrite_leaves_nothing_stale(tmp_path, capsys):
    first = run_folder(
        tmp_path / "run1", 1, {"source_model": "hf-hub:someone/run-one-source", "steps": 1}, ("astronaut", "coffee")
    )
    second = run_folder(
        tmp_path / "run2", 2, {"source_model": "hf-hub:someone/run-two-source", "steps": 2}, ("camera",)
    )
    out = tmp_path / "out"
    export(first, out, format="timm", card=True)
    (out / "notes.txt").write_text("mine")
    before = listing(out)
    code = cli(["export", str(second), "--to", str(out), "--format", "timm", "--card"])
    one_error_line(capsys, code, 2, f"--to {out} is not empty", "--overwrite")
    assert listing(out) == before

    assert cli(["export", str(second), "--to", str(out), "--format", "timm", "--card", "--overwrite"]) == 0
    names = sorted(listing(out))
    assert names == [
        "README.md",
        "before_after_camera.png",
        "config.json",
        "model.safetensors",
        "notes.txt",
        "repair_report.json",
    ]
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "repair_report.json").read_text())["source_model"] == "hf-hub:someone/run-two-source"
    card = (out / "README.md").read_text()
    assert (
        "`someone/run-two-source`" in card
        and "run-one-source" not in card
        and "before_after_camera.png" in card
        and "astronaut" not in card
    )
    assert torch.equal(safetensors.torch.load_file(out / "model.safetensors")["cls_token"], small_vit(2).cls_token)


def test_export_of_a_bare_model_over_a_run_export_drops_its_report(tmp_path):
    out = tmp_path / "out"
    export(run_folder(tmp_path / "run", 1, {"steps": 1}, ("astronaut",)), out, format="transformers")
    export(small_vit(3), out, format="transformers", overwrite=True, card=True)
    assert sorted(listing(out)) == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    card = (out / "README.md").read_text()
    assert "It has not been repaired" in card and "repair_report" not in card  # the bare model was never repaired


def test_export_into_its_own_source_is_refused_up_front(tmp_path, capsys, no_model):
    run = run_folder(tmp_path / "run", 1, {"steps": 1}, ())
    before = listing(run)
    one_error_line(
        capsys,
        cli(["export", str(run), "--to", str(run), "--format", "timm", "--overwrite"]),
        2,
        f"--to {run} is the source {run}",
    )
    one_error_line(
        capsys,
        cli(["export", str(run), "--to", str(tmp_path), "--format", "timm", "--overwrite"]),
        2,
        f"--to {tmp_path} contains the source {run}",
    )
    assert listing(run) == before
    (run / "INCOMPLETE").write_text("")
    one_error_line(
        capsys,
        cli(["export", str(run), "--to", str(tmp_path / "new")]),
        2,
        f"this run is incomplete: {run}",
        "--resume",
    )
    assert not (tmp_path / "new").exists()
    with pytest.raises(RunFolderError, match="is a file"):
        export(small_vit(), run / "config.json", format="timm")


def test_export_both_needs_an_empty_parent(tmp_path, capsys, no_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "other.txt").write_text("x")
    one_error_line(
        capsys, cli(["export", "planted-gelu", "--to", str(out)]), 2, f"--to {out} holds other files", "other.txt"
    )


# --- push and the card ------------------------------------------------------------------------------


def test_push_refuses_incomplete_and_truncated_runs(timm_folder, capsys):
    (timm_folder / "INCOMPLETE").write_text("")
    one_error_line(
        capsys,
        cli(["push", str(timm_folder), "--repo-id", "a/b", "--dry-run"]),
        2,
        f"this run is incomplete: {timm_folder} (finish it with --resume or start again)",
    )
    (timm_folder / "INCOMPLETE").unlink()
    truncate(timm_folder / "model.safetensors")
    one_error_line(
        capsys,
        cli(["push", str(timm_folder), "--repo-id", "a/b", "--dry-run"]),
        2,
        f"{timm_folder / 'model.safetensors'} does not load, the file is truncated or corrupt",
    )
    one_error_line(
        capsys, cli(["push", str(timm_folder / "nope"), "--repo-id", "a/b", "--dry-run"]), 2, "nope is not a folder"
    )


def test_push_refuses_invalid_config_json(timm_folder, capsys):
    (timm_folder / "config.json").write_text("{oops")
    one_error_line(
        capsys,
        cli(["push", str(timm_folder), "--repo-id", "a/b", "--dry-run"]),
        2,
        "config.json: invalid JSON at line 1 column 2",
    )


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (
            {"status": "degraded", "reasons": ["held-out defects rose from 3 to 5", "2 steps skipped (NaN)"]},
            "**Warning: the repair run that produced these weights reports a degraded outcome.** Reasons recorded in "
            "`repair_report.json`: held-out defects rose from 3 to 5; 2 steps skipped (NaN).",
        ),
        (
            {"status": "failed", "reasons": []},
            "**Warning: the repair run that produced these weights failed.** No reason was recorded.",
        ),
        ({"status": "ok", "reasons": []}, None),
    ],
)
@pytest.mark.parametrize("kind", ["timm", "transformers"])
def test_card_warns_when_the_run_is_not_ok(timm_folder, outcome, expected, kind):
    card = str(build_model_card(timm_folder, kind=kind, report={"steps": 3, "outcome": outcome}))
    if expected is None:
        assert "Warning" not in card
    else:
        assert f"\n> {expected} Check the figures below before using this model.\n" in card


def test_dry_run_card_of_a_degraded_run(timm_folder):
    (timm_folder / "repair_report.json").write_text(
        json.dumps({"steps": 1, "outcome": {"status": "degraded", "reasons": ["no update at block 3"]}})
    )
    assert (
        "reports a degraded outcome.** Reasons recorded in `repair_report.json`: no update at block 3."
        in push_folder(timm_folder, "a/b", dry_run=True).card
    )


# --- evaluate ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_per_class=1, size=28)


def evaluate(*args) -> int:
    return cli(["evaluate", "--model", "planted-gelu", "--workers", "0", *map(str, args)])


def test_evaluate_checks_the_layout_before_loading(shapes, tmp_path, capsys, no_model):
    segmentation, classification = shapes / "segmentation", shapes / "classification"
    one_error_line(
        capsys,
        evaluate("--task", "knn", "--data", segmentation),
        2,
        f"--data {segmentation}",
        "found a segmentation layout",
        "knn expects ROOT/train/<class>/",
    )
    one_error_line(
        capsys,
        evaluate("--task", "linseg", "--data", classification),
        2,
        f"--data {classification}",
        "found a classification layout",
        "segmentation expects ROOT/<split>/images/",
    )
    one_error_line(
        capsys, evaluate("--task", "knn", "--data", tmp_path / "nope"), 2, f"--data {tmp_path / 'nope'} is not a folder"
    )
    one_class = tmp_path / "one"
    for split in ("train", "val"):
        (one_class / split / "cat").mkdir(parents=True)
        Image.new("RGB", (28, 28)).save(one_class / split / "cat" / "a.png")
    one_error_line(
        capsys, evaluate("--task", "knn", "--data", one_class), 2, f"{one_class / 'train'} has 1 class folder (cat)"
    )
    seg = tmp_path / "seg"
    for split in ("train", "val"):
        (seg / split / "masks").mkdir(parents=True)
        (seg / split / "images").mkdir()
        for stem in ("a", "b"):
            Image.new("RGB", (28, 28)).save(seg / split / "images" / f"{stem}.png")
        Image.new("L", (28, 28)).save(seg / split / "masks" / "a.png")
    one_error_line(
        capsys,
        evaluate("--task", "kmeans", "--data", seg, "--kmeans-fit", "val"),
        2,
        f"{seg / 'val'}: 1 of 2 images have no mask in {seg / 'val' / 'masks'} (b.png)",
    )
    for flag in ("--batch-size", "--resolution", "--iterations", "--max-pixels"):
        one_error_line(capsys, evaluate("--task", "knn", "--data", classification, flag, "0"), 2, f"{flag} 0")
    one_error_line(capsys, evaluate("--task", "onnx", "--data", classification), 2, "--task", "onnx")
    assert not Path("evaluate-knn.json").exists()


def tiny_backbone(spec: str):
    torch.manual_seed(len(spec))
    return timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        img_size=28,
        dynamic_img_size=True,
        depth=1,
        embed_dim=32,
        num_heads=2,
    ).eval()


def test_evaluate_max_pixels_names_the_image(shapes, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sinder_hub.backbones, "load_backbone", tiny_backbone)
    out = tmp_path / "r"
    one_error_line(
        capsys,
        evaluate(
            "--task",
            "knn",
            "--data",
            shapes / "classification",
            "--resolution",
            "28",
            "--max-pixels",
            "700",
            "--out",
            out,
        ),
        2,
        "image of 28x28 px (784 pixels) is over the limit of 700 pixels",
    )
    assert not out.exists()
    assert evaluate("--task", "knn", "--data", shapes / "classification", "--resolution", "28", "--out", out) == 0
    assert json.loads((out / "results.json").read_text())["settings"]["tasks"] == ["knn"]


# --- diagnose ---------------------------------------------------------------------------------------


def diagnose(tmp_path, *args) -> int:
    return cli(["diagnose", "--model", "planted-gelu", "--out", str(tmp_path / "out"), *map(str, args)])


def test_diagnose_flags_and_images_fail_before_loading(tmp_path, capsys, no_model):
    for flag, value in (("--resolution", "0"), ("--resolution", "-14"), ("--samples", "0"), ("--max-pixels", "-1")):
        one_error_line(capsys, diagnose(tmp_path, flag, value), 2, f"{flag} {value}")
    one_error_line(capsys, diagnose(tmp_path, "--kernel", "4"), 2, "--kernel")
    one_error_line(
        capsys,
        diagnose(tmp_path, "--images", tmp_path / "nope.png"),
        2,
        f"--images {tmp_path / 'nope.png'} does not exist",
    )
    (tmp_path / "notes.txt").write_text("not an image")
    one_error_line(capsys, diagnose(tmp_path, "--images", tmp_path / "notes.txt"), 2, "notes.txt: cannot read image")
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    one_error_line(
        capsys,
        diagnose(tmp_path, "--images", tmp_path / "big.png", "--max-pixels", "9999"),
        2,
        "big.png: image of 100x100 px (10,000 pixels) is over the limit of 9,999 pixels",
    )
    (tmp_path / "file").write_text("")
    one_error_line(
        capsys,
        cli(["diagnose", "--model", "planted-gelu", "--out", str(tmp_path / "file")]),
        2,
        f"--out {tmp_path / 'file'} is a file",
    )
    assert not (tmp_path / "out").exists()


def test_diagnose_resolution_must_fit_the_patches(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sinder_hub.backbones, "load_backbone", tiny_backbone)
    Image.new("RGB", (60, 60)).save(tmp_path / "a.png")
    one_error_line(
        capsys,
        diagnose(tmp_path, "--images", tmp_path / "a.png", "--resolution", "30"),
        2,
        "--resolution 30 is not a multiple of the 14-px patches of planted-gelu",
        "28 or 42",
    )
    assert not (tmp_path / "out").exists()


def test_diagnose_nan_weights_name_the_tensor(tmp_path, capsys):
    model = small_vit()
    save_for_hf(model, tmp_path / "bad", safe_serialization=True)
    safetensors.torch.save_file(poisoned(model, "blocks.0.attn.qkv.weight", 7), tmp_path / "bad" / "model.safetensors")
    code = cli(["diagnose", "--model", str(tmp_path / "bad"), "--resolution", "28", "--out", str(tmp_path / "out")])
    one_error_line(capsys, code, 2, "model.safetensors: tensor blocks.0.attn.qkv.weight has 7 NaN values")
    assert not (tmp_path / "out").exists()


def test_report_json_never_holds_nan():
    from sinder_hub.diagnostics import json_safe

    safe = json_safe({"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": (2, "x")})
    assert safe == {"a": None, "b": [1.0, None, {"c": None}], "d": [2, "x"]}
    json.dumps(safe, allow_nan=False)


def test_demo_flags(tmp_path, capsys):
    one_error_line(
        capsys, cli(["demo", "--crops-per-image", "0", "--output", str(tmp_path / "d")]), 2, "--crops-per-image 0"
    )
    one_error_line(
        capsys, cli(["demo", "--model", "planted-relu", "--output", str(tmp_path / "d")]), 2, "--model planted-relu"
    )
    assert not (tmp_path / "d").exists()


# --- no traceback in a real process -------------------------------------------------------------------


TOOL_RUNS = [
    ["diagnose.py", "--model", "planted-gelu", "--resolution", "-5"],
    ["export.py", "RUN", "--to", "RUN", "--format", "timm"],
    ["evaluate.py", "--model", "planted-gelu", "--task", "knn", "--data", "SEG"],
]
# runs each tool as ``python tools/X.py`` would (runpy, a fresh sys.argv), in one interpreter so that torch is
# imported once; any exception a tool lets through would end this interpreter with its traceback
HARNESS = """
import contextlib, io, json, runpy, sys
results = []
for args in json.loads(sys.argv[1]):
    sys.argv, stderr = args, io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(args[0], run_name="__main__")
            code = 0
        except SystemExit as done:
            code = done.code
    results.append([code, stderr.getvalue()])
print(json.dumps(results))
"""


@pytest.mark.slow
def test_tools_print_one_line_and_no_traceback(tmp_path, shapes):
    run = run_folder(tmp_path / "run", 1, {"steps": 1}, ())
    runs = [
        [str(ROOT / "tools" / args[0])]
        + [str(run) if a == "RUN" else str(shapes / "segmentation") if a == "SEG" else a for a in args[1:]]
        for args in TOOL_RUNS
    ]
    done = subprocess.run([sys.executable, "-c", HARNESS, json.dumps(runs)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)  # fmt: skip
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    for (code, stderr), args in zip(json.loads(done.stdout.strip().splitlines()[-1]), TOOL_RUNS):
        lines = stderr.strip().splitlines()
        assert code == 2, (args, stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, (args, stderr)


def test_a_bad_compare_fails_before_any_work(shapes, tmp_path, capsys, monkeypatch):
    def load(spec):
        if spec != "planted-gelu":
            raise BackboneError(f"{spec} does not exist (expected a checkpoint file or a model folder)")
        return tiny_backbone(spec)

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the second model loaded")

    monkeypatch.setattr(sinder_hub.backbones, "load_backbone", load)
    monkeypatch.setattr("sinder_hub.evaluation.run.run_cell", refuse)
    monkeypatch.setattr("sinder_hub.commands.diagnose.singular_defect_directions", refuse)
    one_error_line(
        capsys,
        evaluate("--task", "knn", "--data", shapes / "classification", "--compare", "runs/typo"),
        2,
        "runs/typo does not exist",
    )
    Image.new("RGB", (60, 60)).save(tmp_path / "a.png")
    one_error_line(
        capsys,
        diagnose(tmp_path, "--images", tmp_path / "a.png", "--compare", "runs/typo"),
        2,
        "runs/typo does not exist",
    )
    assert not (tmp_path / "out").exists()
