"""The authors' pixel pipeline, faithful conversion of every PIL mode, and typed data errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from sinder_hub.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFiles,
    list_images,
    load_rgb,
    sample_images,
    sinder_transform,
)
from sinder_hub.errors import DataError


def reference_transform(
    image: Image.Image, resolution: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, resample=Image.BICUBIC, resize=None
) -> np.ndarray:
    """Written independently of torchvision: PIL resize of the short side to ``resize`` (default
    ``resolution``; PIL antialiases), centre crop box rounded as torchvision does, normalisation in float64."""
    width, height = image.size
    short = resolution if resize is None else resize
    if width <= height:
        size = (short, int(short * height / width))
    else:
        size = (int(short * width / height), short)
    resized = image.resize(size, resample)
    left, top = round((size[0] - resolution) / 2), round((size[1] - resolution) / 2)
    pixels = np.asarray(resized.crop((left, top, left + resolution, top + resolution)), dtype=np.float64) / 255
    return ((pixels - np.asarray(mean)) / np.asarray(std)).transpose(2, 0, 1)


# Measured 2026-12-01 on these images: the previous tensor path (v2.ToImage, then an antialiased
# bicubic resize of the uint8 tensor) differed from this reference by up to 0.0342 in normalised
# units (1 level out of 255 at 224 px, 2 levels at 518 px) on 0.12-0.53% of the values; the PIL path
# below differs by at most 3.7e-7 (float32 round-off).
@pytest.mark.parametrize("resolution", [224, 518])
def test_transform_is_the_pil_pipeline(resolution):
    for name, image in sample_images(["astronaut", "coffee", "chelsea", "rocket"]).items():  # square, 3:2, landscape
        ours = sinder_transform(resolution)(image)
        assert ours.dtype == torch.float32 and ours.shape == (3, resolution, resolution), name
        assert np.abs(ours.double().numpy() - reference_transform(image, resolution)).max() <= 1e-5, name


def test_transform_of_a_portrait_image():
    image = sample_images(["coffee"])["coffee"].transpose(Image.Transpose.ROTATE_90)  # 400x600
    assert np.abs(sinder_transform(224)(image).double().numpy() - reference_transform(image, 224)).max() <= 1e-5


def saved(tmp_path, image: Image.Image, name: str) -> str:
    path = tmp_path / name
    image.save(path)
    return str(path)


def pixels(image: Image.Image) -> list[tuple[int, int, int]]:
    assert image.mode == "RGB"
    return [tuple(pixel) for pixel in np.asarray(image).reshape(-1, 3).tolist()]


def two_pixels(mode: str, first, second) -> Image.Image:
    image = Image.new(mode, (2, 1))
    image.putpixel((0, 0), first)
    image.putpixel((1, 0), second)
    return image


@pytest.mark.parametrize(
    ("mode", "dtype", "suffix"), [("I;16", "<u2", ".png"), ("I;16B", ">u2", ".tif"), ("I;16L", "<u2", None)]
)
def test_16_bit_grayscale_is_scaled_by_its_bit_depth(tmp_path, mode, dtype, suffix):
    array = np.array([[0, 257 * 100, 65535, 12000]], dtype=dtype)
    image = Image.frombytes(mode, (4, 1), array.tobytes())  # PIL's convert() would clip to 255
    assert np.array_equal(np.asarray(image), array)
    loaded = load_rgb(saved(tmp_path, image, f"gray16{suffix}")) if suffix else _load_unsaveable(tmp_path, image)
    assert pixels(loaded) == [(0,) * 3, (100,) * 3, (255,) * 3, (47,) * 3]  # 12000 / 257 = 46.7


def test_a_dark_16_bit_photo_is_not_white(tmp_path):
    photo = np.asarray(sample_images(["camera"])["camera"].convert("L"), dtype=np.uint16) * 257
    loaded = np.asarray(load_rgb(saved(tmp_path, Image.fromarray(photo), "camera16.png")))
    assert np.abs(loaded[..., 0].astype(int) - photo // 257).max() == 0


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0, 255], [0, 255]),  # 8-bit values as they are
        ([0, 65535], [0, 255]),  # 16-bit values by 65535
        ([-1000, 1000], [0, 255]),  # anything else by its own range
    ],
)
def test_32_bit_integer_grayscale(tmp_path, values, expected):
    image = two_pixels("I", *values)
    assert [p[0] for p in pixels(load_rgb(saved(tmp_path, image, "int32.tif")))] == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0, 0.5], [0, 128]),  # unit range
        ([0.0, 200.0], [0, 200]),
        ([-2.0, 2.0], [0, 255]),
    ],
)
def test_float_grayscale(tmp_path, values, expected):
    image = two_pixels("F", *values)
    assert [p[0] for p in pixels(load_rgb(saved(tmp_path, image, "float.tif")))] == expected


def test_palette_with_and_without_transparency(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert pixels(load_rgb(saved(tmp_path, palette, "p.png"))) == [(255, 0, 0), (0, 0, 255)]
    palette.info["transparency"] = 0
    assert pixels(load_rgb(saved(tmp_path, palette, "p_alpha.png"))) == [(255, 255, 255), (0, 0, 255)]


@pytest.mark.parametrize(
    ("mode", "first", "second", "suffix", "expected"),
    [
        ("1", 0, 1, ".png", [(0, 0, 0), (255, 255, 255)]),
        ("L", 30, 200, ".png", [(30,) * 3, (200,) * 3]),
        ("LA", (0, 0), (100, 255), ".png", [(255,) * 3, (100,) * 3]),  # transparent -> white
        ("PA", (0, 0), (0, 255), ".tif", None),  # palette of grays: checked below
        ("RGBA", (255, 0, 0, 0), (0, 255, 0, 255), ".png", [(255,) * 3, (0, 255, 0)]),
        ("RGBA", (0, 0, 0, 128), (0, 0, 255, 255), ".png", [(127,) * 3, (0, 0, 255)]),  # half over white
        ("CMYK", (255, 0, 0, 0), (0, 0, 0, 255), ".jpg", None),
        ("CMYK", (0, 255, 0, 0), (0, 0, 0, 0), ".tif", [(255, 0, 255), (255, 255, 255)]),
        ("YCbCr", (255, 128, 128), (76, 85, 255), None, None),
        ("HSV", (0, 255, 255), (85, 255, 128), None, [(255, 0, 0), (0, 128, 0)]),
    ],
)
def test_modes_become_the_expected_rgb(tmp_path, mode, first, second, suffix, expected):
    image = two_pixels(mode, first, second)
    if mode == "PA":
        image.putpalette([0, 0, 0] * 256)
        expected = [(255,) * 3, (0,) * 3]
    if mode == "YCbCr":  # white, and pure red in JPEG's YCbCr
        expected = [(255, 255, 255), (254, 0, 0)]
    if mode == "CMYK" and suffix == ".jpg":  # lossy: only check the two colours roughly
        loaded = np.asarray(load_rgb(saved(tmp_path, image.resize((16, 8), Image.NEAREST), "cmyk.jpg")), dtype=int)
        assert np.abs(loaded[4, 2] - (0, 255, 255)).max() <= 12 and loaded[4, 12].max() <= 12
        return
    loaded = load_rgb(saved(tmp_path, image, f"image{suffix}")) if suffix else _load_unsaveable(tmp_path, image)
    assert pixels(loaded) == expected


def _load_unsaveable(tmp_path, image: Image.Image) -> Image.Image:
    """PIL writes no file that opens as HSV, YCbCr or I;16L: convert the image in memory as load_rgb does."""
    from sinder_hub import data

    return data._to_rgb(image)


def test_lab_matches_littlecms(tmp_path):
    rgb = Image.fromarray(np.array([[[200, 50, 50], [20, 120, 240], [250, 250, 250]]], dtype=np.uint8))
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    lab = ImageCms.applyTransform(rgb, to_lab)
    assert lab.mode == "LAB"
    loaded = np.asarray(load_rgb(saved(tmp_path, lab, "lab.tif")), dtype=int)
    assert np.abs(loaded - np.asarray(rgb, dtype=int)).max() <= 5  # 8-bit L*a*b* quantisation (measured 4)


def test_max_pixels_is_explicit(tmp_path):
    path = saved(tmp_path, Image.new("RGB", (200, 100)), "big.png")
    with pytest.raises(
        DataError, match=r"big\.png: image of 200x100 px \(20,000 pixels\) is over the limit of 19,999 pixels"
    ):
        load_rgb(path, max_pixels=19_999)
    assert load_rgb(path, max_pixels=20_000).size == (200, 100)
    index, image, problem = ImageFiles([path], resolution=28, max_pixels=10)[0]
    assert (index, image) == (0, None) and "over the limit of 10 pixels" in problem
    assert ImageFiles([path], resolution=28, max_pixels=None)[0][1].shape == (3, 28, 28)


def test_a_limit_above_pils_own_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL would refuse 20,000 pixels (> 2 x its limit)
    path = saved(tmp_path, Image.new("RGB", (200, 100)), "big.png")
    assert load_rgb(path, max_pixels=50_000).size == (200, 100)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_unreadable_and_tiny_images_are_data_errors(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"broken\.png: cannot read image"):
        load_rgb(tmp_path / "broken.png")
    with pytest.raises(DataError, match=r"tiny\.png: image of 10x10 px is smaller than one 14-px patch"):
        load_rgb(saved(tmp_path, Image.new("RGB", (10, 10)), "tiny.png"), min_size=14)


def test_list_images_errors(tmp_path):
    with pytest.raises(DataError, match=r"data source .*nope does not exist; expected a folder of images"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found in"):
        list_images(tmp_path / "empty")
    image = saved(tmp_path, Image.new("RGB", (20, 20)), "photo.png")
    with pytest.raises(DataError, match=r"photo\.png is an image file; --data takes a folder of images or a text file"):
        list_images(image)
    disguised = tmp_path / "photo.dat"
    disguised.write_bytes((tmp_path / "photo.png").read_bytes())
    with pytest.raises(DataError, match="photo.dat is an image file"):
        list_images(disguised)
    (tmp_path / "binary.lst").write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(DataError, match=r"binary\.lst is not a text file \(byte 0 is not UTF-8\)"):
        list_images(tmp_path / "binary.lst")
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\nphoto.png\n" + "\n".join(f"gone{i}.png" for i in range(5)) + "\n")
    with pytest.raises(
        DataError,
        match=r"list\.txt: 5 of 6 listed images do not exist or are not files "
        r"\(.*gone0\.png, .*gone1\.png, .*gone2\.png, \.\.\.\)",
    ):
        list_images(listing)
    listing.write_text("# only a comment\n")
    with pytest.raises(DataError, match="lists no image paths"):
        list_images(listing)
    listing.write_text(f"photo.png\n{image}\n")
    assert list_images(listing) == [tmp_path / "photo.png", tmp_path / "photo.png"]
