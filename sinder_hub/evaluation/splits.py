"""What every dataset layout shares: the layout record, samples, the opened dataset, split files and their checks.

A split file (VOC's ``val.txt``, BTS's ``nyudepthv2_test_files_with_gt.txt``, ...) is read as
mmsegmentation and torchvision read theirs, with ``#`` comments and blank lines skipped; a
duplicated entry is refused (naming the file and the entry) and a file that lists nothing gives
an empty split (the caller refuses it). A training and a validation split sharing an image are
refused, so that no figure is measured on training images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..data import IMAGE_SUFFIXES
from ..errors import DataError

SHOWN = 3


@dataclass(frozen=True)
class Layout:
    """What a layout holds: ``kind`` is ``classification``, ``segmentation`` or ``depth``.

    ``label_map`` (masks): raw value ``v`` -> class ``label_map[v]`` (values beyond it -> 255);
    ``depth_scale`` (depth maps): values per metre, ``None`` = the layout's own 16-bit millimetres.
    """

    name: str
    title: str
    kind: str
    expected: str
    split_names: dict[str, str] = field(default_factory=lambda: {"train": "train", "val": "val"})
    num_classes: int | None = None
    ignore_index: int = 255
    reduce_zero_label: bool = False
    label_map: tuple[int, ...] | None = None
    depth_scale: float | None = None
    min_depth: float = 1e-3
    max_depth: float = 10.0


@dataclass(frozen=True)
class Sample:
    """One image and its target: a class index, or the mask / depth file."""

    image: Path
    target: int | Path


@dataclass
class EvalDataset:
    """A dataset folder read as ``layout``: ``splits[split]`` lists its samples in a fixed order.

    ``standard_split`` is false when the images are not the published split (e.g. NYU without
    BTS's split files: every pair in the folders); ``notes`` says which images were used and why,
    for the results and the table.
    """

    root: Path
    layout: Layout
    splits: dict[str, list[Sample]]
    classes: list[str] | None = None
    standard_split: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return self.layout.title or self.root.resolve().name

    @property
    def kind(self) -> str:
        return self.layout.kind


@dataclass(frozen=True)
class DatasetOptions:
    """What the user says about the datasets: ``depth_scale`` (depth values per metre, ``--depth-scale``)
    and ``split_files`` (``{"train" | "val": path}``, ``--split-file``, for NYU)."""

    depth_scale: float | None = None
    split_files: dict[str, str] = field(default_factory=dict)


def shown(names: list[str]) -> str:
    """The first few of ``names``, for messages."""
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


def require(path: Path, root: Path, layout: Layout, what: str) -> Path:
    """``path`` if it exists, else a ``DataError`` naming the missing part of ``layout``."""
    if not path.exists():
        raise DataError(f"--data {root}: {layout.title} layout without {path} ({what}); expected {layout.expected}")
    return path


def pairs(images: list[Path], target_of, root: Path, where: Path, what: str) -> list[Sample]:
    """Samples of ``images`` whose target file ``target_of(image)`` exists; a ``DataError`` lists the others."""
    samples = [Sample(image, target_of(image)) for image in images]
    missing = [sample.image.name for sample in samples if not sample.target.is_file()]
    if missing:
        raise DataError(
            f"--data {root}: {len(missing)} of {len(samples)} images of {where} have no {what} ({shown(missing)})"
        )
    return samples


def read_split_file(path: Path) -> list[list[str]]:
    """The rows of a split file (whitespace-separated fields), ``#`` comments and blank lines skipped.

    Raises ``DataError`` naming the file and the entry when a row's first field appears twice.
    """
    rows = [line.split() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    rows = [row for row in rows if row and not row[0].startswith("#")]
    seen = set()
    for row in rows:
        if row[0] in seen:
            raise DataError(f"{path} lists {row[0]} twice; expected each image once")
        seen.add(row[0])
    return rows


def check_disjoint(dataset: EvalDataset) -> EvalDataset:
    """``dataset``, refused (``DataError``) when an image is in both its training and validation splits."""
    if "train" not in dataset.splits or "val" not in dataset.splits:
        return dataset
    train = {sample.image for sample in dataset.splits["train"]}  # by path: a listing's overlap, no file system call
    shared = [sample.image for sample in dataset.splits["val"] if sample.image in train]
    if shared:
        raise DataError(
            f"--data {dataset.root}: {len(shared)} of {len(dataset.splits['val'])} validation images are also "
            f"training images ({shown([str(path) for path in shared])}); expected disjoint splits"
        )
    return dataset
