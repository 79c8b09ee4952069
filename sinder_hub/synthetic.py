"""Small synthetic datasets written to disk, for demos, tests and quick looks at ``sinder-hub evaluate``.

``make_shapes_dataset`` writes coloured shapes on grey textures in the project's simple layouts
(classification: ``ROOT/{train,val}/<class>/``; segmentation: ``ROOT/<split>/images`` + ``masks``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from .files import atomic_path

IGNORE_INDEX = 255  # mask value of the boundary pixels between regions

SHAPE_CLASSES = ("disc", "square", "triangle", "cross", "ring")
SHAPE_COLOURS = {  # one hue per class, so hand-crafted colour features are an oracle
    "disc": (0.85, 0.15, 0.15),
    "square": (0.15, 0.70, 0.20),
    "triangle": (0.15, 0.30, 0.90),
    "cross": (0.90, 0.80, 0.10),
    "ring": (0.80, 0.20, 0.80),
}


def _shape_mask(kind: str, size: int, centre: tuple[float, float], radius: float, angle: float) -> np.ndarray:
    """Boolean ``[size, size]`` mask of one shape."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dy, dx = rows - centre[0], cols - centre[1]
    u = np.cos(angle) * dx + np.sin(angle) * dy
    v = -np.sin(angle) * dx + np.cos(angle) * dy
    distance = np.hypot(u, v)
    if kind == "disc":
        return distance < radius
    if kind == "square":
        return np.maximum(abs(u), abs(v)) < 0.8 * radius
    if kind == "triangle":  # equilateral: inside the three edges at distance radius / 2 from the centre
        normals = [angle + math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
        return np.all([np.cos(n) * dx + np.sin(n) * dy < radius / 2 for n in normals], axis=0)
    if kind == "cross":
        arm = 0.3 * radius
        return ((abs(u) < arm) & (abs(v) < radius)) | ((abs(v) < arm) & (abs(u) < radius))
    if kind == "ring":
        return (distance < radius) & (distance > 0.55 * radius)
    raise ValueError(f"unknown shape {kind!r}; known: {', '.join(SHAPE_CLASSES)}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey texture: random gratings plus noise, ``[size, size, 3]`` in ``[0.2, 0.8]``."""
    rows, cols = np.mgrid[0:size, 0:size] / size
    texture = np.zeros((size, size))
    for _ in range(3):
        angle, frequency, phase = rng.uniform(0, math.pi), rng.uniform(2, 12), rng.uniform(0, 2 * math.pi)
        texture += np.sin(2 * math.pi * frequency * (np.cos(angle) * cols + np.sin(angle) * rows) + phase)
    texture = 0.5 + 0.08 * texture + 0.05 * rng.standard_normal((size, size))
    return np.repeat(texture.clip(0.2, 0.8)[..., None], 3, axis=2)


def _paint(rng: np.random.Generator, canvas: np.ndarray, kind: str, mask: np.ndarray) -> None:
    colour = np.clip(np.asarray(SHAPE_COLOURS[kind]) + rng.uniform(-0.07, 0.07, 3), 0, 1)
    shading = 0.9 + 0.1 * rng.random(mask.sum())
    canvas[mask] = colour[None, :] * shading[:, None]


def _random_shape(rng: np.random.Generator, size: int, kind: str, radius_range: tuple[float, float]) -> np.ndarray:
    radius = rng.uniform(*radius_range) * size
    centre = tuple(rng.uniform(radius, size - radius, 2))
    return _shape_mask(kind, size, centre, radius, rng.uniform(0, 2 * math.pi))


def _save_rgb(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray((array * 255).round().astype(np.uint8)).save(tmp, format="PNG")


def make_shapes_dataset(root: str | Path, n_per_class: int = 8, size: int = 112, seed: int = 0) -> Path:
    """Write a small synthetic benchmark of coloured shapes on grey textures; returns ``root``.

    - ``ROOT/classification/{train,val}/<class>/<class>_<i>.png``: one shape of the class
      per image, ``n_per_class`` images per class and split;
    - ``ROOT/segmentation/{train,val}/images/<i>.png`` and ``masks/<i>.png``:
      ``n_per_class x len(SHAPE_CLASSES)`` images per split with 1–3 shapes each; mask
      0 = background, ``1 + SHAPE_CLASSES.index(class)`` = shape, 255 = the one-pixel
      boundary between regions (ignored).

    Classes differ in shape and hue (``SHAPE_COLOURS``, jittered); positions, sizes,
    rotations and textures are random (``seed``).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for kind in SHAPE_CLASSES:
            for index in range(n_per_class):
                canvas = _background(rng, size)
                _paint(rng, canvas, kind, _random_shape(rng, size, kind, (0.2, 0.35)))
                _save_rgb(canvas, root / "classification" / split / kind / f"{kind}_{index:04d}.png")
        for index in range(n_per_class * len(SHAPE_CLASSES)):
            canvas, labels = _background(rng, size), np.zeros((size, size), dtype=np.uint8)
            for label in rng.integers(0, len(SHAPE_CLASSES), rng.integers(1, 4)):
                kind = SHAPE_CLASSES[label]
                mask = _random_shape(rng, size, kind, (0.12, 0.25))
                _paint(rng, canvas, kind, mask)
                labels[mask] = label + 1
            padded = np.pad(labels, 1, mode="edge")
            boundary = np.zeros_like(labels, dtype=bool)
            for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
                boundary |= padded[dy : dy + size, dx : dx + size] != labels
            labels[boundary] = IGNORE_INDEX
            folder = root / "segmentation" / split
            _save_rgb(canvas, folder / "images" / f"{index:04d}.png")
            (folder / "masks").mkdir(parents=True, exist_ok=True)
            with atomic_path(folder / "masks" / f"{index:04d}.png") as tmp:
                Image.fromarray(labels).save(tmp, format="PNG")
    return root
