"""Datasets as they are really distributed, and no silent wrong targets (issues #24, #25): depth units, partly
sorted ImageNet, NYU without BTS's split files, Cityscapes' labelIds, the flat ImageNet val, NYU's toolbox and
mmsegmentation arrangements, split files with comments / duplicates / overlap; masks read as mmsegmentation does."""

from __future__ import annotations

import shutil
import tarfile

import numpy as np
import pytest
from cli_checks import one_error_line
from PIL import Image
from test_evaluation_layouts import evaluate

from sinder_hub.errors import DataError
from sinder_hub.evaluation import check_targets, detect_layout, open_dataset
from sinder_hub.evaluation.layouts import LAYOUTS, DatasetOptions, subset
from sinder_hub.evaluation.targets import read_depth, read_mask
from sinder_hub.synthetic import (
    CITYSCAPES_SCENE_TRAIN_IDS,
    make_ade20k,
    make_cityscapes,
    make_imagenet,
    make_nyu,
    make_voc2012,
)

# --- depth units (#25 item 2) ------------------------------------------------------------------------------------


def depth_maps(root):
    return sorted(root.rglob("sync_depth_*.png"))


def metres(path):
    return np.asarray(Image.open(path)).astype(np.float64) / 1000.0


def test_depth_maps_in_another_unit_are_refused_naming_the_file(tmp_path, capsys, no_model):
    nyu = make_nyu(tmp_path / "nyu")
    eight_bit = depth_maps(nyu / "official_splits")[0]
    Image.fromarray(np.round(metres(eight_bit) * 25).astype(np.uint8)).save(eight_bit)
    one_error_line(capsys, evaluate("--task", "depth", "--data", nyu), 2, str(eight_bit), "8-bit", "--depth-scale")
    floats = depth_maps(nyu / "sync")[1]
    Image.fromarray(metres(floats).astype(np.float32), mode="F").save(floats, format="TIFF")
    Image.open(depth_maps(nyu / "official_splits")[1]).save(eight_bit)  # mend the first
    one_error_line(capsys, evaluate("--task", "depth", "--data", nyu), 2, str(floats), "32-bit float")


def test_a_median_depth_outside_a_room_is_refused(tmp_path, capsys, no_model):
    nyu = make_nyu(tmp_path / "nyu")
    decimetres = depth_maps(nyu / "sync")[2]
    Image.fromarray(np.round(metres(decimetres) * 10).astype(np.uint16)).save(decimetres)
    one_error_line(
        capsys, evaluate("--task", "depth", "--data", nyu), 2, str(decimetres), "median valid depth", "outside 0.1-20 m"
    )


def test_depth_scale_reads_other_units(tmp_path, capsys, no_model):
    nyu = make_nyu(tmp_path / "nyu")
    truth = {path: metres(path) for path in depth_maps(nyu)}
    for path, depth in truth.items():
        Image.fromarray(np.round(depth * 25).astype(np.uint8)).save(path)
    dataset = open_dataset(nyu, options=DatasetOptions(depth_scale=25))
    for sample in dataset.splits["val"]:
        assert np.abs(read_depth(sample, dataset.layout) - truth[sample.target]).max() <= 0.5 / 25 + 1e-6
    one_error_line(capsys, evaluate("--task", "depth", "--data", nyu, "--depth-scale", "1000"), 2, "median valid depth")
    one_error_line(capsys, evaluate("--task", "depth", "--data", nyu, "--depth-scale", "0"), 2, "--depth-scale 0.0")
    voc = make_voc2012(tmp_path / "voc")
    one_error_line(
        capsys, evaluate("--task", "kmeans", "--data", voc, "--depth-scale", "25"), 2, "none of --data is a depth"
    )


# --- ImageNet: partly sorted val (#25 item 3), the flat val as distributed ----------------------------------------


def test_a_partly_sorted_val_is_refused_naming_the_count(tmp_path, capsys, no_model):
    imagenet = make_imagenet(tmp_path / "imagenet")
    for image in sorted((imagenet / "val").rglob("*.JPEG"))[::5]:  # one of each of 4 classes
        image.rename(imagenet / "val" / image.name)
    one_error_line(capsys, evaluate("--task", "knn", "--data", imagenet), 2, "holds 4 images directly beside 5 class")


def test_a_val_split_missing_classes_is_refused(tmp_path, capsys, no_model):
    imagenet = make_imagenet(tmp_path / "imagenet")
    shutil.rmtree(imagenet / "val" / "n00000003")
    one_error_line(capsys, evaluate("--task", "linear", "--data", imagenet), 2, "1 of 5 training classes", "n00000003")
    (imagenet / "val" / "n00000009").mkdir()
    shutil.copy(next((imagenet / "val" / "n00000001").iterdir()), imagenet / "val" / "n00000009")
    one_error_line(capsys, evaluate("--task", "knn", "--data", imagenet), 2, "n00000009", "not in the training split")


def labels_by_name(dataset):
    return {sample.image.name: dataset.classes[sample.target] for sample in dataset.splits["val"]}


@pytest.mark.parametrize("val_layout", ["devkit", "kaggle", "devkit.tar.gz"])
def test_a_flat_val_is_labelled_by_the_devkit_or_kaggle(tmp_path, val_layout):
    sorted_val = labels_by_name(open_dataset(make_imagenet(tmp_path / "sorted")))
    root = make_imagenet(tmp_path / "flat", val_layout=val_layout.removesuffix(".tar.gz"))
    if val_layout.endswith(".tar.gz"):
        with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
            tar.add(root / "ILSVRC2012_devkit_t12", "ILSVRC2012_devkit_t12")
        shutil.rmtree(root / "ILSVRC2012_devkit_t12")
    assert detect_layout(root) == "imagenet"
    flat = open_dataset(root)
    assert flat.classes == [f"n{i:08d}" for i in range(1, 6)] and len(flat.splits["train"]) == 30
    assert labels_by_name(flat) == sorted_val and len(sorted_val) == 20


def test_a_flat_val_without_labels_or_with_unknown_images_is_refused(tmp_path):
    root = make_imagenet(tmp_path / "flat", val_layout="kaggle")
    Image.new("RGB", (32, 32)).save(root / "ILSVRC" / "Data" / "CLS-LOC" / "val" / "ILSVRC2012_val_00000099.JPEG")
    with pytest.raises(DataError, match="1 of 21 images are not in .*LOC_val_solution.csv"):
        open_dataset(root)
    (root / "LOC_val_solution.csv").unlink()
    with pytest.raises(DataError, match="holds 21 images directly, not in class folders, and no labels"):
        open_dataset(root)


# --- NYU: BTS without its split files (#25 item 4), --split-file, the toolbox and mmseg arrangements --------------


def test_nyu_without_bts_split_files_says_which_images_it_used(tmp_path):
    nyu = make_nyu(tmp_path / "nyu", split_files=False)
    dataset = open_dataset(nyu)
    assert not dataset.standard_split and len(dataset.splits["train"]) == 8
    assert (
        "(8 images), not BTS's split" in dataset.notes[0] and "nyudepthv2_train_files_with_gt.txt" in dataset.notes[0]
    )
    assert "(6 images)" in dataset.notes[1]
    fewer = subset(dataset, 3)  # what evaluate keeps with --max-images
    assert len(fewer.splits["train"]) == 3 and fewer.notes == dataset.notes and not fewer.standard_split
    bts = make_nyu(tmp_path / "bts")
    assert open_dataset(bts).standard_split and not open_dataset(bts).notes


def test_split_files_beside_the_dataset_or_given_are_used(tmp_path, capsys, no_model):
    nyu = make_nyu(tmp_path / "data" / "nyu")
    lists = tmp_path / "bts" / "train_test_inputs"
    lists.mkdir(parents=True)
    for listing in nyu.glob("*.txt"):
        lines = listing.read_text().splitlines()
        (lists / listing.name).write_text("# BTS\n" + "\n".join(lines[:3]) + "\n")
        listing.rename(tmp_path / "data" / listing.name)  # beside the dataset
    assert open_dataset(nyu).standard_split and len(open_dataset(nyu).splits["train"]) == 8
    train, test = sorted(lists.glob("*.txt"))[::-1]
    options = DatasetOptions(split_files={"train": str(train), "val": str(test)})
    dataset = open_dataset(nyu, options=options)
    assert [len(dataset.splits[s]) for s in ("train", "val")] == [3, 3] and dataset.standard_split
    one_error_line(
        capsys, evaluate("--task", "depth", "--data", nyu, "--split-file", "x.txt"), 2, "expected train=PATH"
    )
    one_error_line(
        capsys, evaluate("--task", "depth", "--data", nyu, "--split-file", "val=x.txt"), 2, "x.txt is not a file"
    )
    voc = make_voc2012(tmp_path / "voc")
    one_error_line(
        capsys, evaluate("--task", "kmeans", "--data", voc, "--split-file", str(train)), 2, "0 NYU --data folders"
    )
    mmseg = make_nyu(tmp_path / "mmseg", arrangement="mmseg")
    one_error_line(
        capsys, evaluate("--task", "depth", "--data", mmseg, "--split-file", f"train={train}"), 2, "whose folders are"
    )


def depth_by_pair(dataset):
    """``{(scene, number): depth}`` of the val split: the same scenes whatever the arrangement."""
    found = {}
    for sample in dataset.splits["val"]:
        scene, number = sample.image.parent.name, sample.image.stem.rsplit("_", 1)[-1]
        if sample.image.parent.name == "test":  # mmsegmentation: images/test/<scene>_<n>.jpg
            scene = sample.image.stem.rsplit("_", 1)[0]
        found[scene, number] = read_depth(sample, dataset.layout)
    return found


@pytest.mark.parametrize("arrangement", ["toolbox", "mmseg"])
def test_nyu_in_the_toolbox_and_mmseg_arrangements(tmp_path, arrangement):
    reference = depth_by_pair(open_dataset(make_nyu(tmp_path / "bts")))
    root = make_nyu(tmp_path / arrangement, arrangement=arrangement)
    assert detect_layout(root) == "nyu"
    dataset = open_dataset(root)
    assert (dataset.title, len(dataset.splits["train"]), dataset.standard_split) == ("NYUd", 8, True)
    found = depth_by_pair(dataset)
    assert found.keys() == reference.keys() and all(np.array_equal(found[k], reference[k]) for k in found)
    check_targets(dataset, ("train", "val"))


# --- Cityscapes as distributed ---------------------------------------------------------------------------------


def mmseg_reading(path):
    """mmsegmentation's LoadAnnotations: ``mmcv.imfrombytes(bytes, flag='unchanged', backend='pillow')`` is
    ``np.array(Image.open(...))``, then ``.squeeze().astype(np.uint8)``."""
    return np.array(Image.open(path)).squeeze().astype(np.uint8)


def test_cityscapes_label_ids_are_mapped_to_the_19_train_ids(tmp_path):
    shipped = open_dataset(make_cityscapes(tmp_path / "shipped"))
    prepared = open_dataset(make_cityscapes(tmp_path / "prepared", train_ids=True))
    assert prepared.splits["val"][0].target.name.endswith("_labelTrainIds.png")
    for as_shipped, with_train_ids in zip(shipped.splits["val"], prepared.splits["val"]):
        assert as_shipped.target.name.endswith("_gtFine_labelIds.png")
        reference = mmseg_reading(with_train_ids.target)
        assert np.array_equal(read_mask(as_shipped, shipped.layout), reference)
        assert np.array_equal(read_mask(with_train_ids, prepared.layout), reference)
    assert set(CITYSCAPES_SCENE_TRAIN_IDS.values()) - {255} <= set(check_targets(shipped, ("val",)).present["val"])
    table = shipped.layout.label_map  # a few rows of cityscapesScripts' labels.py
    assert (table[0], table[6], table[7], table[9], table[24], table[26], table[33]) == (255, 255, 0, 255, 11, 13, 18)


def test_the_27_class_protocol_is_label_ids_minus_7(tmp_path):
    dataset = open_dataset(make_cityscapes(tmp_path / "cityscapes"), "cityscapes27")
    sample = dataset.splits["val"][1]
    ids = mmseg_reading(sample.target).astype(np.int64)
    expected = np.where(ids >= 7, ids - 7, 255)
    assert np.array_equal(read_mask(sample, dataset.layout), expected) and 2 in expected  # parking: a class here
    summary = check_targets(dataset, ("train", "val"))
    assert summary.num_classes == 27 and dataset.title == "Cityscapes27"
    assert LAYOUTS["cityscapes"].num_classes == 19


def test_masks_equal_mmsegmentations_reading(tmp_path):
    voc = open_dataset(make_voc2012(tmp_path / "voc"))
    for sample in voc.splits["val"]:
        assert np.array_equal(read_mask(sample, voc.layout), mmseg_reading(sample.target))
    ade = open_dataset(make_ade20k(tmp_path / "ade"))
    for sample in ade.splits["val"]:
        gt = mmseg_reading(sample.target)
        gt[gt == 0] = 255  # reduce_zero_label, as mmseg's LoadAnnotations does it
        gt = gt - 1
        gt[gt == 254] = 255
        assert np.array_equal(read_mask(sample, ade.layout), gt)


# --- split files (#24) --------------------------------------------------------------------------------------------


def test_split_files_skip_comments_and_refuse_duplicates_and_overlap(tmp_path):
    voc = make_voc2012(tmp_path / "voc")
    lists = voc / "VOC2012" / "ImageSets" / "Segmentation"
    ids = (lists / "val.txt").read_text().split()
    (lists / "val.txt").write_text("# VOC2012 val\n\n" + "\n".join(ids) + "\n\n")
    assert [s.image.stem for s in open_dataset(voc).splits["val"]] == ids
    (lists / "val.txt").write_text("\n".join([*ids, ids[1]]) + "\n")
    with pytest.raises(DataError, match=f"val.txt lists {ids[1]} twice"):
        open_dataset(voc)
    train = (lists / "train.txt").read_text().split()
    (lists / "val.txt").write_text("\n".join([*ids, train[0]]) + "\n")
    with pytest.raises(DataError, match=f"1 of 7 validation images are also training images .*{train[0]}"):
        open_dataset(voc)
    (lists / "val.txt").write_text("# nothing yet\n")
    assert open_dataset(voc).splits["val"] == []
