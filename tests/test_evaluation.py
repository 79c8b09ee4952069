import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from sinder_hub.data import IMAGENET_MEAN, IMAGENET_STD
from sinder_hub.errors import DataError
from sinder_hub.evaluation import (
    class_token_encoder,
    confusion_matrix,
    depth_errors,
    kmeans,
    kmeans_segmentation,
    knn_evaluate,
    knn_votes,
    linear_classification,
    linear_probe_segmentation,
    load_mask,
    match_clusters,
    segmentation_scores,
    segmentation_split,
    topk_accuracy,
)
from sinder_hub.evaluation.streaming import Streaming
from sinder_hub.synthetic import SHAPE_CLASSES, make_shapes_dataset

SIZE = 112  # 8x8 patch grid


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_per_class=4, size=SIZE, seed=0)


# --- hand-crafted and random encoders ------------------------------------------------------


def chroma(images: torch.Tensor) -> torch.Tensor:
    """Normalised ``[B, 3, R, R]`` -> colour minus its grey level, ``[B, 3, R, R]`` (0 on the grey backgrounds)."""
    rgb = images * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    return rgb - rgb.mean(dim=1, keepdim=True)


def colour_class_encoder(images: torch.Tensor) -> torch.Tensor:
    """Mean chroma of the saturated pixels: an oracle for the shapes' class (one hue per class)."""
    c = chroma(images)
    saturated = (c.abs().amax(dim=1, keepdim=True) > 0.15).float()
    return (c * saturated).sum(dim=(2, 3)) / saturated.sum(dim=(2, 3)).clamp_min(1)


def colour_patch_encoder(images: torch.Tensor) -> torch.Tensor:
    """Per-patch mean chroma plus a constant channel (background = the constant): ``[B, H, W, 4]``."""
    c = F.avg_pool2d(chroma(images), 14).permute(0, 2, 3, 1)
    return torch.cat([5 * c, torch.full_like(c[..., :1], 0.2)], dim=-1)


def random_encoder(shape_of_one: tuple[int, ...]):
    generator = torch.Generator().manual_seed(0)
    return lambda images: torch.randn(len(images), *shape_of_one, generator=generator)


# --- metrics with known answers --------------------------------------------------------------


@pytest.mark.slow
def test_confusion_and_scores_by_hand():
    targets = torch.tensor([0, 0, 1, 1, 2, 255])
    predictions = torch.tensor([0, 1, 1, 1, 1, 0])
    confusion = confusion_matrix(predictions, targets, 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]
    scores = segmentation_scores(confusion)
    # IoU: class 0 = 1/2, class 1 = 2/4, class 2 = 0/1
    assert scores["iou"] == pytest.approx([50.0, 50.0, 0.0])
    assert scores["miou"] == pytest.approx(100 / 3)
    assert scores["pixel_accuracy"] == pytest.approx(60.0)


def test_scores_skip_absent_classes_and_count_unmatched_predictions():
    confusion = torch.tensor([[3, 0, 0, 1], [0, 0, 0, 0], [0, 0, 2, 0]])  # last column: no class
    scores = segmentation_scores(confusion)
    assert scores["iou"] == pytest.approx([75.0, None, 100.0])
    assert scores["miou"] == pytest.approx(87.5)
    assert scores["pixel_accuracy"] == pytest.approx(500 / 6)


def test_miou_agrees_with_torchmetrics_jaccard_index():
    """segmentation_scores' mIoU skips the classes neither present nor predicted, as torchmetrics' macro average does."""
    from torchmetrics.classification import MulticlassJaccardIndex

    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 4, (500,), generator=generator)  # classes 4 and 5 never present
    targets[:40] = 255
    predictions = torch.randint(0, 5, (500,), generator=generator)  # class 4 predicted, never present
    jaccard = MulticlassJaccardIndex(6, ignore_index=255, average="macro")
    scores = segmentation_scores(confusion_matrix(predictions, targets, 6))
    assert scores["iou"][5] is None and scores["iou"][4] == 0.0
    assert scores["miou"] == pytest.approx(100 * float(jaccard(predictions, targets)), abs=1e-4)


def test_depth_errors_by_hand():
    prediction = torch.tensor([[1.0, 2.0], [4.0, 9.0]])
    target = torch.tensor([[1.0, 2.5], [2.0, 0.0]])
    valid = target > 0
    errors = depth_errors(prediction, target, valid)
    # errors 0, -0.5, 2: RMSE sqrt((0 + 0.25 + 4) / 3); ratios 1, 1.25, 2: only the first < 1.25
    assert errors["rmse"] == pytest.approx(math.sqrt(4.25 / 3))
    assert errors["delta1"] == pytest.approx(100 / 3)
    assert errors["abs_rel"] == pytest.approx((0 + 0.2 + 1.0) / 3)


def test_knn_votes_follow_the_dino_weighting():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    votes = knn_votes(train, labels, torch.tensor([[2.0, 0.0]]), num_classes=2, k=2, temperature=0.5)
    # nearest: [1, 0] (cos 1) -> class 0, [1, 1] (cos 1/√2) -> class 1
    assert votes[0].tolist() == pytest.approx([math.exp(2.0), math.exp(2 / math.sqrt(2))])
    assert topk_accuracy(votes, torch.tensor([1]), ks=(1, 5)) == {"top1": 0.0, "top5": 100.0}


def test_kmeans_and_hungarian_matching_recover_permuted_blobs():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(20)
    points = centres[truth] + 0.3 * torch.randn(60, 2, generator=generator)
    assignments, centroids = kmeans(points, 3, seed=1)
    assert centroids.shape == (3, 2)
    label_of_cluster = match_clusters(confusion_matrix(assignments, truth, 3))
    assert torch.equal(label_of_cluster[assignments], truth)
    assert match_clusters(torch.tensor([[5, 0, 1], [0, 7, 2]])).tolist() == [0, 1, -1]


# --- the synthetic dataset and bad input -------------------------------------------------------


def test_shapes_dataset_layout(shapes):
    for split in ("train", "val"):
        assert sorted(p.name for p in (shapes / "classification" / split).iterdir()) == sorted(SHAPE_CLASSES)
        pairs = segmentation_split(shapes / "segmentation", split)
        assert len(pairs) == 4 * len(SHAPE_CLASSES)
    image, mask = pairs[0]
    labels = np.asarray(Image.open(mask))
    assert labels.shape == (SIZE, SIZE) and Image.open(image).size == (SIZE, SIZE)
    assert set(np.unique(labels)) <= {0, 255, *range(1, len(SHAPE_CLASSES) + 1)} and 255 in labels


def test_missing_and_mismatched_masks_are_named(shapes, tmp_path):
    folder = tmp_path / "seg" / "val"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    Image.new("RGB", (30, 20)).save(folder / "images" / "a.png")
    with pytest.raises(DataError, match=r"1 of 1 images have no mask in .*masks \(a\.png\)"):
        segmentation_split(tmp_path / "seg", "val")
    Image.new("L", (20, 30)).save(folder / "masks" / "a.png")
    with pytest.raises(DataError, match=r"masks/a\.png: mask is 20x30 px but its image .*a\.png is 30x20"):
        load_mask(folder / "masks" / "a.png", folder / "images" / "a.png", 28)
    Image.new("RGB", (30, 20)).save(folder / "masks" / "a.png")
    with pytest.raises(DataError, match="single-channel"):
        load_mask(folder / "masks" / "a.png", folder / "images" / "a.png", 28)
    with pytest.raises(DataError, match="train"):
        knn_evaluate(colour_class_encoder, tmp_path / "nothing", SIZE)


def test_load_mask_resizes_like_the_image(tmp_path):
    labels = np.zeros((40, 80), dtype=np.uint8)
    labels[:, 40:] = 3
    Image.fromarray(labels).save(tmp_path / "m.png")
    Image.new("RGB", (80, 40)).save(tmp_path / "i.png")
    mask = load_mask(tmp_path / "m.png", tmp_path / "i.png", 20)  # 40x20, centre crop 20x20
    assert mask.shape == (20, 20) and mask[:, :10].eq(0).all() and mask[:, 10:].eq(3).all()


# --- evaluations: the oracle scores high, random features low ---------------------------------


def test_knn_oracle_versus_random(shapes):
    good = knn_evaluate(colour_class_encoder, shapes / "classification", SIZE, k=10)
    bad = knn_evaluate(random_encoder((16,)), shapes / "classification", SIZE, k=10)
    assert good["top1"] == 100.0 and good["classes"] == sorted(SHAPE_CLASSES) and good["val_images"] == 20
    assert bad["top1"] <= 50.0
    # 5 classes: every class is in the top 5; 20 training images <= k = 20: every one of them votes
    assert good["trivial"] == ["top5"] and "top5 is trivial: 5 classes" in good["notes"][0]
    every = knn_evaluate(colour_class_encoder, shapes / "classification", SIZE, max_images=10)
    assert every["train_images"] == 10 and every["trivial"] == ["top5", "top1"]
    assert "k = 20 but only 10 training images" in every["notes"][1]


def test_linear_classification_oracle_versus_random(shapes):
    good = linear_classification(colour_class_encoder, shapes / "classification", SIZE, iterations=100)
    bad = linear_classification(random_encoder((16,)), shapes / "classification", SIZE, iterations=100)
    assert good["top1"] == 100.0 and good["batch_size"] == 20 and good["learning_rate"] in (1e-1, 5e-2, 2e-2)
    assert bad["top1"] <= 50.0


def test_linear_probe_oracle_versus_random(shapes):
    probe = dict(iterations=25, learning_rate=0.1, streaming=Streaming(batch_size=8))
    good = linear_probe_segmentation(colour_patch_encoder, shapes / "segmentation", SIZE, **probe)
    bad = linear_probe_segmentation(random_encoder((8, 8, 8)), shapes / "segmentation", SIZE, **probe)
    assert good["classes"] == len(SHAPE_CLASSES) + 1
    assert good["miou"] > 60 and good["pixel_accuracy"] > 90
    assert bad["miou"] < 30 and good["miou"] > bad["miou"] + 30


def test_kmeans_oracle_versus_random(shapes):
    good = kmeans_segmentation(colour_patch_encoder, shapes / "segmentation", SIZE)
    bad = kmeans_segmentation(random_encoder((8, 8, 8)), shapes / "segmentation", SIZE)
    assert good["clusters"] == len(SHAPE_CLASSES) + 1
    assert good["miou"] > 45 and good["pixel_accuracy"] > 80
    assert bad["miou"] < 25 and good["miou"] > bad["miou"] + 25


def tiny_backbone(spec: str):
    """A random DINOv2-style ViT standing in for load_backbone (the spec only seeds it)."""
    torch.manual_seed(len(spec))
    return timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        img_size=SIZE,
        dynamic_img_size=True,
        depth=2,
        embed_dim=64,
        num_heads=2,
    ).eval()


@pytest.mark.parametrize("task", ["knn", "kmeans"])
def test_evaluate_tool_prints_two_columns(shapes, tmp_path, capsys, monkeypatch, task):
    backbones = pytest.importorskip("sinder_hub.backbones")
    monkeypatch.setattr(backbones, "load_backbone", tiny_backbone)
    from sinder_hub.commands import evaluate

    out = tmp_path / "result"
    data = shapes / ("classification" if task == "knn" else "segmentation")
    evaluate.main(
        [
            "--model",
            "a",
            "--compare",
            "repaired=bb",
            "--task",
            task,
            "--data",
            str(data),
            "--resolution",
            str(SIZE),
            "--out",
            str(out),
            "--workers",
            "0",
        ]
    )
    printed = capsys.readouterr().out
    metric = "top1" if task == "knn" else "miou"
    assert "original" in printed and "repaired" in printed and metric in printed
    results = json.loads((out / "results.json").read_text())
    variants = {variant["label"]: variant for variant in results["variants"]}
    cell = f"{data.name}/{task}"
    assert results["settings"]["tasks"] == [task] and results["settings"]["cells"] == [cell]
    assert variants["original"]["model"] == "a" and variants["repaired"]["model"] == "bb"
    assert 0 <= variants["repaired"]["cells"][cell]["result"][metric] <= 100
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "results.png"]


def test_the_image_feature_is_the_class_token_or_the_models_own_pooling():
    """DINOv2: the final-normed class token; SigLIP (no class token): timm's attention pool, not a patch token."""
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    dinov2 = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=224, depth=2, num_classes=0
    ).eval()
    with torch.no_grad():
        assert torch.equal(class_token_encoder(dinov2)(images), dinov2.forward_features(images)[:, 0])
    siglip = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, depth=2, num_classes=0).eval()
    with torch.no_grad():
        tokens = siglip.forward_features(images)
        pooled = class_token_encoder(siglip)(images)
        assert torch.allclose(pooled, siglip.forward_head(tokens, pre_logits=True))
        assert not torch.allclose(pooled, tokens[:, 0])
