"""Images in, normalised tensors out: the authors' transform with each model's own normalisation, robust
image files, sample images."""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms

from .errors import BackboneError, DataError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's resize filters on PIL images, by the names timm's pretrained_cfg "interpolation" uses
INTERPOLATIONS = tuple(mode.value for mode in transforms.InterpolationMode)
# what counts as an image, in a folder and in a list file alike (GIF, TIFF: their first frame)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS), made explicit: larger images are refused
MAX_PIXELS = 89_478_485
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")
LISTED_MISSING_SHOWN = 3

# Natural images shipped with scikit-image; grayscale ones are converted to RGB.
SAMPLE_IMAGE_NAMES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "motorcycle_left",
    "motorcycle_right",
    "retina",
    "camera",
    "coins",
    "brick",
    "grass",
    "gravel",
    "moon",
    "clock",
    "cell",
)
HELD_OUT_SAMPLES = ("astronaut", "coffee", "motorcycle_right", "camera", "grass")
TRAIN_SAMPLES = tuple(name for name in SAMPLE_IMAGE_NAMES if name not in HELD_OUT_SAMPLES)
_PIL_LIMIT = threading.Lock()


@dataclass(frozen=True)
class Normalization:
    """How a model wants its pixels: RGB in ``[0, 1]`` minus ``mean``, over ``std`` (per channel), resized
    with ``interpolation`` (one of ``INTERPOLATIONS``: ``bicubic``, ``bilinear``...)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"

    def to_json(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation}


IMAGENET = Normalization(IMAGENET_MEAN, IMAGENET_STD, "bicubic")  # the authors' (DINOv2's), and timm's default
# where every tool's normalisation comes from; part of evaluate's cell keys, so that figures computed when
# every model got ImageNet's (results.json written before the tools read the model's own) are never reused
NORMALIZATION_SOURCE = "model data config"


def normalization_of(model=None) -> Normalization:
    """The normalisation a timm model was trained with, from its data config (timm's
    ``resolve_model_data_config``: the ``pretrained_cfg`` of its timm name, of a folder's ``config.json``, of a
    planted fixture's architecture; timm's ImageNet defaults for a model without one). A ``Normalization`` is
    returned as it is; ``None`` gives ``IMAGENET``, the authors' transform.

    Raises ``BackboneError`` for a data config whose mean / std are not 3 finite numbers (std positive) or
    whose interpolation torchvision does not have.
    """
    if model is None or isinstance(model, Normalization):
        return model or IMAGENET
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(model)
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
    mean, std, interpolation = config.get("mean"), config.get("std"), config.get("interpolation")
    for name, values, low in (("mean", mean, -math.inf), ("std", std, 0.0)):
        numbers = isinstance(values, (list, tuple)) and len(values) == 3
        if not numbers or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > low for v in values):
            expected = "3 positive finite numbers" if low == 0.0 else "3 finite numbers"
            raise BackboneError(f"{architecture}: pretrained_cfg {name} {values!r}: expected {expected} (RGB)")
    if interpolation not in INTERPOLATIONS:
        raise BackboneError(
            f"{architecture}: pretrained_cfg interpolation {interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}"
        )
    return Normalization(tuple(float(v) for v in mean), tuple(float(v) for v in std), interpolation)


def sinder_transform(resolution: int = 518, model=None, resize: int | None = None) -> transforms.Compose:
    """The authors' transform with ``model``'s own pixels: resize of the short side to ``resize`` (default
    ``resolution``) with the model's interpolation (antialiased: torchvision's PIL path) and centre crop
    ``resolution``, both on the PIL image, then the model's normalisation (``normalization_of(model)``:
    ``model`` is a timm model, a ``Normalization``, or ``None`` for ImageNet). For DINOv2 this is the
    authors' transform exactly (bicubic, ImageNet mean and std).

    PIL image -> ``[3, resolution, resolution]`` float32.
    """
    normalization = normalization_of(model)
    return transforms.Compose(
        [
            transforms.Resize(
                resolution if resize is None else resize,
                interpolation=transforms.InterpolationMode(normalization.interpolation),
            ),
            transforms.CenterCrop(resolution),
            transforms.ToTensor(),
            transforms.Normalize(normalization.mean, normalization.std),
        ]
    )


def _skimage_array(name: str) -> np.ndarray:
    import skimage.data

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        return left if name == "motorcycle_left" else right
    return getattr(skimage.data, name)()


def sample_images(names: tuple[str, ...] | list[str] | None = None) -> dict[str, Image.Image]:
    """Natural RGB images from ``skimage.data`` by name (default: all ``SAMPLE_IMAGE_NAMES``)."""
    names = SAMPLE_IMAGE_NAMES if names is None else names
    unknown = [name for name in names if name not in SAMPLE_IMAGE_NAMES]
    if unknown:
        raise ValueError(f"unknown sample images {unknown}; known: {', '.join(SAMPLE_IMAGE_NAMES)}")
    return {name: Image.fromarray(_skimage_array(name)).convert("RGB") for name in names}


def _is_image_file(path: Path) -> bool:
    try:
        with Image.open(path):
            return True
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def _walk_images(folder: Path) -> list[Path]:
    """Files with an image suffix under ``folder``, sorted; symlinked sub-folders are followed, each real
    folder visited once (a link back to a parent is no loop)."""
    found, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        found += [Path(root) / name for name in names if Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(path for path in found if path.is_file())


def list_images(source: str | Path) -> list[Path]:
    """Image paths under a folder (recursive, sorted, symlinked sub-folders followed once) or listed in a
    UTF-8 text file, one per line (a byte-order mark, blank lines and ``#`` comments ignored). Both take
    the files whose suffix is one of ``IMAGE_SUFFIXES``.

    Raises ``DataError`` for a missing source, an image file given as the source, a list file that
    is not text, a listed path that does not exist or is not an image file, or no images at all.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise DataError(
            f"data source {source} does not exist; expected a folder of images or a text file listing image paths"
        )
    if source.is_file():
        if source.suffix.lower() in IMAGE_SUFFIXES or _is_image_file(source):
            raise DataError(
                f"{source} is an image file; --data takes a folder of images or a text file listing image paths"
            )
        try:
            lines = [line.strip() for line in source.read_text(encoding="utf-8-sig").splitlines()]
        except UnicodeDecodeError as error:
            raise DataError(
                f"{source} is not a text file (byte {error.start} is not UTF-8); expected a folder "
                "of images or a text file listing image paths, one per line"
            ) from error
        paths = [
            Path(line) if Path(line).is_absolute() else source.parent / line
            for line in lines
            if line and not line.startswith("#")
        ]
        missing = [path for path in paths if not path.is_file()]
        if missing:
            shown = ", ".join(map(str, missing[:LISTED_MISSING_SHOWN]))
            raise DataError(
                f"{source}: {len(missing)} of {len(paths)} listed images do not exist or are not files "
                f"({shown}{', ...' if len(missing) > LISTED_MISSING_SHOWN else ''})"
            )
        if not paths:
            raise DataError(f"{source} lists no image paths; expected one image path per line")
        others = [path for path in paths if path.suffix.lower() not in IMAGE_SUFFIXES]
        if others:
            raise DataError(
                f"{source}: {len(others)} listed files are not images by their suffix ({others[0]}"
                f"{', ...' if len(others) > 1 else ''}); expected one of {', '.join(IMAGE_SUFFIXES)}"
            )
    else:
        paths = _walk_images(source)
        if not paths:
            raise DataError(f"no images found in {source} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return paths


def _open(path: str | Path, max_pixels: int | None) -> Image.Image:
    """``Image.open`` with PIL's own bomb limit replaced by ``max_pixels`` (checked on the header)."""
    with _PIL_LIMIT:  # the limit is global to PIL: switched off only around this open
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            image = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        image.close()
        raise DataError(
            f"{path}: image of {width}x{height} px ({width * height:,} pixels) is over the limit of "
            f"{max_pixels:,} pixels; raise --max-pixels if the file is trusted"
        )
    return image


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """A 16-bit (``I;16*``), 32-bit integer (``I``) or float (``F``) image as 8-bit ``L``, scaled, not clipped.

    ``I;16*`` by its bit depth (65535 -> 255). ``I`` and ``F`` by the smallest range that holds their
    values: ``[0, 1]`` (``F`` only), ``[0, 255]`` or ``[0, 65535]``, else their own min..max.
    """
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        low, top = 0.0, 65535.0
    else:
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        ranges = (1.0, 255.0, 65535.0) if image.mode == "F" else (255.0, 65535.0)
        top = next((r for r in ranges if low >= 0 and high <= r), None)
        if top is None:
            top = high - low
        else:
            low = 0.0
    scaled = np.nan_to_num((values - low) * (255.0 / max(top, 1e-12)), nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), "L")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        return _high_depth_to_l(image).convert("RGB")
    return image.convert("RGB")  # 1, L, P, RGB(X), CMYK, YCbCr, LAB, HSV


def load_rgb(path: str | Path, min_size: int = 1, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Open any image as RGB: alpha composited on white, 16-bit / 32-bit / float grayscale scaled to 0-255
    (see ``_high_depth_to_l``), every other PIL mode converted by PIL.

    Raises ``DataError`` naming the file when it cannot be decoded, has more than ``max_pixels``
    pixels (``None``: no limit) or is smaller than ``min_size`` pixels on a side.
    """
    try:
        with _open(path, max_pixels) as image:
            image.load()
            rgb = _to_rgb(image)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"{path}: cannot read image ({error})") from error
    if min(rgb.size) < min_size:
        raise DataError(f"{path}: image of {rgb.size[0]}x{rgb.size[1]} px is smaller than one {min_size}-px patch")
    return rgb


class ImageFiles(Dataset):
    """Image files as normalised tensors; an unreadable file gives ``(index, None, reason)``.

    Items are ``(index, image [3, R, R] | None, problem str | None)``; the trainer skips
    and counts the ``None`` ones, so one bad file never ends a run. ``max_pixels`` goes to ``load_rgb``;
    ``model``: whose normalisation (``sinder_transform``; only its transform is kept, not the model).
    """

    def __init__(
        self,
        paths: list[Path],
        resolution: int = 518,
        min_size: int = 14,
        max_pixels: int | None = MAX_PIXELS,
        model=None,
    ):
        self.paths = list(paths)
        self.transform = sinder_transform(resolution, model)
        self.min_size = min_size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            image = load_rgb(self.paths[index], min_size=self.min_size, max_pixels=self.max_pixels)
        except DataError as error:
            return index, None, str(error)
        return index, self.transform(image), None


def collate_one(batch):
    """Collate for ``batch_size=1`` loaders over ``ImageFiles``: keep ``None`` images as they are."""
    (item,) = batch
    return item
