"""Evaluation datasets as they are distributed: which layout a folder has, its splits and the files of each sample.

Only names are read here (no image is decoded), so a wrong or incomplete layout fails in one line
before any model loads. Our split names are ``train`` and ``val``; each layout maps them to its own
(ADE20k ``training`` / ``validation``, NYU ``sync`` / ``official_splits/test``).

- ``imagenet``: ``ROOT/train/<wnid>/*.JPEG`` with ``ROOT/val/<wnid>/*.JPEG`` (sorted, as torchvision's
  ``ImageFolder`` reads them) or a flat ``ROOT/val/`` labelled by Kaggle's CSV or the devkit
  (``imagenet.py``);
- ``class-folders``: ``ROOT/{train,val}/<class>/*``, the project's own classification layout;
- ``voc2012``: ``VOCdevkit/VOC2012/`` with ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``
  (palette PNGs) and ``ImageSets/Segmentation/{train,val}.txt``; 21 classes, 255 = ignore;
- ``ade20k``: ``ADEChallengeData2016/{images,annotations}/{training,validation}/``; 150 classes,
  annotation 0 = ignore and 1..150 -> 0..149 (mmsegmentation's ``reduce_zero_label``);
- ``cityscapes``: ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` with ``gtFine/{train,val}/<city>/``
  ``*_gtFine_labelTrainIds.png`` (cityscapesScripts' ``csCreateTrainIdLabelImgs``) or, as the archive
  ships them, ``*_gtFine_labelIds.png`` mapped to the 19 trainIds on the fly; 255 = ignore;
- ``cityscapes27``: the same files, ``*_gtFine_labelIds.png`` - 7: the 27 classes of STEGO and the
  SINDER paper's unsupervised tables (ids 0-6 ignored);
- ``image-mask-folders``: ``ROOT/<split>/images/<stem>.*`` with ``ROOT/<split>/masks/<stem>.png``,
  the project's own segmentation layout (classes: the mask values, 255 = ignore);
- ``nyu``: NYU Depth v2 as BTS, the depth toolbox (DINOv2's depth evaluation) or mmsegmentation
  arrange it (``nyu.py``), 16-bit depth in millimetres, 0 = no depth.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from ..data import list_images
from ..errors import DataError, InputError
from .imagenet import CLASSIFICATION_LAYOUT, KAGGLE, classification_split, open_classification
from .nyu import arrangement, open_nyu, parse_split_files
from .splits import (
    DatasetOptions,
    EvalDataset,
    Layout,
    Sample,
    check_disjoint,
    describe_folder,
    pairs,
    read_split_file,
    require,
    shown,
)

SPLITS = ("train", "val")
SEGMENTATION_LAYOUT = "ROOT/<split>/images/<stem>.* with ROOT/<split>/masks/<stem>.png"
WNID = re.compile(r"n\d{8}")
# cityscapesScripts' helpers/labels.py: labelId 0..33 -> trainId (255 = void; license plate, id -1, is never drawn)
CITYSCAPES_TRAIN_IDS = (
    *[255] * 7,  # unlabeled, ego vehicle, rectification border, out of roi, static, dynamic, ground
    *(0, 1, 255, 255),  # road, sidewalk, parking, rail track
    *(2, 3, 4, 255, 255, 255),  # building, wall, fence, guard rail, bridge, tunnel
    *(5, 255, 6, 7),  # pole, polegroup, traffic light, traffic sign
    *(8, 9, 10, 11, 12),  # vegetation, terrain, sky, person, rider
    *(13, 14, 15, 255, 255, 16, 17, 18),  # car, truck, bus, caravan, trailer, train, motorcycle, bicycle
)
# STEGO's Cityscapes (the SINDER paper's unsupervised tables): labelIds 7..33 -> 0..26, the void ids 0..6 -> 255
CITYSCAPES_27 = (*[255] * 7, *range(27))
CITYSCAPES_FILES = "gtFine/{train,val}/<city>/*_gtFine_labelIds.png (or *_labelTrainIds.png)"
NYU_LAYOUTS = (
    "BTS's sync/<scene>/rgb_<n>.jpg + sync_depth_<n>.png and official_splits/test/<scene>/, "
    "the depth toolbox's <scene>/ + nyu_train.txt / nyu_test.txt, or mmsegmentation's images|annotations/{train,test}/"
)

LAYOUTS = {
    layout.name: layout
    for layout in (
        Layout("imagenet", "ImageNet", "classification", "ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/*.JPEG"),
        Layout("class-folders", "", "classification", CLASSIFICATION_LAYOUT),
        Layout(
            "voc2012",
            "VOC2012",
            "segmentation",
            "VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation/{train,val}.txt}",
            num_classes=21,
        ),
        Layout(
            "ade20k",
            "ADE20k",
            "segmentation",
            "ADEChallengeData2016/{images,annotations}/{training,validation}/",
            split_names={"train": "training", "val": "validation"},
            num_classes=150,
            reduce_zero_label=True,
        ),
        Layout(
            "cityscapes",
            "Cityscapes",
            "segmentation",
            f"leftImg8bit/{{train,val}}/<city>/*_leftImg8bit.png + {CITYSCAPES_FILES}",
            num_classes=19,
        ),
        Layout(
            "cityscapes27",
            "Cityscapes27",
            "segmentation",
            "leftImg8bit/{train,val}/<city>/*_leftImg8bit.png + gtFine/{train,val}/<city>/*_gtFine_labelIds.png",
            num_classes=27,
            label_map=CITYSCAPES_27,
        ),
        Layout("image-mask-folders", "", "segmentation", SEGMENTATION_LAYOUT),
        Layout(
            "nyu",
            "NYUd",
            "depth",
            NYU_LAYOUTS,
            split_names={"train": "sync", "val": "official_splits/test"},
        ),
    )
}


# --- the segmentation layouts ----------------------------------------------------------------


def segmentation_split(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """``(image, mask)`` pairs of ``ROOT/split/images/<stem>.*`` and ``ROOT/split/masks/<stem>.png``.

    Raises ``DataError`` naming the folder when the layout is not ``SEGMENTATION_LAYOUT`` or an image has no mask.
    """
    root = Path(root)
    folder = root / split
    if not (folder / "images").is_dir() or not (folder / "masks").is_dir():
        raise DataError(
            f"--data {root}: found {describe_folder(root)}, no {folder}/images/ + masks/; "
            f"segmentation expects {SEGMENTATION_LAYOUT} (splits: train and val for linseg, val for kmeans)"
        )
    images = list_images(folder / "images")
    orphans = [image.name for image in images if not (folder / "masks" / f"{image.stem}.png").is_file()]
    if orphans:
        raise DataError(
            f"{folder}: {len(orphans)} of {len(images)} images have no mask in {folder / 'masks'} "
            f"({shown(orphans)}); expected masks/<stem>.png for every image"
        )
    return [(image, folder / "masks" / f"{image.stem}.png") for image in images]


def _voc_root(root: Path) -> Path | None:
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if any((candidate / name).is_dir() for name in ("JPEGImages", "SegmentationClass", "ImageSets")):
            return candidate
    return None


def _voc2012(root: Path, layout: Layout, splits: tuple[str, ...], _options: DatasetOptions) -> EvalDataset:
    voc = _voc_root(root) or root
    images = require(voc / "JPEGImages", root, layout, "the images")
    masks = require(voc / "SegmentationClass", root, layout, "the masks")
    listed = {}
    for split in splits:
        ids_file = require(voc / "ImageSets" / "Segmentation" / f"{split}.txt", root, layout, f"the {split} split")
        ids = [row[0] for row in read_split_file(ids_file)]
        missing = [i for i in ids if not (images / f"{i}.jpg").is_file()]
        if missing:
            raise DataError(
                f"--data {root}: {len(missing)} of {len(ids)} images listed in {ids_file} are not in {images} "
                f"({shown(missing)})"
            )
        listed[split] = pairs(
            [images / f"{i}.jpg" for i in ids], lambda p: masks / f"{p.stem}.png", root, ids_file, "mask"
        )
    return EvalDataset(root, layout, listed)


def _ade_root(root: Path) -> Path | None:
    for candidate in (root, root / "ADEChallengeData2016"):
        splits = [candidate / "images" / name for name in ("training", "validation")]
        if (candidate / "annotations").is_dir() and any(split.is_dir() for split in splits):
            return candidate
    return None


def _ade20k(root: Path, layout: Layout, splits: tuple[str, ...], _options: DatasetOptions) -> EvalDataset:
    ade = _ade_root(root) or root
    listed = {}
    for split in splits:
        name = layout.split_names[split]
        images = require(ade / "images" / name, root, layout, f"the {name} images")
        annotations = require(ade / "annotations" / name, root, layout, f"the {name} annotations")
        listed[split] = pairs(
            list_images(images), lambda p, a=annotations: a / f"{p.stem}.png", root, images, "annotation"
        )
    return EvalDataset(root, layout, listed)


def _cityscapes(root: Path, layout: Layout, splits: tuple[str, ...], _options: DatasetOptions) -> EvalDataset:
    """Cityscapes' ``*_gtFine_labelTrainIds.png`` when every image has one (19 classes), else its
    ``*_gtFine_labelIds.png`` mapped on the fly (``layout.label_map``: the 19 trainIds, or the 27 classes)."""
    folders, pictures = {}, {}
    for split in splits:
        images = require(root / "leftImg8bit" / split, root, layout, f"the {split} images")
        folders[split] = (images, require(root / "gtFine" / split, root, layout, f"the {split} annotations"))
        pictures[split] = [p for p in list_images(images) if p.name.endswith("_leftImg8bit.png")]

    def label_of(path: Path, split: str, kind: str) -> Path:
        images, labels = folders[split]
        stem = path.name.removesuffix("_leftImg8bit.png")
        return labels / path.parent.relative_to(images) / f"{stem}_gtFine_{kind}.png"

    train_ids = layout.label_map is None and all(
        label_of(p, split, "labelTrainIds").is_file() for split in splits for p in pictures[split]
    )
    kind = "labelTrainIds" if train_ids else "labelIds"
    if not train_ids and layout.label_map is None:
        layout = replace(layout, label_map=CITYSCAPES_TRAIN_IDS)
    listed = {
        split: pairs(
            pictures[split], lambda p, s=split: label_of(p, s, kind), root, folders[split][0], f"*_gtFine_{kind}.png"
        )
        for split in splits
    }
    return EvalDataset(root, layout, listed)


def _image_mask_folders(root: Path, layout: Layout, splits: tuple[str, ...], _options: DatasetOptions) -> EvalDataset:
    listed = {split: [Sample(image, mask) for image, mask in segmentation_split(root, split)] for split in splits}
    return EvalDataset(root, layout, listed)


# --- detection ---------------------------------------------------------------------------------


READERS = {
    "imagenet": lambda root, layout, splits, _options: open_classification(root, layout, splits),
    "class-folders": lambda root, layout, splits, _options: open_classification(root, layout, splits),
    "voc2012": _voc2012,
    "ade20k": _ade20k,
    "cityscapes": _cityscapes,
    "cityscapes27": _cityscapes,
    "image-mask-folders": _image_mask_folders,
    "nyu": open_nyu,
}


def _is_imagenet(root: Path) -> bool:
    """Whether ``ROOT/train`` (or Kaggle's ``ROOT/ILSVRC/Data/CLS-LOC/train``) holds only WordNet-id folders."""
    train = (root / KAGGLE if (root / KAGGLE).is_dir() else root) / "train"
    names = [p.name for p in train.iterdir() if p.is_dir()] if train.is_dir() else []
    return bool(names) and all(WNID.fullmatch(name) for name in names)


def detect_layout(root: Path) -> str | None:
    """The name of the layout ``root`` looks like (by its folder names), or ``None``."""
    if _voc_root(root):
        return "voc2012"
    if _ade_root(root):
        return "ade20k"
    if (root / "leftImg8bit").is_dir() or (root / "gtFine").is_dir():
        return "cityscapes"
    if arrangement(root) or arrangement(root / "nyu"):
        return "nyu"
    if _is_imagenet(root):
        return "imagenet"
    children = [p for p in sorted(root.iterdir()) if p.is_dir()]
    if (root / "images").is_dir() or any((p / "images").is_dir() or (p / "masks").is_dir() for p in children):
        return "image-mask-folders"
    if any(q.is_dir() for p in children for q in p.iterdir()):
        return "class-folders"
    return None


def open_dataset(
    root: str | Path,
    layout: str | None = None,
    splits: tuple[str, ...] = SPLITS,
    flag: str = "--data",
    options: DatasetOptions | None = None,
) -> EvalDataset:
    """Read the file lists of ``splits`` of the dataset at ``root`` (layout detected unless named).

    ``options`` (``--depth-scale``, ``--split-file``) travel on the dataset (its layout's
    ``depth_scale``). Raises ``DataError`` (one line naming the folder or file) for a missing
    folder, an unknown layout, a missing part of it (a split, an annotation folder, a target
    file), a split file listing an image twice, or an image in both splits.
    """
    root, options = Path(root), options or DatasetOptions()
    if not root.is_dir():
        raise DataError(
            f"{flag} {root} is not a folder; expected a dataset folder "
            f"({', '.join(name for name in LAYOUTS)}, see docs/evaluation.md)"
        )
    name = layout or detect_layout(root)
    if name is None:
        raise DataError(
            f"{flag} {root}: found {describe_folder(root)}, no known layout; expected one of "
            f"{', '.join(LAYOUTS)} (see docs/evaluation.md), or name it with --layout"
        )
    if name not in LAYOUTS:
        raise DataError(f"--layout {name}: unknown layout; expected one of {', '.join(LAYOUTS)}")
    dataset = READERS[name](root, LAYOUTS[name], tuple(splits), options)
    if dataset.kind == "depth" and options.depth_scale is not None:
        dataset.layout = replace(dataset.layout, depth_scale=options.depth_scale)
    return check_disjoint(dataset)


def check_dataset_options(datasets: list[EvalDataset], options: DatasetOptions) -> None:
    """Refuse (``InputError``) ``--depth-scale`` without a depth dataset, ``--split-file`` without exactly one NYU."""
    if options.depth_scale is not None and not any(d.kind == "depth" for d in datasets):
        raise InputError(f"--depth-scale {options.depth_scale:g}: none of --data is a depth dataset")
    roots = {d.root for d in datasets if d.layout.name == "nyu"}
    if options.split_files and len(roots) != 1:
        raise InputError(f"--split-file: {len(roots)} NYU --data folders; it applies to exactly one")


def spread(samples: list[Sample], count: int | None) -> list[Sample]:
    """At most ``count`` samples, evenly spaced over the list (every class of a sorted list keeps a share)."""
    if count is None or count >= len(samples):
        return list(samples)
    return [samples[i * len(samples) // count] for i in range(count)]


TASK_KINDS = {
    "knn": "classification",
    "linear": "classification",
    "linseg": "segmentation",
    "kmeans": "segmentation",
    "depth": "depth",
}
TASK_SPLITS = {"kmeans": ("val",)}
KIND_EXPECTS = {
    "classification": f"{CLASSIFICATION_LAYOUT} (ImageNet or the project's class folders)",
    "segmentation": f"{SEGMENTATION_LAYOUT}, or VOC2012, ADE20k or Cityscapes as distributed",
    "depth": f"NYU Depth v2 as distributed: {NYU_LAYOUTS}",
}


def _expects(task: str) -> str:
    """``"knn expects ..."``, ``"segmentation expects ..."``: what a task needs, for error messages."""
    kind = TASK_KINDS[task]
    return f"{task if kind == 'classification' else kind} expects {KIND_EXPECTS[kind]}"


def dataset_for(data, task: str, layout: str | None = None, flag: str = "--data") -> EvalDataset:
    """``data`` (a dataset folder, or an ``EvalDataset``) opened with the splits ``task`` needs.

    Raises ``DataError`` naming the folder and the layout found when ``task`` does not apply to it.
    """
    if task not in TASK_KINDS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASK_KINDS)}")
    splits = TASK_SPLITS.get(task, SPLITS)
    if isinstance(data, EvalDataset):
        dataset = data
    else:
        root = Path(data)
        if not root.is_dir():
            raise DataError(f"{flag} {root} is not a folder; {_expects(task)}")
        name = layout or detect_layout(root)
        kind = LAYOUTS[name].kind if name in LAYOUTS else None
        if kind is not None and kind != TASK_KINDS[task]:
            found = describe_folder(root) if not LAYOUTS[name].title else f"the {LAYOUTS[name].title} layout ({kind})"
            raise DataError(f"{flag} {root}: found {found}; {_expects(task)}")
        dataset = open_dataset(root, name, splits, flag)
    if dataset.kind != TASK_KINDS[task]:
        raise DataError(f"{flag} {dataset.root}: a {dataset.kind} dataset; {_expects(task)}")
    missing = [split for split in splits if split not in dataset.splits]
    if missing:
        raise DataError(f"{flag} {dataset.root}: opened without its {missing[0]} split, which {task} needs")
    return dataset


def subset(dataset: EvalDataset, max_images: int | None) -> EvalDataset:
    """``dataset`` with at most ``max_images`` samples per split, evenly spread (``spread``); its notes kept."""
    return replace(dataset, splits={split: spread(samples, max_images) for split, samples in dataset.splits.items()})


__all__ = [
    "LAYOUTS",
    "DatasetOptions",
    "EvalDataset",
    "Layout",
    "Sample",
    "classification_split",
    "check_dataset_options",
    "dataset_for",
    "detect_layout",
    "open_dataset",
    "parse_split_files",
    "segmentation_split",
    "subset",
]
