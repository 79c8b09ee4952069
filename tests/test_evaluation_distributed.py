"""Two processes give the numbers of one process (every sample scored exactly once).

The two ranks are forked copies of this process with the environment ``accelerate launch`` gives
its processes (tests/forked.py), as in tests/test_trainer_runs.py: no new interpreters."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from forked import run_ranks
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
    codes, stdout, stderr = run_ranks([*args, "--out", str(tmp_path / "two")], 2, tmp_path / "ranks", timeout=400)
    assert codes == [0, 0], "".join(stderr)[-3000:]
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
    assert "".join(stdout).count("| original") == 1  # one table, from the main process
