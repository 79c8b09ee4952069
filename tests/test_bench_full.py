"""tools/bench_full.py at a tiny size on the CPU: its figures are present and add up, its image cache is reused."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.slow  # models end to end, subprocesses or a browser: make test-fast skips this file

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES = 24


def load_tool():
    spec = importlib.util.spec_from_file_location("bench_full", REPO / "tools" / "bench_full.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_full"] = module  # the image pool pickles its function by module name
    spec.loader.exec_module(module)
    return module


def run_tool(arguments: list[str], capsys) -> str:
    """The benchmark's ``main`` in this process (the trainer it times reads nothing of the test's): its stdout."""
    matmul_precision = torch.get_float32_matmul_precision()
    try:
        assert load_tool().main(arguments) == 0
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
    return capsys.readouterr().out


def test_tiny_run_figures_add_up(tmp_path, capsys):
    output = tmp_path / "figures.json"
    arguments = [
        "--depth",
        "6",
        "--width",
        "192",
        "--planted-block",
        "3",
        "--resolution",
        "224",
        "--num-images",
        str(NUM_IMAGES),
        "--limit-layers",
        "3",
        "--directions-method",
        "expected",
        "--num-workers",
        "0",
        "--precision",
        "fp32",
        "--quiet",
        "--cache",
        str(tmp_path / "cache"),
        "--json",
        str(output),
    ]
    printed = run_tool(arguments, capsys)
    assert "images/s" in printed and "held out" in printed
    result = json.loads(output.read_text())

    assert result["device"].startswith("cpu (")
    assert result["model"]["depth"] == 6 and result["model"]["embed_dim"] == 192
    assert result["images_processed"] == result["steps"] == NUM_IMAGES
    loss, clear = result["loss"], result["clear"]
    assert loss["images"] + clear["images"] == NUM_IMAGES
    assert (loss["images"], clear["images"]) == (result["report_images"]["with_loss"], result["report_images"]["clear"])
    histogram = result["loss_layer_histogram"]
    assert sum(histogram.values()) == loss["images"] and histogram.get("3", 0) > 0  # the planted block gives losses
    assert loss["time_s"] > 0
    timings = result["timings"]  # the run's own, from its report
    assert result["images_per_s"] > 0 and timings["loader_wait_s"] > 0  # no workers: decoding happens in next()
    assert loss["time_s"] + clear["time_s"] + timings["loader_wait_s"] <= timings["loop_s"]
    assert result["build_and_save_s"] > 0 and timings["setup_s"] > 0 and timings["directions_s"] > 0
    parts = ("setup_s", "directions_s", "held_out_s", "loop_s", "merge_s", "write_s")
    assert sum(timings[part] for part in parts) < result["total_s"]
    assert timings["peak_memory_gib"] > 0.1 and timings["peak_memory_kind"] == "process RSS"
    held = result["held_out"]
    assert held["defects_before"] > 0 and held["defects_after"] >= 0
    assert 0.9 < held["normal_token_cosine"] <= 1.0 + 1e-6 and 0.9 < held["class_token_cosine"] <= 1.0 + 1e-6

    images = sorted((tmp_path / "cache").glob("*.jpg"))
    assert len(images) == NUM_IMAGES
    with Image.open(images[0]) as image:
        assert image.format == "JPEG" and image.size == (640, 480)


def test_image_cache_is_deterministic_and_reused(tmp_path):
    tool = load_tool()
    paths, made_s = tool.training_images(tmp_path, 3, processes=1)
    assert made_s > 0 and [p.name for p in paths] == ["000000.jpg", "000001.jpg", "000002.jpg"]
    first = [p.read_bytes() for p in paths]
    assert len(set(first)) == 3  # different crops

    assert tool.training_images(tmp_path, 3, processes=1)[1] == 0.0  # complete: reused
    assert tool.training_images(tmp_path, 2, processes=1)[1] == 0.0  # a prefix of a larger cache

    paths[1].unlink()  # an incomplete cache is completed, to the same bytes
    assert tool.training_images(tmp_path, 3, processes=1)[1] > 0
    assert [p.read_bytes() for p in paths] == first

    other = tmp_path / "other"  # another seed draws other crops
    assert tool.training_images(other, 1, seed=1, processes=1)[0][0].read_bytes() != first[0]


def test_tiny_run_with_compile_times_the_compiled_scan(tmp_path, capsys):
    """``--compile``: the compiled scan is what the loop timed (every image is counted).

    At planted-swiglu's own size (12 × 384, defect at block 4, fp32, 224 px), compiled with aot_eager
    (inductor's kernels: tests/test_trainer_runs.py; each model compiled cold costs about 40 s of CPU)."""
    output = tmp_path / "figures.json"
    arguments = [
        "--depth",
        "12",
        "--width",
        "384",
        "--planted-block",
        "4",
        "--resolution",
        "224",
        "--num-images",
        "8",
        "--limit-layers",
        "3",
        "--directions-method",
        "expected",
        "--num-workers",
        "1",
        "--precision",
        "fp32",
        "--quiet",
        "--compile",
        "--compile-backend",
        "aot_eager",
        "--count-batch",
        "2",
        "--cache",
        str(tmp_path / "cache"),
        "--json",
        str(output),
    ]
    assert "--compile" in run_tool(arguments, capsys)
    result = json.loads(output.read_text())
    assert (
        result["compile"] is True
        and result["compile_backend"] == "aot_eager"
        and result["count_batch"] == 2
        and result["num_workers"] == 1
    )
    assert result["loss"]["images"] + result["clear"]["images"] == result["steps"] == 8
    assert sum(result["loss_layer_histogram"].values()) == result["loss"]["images"] > 0
