"""The benchmark prints the figures it promises (its numbers are measured, never checked here)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # models end to end, subprocesses or a browser: make test-fast skips this file

REPO = Path(__file__).resolve().parents[1]
KEYS = {
    "fast_step_s",
    "naive_step_s",
    "clear_image_s",
    "directions_s",
    "setup_s",
    "fast_peak_gib",
    "naive_peak_gib",
    "device",
    "compiled_step_s",
    "compiled_clear_image_s",
    "compiled_peak_gib",
    "weights_gib",
    "factors_gib",
}


def load_tool():
    spec = importlib.util.spec_from_file_location("bench_repair", REPO / "tools" / "bench_repair.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_json_has_every_key(capsys):
    matmul_precision = torch.get_float32_matmul_precision()
    arguments = [
        "--model",
        "vit_small_patch14_dinov2",
        "--no-pretrained",
        "--resolution",
        "112",
        "--loss-block",
        "4",
        "--limit-layers",
        "2",
        "--repeats",
        "1",
        "--samples",
        "2000",
        "--compile-backend",
        "aot_eager",  # inductor's kernels: tests/test_trainer_runs.py (a minute of C++ per model here)
        "--json",
    ]
    try:
        assert load_tool().main(arguments) == 0  # in this process: the benchmark itself is what is tested
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) >= KEYS
    assert result["loss_block"] == 4 and result["device"].startswith("cpu")
    assert all(result[key] > 0 for key in KEYS - {"device"})
    # the compiled step's gradients are the naive step's; the ledger counts the window's factors (blocks 3–4)
    assert result["compiled_grad_rel_diff"] < 1e-4 and result["grad_rel_diff"] < 1e-4
    assert result["factors_gib"] < result["weights_gib"]
    assert result["naive_peak_gib"] > 0.1  # the process holds at least the model
