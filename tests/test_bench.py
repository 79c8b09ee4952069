"""The benchmark prints the figures it promises (its numbers are measured, never checked here)."""

import json
import subprocess
import sys
from pathlib import Path

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


def test_bench_json_has_every_key():
    command = [
        sys.executable,
        str(REPO / "tools" / "bench_repair.py"),
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
        "--json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result) >= KEYS
    assert result["loss_block"] == 4 and result["device"].startswith("cpu")
    assert all(result[key] > 0 for key in KEYS - {"device"})
    # the compiled step's gradients are the naive step's; the ledger counts the window's factors (blocks 3–4)
    assert result["compiled_grad_rel_diff"] < 1e-4 and result["grad_rel_diff"] < 1e-4
    assert result["factors_gib"] < result["weights_gib"]
    assert result["naive_peak_gib"] > 0.1  # the process holds at least the model
