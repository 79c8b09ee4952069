"""NYU Depth v2 in the three arrangements it is distributed in; depth maps are 16-bit PNGs in millimetres.

- BTS (``sync.zip`` + the official test set): ``ROOT/sync/<scene>/rgb_<n>.jpg`` + ``sync_depth_<n>.png``
  (training), ``ROOT/official_splits/test/<scene>/`` (the 654 test images). BTS keeps its split
  files ``nyudepthv2_{train,test}_files_with_gt.txt`` in its code repository (``train_test_inputs/``),
  not in the dataset: they are looked for in ROOT, ``ROOT/train_test_inputs`` and beside ROOT, or
  given with ``--split-file``; without them every pair in the folders is used and the dataset says
  so (``standard_split`` false, ``notes``).
- The Monocular-Depth-Estimation-Toolbox (DINOv2's depth evaluation): ``ROOT/<scene>/`` (training
  and test scenes side by side) with ``ROOT/nyu_train.txt`` and ``ROOT/nyu_test.txt`` (its ``splits/``).
- mmsegmentation 1.x (``tools/dataset_converters/nyu.py``): ``ROOT/images/{train,test}/<scene>_<n>.jpg``
  with ``ROOT/annotations/{train,test}/<scene>_<n>.png``; the folders are the split.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError, InputError
from .splits import DatasetOptions, EvalDataset, Layout, Sample, pairs, read_split_file, require, shown

BTS_SPLIT_FILES = {"train": "nyudepthv2_train_files_with_gt.txt", "val": "nyudepthv2_test_files_with_gt.txt"}
TOOLBOX_SPLIT_FILES = {"train": "nyu_train.txt", "val": "nyu_test.txt"}
MMSEG_SPLITS = {"train": "train", "val": "test"}
SPLIT_WORDS = {"train": "train", "val": "val", "test": "val"}


def parse_split_files(values: list[str] | None) -> dict[str, str]:
    """``--split-file [SPLIT=]PATH ...`` -> ``{"train" | "val": absolute path}``; a bare PATH's split is the word
    ``train`` or ``test``/``val`` in its name. Raises ``InputError`` for a missing file or an unclear split."""
    files = {}
    for value in values or []:
        word, _, path = value.partition("=")
        if word not in SPLIT_WORDS:  # a bare PATH (which may hold "=" itself)
            word, path = "", value
        if not word:
            named = {SPLIT_WORDS[w] for w in SPLIT_WORDS if w in Path(path).name.lower()}
            word = named.pop() if len(named) == 1 else ""
        if word not in SPLIT_WORDS:
            raise InputError(
                f"--split-file {value}: expected train=PATH or val=PATH (or a file named *train* / *test*)"
            )
        if not Path(path).is_file():
            raise InputError(f"--split-file {value}: {path} is not a file")
        if SPLIT_WORDS[word] in files:
            raise InputError(f"--split-file {value}: a second file for the {SPLIT_WORDS[word]} split")
        files[SPLIT_WORDS[word]] = str(Path(path).resolve())
    return files


def arrangement(root: Path) -> str | None:
    """``bts``, ``toolbox`` or ``mmseg``: how an NYU folder is arranged (by names only), or ``None``."""
    if (root / "sync").is_dir() or (root / "official_splits").is_dir():
        return "bts"
    if any((root / name).is_file() for name in TOOLBOX_SPLIT_FILES.values()):
        return "toolbox"
    images, annotations = root / "images", root / "annotations"
    if annotations.is_dir() and any((images / name).is_dir() for name in MMSEG_SPLITS.values()):
        return "mmseg"
    scenes = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    if any(next(scene.glob("sync_depth_*.png"), None) for scene in scenes):
        return "toolbox"
    return None


def _listed(rows: list[list[str]], folder: Path, root: Path, split_file: Path) -> list[Sample]:
    """Samples of a BTS / toolbox split file: ``image depth [focal]`` rows relative to ``folder``; ``None`` depth skipped."""
    rows = [row for row in rows if len(row) >= 2 and row[1] != "None"]
    missing = [row[0] for row in rows if not (folder / row[0].lstrip("/")).is_file()]
    if missing:
        raise DataError(
            f"--data {root}: {len(missing)} of {len(rows)} images listed in {split_file} are not in {folder} "
            f"({shown(missing)})"
        )
    images = [folder / row[0].lstrip("/") for row in rows]
    depths = dict(zip(images, (folder / row[1].lstrip("/") for row in rows)))
    return pairs(images, depths.__getitem__, root, split_file, "depth file")


def _split_file(root: Path, split: str, options: DatasetOptions) -> Path | None:
    if split in options.split_files:
        return Path(options.split_files[split])
    name = BTS_SPLIT_FILES[split]
    return next((p / name for p in (root, root / "train_test_inputs", root.parent) if (p / name).is_file()), None)


def _bts(root: Path, layout: Layout, splits: tuple[str, ...], options: DatasetOptions) -> EvalDataset:
    listed, notes = {}, []
    for split in splits:
        folder = require(root / layout.split_names[split], root, layout, f"the {split} split")
        split_file = _split_file(root, split, options)
        if split_file is not None:
            listed[split] = _listed(read_split_file(split_file), folder, root, split_file)
            continue
        images = sorted(folder.rglob("rgb_*.jpg"))
        if not images:
            raise DataError(f"--data {root}: {folder} holds no rgb_*.jpg; expected {layout.expected}")
        listed[split] = pairs(
            images,
            lambda p: p.with_name(p.name.replace("rgb_", "sync_depth_")).with_suffix(".png"),
            root,
            folder,
            "depth",
        )
        notes.append(
            f"{split}: every rgb_*.jpg with its depth map in {folder} ({len(images)} images), not BTS's split: "
            f"no {BTS_SPLIT_FILES[split]} in {root}, {root / 'train_test_inputs'} or {root.parent}, and no --split-file"
        )
    return EvalDataset(root, layout, listed, standard_split=not notes, notes=notes)


def _toolbox(root: Path, layout: Layout, splits: tuple[str, ...], options: DatasetOptions) -> EvalDataset:
    listed = {}
    for split in splits:
        split_file = Path(options.split_files.get(split, root / TOOLBOX_SPLIT_FILES[split]))
        if not split_file.is_file():
            raise DataError(
                f"--data {root}: depth-toolbox NYU layout without {split_file} (the {split} split, from the "
                "toolbox's splits/ folder); copy it there or give it with --split-file"
            )
        listed[split] = _listed(read_split_file(split_file), root, root, split_file)
    return EvalDataset(root, layout, listed)


def _mmseg(root: Path, layout: Layout, splits: tuple[str, ...], options: DatasetOptions) -> EvalDataset:
    if options.split_files:
        raise InputError(f"--split-file: --data {root} is mmsegmentation's NYU layout, whose folders are its split")
    listed = {}
    for split in splits:
        name = MMSEG_SPLITS[split]
        images = require(root / "images" / name, root, layout, f"the {name} images")
        depths = require(root / "annotations" / name, root, layout, f"the {name} depth maps")
        found = sorted(images.rglob("*.jpg"))
        listed[split] = pairs(
            found, lambda p, i=images, d=depths: d / p.relative_to(i).with_suffix(".png"), root, images, "depth map"
        )
    return EvalDataset(root, layout, listed)


def open_nyu(root: Path, layout: Layout, splits: tuple[str, ...], options: DatasetOptions) -> EvalDataset:
    """The splits of an NYU folder in any of the three arrangements (``arrangement``)."""
    if (root / "nyu").is_dir() and arrangement(root) is None:
        root = root / "nyu"
    reader = {"bts": _bts, "toolbox": _toolbox, "mmseg": _mmseg}.get(arrangement(root) or "bts")
    return reader(root, layout, splits, options)
