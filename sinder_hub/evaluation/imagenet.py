"""Classification datasets: class folders, and ImageNet as distributed (a flat ``val/`` and its labels).

``ROOT/{train,val}/<class>/`` is read as torchvision's ``ImageFolder`` reads it (classes: the
training split's folders, sorted). ImageNet's validation images may instead lie flat in ``val/``
(``ILSVRC2012_val_<n>.JPEG``, as ``ILSVRC2012_img_val.tar`` ships them), labelled by Kaggle's
``LOC_val_solution.csv`` (beside ``ILSVRC/``, whose ``Data/CLS-LOC/`` holds train and val) or by the
devkit (``ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt`` + ``meta.mat``, or its
``.tar.gz``, read as torchvision's ``ImageNet`` reads them: line n labels image n, ILSVRC2012 ids
mapped to WordNet ids by ``meta.mat``). A split with images both loose and in class folders, a
validation split missing training classes, and validation classes that training lacks are refused.
"""

from __future__ import annotations

import csv
import io
import re
import tarfile
from pathlib import Path

from ..data import IMAGE_SUFFIXES, list_images
from ..errors import DataError
from .splits import EvalDataset, Layout, Sample, describe_folder, shown

CLASSIFICATION_LAYOUT = "ROOT/train/<class>/ and ROOT/val/<class>/ image folders, at least 2 classes"
KAGGLE = Path("ILSVRC") / "Data" / "CLS-LOC"
KAGGLE_LABELS = "LOC_val_solution.csv"
DEVKIT = "ILSVRC2012_devkit_t12"
DEVKIT_FILES = ("data/meta.mat", "data/ILSVRC2012_validation_ground_truth.txt")
VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})")
FLAT_VAL_HELP = (
    f"sort them into val/<wnid>/, or put Kaggle's {KAGGLE_LABELS} or the devkit {DEVKIT}/ (or its .tar.gz) in ROOT"
)


def classification_split(
    root: str | Path, split: str, classes: list[str] | None = None, task: str = "knn"
) -> tuple[list[Path], list[int], list[str]]:
    """Images of ``ROOT/split/<class>/``: ``(paths, labels, classes)``; ``classes`` default to the folder's.

    Raises ``DataError`` naming the folder when the layout is not ``CLASSIFICATION_LAYOUT``, when
    images lie beside the class folders, or when a class is not one of ``classes``.
    """
    root = Path(root)
    folder = root / split
    if not folder.is_dir() or ((folder / "images").is_dir() and (folder / "masks").is_dir()):
        raise DataError(f"--data {root}: found {describe_folder(root)}; {task} expects {CLASSIFICATION_LAYOUT}")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    loose = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if loose:
        beside = f" beside {len(found)} class folders" if found else ", not in class folders"
        raise DataError(
            f"{folder} holds {len(loose)} images directly{beside} ({shown(loose)}); expected {folder}/<class>/ "
            f"only (ImageNet's raw validation images: {FLAT_VAL_HELP})"
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


def _kaggle_labels(path: Path) -> dict[str, str]:
    """``{image id: wnid}`` from ``LOC_val_solution.csv`` (``ImageId,PredictionString``: the first box's synset)."""
    labels = {}
    with path.open(newline="", encoding="utf-8-sig") as file:
        for row in csv.DictReader(file):
            image, boxes = row.get("ImageId"), (row.get("PredictionString") or "").split()
            if not image or not boxes:
                raise DataError(
                    f"{path}: a row without ImageId,PredictionString ({row}); expected Kaggle's {KAGGLE_LABELS}"
                )
            if image in labels:
                raise DataError(f"{path} lists {image} twice; expected each image once")
            labels[image] = boxes[0]
    return labels


def _devkit_bytes(root: Path) -> dict[str, bytes] | None:
    """The devkit's ``meta.mat`` and ground truth, from ``ROOT/ILSVRC2012_devkit_t12/`` or its ``.tar.gz``."""
    folder, archive = root / DEVKIT, root / f"{DEVKIT}.tar.gz"
    if all((folder / name).is_file() for name in DEVKIT_FILES):
        return {name: (folder / name).read_bytes() for name in DEVKIT_FILES}
    if archive.is_file():
        with tarfile.open(archive) as tar:
            try:
                return {name: tar.extractfile(f"{DEVKIT}/{name}").read() for name in DEVKIT_FILES}
            except (KeyError, AttributeError) as error:
                raise DataError(f"{archive} lacks {DEVKIT}/{'/'.join(DEVKIT_FILES)}: {error}") from None
    return None


def _devkit_labels(files: dict[str, bytes], where: Path) -> dict[str, str]:
    """``{"ILSVRC2012_val_<n>": wnid}``: line n of the ground truth, its ILSVRC2012 id mapped by meta.mat's leaf synsets."""
    from scipy.io import loadmat

    synsets = loadmat(io.BytesIO(files[DEVKIT_FILES[0]]), squeeze_me=True)["synsets"]
    wnid_of = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    lines = files[DEVKIT_FILES[1]].decode().split()
    unknown = [line for line in lines if int(line) not in wnid_of]
    if unknown:
        raise DataError(f"{where}: ground truth ids {shown(unknown)} are not leaf synsets of meta.mat")
    return {f"ILSVRC2012_val_{n:08d}": wnid_of[int(line)] for n, line in enumerate(lines, start=1)}


def flat_val(root: Path, data: Path, classes: list[str]) -> list[Sample]:
    """The samples of a flat ``data/val/``, labelled by Kaggle's CSV or the devkit found in ``root``."""
    folder = data / "val"
    images = list_images(folder)
    kaggle, devkit = root / KAGGLE_LABELS, _devkit_bytes(root)
    if kaggle.is_file():
        labels, source = _kaggle_labels(kaggle), kaggle
    elif devkit is not None:
        labels, source = _devkit_labels(devkit, root / DEVKIT), root / DEVKIT
    else:
        raise DataError(
            f"{folder} holds {len(images)} images directly, not in class folders, and no labels: {FLAT_VAL_HELP}"
        )
    unlabelled = [image.name for image in images if image.stem not in labels]
    if unlabelled:
        raise DataError(
            f"{folder}: {len(unlabelled)} of {len(images)} images are not in {source} ({shown(unlabelled)})"
        )
    unknown = sorted({labels[image.stem] for image in images} - set(classes))
    if unknown:
        raise DataError(f"{source} labels {folder} with classes {shown(unknown)} that are not in the training split")
    return [Sample(image, classes.index(labels[image.stem])) for image in images]


def _is_flat(folder: Path) -> bool:
    return folder.is_dir() and not any(p.is_dir() for p in folder.iterdir())


def open_classification(root: Path, layout: Layout, splits: tuple[str, ...]) -> EvalDataset:
    """``ROOT/{train,val}/<class>/``, or ImageNet with a flat ``val/`` (``flat_val``), Kaggle's ``ILSVRC/Data/CLS-LOC``."""
    data = root / KAGGLE if layout.name == "imagenet" and (root / KAGGLE).is_dir() else root
    paths, labels, classes = classification_split(data, "train")
    listed = {"train": [Sample(p, c) for p, c in zip(paths, labels)]}
    if "val" in splits:
        if layout.name == "imagenet" and _is_flat(data / "val") and list_images(data / "val"):
            listed["val"] = flat_val(root, data, classes)
        else:
            paths, labels, _ = classification_split(data, "val", classes)
            listed["val"] = [Sample(p, c) for p, c in zip(paths, labels)]
        absent = sorted(set(classes) - {classes[sample.target] for sample in listed["val"]})
        if absent:
            raise DataError(
                f"{data / 'val'}: {len(absent)} of {len(classes)} training classes have no validation image "
                f"({shown(absent)}); expected every class in val"
            )
    return EvalDataset(root, layout, {split: listed[split] for split in splits}, classes)
