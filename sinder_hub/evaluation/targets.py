"""Masks and depth maps: reading them, and checking every one (values, sizes) before any feature is computed.

A mask is a single-channel index image (mode L, P, I or I;16) of its image's size. Its values are
mapped to class indices ``0..C-1`` and ``255`` (ignored): ADE20k's ``0`` becomes ``255`` and ``v``
becomes ``v - 1``; Cityscapes' labelIds go through the layout's ``label_map``; the other layouts keep
their values (as mmsegmentation reads them). A depth map is a 16-bit PNG in millimetres (NYU), or,
with ``--depth-scale S``, any single-channel image in ``S`` units per metre; ``0`` = no depth. A map
in another unit (8-bit, float) without ``--depth-scale``, and one whose median valid depth is outside
``MEDIAN_DEPTH`` metres (a wrong scale), are refused naming the file.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from ..errors import DataError
from .layouts import EvalDataset, Layout, Sample

INDEX_MODES = ("L", "P", "I", "I;16")
DEPTH_MODES = ("I", "I;16", "I;16B", "F", "L")
IGNORE_INDEX = 255
SPARSE_LABELS = 0.5  # inferred classes: refused when fewer than this share of 0..max appear
MILLIMETRES = 1000.0  # NYU's depth maps: 16-bit PNGs, values per metre
MEDIAN_DEPTH = (0.1, 20.0)  # metres: the median valid depth of a scene in the right unit lies within


def _open_target(
    path: Path,
    image_path: Path,
    modes: tuple[str, ...],
    what: str,
    image_size: tuple[int, int] | None = None,
    check=None,
) -> np.ndarray:
    """The pixels of a mask or depth map as a numpy array, refused unless single-channel and of its image's
    size (``image_size``, read from the image's header when not given); ``check(image)`` may refuse more."""
    if image_size is None:
        with Image.open(image_path) as image:
            image_size = image.size
    with Image.open(path) as target:
        if target.mode not in modes:
            raise DataError(
                f"{path}: {what} must be a single-channel index image ({' or '.join(modes)}), got mode {target.mode}"
            )
        if target.size != image_size:
            raise DataError(
                f"{path}: {what} is {target.size[0]}x{target.size[1]} px but its image {image_path} is "
                f"{image_size[0]}x{image_size[1]}"
            )
        if check is not None:
            check(target)
        return np.asarray(target)


def map_labels(values: np.ndarray, layout: Layout) -> np.ndarray:
    """Raw mask values -> class indices ``[H, W]`` int64 (ADE20k: 0 -> 255, v -> v - 1)."""
    labels = values.astype(np.int64)
    if layout.label_map is not None:
        table = np.asarray(layout.label_map, dtype=np.int64)
        labels = np.where(labels < len(table), table[labels.clip(0, len(table) - 1)], IGNORE_INDEX)
    if layout.reduce_zero_label:
        labels = np.where(labels == 0, IGNORE_INDEX, labels - 1)
    return labels


def read_mask(sample: Sample, layout: Layout, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """The class indices of a sample's mask, ``[H, W]`` int64 at the image's own size."""
    return map_labels(_open_target(sample.target, sample.image, INDEX_MODES, "mask", image_size), layout)


def _millimetres(path: Path):
    """A check for ``_open_target``: a depth map must be a 16-bit PNG unless ``--depth-scale`` says its unit."""

    def check(target: Image.Image) -> None:
        if target.format != "PNG" or target.mode not in ("I", "I;16", "I;16B"):
            kind = {"L": "8-bit", "F": "32-bit float"}.get(target.mode, f"mode {target.mode}")
            raise DataError(
                f"{path}: {kind} depth map ({target.format} mode {target.mode}); expected a 16-bit PNG in "
                "millimetres as NYU ships them, or say its unit with --depth-scale (values per metre, e.g. 1 for metres)"
            )

    return check


def read_depth(sample: Sample, layout: Layout, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """A sample's depth in metres, ``[H, W]`` float32 at the image's own size (0 = no depth).

    Raises ``DataError`` naming the file for a map in another unit than the layout's (``_millimetres``)
    or whose median valid depth lies outside ``MEDIAN_DEPTH``.
    """
    scale = MILLIMETRES if layout.depth_scale is None else layout.depth_scale
    check = _millimetres(sample.target) if layout.depth_scale is None else None
    values = _open_target(sample.target, sample.image, DEPTH_MODES, "depth map", image_size, check)
    depth = (values.astype(np.float32) / scale).astype(np.float32)
    valid = depth[depth > 0]
    median = float(np.median(valid)) if valid.size else None
    if median is not None and not MEDIAN_DEPTH[0] <= median <= MEDIAN_DEPTH[1]:
        low, high = MEDIAN_DEPTH
        raise DataError(
            f"{sample.target}: median valid depth {median:.3g} m (values / {scale:g}), outside {low:g}-{high:g} m; "
            "expected depth in millimetres, or the right --depth-scale (values per metre)"
        )
    return depth


def resize_crop(target: torch.Tensor, resolution: int) -> torch.Tensor:
    """``[H, W]`` mask or depth -> ``[R, R]``: nearest resize of the short side and centre crop, like its image."""
    resized = v2.functional.resize(target[None], resolution, interpolation=v2.InterpolationMode.NEAREST)
    return v2.functional.center_crop(resized, resolution)[0]


def load_mask(mask_path: Path, image_path: Path, resolution: int) -> torch.Tensor:
    """An index mask resized (nearest) and centre-cropped like its image: ``[R, R]`` int64."""
    values = _open_target(Path(mask_path), Path(image_path), INDEX_MODES, "mask")
    return resize_crop(torch.from_numpy(values.astype(np.int64)), resolution)


# --- the checks ------------------------------------------------------------------------------


@dataclass
class TargetSummary:
    """What the check found: the classes and, per split, every image's ``(width, height)``."""

    num_classes: int | None
    sizes: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    present: dict[str, list[int]] = field(default_factory=dict)


def _inspect(sample: Sample, layout: Layout, kind: str) -> tuple[tuple[int, int], np.ndarray | None]:
    """``(image size, the distinct class indices)`` of one sample (``None`` for depth maps)."""
    if kind == "depth":
        values = read_depth(sample, layout)
        return (values.shape[1], values.shape[0]), None
    labels = read_mask(sample, layout)
    return (labels.shape[1], labels.shape[0]), np.unique(labels)


def _first_with(found: list[tuple[Sample, np.ndarray]], bad) -> tuple[Sample, int]:
    for sample, values in found:
        wrong = [int(v) for v in values if bad(int(v))]
        if wrong:
            return sample, wrong[-1]
    raise AssertionError("no sample holds the value")


def _check_values(found: dict[str, list], layout: Layout, num_classes: int | None) -> int:
    """The number of classes; a ``DataError`` names the first mask holding a value outside ``0..C-1`` and 255."""
    ignore = layout.ignore_index
    first = "train" if "train" in found else "val"
    if layout.num_classes is not None:
        num_classes, origin = layout.num_classes, f"the {layout.title} classes"
    elif num_classes is not None:
        origin = f"--num-classes {num_classes}"
    else:
        origin = f"the classes of the {first} masks"
        labels = sorted({int(v) for _, values in found[first] for v in values if v != ignore})
        if not labels:
            raise DataError(f"the {first} masks hold no labelled pixel (all {ignore}); expected class indices 0-254")
        if len(labels) < SPARSE_LABELS * (labels[-1] + 1) and labels[-1] > 1:
            sample, value = _first_with(found[first], lambda v: v == labels[-1])
            others = [v for v in labels if v != labels[-1]]
            raise DataError(
                f"{sample.target} holds label {value} but the other {first} masks use {others[0]}-{others[-1]} "
                f"({len(labels)} distinct labels); expected class indices 0..C-1 and {ignore} = ignore, "
                "or say --num-classes"
            )
        num_classes = labels[-1] + 1
    for samples in found.values():
        if any(int(v) >= num_classes and v != ignore for _, values in samples for v in values):
            sample, value = _first_with(samples, lambda v: v >= num_classes and v != ignore)
            raise DataError(
                f"{sample.target} holds label {value}, outside {origin} (0-{num_classes - 1}, {ignore} = ignore); "
                f"expected class indices 0-{num_classes - 1} or {ignore}"
            )
    return num_classes


def check_targets(
    dataset: EvalDataset, splits: tuple[str, ...], num_classes: int | None = None, workers: int = 1, progress=None
) -> TargetSummary:
    """Read every mask or depth map of ``splits`` once (threads), before any feature is computed.

    Raises ``DataError`` naming the first file that is not single-channel, not of its image's size,
    or (masks) holds a value outside the classes: the layout's own, ``num_classes``, or else
    ``max + 1`` of the first split's values (refused when they are sparse, e.g. 0-5 and 254,
    or when a later split holds a value beyond them). Classification datasets need no check.
    """
    if dataset.kind == "classification":
        return TargetSummary(len(dataset.classes))
    summary, found = TargetSummary(None), {}
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for split in splits:
            samples = dataset.splits[split]
            results = pool.map(lambda s: _inspect(s, dataset.layout, dataset.kind), samples)
            if progress is not None:
                results = progress(results, total=len(samples), desc=f"checking {dataset.title} {split}")
            results = list(results)
            summary.sizes[split] = [size for size, _ in results]
            found[split] = [(sample, values) for sample, (_, values) in zip(samples, results)]
    if dataset.kind == "segmentation":
        summary.num_classes = _check_values(found, dataset.layout, num_classes)
        for split, samples in found.items():
            present = {int(v) for _, values in samples for v in values}
            summary.present[split] = sorted(present - {dataset.layout.ignore_index})
    return summary
