"""``accelerate launch`` over two processes gives the numbers of one process (every sample scored exactly once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from timm.models import save_for_hf

from sinder_hub.cli import main as cli_main
from sinder_hub.synthetic import make_imagenet, make_nyu, make_voc2012

pytestmark = pytest.mark.slow  # models end to end, subprocesses or a browser: make test-fast skips this file

TOLERANCE = 1e-3  # percent or metres: the processes sum in another order


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=56, embed_dim=32, depth=4, num_heads=2
    )
    save_for_hf(model.eval(), tmp_path / "model", safe_serialization=True)
    data = [
        make_imagenet(tmp_path / "imagenet", n_train=5, n_val=3, size=56),
        make_voc2012(tmp_path / "voc", n_train=7, n_val=5),
        make_nyu(tmp_path / "nyu", n_train=6, n_test=5),
    ]
    args = ["evaluate", "--model", str(tmp_path / "model"), "--task", "knn", "linear", "linseg", "kmeans", "depth"]
    args += ["--data", *map(str, data), "--layers", "1", "4", "--resolution", "56", "--iterations", "6"]
    args += ["--batch-size", "4", "--learning-rate", "0.05", "--workers", "0"]
    assert cli_main([*args, "--out", str(tmp_path / "one")]) == 0
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sinder_hub.cli"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launch, *args, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / out / "results.json").read_text()) for out in ("one", "two"))
    cells_one, cells_two = one["variants"][0]["cells"], two["variants"][0]["cells"]
    assert list(cells_one) == list(cells_two) and len(cells_one) == 7
    for cell, entry in cells_one.items():
        for metric, value in entry["result"].items():
            other = cells_two[cell]["result"][metric]
            if isinstance(value, float):
                assert other == pytest.approx(value, abs=TOLERANCE), (cell, metric)
            elif metric != "iou":
                assert other == value, (cell, metric)
    assert done.stdout.count("| original") == 1  # one table, from the main process
