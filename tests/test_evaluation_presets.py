"""The protocol presets (``--protocol dinov2|quick``): their values, what results.json records, and the pieces
they switch on (schedules, random crops, sliding windows, multi-scale tests, the gradient loss, k-means on
train, 256 -> 224 crops, heads trained on stored features)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_vit
from torchvision import transforms

from sinder_hub.data import IMAGENET_MEAN, IMAGENET_STD
from sinder_hub.errors import DataError, InputError
from sinder_hub.evaluation import kmeans_segmentation, linear_probe_segmentation, patch_token_encoder
from sinder_hub.evaluation.dense import (
    HeadTraining,
    feature_statistics,
    fit_head,
    head_plan,
    linear_head,
    window_starts,
)
from sinder_hub.evaluation.depth import Depth, gradient_loss
from sinder_hub.evaluation.layouts import open_dataset
from sinder_hub.evaluation.linseg import Segmentation
from sinder_hub.evaluation.protocols import MULTISCALE_RATIOS, PROTOCOLS, task_settings
from sinder_hub.evaluation.run import Cell, EvaluationSettings, new_document, settings_record
from sinder_hub.evaluation.streaming import Augment, SampleImages, Streaming
from sinder_hub.synthetic import SHAPE_CLASSES, make_nyu, make_shapes_dataset, make_voc2012

SIZE = 56


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_per_class=2, size=SIZE, seed=0)


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_voc2012(tmp_path_factory.mktemp("voc"), n_train=6, n_val=4, shape=(56, 84))


# --- the presets ---------------------------------------------------------------------------------------


def test_the_dinov2_preset_holds_dinov2s_published_settings():
    linseg = task_settings("dinov2", "linseg")
    assert (linseg["iterations"], linseg["batch_size"], linseg["learning_rate"], linseg["weight_decay"]) == (
        40_000,
        16,
        1e-3,
        1e-4,
    )
    assert (linseg["schedule"], linseg["warmup"], linseg["warmup_ratio"]) == ("poly", 1_500, 1e-6)
    assert (linseg["train_crop"], linseg["scale_range"], linseg["flip"], linseg["resolution"]) == (
        "random-scale",
        (0.5, 2.0),
        True,
        512,
    )
    assert (linseg["test_mode"], linseg["test_resolution"], round(linseg["stride_ratio"] * 512)) == ("slide", 512, 341)
    depth = task_settings("dinov2", "depth")
    assert (depth["learning_rate"], depth["weight_decay"], depth["schedule"], depth["iterations"]) == (
        5e-3,
        0.01,
        "cosine",
        38_400,
    )
    assert (depth["resolution"], depth["crop_width"], depth["gradient_loss"], depth["test_flip"]) == (
        416,
        544,
        0.5,
        True,
    )
    assert (depth["warmup"], depth["grad_clip"], depth["train_crop"]) == (12_800, 35.0, "random")
    knn, linear = task_settings("dinov2", "knn"), task_settings("dinov2", "linear")
    assert round(knn["resolution"] / knn["resize_ratio"]) == 256 and knn["resolution"] == 224
    assert round(linear["resolution"] / linear["resize_ratio"]) == 256 and linear["iterations"] == 12_500
    assert (knn["k"], knn["temperature"]) == (20, 0.07)
    assert task_settings("dinov2", "kmeans")["fit_split"] == "train"
    assert MULTISCALE_RATIOS == (1.0, 1.32, 1.73, 2.28, 3.0)


def test_the_quick_preset_is_the_earlier_setting():
    """The settings of sinder-hub before the presets: 224 px centre crops, 4,000 AdamW steps at 1e-3 with a
    linear decay, whole-image tests, plain 224 crops for knn / linear, k-means fitted on val."""
    for task in ("linseg", "depth"):
        quick = task_settings("quick", task)
        assert (quick["resolution"], quick["test_resolution"], quick["iterations"], quick["batch_size"]) == (
            224,
            224,
            4_000,
            16,
        )
        assert (quick["learning_rate"], quick["weight_decay"], quick["schedule"], quick["warmup"]) == (
            1e-3,
            1e-4,
            "linear",
            0,
        )
        assert quick["train_crop"] == "centre" and quick["grad_clip"] is None
        training, testing = head_plan(quick, 14, {})
        assert training.augment is None and training.stored and testing.window is None
        assert testing.ratios == (1.0,) and not testing.flip
        assert [training.factor(step) for step in (0, 1000, 3999)] == [1 - step / 4000 for step in (0, 1000, 3999)]
    assert task_settings("quick", "depth")["gradient_loss"] == 0.0
    assert (
        task_settings("quick", "knn")["resize_ratio"] == 1.0 and task_settings("quick", "kmeans")["fit_split"] == "val"
    )


def test_a_flag_given_overrides_the_preset_and_results_record_every_value(voc):
    settings = EvaluationSettings(protocol="dinov2", iterations=8, resolution=56, multiscale=True)
    dataset = open_dataset(voc)
    cell = Cell("VOC2012", dataset, "linseg", 4)
    record = cell.settings(settings)
    assert record["iterations"] == 8 and record["resolution"] == record["test_resolution"] == 56
    assert record["warmup"] == 1_500 and record["schedule"] == "poly" and record["protocol"] == "dinov2"
    assert record["multiscale"] is True and record["layers"] == 4
    assert cell.title(settings) == "VOC2012 linseg last 4 blocks + multiscale"
    assert set(PROTOCOLS["dinov2"]["linseg"]) <= set(record)  # every preset value lands in results.json
    assert settings_record([cell], settings)["protocol"] == "dinov2"
    document = new_document([cell], settings)
    assert document["protocol_settings"]["linseg"]["stride_ratio"] == 341 / 512
    assert document["columns"][0]["title"] == "VOC2012 linseg last 4 blocks + multiscale miou"
    quick = Cell("VOC2012", dataset, "linseg", 1).settings(EvaluationSettings(protocol="quick"))
    assert quick["iterations"] == 4_000 and quick["schedule"] == "linear" and quick["resolution"] == 224


def test_protocol_flags_out_of_range_are_one_line(capsys):
    from sinder_hub.commands.evaluate import parse_args

    base = ["--model", "a", "--task", "linseg", "--data", "x"]
    with pytest.raises(InputError, match="--warmup -1: expected a number at least 0"):
        parse_args([*base, "--warmup", "-1"])
    with pytest.raises(InputError, match="--resize-ratio 1.5: expected a number between"):
        parse_args([*base, "--resize-ratio", "1.5"])
    args = parse_args([*base, "--protocol", "quick", "--kmeans-fit", "train", "--no-multiscale"])
    assert (args.protocol, args.fit_split, args.multiscale) == ("quick", "train", False)


# --- schedules --------------------------------------------------------------------------------------------


def test_schedules_follow_mmcv_with_linear_warm_up():
    poly = HeadTraining(40_000, 1e-3, 1e-4, "poly", warmup=1_500, warmup_ratio=1e-6)
    assert poly.factor(0) == pytest.approx(1e-6)  # warm-up from 1e-6 of the rate
    assert poly.factor(750) == pytest.approx((1 - 750 / 40_000) * (1 - 0.5 * (1 - 1e-6)))
    assert poly.factor(1_500) == pytest.approx(1 - 1_500 / 40_000) and poly.factor(39_999) == pytest.approx(1 / 40_000)
    cosine = HeadTraining(38_400, 5e-3, 0.01, "cosine", warmup=12_800, warmup_ratio=1e-3)
    assert cosine.factor(0) == pytest.approx(1e-3, rel=1e-6)
    assert cosine.factor(19_200) == pytest.approx(0.5, rel=1e-6)  # half-way: half the rate
    assert cosine.factor(38_400) == pytest.approx(1e-8)
    with pytest.raises(ValueError, match="schedule 'step'"):
        HeadTraining(10, 1.0, 0.0, "step").factor(0)


# --- test-time views ---------------------------------------------------------------------------------------


def test_sliding_windows_are_placed_as_mmseg_places_them():
    assert window_starts(518, 504, 336) == [0, 14]  # 2 windows, the last one ending at the border
    assert window_starts(700, 504, 336) == [0, 196]
    assert window_starts(1200, 504, 336) == [0, 336, 672, 696]
    assert window_starts(400, 504, 336) == [0]  # smaller than a window: one, cut to the image


@pytest.mark.slow
def test_a_window_the_size_of_the_image_tests_as_the_whole_image(shapes):
    model = tiny_vit(depth=2)
    encoder = patch_token_encoder(model, 1)
    probe = dict(iterations=6, learning_rate=0.05, streaming=Streaming(batch_size=4), protocol="quick")
    whole = linear_probe_segmentation(encoder, shapes / "segmentation", SIZE, **probe)
    slide = linear_probe_segmentation(
        encoder, shapes / "segmentation", SIZE, **probe, settings={"test_mode": "slide", "stride_ratio": 1.0}
    )
    assert slide["settings"]["test_mode"] == "slide" and whole["settings"]["test_mode"] == "whole"
    assert slide["miou"] == pytest.approx(whole["miou"], abs=1e-9)  # 56 px images, one 56 px window


def test_multiscale_averages_the_probabilities_of_every_ratio_and_flip(shapes):
    model = tiny_vit(depth=2)
    encoder = patch_token_encoder(model, 1)
    probe = dict(iterations=4, learning_rate=0.05, streaming=Streaming(batch_size=4), protocol="quick")
    single = linear_probe_segmentation(encoder, shapes / "segmentation", SIZE, **probe)
    multi = linear_probe_segmentation(encoder, shapes / "segmentation", SIZE, **probe, settings={"multiscale": True})
    _, testing = head_plan(multi["settings"], 14, {})
    assert testing.ratios == MULTISCALE_RATIOS and testing.flip
    assert multi["miou"] != single["miou"]  # other views, another figure (the same head: the same seed)


# --- training crops ------------------------------------------------------------------------------------------


def test_random_training_crops_are_seeded_per_step_and_image(voc):
    dataset = open_dataset(voc)
    augment = Augment((42, 42), (0.5, 2.0), 56, 224, True, cat_max_ratio=0.75)
    images = SampleImages(dataset, dataset.splits["train"], "augment", 56, 14, None, augment=augment, seed=3)
    first, again, other = images[(2, 5)], images[(2, 5)], images[(2, 6)]
    assert first[1].shape == (3, 42, 42) and first[2].shape == (42, 42)
    assert torch.equal(first[1], again[1]) and torch.equal(first[2], again[2])
    assert not torch.equal(first[1], other[1])
    draws = [images[(1, step)] for step in range(12)]
    padded = [item for item in draws if bool((item[2] == 255).all(dim=1).any())]
    assert padded, "crops of images scaled below 42 px are padded at the bottom with 255"
    for _, pixels, mask, _ in padded:
        rows = (mask == 255).all(dim=1)
        assert bool((pixels[:, rows] == 0).all())  # padded pixels are 0 after normalisation, as mmseg's Pad


def test_depth_crops_take_the_eigen_region_and_pad_with_no_depth(tmp_path):
    nyu = open_dataset(make_nyu(tmp_path, n_train=2, n_test=1, shape=(48, 64)))
    augment = Augment((56, 56), None, 56, 224, False, pad_target=0.0)
    images = SampleImages(nyu, nyu.splits["train"], "augment", 56, 14, None, augment=augment, seed=0)
    _, pixels, depth, _ = images[(0, 0)]
    assert pixels.shape == (3, 56, 56) and depth.shape == (56, 56)
    assert bool((depth[48:] == 0).all()) and bool((depth[:, 64:] == 0).all()) and bool((pixels[:, 48:] == 0).all())


def test_classification_crops_resize_to_256_then_crop_224(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(path)
    from sinder_hub.evaluation.streaming import image_transform

    dinov2 = transforms.Compose(
        [
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    image = Image.open(path).convert("RGB")
    assert torch.equal(image_transform(224, 0.875)(image), dinov2(image))
    assert not torch.equal(image_transform(224, 1.0)(image), dinov2(image))


# --- depth loss ---------------------------------------------------------------------------------------------


def test_the_gradient_loss_ignores_scale_and_sees_structure():
    target = torch.linspace(1.0, 5.0, 48 * 64).view(48, 64)
    valid = torch.ones_like(target, dtype=torch.bool)
    assert float(gradient_loss(target, target, valid)) == 0.0
    # a global scale is a constant log error: no gradient (up to the 1e-3 eps of DINOv2's loss)
    assert float(gradient_loss(2 * target, target, valid)) < 1e-3
    bumpy = target * (1 + 0.2 * torch.rand(48, 64, generator=torch.Generator().manual_seed(0)))
    assert float(gradient_loss(bumpy, target, valid)) > 0.1
    plain, with_gradient = Depth(1e-3, 10.0), Depth(1e-3, 10.0, gradient_loss=0.5)
    output = torch.randn(1, 256, 12, 16, generator=torch.Generator().manual_seed(1))
    targets = target[None]
    difference = with_gradient.loss(output, targets) - plain.loss(output, targets)
    assert float(difference) == pytest.approx(
        0.5 * float(gradient_loss(plain.depth(output, (48, 64))[0], target, valid))
    )


# --- k-means on train ------------------------------------------------------------------------------------


def test_kmeans_fits_on_train_when_asked(shapes, tmp_path):
    from test_evaluation import colour_patch_encoder

    on_val = kmeans_segmentation(colour_patch_encoder, shapes / "segmentation", SIZE)
    on_train = kmeans_segmentation(colour_patch_encoder, shapes / "segmentation", SIZE, fit_split="train")
    assert on_val["fit_split"] == "val" and on_train["fit_split"] == "train"
    splits = open_dataset(shapes / "segmentation").splits
    assert on_train["fit_images"] == len(splits["train"]) and on_train["images"] == len(splits["val"])
    assert on_train["miou"] > 30
    val_only = tmp_path / "val-only"
    (val_only / "val").mkdir(parents=True)
    for part in ("images", "masks"):
        (val_only / "val" / part).symlink_to(shapes / "segmentation" / "val" / part)
    with pytest.raises(
        DataError, match="no .*train/images/.*; --kmeans-fit train .* fits the clusters on the train split"
    ):
        kmeans_segmentation(colour_patch_encoder, val_only, SIZE, fit_split="train")


# --- the backbone once per image ----------------------------------------------------------------------------


def test_a_head_trained_on_stored_features_equals_one_trained_on_the_fly(shapes):
    """Quick protocol (centre crops): features stored once (float16) train the same head as features computed
    at every step, to the float16 rounding of the features (the statistics read the stored ones too)."""
    dataset = open_dataset(shapes / "segmentation")
    train = dataset.splits["train"]
    encoder = patch_token_encoder(tiny_vit(depth=2), 1)
    streaming, task = Streaming(batch_size=4), Segmentation(len(SHAPE_CLASSES) + 1)
    heads = {}
    for stored in (True, False):
        training = HeadTraining(30, 0.05, 1e-4, stored=stored)
        heads[stored] = fit_head(task, encoder, dataset, train, SIZE, streaming, training, 0, "test")
    weights = {
        stored: torch.cat([p.detach().flatten() for p in head[1].parameters()]) for stored, head in heads.items()
    }
    mean, std = feature_statistics(encoder, dataset, train, SIZE, streaming, seed=0)
    start = linear_head(mean, std, task.channels, seed=0)[1].weight.detach().flatten()
    assert float((weights[False][: start.numel()] - start).abs().max()) > 0.05  # the heads did train
    assert torch.allclose(weights[True], weights[False], atol=2e-3, rtol=0)
    assert torch.allclose(heads[True][0].mean, heads[False][0].mean, atol=1e-3)
    assert math.isfinite(float(weights[True].sum()))
