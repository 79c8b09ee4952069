"""Images in, normalised tensors out: the authors' transform, robust image files, sample images."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

# Natural images shipped with scikit-image; grayscale ones are converted to RGB.
SAMPLE_IMAGE_NAMES = (
    "astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
    "motorcycle_left", "motorcycle_right", "retina", "camera", "coins", "brick", "grass",
    "gravel", "moon", "clock", "cell",
)
HELD_OUT_SAMPLES = ("astronaut", "coffee", "motorcycle_right", "camera", "grass")
TRAIN_SAMPLES = tuple(name for name in SAMPLE_IMAGE_NAMES if name not in HELD_OUT_SAMPLES)


def sinder_transform(resolution: int = 518) -> v2.Compose:
    """The authors' transform: bicubic antialiased resize of the short side, centre crop, ImageNet normalisation.

    PIL image -> ``[3, resolution, resolution]`` float32.
    """
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(resolution, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(resolution),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


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


def list_images(source: str | Path) -> list[Path]:
    """Image paths under a folder (recursive, sorted) or listed in a text file, one per line."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"data source {source} does not exist (expected a folder of images or a text file of paths)")
    if source.is_file():
        lines = [line.strip() for line in source.read_text().splitlines()]
        paths = [Path(line) if Path(line).is_absolute() else source.parent / line for line in lines if line and not line.startswith("#")]
    else:
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"no images found in {source} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return paths


def load_rgb(path: str | Path, min_size: int = 1) -> Image.Image:
    """Open any image as RGB (grayscale, CMYK, palette, alpha composited on white).

    Raises ``ValueError`` naming the file when it cannot be decoded or is smaller than
    ``min_size`` pixels on a side.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                    rgba = image.convert("RGBA")
                    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    rgb = Image.alpha_composite(canvas, rgba).convert("RGB")
                else:
                    rgb = image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"{path}: cannot read image ({error})") from error
    if min(rgb.size) < min_size:
        raise ValueError(f"{path}: image of {rgb.size[0]}x{rgb.size[1]} px is smaller than one {min_size}-px patch")
    return rgb


class ImageFiles(Dataset):
    """Image files as normalised tensors; an unreadable file gives ``(index, None, reason)``.

    Items are ``(index, image [3, R, R] | None, problem str | None)``; the trainer skips
    and counts the ``None`` ones, so one bad file never ends a run.
    """

    def __init__(self, paths: list[Path], resolution: int = 518, min_size: int = 14):
        self.paths = list(paths)
        self.transform = sinder_transform(resolution)
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            image = load_rgb(self.paths[index], min_size=self.min_size)
        except ValueError as error:
            return index, None, str(error)
        return index, self.transform(image), None


def collate_one(batch):
    """Collate for ``batch_size=1`` loaders over ``ImageFiles``: keep ``None`` images as they are."""
    (item,) = batch
    return item
