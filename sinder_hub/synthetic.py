"""Small synthetic datasets written to disk, for demos, tests and quick looks at ``sinder-hub evaluate``.

``make_shapes_dataset`` writes coloured shapes on grey textures in the project's simple layouts
(classification: ``ROOT/{train,val}/<class>/``; segmentation: ``ROOT/<split>/images`` + ``masks``).
``make_standard_datasets`` writes the same kind of pictures in the layouts of ImageNet, VOC2012,
ADE20k, Cityscapes and NYU Depth v2 as they are distributed (see ``sinder_hub.evaluation.layouts``).
"""

from __future__ import annotations

import json
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


def _shape_mask(
    kind: str, shape: tuple[int, int], centre: tuple[float, float], radius: float, angle: float
) -> np.ndarray:
    """Boolean ``[height, width]`` mask of one shape."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64) + 0.5
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


def _background(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Grey texture: random gratings plus noise, ``[height, width, 3]`` in ``[0.2, 0.8]``."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]] / max(shape)
    texture = np.zeros(shape)
    for _ in range(3):
        angle, frequency, phase = rng.uniform(0, math.pi), rng.uniform(2, 12), rng.uniform(0, 2 * math.pi)
        texture += np.sin(2 * math.pi * frequency * (np.cos(angle) * cols + np.sin(angle) * rows) + phase)
    texture = 0.5 + 0.08 * texture + 0.05 * rng.standard_normal(shape)
    return np.repeat(texture.clip(0.2, 0.8)[..., None], 3, axis=2)


def _paint(rng: np.random.Generator, canvas: np.ndarray, kind: str, mask: np.ndarray) -> None:
    colour = np.clip(np.asarray(SHAPE_COLOURS[kind]) + rng.uniform(-0.07, 0.07, 3), 0, 1)
    shading = 0.9 + 0.1 * rng.random(mask.sum())
    canvas[mask] = colour[None, :] * shading[:, None]


def _random_shape(
    rng: np.random.Generator, shape: tuple[int, int], kind: str, radius_range: tuple[float, float]
) -> np.ndarray:
    radius = rng.uniform(*radius_range) * min(shape)
    centre = tuple(rng.uniform(radius, np.asarray(shape) - radius))
    return _shape_mask(kind, shape, centre, radius, rng.uniform(0, 2 * math.pi))


def _scene(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """1-3 random shapes on a texture: ``(image [H, W, 3], labels [H, W] uint8)``, labels 0 = background,
    ``1 + SHAPE_CLASSES.index(class)`` = shape, ``IGNORE_INDEX`` = the one-pixel boundary between regions."""
    canvas, labels = _background(rng, shape), np.zeros(shape, dtype=np.uint8)
    for label in rng.integers(0, len(SHAPE_CLASSES), rng.integers(1, 4)):
        kind = SHAPE_CLASSES[label]
        mask = _random_shape(rng, shape, kind, (0.12, 0.25))
        _paint(rng, canvas, kind, mask)
        labels[mask] = label + 1
    padded = np.pad(labels, 1, mode="edge")
    boundary = np.zeros_like(labels, dtype=bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        boundary |= padded[dy : dy + shape[0], dx : dx + shape[1]] != labels
    labels[boundary] = IGNORE_INDEX
    return canvas, labels


def _save_rgb(array: np.ndarray, path: Path) -> None:
    """An RGB image in ``[0, 1]``, as PNG or (by the suffix) JPEG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image = Image.fromarray((array * 255).round().astype(np.uint8))
        image.save(tmp, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG", quality=95)


def _save_index(labels: np.ndarray, path: Path, palette: list[int] | None = None) -> None:
    """A single-channel PNG: mode ``I;16`` for uint16 values, ``P`` with ``palette``, else ``L``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if labels.dtype == np.uint16:
        image = Image.fromarray(labels)
    elif palette is None:
        image = Image.fromarray(labels.astype(np.uint8))
    else:
        image = Image.frombytes("P", labels.shape[::-1], labels.astype(np.uint8).tobytes())
        image.putpalette(palette)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


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
                canvas = _background(rng, (size, size))
                _paint(rng, canvas, kind, _random_shape(rng, (size, size), kind, (0.2, 0.35)))
                _save_rgb(canvas, root / "classification" / split / kind / f"{kind}_{index:04d}.png")
        for index in range(n_per_class * len(SHAPE_CLASSES)):
            canvas, labels = _scene(rng, (size, size))
            folder = root / "segmentation" / split
            _save_rgb(canvas, folder / "images" / f"{index:04d}.png")
            _save_index(labels, folder / "masks" / f"{index:04d}.png")
    return root


# --- the standard layouts, in miniature --------------------------------------------------------------


def voc_palette() -> list[int]:
    """VOC's colour map: 256 RGB triples, class ``i``'s colour from the bits of ``i``."""
    palette = []
    for index in range(256):
        r = g = b = 0
        value = index
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette += [r, g, b]
    return palette


IMAGENET_VAL_LAYOUTS = ("folders", "devkit", "kaggle")


def _write_devkit(root: Path, wnids: list[str], labels: list[int]) -> None:
    """``ROOT/ILSVRC2012_devkit_t12/data/``: ``meta.mat`` (leaf synsets numbered against the sorted order of their
    WordNet ids, as in the real devkit, plus one inner synset) and the ground truth, one ILSVRC2012 id per image."""
    from scipy.io import savemat

    fields = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height")
    synsets = np.zeros((len(wnids) + 1, 1), dtype=[(name, "O") for name in fields])
    ids = {wnid: len(wnids) - i for i, wnid in enumerate(wnids)}
    for row, wnid in enumerate(wnids):
        synsets[row, 0] = (ids[wnid], wnid, SHAPE_CLASSES[row % len(SHAPE_CLASSES)], "a shape", 0, np.zeros(0), 0)
    children = np.asarray(list(ids.values()), dtype=np.float64)
    synsets[len(wnids), 0] = (len(wnids) + 1, "n99999999", "shape", "any shape", len(wnids), children, 1)
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True, exist_ok=True)
    savemat(data / "meta.mat", {"synsets": synsets})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[wnids[c]]}\n" for c in labels))


def make_imagenet(
    root: str | Path, n_train: int = 6, n_val: int = 4, size: int = 64, seed: int = 0, val_layout: str = "folders"
) -> Path:
    """ImageNet with one shape class per synset (``n00000001`` ...): ``ROOT/train/<wnid>/<wnid>_<i>.JPEG`` and

    - ``val_layout="folders"``: ``ROOT/val/<wnid>/`` (the validation images sorted, as ``ImageFolder`` reads them);
    - ``"devkit"``: ``ROOT/val/ILSVRC2012_val_<n>.JPEG`` flat (as ``ILSVRC2012_img_val.tar`` ships them, the
      classes interleaved) with the extracted ``ROOT/ILSVRC2012_devkit_t12/`` (``_write_devkit``);
    - ``"kaggle"``: Kaggle's ``ROOT/ILSVRC/Data/CLS-LOC/{train,val,test}/`` (val and test flat) with
      ``ROOT/LOC_val_solution.csv`` and ``ROOT/LOC_synset_mapping.txt``.
    """
    if val_layout not in IMAGENET_VAL_LAYOUTS:
        raise ValueError(f"val_layout {val_layout!r}: expected one of {', '.join(IMAGENET_VAL_LAYOUTS)}")
    root, rng = Path(root), np.random.default_rng(seed)
    data = root / "ILSVRC" / "Data" / "CLS-LOC" if val_layout == "kaggle" else root
    wnids = [f"n{number:08d}" for number in range(1, len(SHAPE_CLASSES) + 1)]
    val_labels = [int(c) for c in rng.permutation(np.repeat(np.arange(len(wnids)), n_val))]

    def picture(label: int, path: Path) -> None:
        canvas = _background(rng, (size, size))
        kind = SHAPE_CLASSES[label]
        _paint(rng, canvas, kind, _random_shape(rng, (size, size), kind, (0.2, 0.35)))
        _save_rgb(canvas, path)

    for label, wnid in enumerate(wnids):
        for index in range(n_train):
            picture(label, data / "train" / wnid / f"{wnid}_{index}.JPEG")
    for number, label in enumerate(val_labels, start=1):
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        picture(label, data / "val" / (wnids[label] if val_layout == "folders" else "") / name)
    if val_layout == "devkit":
        _write_devkit(root, wnids, val_labels)
    if val_layout == "kaggle":
        picture(0, data / "test" / "ILSVRC2012_test_00000001.JPEG")
        rows = [f"ILSVRC2012_val_{n:08d},{wnids[c]} 1 2 {size - 2} {size - 1} \n" for n, c in enumerate(val_labels, 1)]
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(rows))
        (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {k}\n" for w, k in zip(wnids, SHAPE_CLASSES)))
    return root


def _segmentation_scenes(rng, count: int, shape: tuple[int, int]):
    for index in range(count):
        yield (index, *_scene(rng, shape))


def make_voc2012(root: str | Path, n_train: int = 8, n_val: int = 6, shape=(48, 64), seed: int = 0) -> Path:
    """``ROOT/VOCdevkit/VOC2012/``: JPEGs, palette masks (shapes as VOC classes 1-5, 255 boundaries), split lists."""
    voc, rng = Path(root) / "VOCdevkit" / "VOC2012", np.random.default_rng(seed)
    for split, count, year in (("train", n_train, 2007), ("val", n_val, 2008)):
        ids = []
        for index, canvas, labels in _segmentation_scenes(rng, count, shape):
            ids.append(f"{year}_{index:06d}")
            _save_rgb(canvas, voc / "JPEGImages" / f"{ids[-1]}.jpg")
            _save_index(labels, voc / "SegmentationClass" / f"{ids[-1]}.png", voc_palette())
        (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return Path(root) / "VOCdevkit"


def make_ade20k(root: str | Path, n_train: int = 8, n_val: int = 6, shape=(56, 72), seed: int = 0) -> Path:
    """``ROOT/ADEChallengeData2016/{images,annotations}/{training,validation}/``: annotations 0 = ignore (the
    boundaries), 1 = background, 2-6 = the shapes (classes 0, 1-5 after ADE's shift)."""
    ade, rng = Path(root) / "ADEChallengeData2016", np.random.default_rng(seed)
    for split, count, tag in (("training", n_train, "train"), ("validation", n_val, "val")):
        for index, canvas, labels in _segmentation_scenes(rng, count, shape):
            stem = f"ADE_{tag}_{index + 1:08d}"
            _save_rgb(canvas, ade / "images" / split / f"{stem}.jpg")
            _save_index(np.where(labels == IGNORE_INDEX, 0, labels + 1), ade / "annotations" / split / f"{stem}.png")
    return ade


# the scenes' labels as Cityscapes labelIds (cityscapesScripts' labels.py): background road, the shapes car, building,
# person, traffic sign and parking (void among the 19 training classes), the boundaries unlabeled
CITYSCAPES_SCENE_IDS = {0: 7, 1: 26, 2: 11, 3: 24, 4: 20, 5: 9, IGNORE_INDEX: 0}
CITYSCAPES_SCENE_TRAIN_IDS = {0: 0, 1: 13, 2: 2, 3: 11, 4: 7, 5: IGNORE_INDEX, IGNORE_INDEX: IGNORE_INDEX}
INSTANCE_IDS = (24, 26)  # person, car: instanceIds hold id * 1000 + instance


def _cityscapes_labels(labels: np.ndarray, folder: Path, stem: str, train_ids: bool) -> None:
    """The ``gtFine`` files of one image as the archive ships them (labelIds, instanceIds, color, polygons),
    and ``*_labelTrainIds.png`` as ``csCreateTrainIdLabelImgs`` makes it when ``train_ids``."""
    ids = np.vectorize(CITYSCAPES_SCENE_IDS.__getitem__)(labels).astype(np.uint8)
    _save_index(ids, folder / f"{stem}_gtFine_labelIds.png")
    instances = np.where(np.isin(ids, INSTANCE_IDS), ids.astype(np.uint16) * 1000, ids).astype(np.uint16)
    _save_index(instances, folder / f"{stem}_gtFine_instanceIds.png")
    _save_rgb(
        np.stack([ids / 33.0, labels / 255.0, np.zeros(labels.shape)], axis=-1), folder / f"{stem}_gtFine_color.png"
    )
    polygons = {"imgHeight": labels.shape[0], "imgWidth": labels.shape[1], "objects": []}
    (folder / f"{stem}_gtFine_polygons.json").write_text(json.dumps(polygons))
    if train_ids:
        train = np.vectorize(CITYSCAPES_SCENE_TRAIN_IDS.__getitem__)(labels).astype(np.uint8)
        _save_index(train, folder / f"{stem}_gtFine_labelTrainIds.png")


def make_cityscapes(
    root: str | Path, n_train: int = 8, n_val: int = 6, shape=(48, 96), seed: int = 0, train_ids: bool = False
) -> Path:
    """Cityscapes as ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip`` ship it: ``ROOT/leftImg8bit/``
    ``{train,val,test}/<city>/*_leftImg8bit.png`` and ``ROOT/gtFine/.../*_gtFine_{labelIds,instanceIds,color}.png``
    + ``*_polygons.json`` (``CITYSCAPES_SCENE_IDS``; test labels all unlabeled), ``README`` and ``license.txt``;
    with ``train_ids`` also ``*_gtFine_labelTrainIds.png`` (``CITYSCAPES_SCENE_TRAIN_IDS``)."""
    root, rng = Path(root), np.random.default_rng(seed)
    for split, count, city in (("train", n_train, "aachen"), ("val", n_val, "frankfurt"), ("test", 1, "berlin")):
        for index, canvas, labels in _segmentation_scenes(rng, count, shape):
            stem = f"{city}_{index:06d}_000019"
            _save_rgb(canvas, root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            labels = np.full_like(labels, IGNORE_INDEX) if split == "test" else labels
            _cityscapes_labels(labels, root / "gtFine" / split / city, stem, train_ids)
    for name in ("README", "license.txt"):
        (root / name).write_text("The Cityscapes Dataset (a synthetic miniature).\n")
    return root


def _depth_scene(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A room-like scene: ``(image [H, W, 3], depth [H, W] uint16 millimetres)``: a floor receding to the
    top (2-8 m, darker when further), shapes standing nearer (1-3 m), a few pixels without depth."""
    height, width = shape
    rows = np.linspace(1.0, 0.0, height)[:, None] * np.ones((1, width))
    depth = 2.0 + 6.0 * (1.0 - rows)
    canvas = _background(rng, shape) * (1.2 - 0.1 * depth)[..., None]
    for _ in range(rng.integers(1, 3)):
        kind = SHAPE_CLASSES[rng.integers(len(SHAPE_CLASSES))]
        mask = _random_shape(rng, shape, kind, (0.15, 0.3))
        _paint(rng, canvas, kind, mask)
        depth[mask] = rng.uniform(1.0, 3.0)
    millimetres = np.round(depth * 1000).astype(np.uint16)
    millimetres[rng.random(shape) < 0.02] = 0
    return canvas.clip(0, 1), millimetres


NYU_ARRANGEMENTS = ("bts", "toolbox", "mmseg")


def make_nyu(
    root: str | Path,
    n_train: int = 8,
    n_test: int = 6,
    shape=(48, 64),
    seed: int = 0,
    arrangement: str = "bts",
    split_files: bool = True,
) -> Path:
    """NYU Depth v2 (``rgb_<n>.jpg`` + ``sync_depth_<n>.png``, uint16 mm) as distributed:

    - ``"bts"``: BTS's ``ROOT/sync/<scene>/`` (training) and ``ROOT/official_splits/test/<scene>/``; with
      ``split_files`` also its ``nyudepthv2_{train,test}_files_with_gt.txt`` in ROOT (BTS keeps them in its
      code repository, so the dataset as downloaded has none);
    - ``"toolbox"``: the depth toolbox's ``ROOT/<scene>/`` (training and test scenes side by side) with
      ``ROOT/nyu_train.txt`` and ``ROOT/nyu_test.txt``;
    - ``"mmseg"``: mmsegmentation 1.x's ``ROOT/{images,annotations}/{train,test}/<scene>_<n>.{jpg,png}``.
    """
    if arrangement not in NYU_ARRANGEMENTS:
        raise ValueError(f"arrangement {arrangement!r}: expected one of {', '.join(NYU_ARRANGEMENTS)}")
    root, rng = Path(root), np.random.default_rng(seed)
    splits = (
        ("train", "sync", n_train, ("bedroom_0001", "kitchen_0002"), "nyudepthv2_train_files_with_gt.txt", "/"),
        ("test", "official_splits/test", n_test, ("bathroom", "office"), "nyudepthv2_test_files_with_gt.txt", ""),
    )
    for split, bts_folder, count, scenes, bts_listing, prefix in splits:
        lines = []
        for index in range(count):
            scene = scenes[index % len(scenes)]
            canvas, depth = _depth_scene(rng, shape)
            image, target = f"{scene}/rgb_{index:05d}.jpg", f"{scene}/sync_depth_{index:05d}.png"
            if arrangement == "mmseg":
                image, target = (
                    f"images/{split}/{scene}_{index:05d}.jpg",
                    f"annotations/{split}/{scene}_{index:05d}.png",
                )
            folder = root / bts_folder if arrangement == "bts" else root
            _save_rgb(canvas, folder / image)
            _save_index(depth, folder / target)
            lines.append(f"{prefix}{image} {prefix}{target} 518.8579")
        listing = {"bts": bts_listing if split_files else None, "toolbox": f"nyu_{split}.txt"}.get(arrangement)
        if listing:
            (root / listing).write_text("\n".join(lines) + "\n")
    return root


def make_standard_datasets(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Tiny datasets in every standard layout under ``root``: ``{layout name: the folder to give --data}``."""
    root = Path(root)
    return {
        "imagenet": make_imagenet(root / "imagenet", seed=seed),
        "voc2012": make_voc2012(root / "voc", seed=seed),
        "ade20k": make_ade20k(root / "ade", seed=seed),
        "cityscapes": make_cityscapes(root / "cityscapes", seed=seed),
        "nyu": make_nyu(root / "nyu", seed=seed),
    }
