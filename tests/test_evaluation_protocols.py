"""Every protocol on every layout it applies to, at tiny size; encoders, streaming and clustering pieces with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_vit

import sinder_hub.backbones
from sinder_hub.cli import main as cli_main
from sinder_hub.data import IMAGENET_MEAN, IMAGENET_STD
from sinder_hub.evaluation import depth_token_encoder, kmeans, linear_depth, patch_token_encoder
from sinder_hub.evaluation.features import DINOV2_DEPTH_LAYERS, depth_layer_indices
from sinder_hub.evaluation.kmeans import cluster_tokens
from sinder_hub.evaluation.streaming import FeatureStore, Processes, Streaming, TrainingBatches
from sinder_hub.synthetic import make_standard_datasets


@pytest.fixture(scope="module")
def standard(tmp_path_factory):
    return make_standard_datasets(tmp_path_factory.mktemp("standard"))


def tiny_backbone(spec: str):
    return tiny_vit(depth=4, seed=len(spec))


@pytest.mark.slow
def test_every_protocol_runs_on_every_layout_it_applies_to(standard, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sinder_hub.backbones, "load_backbone", tiny_backbone)
    data = [standard[name] for name in ("imagenet", "voc2012", "ade20k", "cityscapes", "nyu")]
    tasks = ["knn", "linear", "linseg", "kmeans", "depth"]
    argv = ["evaluate", "--model", "a", "--task", *tasks, "--data", *map(str, data), "--layers", "1", "4"]
    argv += ["--resolution", "56", "--iterations", "8", "--batch-size", "4", "--workers", "0", "--out", str(tmp_path)]
    assert cli_main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    cells = results["variants"][0]["cells"]
    expected = ["ImageNet/knn", "ImageNet/linear"]
    for name in ("VOC2012", "ADE20k", "Cityscapes"):
        expected += [f"{name}/linseg-L1", f"{name}/linseg-L4", f"{name}/kmeans"]
    expected += ["NYUd/depth-L1", "NYUd/depth-L4"]
    assert list(cells) == expected
    classes = {"VOC2012": 21, "ADE20k": 150, "Cityscapes": 19}
    for cell, entry in cells.items():
        result = entry["result"]
        name, task = cell.split("/")
        if task in ("knn", "linear"):
            assert 0 <= result["top1"] <= result["top5"] == 100.0 and result["trivial"] == ["top5"]
        elif task.startswith("depth"):
            assert 0 < result["rmse"] < 10 and 0 <= result["delta1"] <= 100 and result["val_images"] == 6
        else:
            assert result["classes"] == classes[name] and 0 <= result["miou"] <= 100
            assert len(result["iou"]) == classes[name]
    assert cells["VOC2012/kmeans"]["result"]["clusters"] == 21
    assert results["settings"]["protocol"] == "dinov2" and results["protocol_settings"]["linseg"]["warmup"] == 1_500
    linseg = cells["VOC2012/linseg-L1"]["result"]["settings"]
    assert (linseg["iterations"], linseg["resolution"], linseg["schedule"], linseg["test_mode"]) == (
        8,
        56,
        "poly",
        "slide",
    )
    assert cells["VOC2012/kmeans"]["result"]["fit_split"] == "train"
    printed = capsys.readouterr().out
    assert (
        "Protocol dinov2" in printed
        and "| original (`a`) |" in printed
        and "NYUd depth 4 spread blocks rmse ↓" in printed
    )
    assert "ImageNet/knn: top5 is trivial: 5 classes" in (tmp_path / "results.md").read_text()


# --- encoders -------------------------------------------------------------------------------------------


def test_linear_4_concatenates_the_last_four_final_normed_blocks():
    model = tiny_vit(depth=5)
    images = torch.randn(2, 3, 56, 70, generator=torch.Generator().manual_seed(0))
    features = patch_token_encoder(model, 4)(images)
    assert features.shape == (2, 4, 5, 4 * 32)
    with torch.no_grad():
        tokens, outputs = model.patch_embed(images), []
        tokens = model.norm_pre(model._pos_embed(tokens))
        for block in model.blocks:
            tokens = block(tokens)
            outputs.append(model.norm(tokens)[:, 1:].reshape(2, 4, 5, 32))
    assert torch.allclose(features, torch.cat(outputs[-4:], dim=-1), atol=1e-5)
    assert torch.allclose(patch_token_encoder(model, 1)(images), outputs[-1], atol=1e-5)


def test_bf16_autocast_stays_close_to_fp32():
    model = tiny_vit(depth=4)
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    full, half = (patch_token_encoder(model, 4, precision)(images) for precision in ("fp32", "bf16"))
    assert half.dtype == torch.float32 and torch.allclose(full, half, atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match="precision 'fp16'"):
        patch_token_encoder(model, 1, "fp16")


def test_depth_features_follow_dinov2s_depth_heads():
    assert [depth_layer_indices(depth, 4) for depth in (12, 24, 40)] == [list(v) for v in DINOV2_DEPTH_LAYERS.values()]
    assert depth_layer_indices(24, 1) == [23] and depth_layer_indices(8, 4) == [1, 3, 5, 7]
    model = tiny_vit(depth=4)
    images = torch.randn(1, 3, 42, 56, generator=torch.Generator().manual_seed(1))
    features = depth_token_encoder(model, 1)(images)
    assert features.shape == (1, 3, 4, 64)
    with torch.no_grad():
        raw = model.blocks(model.norm_pre(model._pos_embed(model.patch_embed(images))))  # no final norm
    assert torch.allclose(features[0, :, :, :32].reshape(12, 32), raw[0, 1:], atol=1e-5)
    assert torch.allclose(features[0, 2, 3, 32:], raw[0, 0], atol=1e-5)  # the class token beside every patch


# --- streaming -------------------------------------------------------------------------------------------


class Rank:
    """A stand-in accelerator: process ``rank`` of ``world`` (no collective is called in these tests)."""

    def __init__(self, rank: int, world: int):
        self.process_index, self.num_processes = rank, world


@pytest.mark.parametrize("world", [2, 3])
def test_training_batches_are_the_same_for_any_number_of_processes(world):
    single = list(TrainingBatches(10, 4, 7, seed=3))
    shares = [list(TrainingBatches(10, 4, 7, 3, rank, world)) for rank in range(world)]
    for step, batch in enumerate(single):
        assert sorted(sum((share[step] for share in shares), [])) == sorted(batch)
    epochs = sum(single, [])
    assert sorted(epochs[:10]) == list(range(10)) and sorted(epochs[10:20]) == list(range(10))


def test_feature_store_round_trip(tmp_path):
    processes = Processes(Rank(1, 2))
    store = FeatureStore(tmp_path, "s", processes)
    store.append_vectors([1, 3], torch.tensor([[1.0, 2.0], [3.0, 4.5]]))
    store.handle.close()
    np.save(tmp_path / "s.1.npy", np.asarray(store.index).reshape(-1, 4))
    other = FeatureStore(tmp_path, "s", Processes(Rank(0, 2)))
    other.append_vectors([0, 2], torch.tensor([[-1.0, 0.5], [7.0, 8.0]]))
    other.handle.close()
    np.save(tmp_path / "s.0.npy", np.asarray(other.index).reshape(-1, 4))
    store.dim = 2
    assert store.rows_of(np.array([3, 0, 2])).tolist() == [[3.0, 4.5], [-1.0, 0.5], [7.0, 8.0]]
    assert [(list(i), r.tolist()) for i, r in store.own_chunks(1)] == [([1], [[1.0, 2.0]]), ([3], [[3.0, 4.5]])]
    assert [list(i) for i, _ in store.all_chunks(5)] == [[0, 2], [1, 3]]


def test_streamed_kmeans_equals_kmeans_in_memory(tmp_path):
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    points = centres[torch.arange(3).repeat(16)] + 0.5 * torch.randn(48, 2, generator=generator)
    points = points.half().float()  # as the store keeps them
    store = FeatureStore(tmp_path, "grid", Processes())
    for image in range(6):  # six 2x4 "images" of 8 tokens
        store.append(image, points[8 * image : 8 * image + 8], (2, 4))
    store.close()
    streamed = cluster_tokens(store, 3, iterations=50, restarts=3, seed=5, streaming=Streaming())
    _, in_memory = kmeans(points, 3, iterations=50, restarts=3, seed=5)
    assert torch.allclose(streamed.float(), in_memory, atol=1e-5)


# --- depth -----------------------------------------------------------------------------------------------


def brightness_and_height(images: torch.Tensor) -> torch.Tensor:
    """Per-patch brightness and image row: the synthetic NYU scenes' depth cues, ``[B, h, w, 2]``."""
    rgb = images * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    brightness = F.avg_pool2d(rgb.mean(dim=1, keepdim=True), 14)
    rows = torch.linspace(0, 1, brightness.shape[-2])[None, None, :, None].expand_as(brightness)
    return torch.cat([brightness, rows], dim=1).permute(0, 2, 3, 1)


@pytest.mark.slow
def test_the_depth_head_learns_depth_cues(standard):
    probe = dict(iterations=60, learning_rate=0.05, streaming=Streaming(batch_size=4))
    good = linear_depth(brightness_and_height, standard["nyu"], 56, **probe)
    generator = torch.Generator().manual_seed(0)
    bad = linear_depth(lambda x: torch.randn(len(x), 4, 5, 2, generator=generator), standard["nyu"], 56, **probe)
    assert good["rmse"] < 0.8 * bad["rmse"] and good["delta1"] > bad["delta1"]
    assert math.isfinite(good["abs_rel"]) and good["min_depth"] == 1e-3 and good["max_depth"] == 10.0
