"""Standard dataset layouts as distributed: recognised, read, and refused in one line (before any model loads) when
incomplete, and masks checked (values, sizes) before any feature is computed."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from cli_checks import cli, one_error_line
from PIL import Image

from sinder_hub.errors import DataError
from sinder_hub.evaluation import check_targets, detect_layout, open_dataset
from sinder_hub.evaluation.layouts import subset
from sinder_hub.evaluation.streaming import SampleImages, whole_size
from sinder_hub.evaluation.targets import read_depth, read_mask
from sinder_hub.synthetic import SHAPE_CLASSES, make_shapes_dataset, make_standard_datasets


def evaluate(*args) -> int:
    return cli(["evaluate", "--model", "planted-gelu", "--workers", "0", *map(str, args)])


@pytest.fixture(scope="module")
def standard(tmp_path_factory):
    return make_standard_datasets(tmp_path_factory.mktemp("standard"))


@pytest.fixture
def copy(standard, tmp_path):
    """A private copy of one standard dataset, to break."""

    def copy_of(name: str):
        source = standard[name]
        target = tmp_path / name / source.name
        shutil.copytree(source, target)
        return target

    return copy_of


def test_each_standard_layout_is_recognised_and_read(standard):
    expected = {
        "imagenet": ("ImageNet", 30, 20),
        "voc2012": ("VOC2012", 8, 6),
        "ade20k": ("ADE20k", 8, 6),
        "cityscapes": ("Cityscapes", 8, 6),
        "nyu": ("NYUd", 8, 6),
    }
    for name, (title, train, val) in expected.items():
        assert detect_layout(standard[name]) == name
        dataset = open_dataset(standard[name])
        assert (dataset.title, len(dataset.splits["train"]), len(dataset.splits["val"])) == (title, train, val)
    imagenet = open_dataset(standard["imagenet"])
    assert imagenet.classes == [f"n{i:08d}" for i in range(1, len(SHAPE_CLASSES) + 1)]
    assert imagenet.splits["val"][-1].target == len(SHAPE_CLASSES) - 1
    voc = open_dataset(standard["voc2012"])
    assert voc.splits["train"][0].image.name == "2007_000000.jpg"
    assert Image.open(voc.splits["train"][0].target).mode == "P"


def test_targets_are_mapped_as_each_layout_defines(standard):
    ade = open_dataset(standard["ade20k"])
    sample = ade.splits["val"][0]
    raw = np.asarray(Image.open(sample.target))
    labels = read_mask(sample, ade.layout)
    assert set(np.unique(raw)) <= {0, *range(1, 7)} and 0 in raw  # 0 = boundaries, 1 = background
    assert np.array_equal(labels == 255, raw == 0) and np.array_equal(labels[raw > 0], raw[raw > 0] - 1)
    nyu = open_dataset(standard["nyu"])
    sample = nyu.splits["val"][0]
    millimetres = np.asarray(Image.open(sample.target))
    assert millimetres.dtype == np.uint16
    assert np.allclose(read_depth(sample, nyu.layout), millimetres / 1000.0)
    summary = check_targets(ade, ("train", "val"))
    assert summary.num_classes == 150 and summary.sizes["val"][0] == (72, 56)
    assert check_targets(open_dataset(standard["cityscapes"]), ("val",)).num_classes == 19


def test_nyu_without_split_files_lists_its_folders(copy):
    nyu = copy("nyu")
    for listing in nyu.glob("*.txt"):
        listing.unlink()
    dataset = open_dataset(nyu)
    assert len(dataset.splits["train"]) == 8 and len(dataset.splits["val"]) == 6
    assert all(
        s.target.name == s.image.name.replace("rgb_", "sync_depth_")[:-4] + ".png" for s in dataset.splits["val"]
    )


def test_whole_images_keep_their_aspect_and_labels_their_resolution(standard):
    cityscapes = open_dataset(standard["cityscapes"])
    assert whole_size(96, 48, 56, 14) == (56, 112)
    images = SampleImages(cityscapes, cityscapes.splits["val"], "whole", 56, 14, None)
    _, pixels, target, problem = images[0]
    assert problem is None and pixels.shape == (3, 56, 112) and target.shape == (48, 96)
    crops = SampleImages(cityscapes, cityscapes.splits["val"], "crop", 28, 14, None)
    assert crops[0][1].shape == (3, 28, 28) and crops[0][2].shape == (28, 28) and crops[0][2].dtype == torch.int64


def test_max_images_spreads_over_the_classes(standard):
    imagenet = subset(open_dataset(standard["imagenet"]), 5)
    assert sorted(sample.target for sample in imagenet.splits["train"]) == list(range(5))


@pytest.mark.parametrize(
    ("name", "damage", "task", "message"),
    [
        ("voc2012", "VOC2012/ImageSets/Segmentation/val.txt", "linseg", "val.txt (the val split)"),
        ("voc2012", "VOC2012/SegmentationClass", "kmeans", "SegmentationClass (the masks)"),
        ("ade20k", "annotations/validation", "kmeans", "annotations/validation (the validation annotations)"),
        ("cityscapes", "gtFine/train", "linseg", "gtFine/train (the train annotations)"),
        ("nyu", "official_splits/test", "depth", "official_splits/test (the val split)"),
        ("imagenet", "val", "knn", "no sub-folders"),
    ],
)
def test_a_missing_part_is_named_before_any_model(copy, capsys, no_model, name, damage, task, message):
    root = copy(name)
    shutil.rmtree(root / damage) if (root / damage).is_dir() else (root / damage).unlink()
    if name == "imagenet":
        (root / "train" / "n00000001").rename(root / "loose")  # keep a train split, lose val
        message = "val"
    one_error_line(capsys, evaluate("--task", task, "--data", root), 2, str(root), message)


def test_layout_specific_mistakes_are_explained(copy, capsys, no_model):
    imagenet = copy("imagenet")
    for image in (imagenet / "val").rglob("*.JPEG"):
        image.rename(imagenet / "val" / image.name)
    for folder in (imagenet / "val").iterdir():
        if folder.is_dir():
            folder.rmdir()
    one_error_line(capsys, evaluate("--task", "knn", "--data", imagenet), 2, "holds 20 images directly", "val/<wnid>/")
    cityscapes = copy("cityscapes")
    (cityscapes / "gtFine" / "val" / "frankfurt" / "frankfurt_000002_000019_gtFine_labelIds.png").unlink()
    one_error_line(
        capsys, evaluate("--task", "kmeans", "--data", cityscapes), 2, "1 of 6 images", "no *_gtFine_labelIds.png"
    )
    voc = copy("voc2012")
    (voc / "VOC2012" / "JPEGImages" / "2008_000002.jpg").unlink()
    one_error_line(capsys, evaluate("--task", "kmeans", "--data", voc), 2, "1 of 6 images listed in", "2008_000002")


def test_tasks_and_datasets_must_fit(standard, capsys, no_model):
    voc, imagenet = standard["voc2012"], standard["imagenet"]
    one_error_line(capsys, evaluate("--task", "knn", "--data", voc), 2, "found the VOC2012 layout (segmentation)")
    one_error_line(
        capsys, evaluate("--task", "depth", "--data", voc, imagenet), 2, "--task depth: none of --data is a depth"
    )
    one_error_line(
        capsys, evaluate("--task", "linseg", "--data", voc, imagenet), 2, f"--data {imagenet}: a classification"
    )
    one_error_line(
        capsys,
        evaluate("--task", "kmeans", "--data", standard["ade20k"], "--layout", "voc2012"),
        2,
        "VOC2012 layout without",
    )
    one_error_line(
        capsys, evaluate("--task", "kmeans", "--data", voc, imagenet, "--layout", "voc2012"), 2, "--layout: 1 layouts"
    )


# --- mask checks: before any model, naming the file ----------------------------------------------------


@pytest.fixture
def shapes(tmp_path):
    return make_shapes_dataset(tmp_path / "shapes", n_per_class=1, size=28) / "segmentation"


def relabel(path, value, region=(slice(0, 4), slice(0, 4))):
    labels = np.asarray(Image.open(path)).copy()
    labels[region] = value
    Image.fromarray(labels).save(path)


def test_a_label_beyond_the_training_classes_is_refused(shapes, capsys, no_model):
    """The reviewer's cases: 7 present in val only, and 254 for one region, used to grow the class count silently."""
    relabel(shapes / "val" / "masks" / "0002.png", 7)
    one_error_line(
        capsys,
        evaluate("--task", "linseg", "--data", shapes),
        2,
        f"{shapes / 'val' / 'masks' / '0002.png'} holds label 7, outside the classes of the train masks (0-5",
    )
    relabel(shapes / "val" / "masks" / "0002.png", 0)
    relabel(shapes / "train" / "masks" / "0001.png", 254)
    one_error_line(
        capsys,
        evaluate("--task", "linseg", "--data", shapes),
        2,
        f"{shapes / 'train' / 'masks' / '0001.png'} holds label 254 but the other train masks use 0-5",
        "--num-classes",
    )
    one_error_line(
        capsys,
        evaluate("--task", "linseg", "--data", shapes, "--num-classes", "6"),
        2,
        "0001.png holds label 254, outside --num-classes 6 (0-5, 255 = ignore)",
    )


def test_a_standard_layouts_classes_are_its_own(copy, capsys, no_model):
    voc = copy("voc2012")
    mask = voc / "VOC2012" / "SegmentationClass" / "2008_000003.png"
    palette = Image.open(mask).getpalette()
    labels = np.asarray(Image.open(mask)).copy()
    labels[:2, :2] = 30
    image = Image.frombytes("P", labels.shape[::-1], labels.tobytes())
    image.putpalette(palette)
    image.save(mask)
    one_error_line(
        capsys,
        evaluate("--task", "kmeans", "--data", voc),
        2,
        f"{mask} holds label 30, outside the VOC2012 classes (0-20",
    )


def test_a_mask_of_another_size_is_found_before_encoding(shapes, capsys, no_model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("features were computed")

    monkeypatch.setattr("sinder_hub.evaluation.streaming.stream", refuse)
    Image.new("L", (30, 28)).save(shapes / "val" / "masks" / "0003.png")
    one_error_line(
        capsys,
        evaluate("--task", "linseg", "--data", shapes),
        2,
        f"{shapes / 'val' / 'masks' / '0003.png'}: mask is 30x28 px but its image",
        "is 28x28",
    )
    Image.new("RGB", (28, 28)).save(shapes / "val" / "masks" / "0003.png")
    one_error_line(capsys, evaluate("--task", "kmeans", "--data", shapes), 2, "0003.png: mask must be a single-channel")


def test_check_targets_raises_data_error(shapes):
    relabel(shapes / "train" / "masks" / "0000.png", 200, (slice(None), slice(None)))
    for path in (shapes / "train" / "masks").glob("*.png"):
        relabel(path, 255, (slice(None), slice(None)))
    with pytest.raises(DataError, match="the train masks hold no labelled pixel"):
        check_targets(open_dataset(shapes), ("train", "val"))
