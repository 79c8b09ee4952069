"""Evaluation datasets as they are distributed: which layout a folder has, its splits and the files of each sample.

Only names are read here (no image is decoded), so a wrong or incomplete layout fails in one line
before any model loads. Our split names are ``train`` and ``val``; each layout maps them to its own
(ADE20k ``training`` / ``validation``, NYU ``sync`` / ``official_splits/test``).

- ``imagenet``: ``ROOT/train/<wnid>/*.JPEG``, ``ROOT/val/<wnid>/*.JPEG`` (the validation images
  sorted into class folders, as torchvision's ``ImageFolder`` reads them);
- ``class-folders``: ``ROOT/{train,val}/<class>/*``, the project's own classification layout;
- ``voc2012``: ``VOCdevkit/VOC2012/`` with ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``
  (palette PNGs) and ``ImageSets/Segmentation/{train,val}.txt``; 21 classes, 255 = ignore;
- ``ade20k``: ``ADEChallengeData2016/{images,annotations}/{training,validation}/``; 150 classes,
  annotation 0 = ignore and 1..150 -> 0..149 (mmsegmentation's ``reduce_zero_label``);
- ``cityscapes``: ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` with
  ``gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png``; 19 classes, 255 = ignore;
- ``image-mask-folders``: ``ROOT/<split>/images/<stem>.*`` with ``ROOT/<split>/masks/<stem>.png``,
  the project's own segmentation layout (classes: the mask values, 255 = ignore);
- ``nyu``: NYU Depth v2 as BTS distributes it, the layout of the depth toolbox DINOv2's depth
  evaluation used: ``sync/<scene>/rgb_<n>.jpg`` + ``sync_depth_<n>.png`` (training),
  ``official_splits/test/<scene>/`` (the 654 test images), uint16 depth in millimetres, 0 = no
  depth; the split files ``nyudepthv2_{train,test}_files_with_gt.txt`` (in ROOT or
  ``ROOT/train_test_inputs``) are used when present, else the folders are listed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..data import IMAGE_SUFFIXES, list_images
from ..errors import DataError

SHOWN = 3
SPLITS = ("train", "val")
CLASSIFICATION_LAYOUT = "ROOT/train/<class>/ and ROOT/val/<class>/ image folders, at least 2 classes"
SEGMENTATION_LAYOUT = "ROOT/<split>/images/<stem>.* with ROOT/<split>/masks/<stem>.png"
WNID = re.compile(r"n\d{8}")


@dataclass(frozen=True)
class Layout:
    """What a layout holds: ``kind`` is ``classification``, ``segmentation`` or ``depth``."""

    name: str
    title: str
    kind: str
    expected: str
    split_names: dict[str, str] = field(default_factory=lambda: {"train": "train", "val": "val"})
    num_classes: int | None = None
    ignore_index: int = 255
    reduce_zero_label: bool = False
    depth_scale: float = 1000.0
    min_depth: float = 1e-3
    max_depth: float = 10.0


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
            "leftImg8bit/{train,val}/<city>/*_leftImg8bit.png + gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png",
            num_classes=19,
        ),
        Layout("image-mask-folders", "", "segmentation", SEGMENTATION_LAYOUT),
        Layout(
            "nyu",
            "NYUd",
            "depth",
            "sync/<scene>/rgb_<n>.jpg + sync_depth_<n>.png and official_splits/test/<scene>/ (BTS's NYU Depth v2)",
            split_names={"train": "sync", "val": "official_splits/test"},
        ),
    )
}


@dataclass(frozen=True)
class Sample:
    """One image and its target: a class index, or the mask / depth file."""

    image: Path
    target: int | Path


@dataclass
class EvalDataset:
    """A dataset folder read as ``layout``: ``splits[split]`` lists its samples in a fixed order."""

    root: Path
    layout: Layout
    splits: dict[str, list[Sample]]
    classes: list[str] | None = None

    @property
    def title(self) -> str:
        return self.layout.title or self.root.resolve().name

    @property
    def kind(self) -> str:
        return self.layout.kind


def _shown(names: list[str]) -> str:
    return ", ".join(names[:SHOWN]) + (", ..." if len(names) > SHOWN else "")


def describe_folder(root: Path) -> str:
    """What a dataset folder looks like, for error messages."""
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "a single segmentation split (images/ + masks/)"
    splits = [p for p in sorted(root.iterdir()) if p.is_dir()] if root.is_dir() else []
    if any((p / "images").is_dir() and (p / "masks").is_dir() for p in splits):
        return "a segmentation layout (<split>/images/ + <split>/masks/)"
    if any(q.is_dir() for p in splits for q in p.iterdir()):
        return "a classification layout (<split>/<class>/)"
    if root.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir()):
        return "image files directly in it"
    return f"sub-folders {', '.join(p.name for p in splits[:4])}" if splits else "no sub-folders"


# --- the classification layouts --------------------------------------------------------------


def classification_split(
    root: str | Path, split: str, classes: list[str] | None = None, task: str = "knn"
) -> tuple[list[Path], list[int], list[str]]:
    """Images of ``ROOT/split/<class>/``: ``(paths, labels, classes)``; ``classes`` default to the folder's.

    Raises ``DataError`` naming the folder when the layout is not ``CLASSIFICATION_LAYOUT``.
    """
    root = Path(root)
    folder = root / split
    if not folder.is_dir() or ((folder / "images").is_dir() and (folder / "masks").is_dir()):
        raise DataError(f"--data {root}: found {describe_folder(root)}; {task} expects {CLASSIFICATION_LAYOUT}")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    loose = [p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    if loose and not found:
        raise DataError(
            f"{folder} holds {len(loose)} images directly ({_shown(sorted(loose))}), not in class folders; "
            f"expected {folder}/<class>/ (ImageNet's raw validation images must first be sorted into val/<wnid>/)"
        )
    if classes is None and len(found) < 2:
        raise DataError(
            f"{folder} has {len(found)} class folder{'s' * (len(found) != 1)} "
            f"({', '.join(found) or 'none'}); {task} expects {CLASSIFICATION_LAYOUT}"
        )
    if not found:
        raise DataError(f"{folder} has no class folders; {task} expects {CLASSIFICATION_LAYOUT}")
    classes = found if classes is None else classes
    unknown = [name for name in found if name not in classes]
    if unknown:
        raise DataError(f"{folder} has classes {unknown} that are not in the training split")
    paths, labels = [], []
    for name in found:
        for path in list_images(folder / name):
            paths.append(path)
            labels.append(classes.index(name))
    return paths, labels, classes


def _classification(root: Path, layout: Layout, splits: tuple[str, ...]) -> EvalDataset:
    paths, labels, classes = classification_split(root, "train")
    listed = {"train": [Sample(p, c) for p, c in zip(paths, labels)]}
    if "val" in splits:
        paths, labels, _ = classification_split(root, "val", classes)
        listed["val"] = [Sample(p, c) for p, c in zip(paths, labels)]
    return EvalDataset(root, layout, {split: listed[split] for split in splits}, classes)


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
            f"({_shown(orphans)}); expected masks/<stem>.png for every image"
        )
    return [(image, folder / "masks" / f"{image.stem}.png") for image in images]


def _require(path: Path, root: Path, layout: Layout, what: str) -> Path:
    """``path`` if it exists, else a ``DataError`` naming the missing part of ``layout``."""
    if not path.exists():
        raise DataError(f"--data {root}: {layout.title} layout without {path} ({what}); expected {layout.expected}")
    return path


def _pairs(images: list[Path], target_of, root: Path, where: Path, what: str) -> list[Sample]:
    """Samples of ``images`` whose target file ``target_of(image)`` exists; a ``DataError`` lists the others."""
    samples = [Sample(image, target_of(image)) for image in images]
    missing = [sample.image.name for sample in samples if not sample.target.is_file()]
    if missing:
        raise DataError(
            f"--data {root}: {len(missing)} of {len(samples)} images of {where} have no {what} ({_shown(missing)})"
        )
    return samples


def _voc_root(root: Path) -> Path | None:
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if any((candidate / name).is_dir() for name in ("JPEGImages", "SegmentationClass", "ImageSets")):
            return candidate
    return None


def _voc2012(root: Path, layout: Layout, splits: tuple[str, ...]) -> EvalDataset:
    voc = _voc_root(root) or root
    images = _require(voc / "JPEGImages", root, layout, "the images")
    masks = _require(voc / "SegmentationClass", root, layout, "the masks")
    listed = {}
    for split in splits:
        ids_file = _require(voc / "ImageSets" / "Segmentation" / f"{split}.txt", root, layout, f"the {split} split")
        ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
        missing = [i for i in ids if not (images / f"{i}.jpg").is_file()]
        if missing:
            raise DataError(
                f"--data {root}: {len(missing)} of {len(ids)} images listed in {ids_file} are not in {images} "
                f"({_shown(missing)})"
            )
        listed[split] = _pairs(
            [images / f"{i}.jpg" for i in ids], lambda p: masks / f"{p.stem}.png", root, ids_file, "mask"
        )
    return EvalDataset(root, layout, listed)


def _ade_root(root: Path) -> Path | None:
    for candidate in (root, root / "ADEChallengeData2016"):
        splits = [candidate / "images" / name for name in ("training", "validation")]
        if (candidate / "annotations").is_dir() and any(split.is_dir() for split in splits):
            return candidate
    return None


def _ade20k(root: Path, layout: Layout, splits: tuple[str, ...]) -> EvalDataset:
    ade = _ade_root(root) or root
    listed = {}
    for split in splits:
        name = layout.split_names[split]
        images = _require(ade / "images" / name, root, layout, f"the {name} images")
        annotations = _require(ade / "annotations" / name, root, layout, f"the {name} annotations")
        listed[split] = _pairs(
            list_images(images), lambda p, a=annotations: a / f"{p.stem}.png", root, images, "annotation"
        )
    return EvalDataset(root, layout, listed)


def _cityscapes(root: Path, layout: Layout, splits: tuple[str, ...]) -> EvalDataset:
    listed = {}
    for split in splits:
        images = _require(root / "leftImg8bit" / split, root, layout, f"the {split} images")
        labels = _require(root / "gtFine" / split, root, layout, f"the {split} annotations")
        if not any(labels.rglob("*_gtFine_labelTrainIds.png")):
            raise DataError(
                f"--data {root}: {labels} has no *_gtFine_labelTrainIds.png; create them with cityscapesscripts' "
                "csCreateTrainIdLabelImgs (the 19 training classes, 255 = ignore)"
            )
        pictures = [p for p in list_images(images) if p.name.endswith("_leftImg8bit.png")]

        def label_of(path: Path, images=images, labels=labels) -> Path:
            stem = path.name.removesuffix("_leftImg8bit.png")
            return labels / path.parent.relative_to(images) / f"{stem}_gtFine_labelTrainIds.png"

        listed[split] = _pairs(pictures, label_of, root, images, "*_gtFine_labelTrainIds.png")
    return EvalDataset(root, layout, listed)


def _image_mask_folders(root: Path, layout: Layout, splits: tuple[str, ...]) -> EvalDataset:
    listed = {split: [Sample(image, mask) for image, mask in segmentation_split(root, split)] for split in splits}
    return EvalDataset(root, layout, listed)


# --- NYU Depth v2 ----------------------------------------------------------------------------


NYU_SPLIT_FILES = {"train": "nyudepthv2_train_files_with_gt.txt", "val": "nyudepthv2_test_files_with_gt.txt"}


def _nyu_list(folder: Path, root: Path, layout: Layout, split: str) -> list[Sample]:
    """The samples of one NYU split: from BTS's split file when there is one, else every ``rgb_*.jpg`` with its depth."""
    for place in (root, root / "train_test_inputs"):
        split_file = place / NYU_SPLIT_FILES[split]
        if split_file.is_file():
            rows = [line.split() for line in split_file.read_text().splitlines() if line.strip()]
            rows = [row for row in rows if len(row) >= 2 and row[1] != "None"]
            missing = [row[0] for row in rows if not (folder / row[0].lstrip("/")).is_file()]
            if missing:
                raise DataError(
                    f"--data {root}: {len(missing)} of {len(rows)} images listed in {split_file} are not in "
                    f"{folder} ({_shown(missing)})"
                )
            images = [folder / row[0].lstrip("/") for row in rows]
            depths = dict(zip(images, (folder / row[1].lstrip("/") for row in rows)))
            return _pairs(images, depths.__getitem__, root, split_file, "depth file")
    images = sorted(folder.rglob("rgb_*.jpg"))
    if not images:
        raise DataError(f"--data {root}: {folder} holds no rgb_*.jpg; expected {layout.expected}")
    return _pairs(
        images, lambda p: p.with_name(p.name.replace("rgb_", "sync_depth_")).with_suffix(".png"), root, folder, "depth"
    )


def _nyu(root: Path, layout: Layout, splits: tuple[str, ...]) -> EvalDataset:
    listed = {}
    for split in splits:
        folder = _require(root / layout.split_names[split], root, layout, f"the {split} split")
        listed[split] = _nyu_list(folder, root, layout, split)
    return EvalDataset(root, layout, listed)


# --- detection ---------------------------------------------------------------------------------


READERS = {
    "imagenet": _classification,
    "class-folders": _classification,
    "voc2012": _voc2012,
    "ade20k": _ade20k,
    "cityscapes": _cityscapes,
    "image-mask-folders": _image_mask_folders,
    "nyu": _nyu,
}


def detect_layout(root: Path) -> str | None:
    """The name of the layout ``root`` looks like (by its folder names), or ``None``."""
    if _voc_root(root):
        return "voc2012"
    if _ade_root(root):
        return "ade20k"
    if (root / "leftImg8bit").is_dir() or (root / "gtFine").is_dir():
        return "cityscapes"
    if (root / "sync").is_dir() or (root / "official_splits").is_dir():
        return "nyu"
    children = [p for p in sorted(root.iterdir()) if p.is_dir()]
    if (root / "images").is_dir() or any((p / "images").is_dir() or (p / "masks").is_dir() for p in children):
        return "image-mask-folders"
    classes = [q.name for p in children for q in p.iterdir() if q.is_dir()]
    if classes and all(WNID.fullmatch(name) for name in classes):
        return "imagenet"
    if classes:
        return "class-folders"
    return None


def open_dataset(
    root: str | Path, layout: str | None = None, splits: tuple[str, ...] = SPLITS, flag: str = "--data"
) -> EvalDataset:
    """Read the file lists of ``splits`` of the dataset at ``root`` (layout detected unless named).

    Raises ``DataError`` (one line naming the folder or file) for a missing folder, an unknown
    layout, or a missing part of it: a split, an annotation folder, a target file.
    """
    root = Path(root)
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
    return READERS[name](root, LAYOUTS[name], tuple(splits))


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
    "depth": "NYU Depth v2 as BTS distributes it (sync/ + official_splits/test/)",
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
    """``dataset`` with at most ``max_images`` samples per split, evenly spread (``spread``)."""
    splits = {split: spread(samples, max_images) for split, samples in dataset.splits.items()}
    return EvalDataset(dataset.root, dataset.layout, splits, dataset.classes)
