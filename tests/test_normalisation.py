"""Every tool feeds every family its own pixels: mean, std and interpolation from the model's data config
(``data.normalization_of``, one function), DINOv2's pixels the authors' transform bit for bit, and the
normalisation recorded in every report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from cli_checks import cli, one_error_line, repair_args
from PIL import Image
from test_data import reference_transform
from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_INCEPTION_MEAN,
    IMAGENET_INCEPTION_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)
from timm.layers import PatchEmbed
from tiny import tiny_vit
from torchvision import transforms

from sinder_hub import load_backbone
from sinder_hub.convert import save_timm
from sinder_hub.data import (
    IMAGENET,
    Normalization,
    normalization_of,
    sample_images,
    sinder_transform,
)
from sinder_hub.errors import BackboneError
from sinder_hub.report import SCHEMA_VERSION, RepairReport
from sinder_hub.synthetic import make_shapes_dataset

SIGLIP = "vit_base_patch16_siglip_224"
FAMILY_STATISTICS = {  # timm's constants: what each family's own image processor normalises with
    "planted-clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "siglip": (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD),
}


def meta_model(name: str, **kwargs) -> torch.nn.Module:
    """A timm architecture with its default pretrained_cfg, no weights."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


def small_siglip() -> torch.nn.Module:
    return timm.create_model(SIGLIP, pretrained=False, depth=4, embed_dim=64, num_heads=2, num_classes=0).eval()


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory) -> Path:
    """A random 4-block SigLIP as a timm folder (config.json with SigLIP's pretrained_cfg)."""
    folder = tmp_path_factory.mktemp("siglip") / "model"
    torch.manual_seed(0)
    save_timm(small_siglip(), folder)
    return folder


def edited_folder(siglip_folder: Path, tmp_path: Path, **cfg) -> Path:
    """A copy of the SigLIP folder whose config.json's pretrained_cfg has ``cfg`` changed."""
    folder = tmp_path / "edited"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((siglip_folder / "model.safetensors").read_bytes())
    config = json.loads((siglip_folder / "config.json").read_text())
    config["pretrained_cfg"].update(cfg)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# ------------------------------------------------------------------ the one function


def test_dinov2_pixels_are_the_authors_transform_bit_for_bit():
    """DINOv2 models (a timm name, a planted fixture) get exactly the authors' transform: bicubic resize of
    the short side, centre crop, ImageNet mean / std, on the PIL image."""
    for resolution in (224, 518):
        authors = transforms.Compose(
            [
                transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(resolution),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
            ]
        )
        for model in (meta_model("vit_small_patch14_dinov2"), meta_model("vit_giant_patch14_reg4_dinov2")):
            ours = sinder_transform(resolution, model)
            for name, image in sample_images(["astronaut", "coffee"]).items():
                assert torch.equal(ours(image), authors(image)), (resolution, name)
    assert normalization_of(meta_model("vit_small_patch14_dinov2")) == IMAGENET == normalization_of(None)


@pytest.mark.parametrize(
    "build, mean, std",
    [
        (lambda: load_backbone("planted-clip"), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        (lambda: meta_model(SIGLIP), IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD),
        (lambda: meta_model("eva02_small_patch14_224"), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        (lambda: load_backbone("planted-deit3"), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        (tiny_vit, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),  # no pretrained_cfg: timm's defaults
    ],
    ids=["planted-clip", "siglip", "eva02", "planted-deit3", "no-pretrained-cfg"],
)
def test_each_family_gets_its_own_mean_and_std(build, mean, std):
    model = build()
    assert normalization_of(model) == Normalization(tuple(mean), tuple(std), "bicubic")
    image = sample_images(["chelsea"])["chelsea"]
    pixels = sinder_transform(224, model)(image).double().numpy()
    assert abs(pixels - reference_transform(image, 224, mean=mean, std=std)).max() <= 1e-5


def test_a_folder_uses_its_own_config_and_its_interpolation(siglip_folder, tmp_path):
    folder = edited_folder(siglip_folder, tmp_path, mean=[0.25, 0.5, 0.75], interpolation="bilinear")
    model = load_backbone(folder)
    assert normalization_of(model) == Normalization((0.25, 0.5, 0.75), tuple(IMAGENET_INCEPTION_STD), "bilinear")
    image = sample_images(["rocket"])["rocket"]
    expected = reference_transform(image, 224, (0.25, 0.5, 0.75), IMAGENET_INCEPTION_STD, Image.BILINEAR)
    assert abs(sinder_transform(224, model)(image).double().numpy() - expected).max() <= 1e-5
    bicubic = reference_transform(image, 224, (0.25, 0.5, 0.75), IMAGENET_INCEPTION_STD, Image.BICUBIC)
    assert abs(expected - bicubic).max() > 1e-2  # the two filters differ on this image: the check can fail


def test_resize_and_crop_sizes_can_differ():
    """DINOv2's evaluation geometry: resize the short side to 256, centre-crop 224."""
    image = sample_images(["coffee"])["coffee"]
    pixels = sinder_transform(224, None, resize=256)(image).double().numpy()
    assert pixels.shape == (3, 224, 224)
    assert abs(pixels - reference_transform(image, 224, resize=256)).max() <= 1e-5


@pytest.mark.parametrize(
    "cfg, named",
    [
        ({"mean": [0.5, 0.5]}, "pretrained_cfg mean [0.5, 0.5]: expected 3 finite numbers"),
        ({"std": [0.5, 0.0, 0.5]}, "pretrained_cfg std [0.5, 0.0, 0.5]: expected 3 positive finite numbers"),
        ({"interpolation": "cubic"}, "pretrained_cfg interpolation 'cubic': expected one of"),
    ],
)
def test_a_data_config_that_cannot_work_is_one_line(siglip_folder, tmp_path, capsys, cfg, named):
    folder = edited_folder(siglip_folder, tmp_path, **cfg)
    with pytest.raises(BackboneError, match="vit_base_patch16_siglip_224: "):
        normalization_of(load_backbone(folder))
    code = cli(["diagnose", "--model", str(folder), "--out", str(tmp_path / "out"), "--method", "expected"])
    one_error_line(capsys, code, 2, named)
    assert not (tmp_path / "out" / "report.json").exists()


# ------------------------------------------------------------------ the reports


def test_repair_reports_before_the_normalisation_read_as_imagenet_and_new_ones_keep_theirs():
    """Every report before schema 2 was made with ImageNet's pixels, whatever the model."""
    for version, old in ((0, {}), (1, {"schema_version": 1, "source_model": "vit_base_patch16_clip_224.openai"})):
        report = RepairReport.from_json(old)
        assert report.normalization == IMAGENET.to_json() and report.schema_version == version
    clip = normalization_of(meta_model("vit_base_patch16_clip_224")).to_json()
    written = RepairReport(source_model="clip", normalization=clip).to_json()
    assert written["schema_version"] == SCHEMA_VERSION == 2
    assert RepairReport.from_json(json.loads(json.dumps(written))).normalization == clip != IMAGENET.to_json()


@pytest.mark.slow
def test_evaluate_never_reuses_cells_made_under_another_normalisation_rule(tmp_path, monkeypatch, capsys):
    """results.json written when every model got ImageNet's pixels (cells keyed before the rule entered the
    key) is computed again, not reused as the model's own pixels."""
    import sinder_hub.backbones
    import sinder_hub.evaluation.run

    monkeypatch.setattr(sinder_hub.backbones, "load_backbone", lambda spec: tiny_vit(img_size=28))
    shapes = make_shapes_dataset(tmp_path / "shapes", n_per_class=1, size=28) / "classification"
    argv = ["evaluate", "--task", "knn", "--data", str(shapes), "--resolution", "28", "--workers", "0",
            "--model", "a", "--out", str(tmp_path / "out")]  # fmt: skip
    with monkeypatch.context() as before:
        before.setattr(sinder_hub.evaluation.run, "NORMALIZATION_SOURCE", "ImageNet for every model")
        assert cli(argv) == 0
    capsys.readouterr()
    assert cli(argv) == 0
    assert "reusing" not in capsys.readouterr().out
    assert cli(argv) == 0  # the same rule: reused
    assert "original: reusing its finished results" in capsys.readouterr().out


# ------------------------------------------------------------------ what every tool feeds the model


@pytest.fixture
def fed(monkeypatch) -> list[torch.Tensor]:
    """Every ``[B, 3, H, W]`` image batch a timm ``PatchEmbed`` is given while the test runs."""
    images, forward = [], PatchEmbed.forward

    def spy(self, x):
        if x.dim() == 4 and x.shape[1] == 3:
            images.append(x.detach().double().cpu())
        return forward(self, x)

    monkeypatch.setattr(PatchEmbed, "forward", spy)
    return images


def assert_own_pixels(images: list[torch.Tensor], mean, std) -> None:
    """Every image fed is whole 8-bit levels under ``mean`` / ``std``: ``x·std + mean = k/255``, k in 0..255
    (another normalisation puts the levels between the integers)."""
    assert images, "no image reached the model"
    mean, std = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in (mean, std))
    for batch in images:
        levels = (batch * std + mean) * 255
        assert levels.min() > -1e-3 and levels.max() < 255 + 1e-3
        assert (levels - levels.round()).abs().max() < 1e-3


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for name, image in sample_images(["chelsea", "rocket", "coins", "brick"]).items():
        image.resize((256, 224)).save(folder / f"{name}.png")
    return folder


@pytest.fixture(params=list(FAMILY_STATISTICS))
def family(request, siglip_folder):
    """``(spec, mean, std)`` of a CLIP and a SigLIP model (planted-clip built before ``fed`` spies: its
    calibration images are the fixture's definition, ImageNet's for every variant)."""
    spec = str(siglip_folder) if request.param == "siglip" else request.param
    if spec.startswith("planted-"):
        load_backbone(spec)
    return (spec, *FAMILY_STATISTICS[request.param])


def own_normalisation(mean, std) -> dict:
    return {"mean": list(mean), "std": list(std), "interpolation": "bicubic"}


@pytest.mark.slow
def test_repair_feeds_the_model_its_own_pixels_and_records_them(family, photos, tmp_path, fed):
    spec, mean, std = family
    # the random SigLIP has no high-norm outliers: the pixels are the point here, not the repair
    extra = ("--max-steps", "2", "--save-every", "0", "--allow-no-outliers")
    code = cli(repair_args(photos, tmp_path / "run", "--model", spec, *extra))
    assert_own_pixels(fed, mean, std)
    report = json.loads((tmp_path / "run" / "repair_report.json").read_text())
    assert code == (0 if report["outcome"]["status"] == "ok" else 1)  # a random SigLIP may have nothing to repair
    assert report["normalization"] == own_normalisation(mean, std) and report["schema_version"] == 2


@pytest.mark.slow
def test_registers_feed_the_model_its_own_pixels_and_record_them(family, photos, tmp_path, fed):
    spec, mean, std = family
    argv = ["registers", "--model", spec, "--images", str(photos), "--output", str(tmp_path / "ttr"),
            "--num-images", "4", "--held-out", "astronaut", "--threshold", "1"]  # fmt: skip
    assert cli(argv) == 0
    assert_own_pixels(fed, mean, std)
    report = json.loads((tmp_path / "ttr" / "registers_report.json").read_text())
    assert report["normalization"] == own_normalisation(mean, std)


@pytest.mark.slow
def test_diagnose_feeds_each_variant_its_own_pixels_and_records_them(family, photos, tmp_path, fed):
    spec, mean, std = family
    argv = ["diagnose", "--model", spec, "--out", str(tmp_path / "out"), "--method", "expected",
            "--resolution", "224", "--images", str(photos / "chelsea.png")]  # fmt: skip
    assert cli(argv) == 0
    assert_own_pixels(fed, mean, std)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [entry["normalization"] for entry in report.values()] == [own_normalisation(mean, std)]


@pytest.mark.slow
def test_evaluate_feeds_the_model_its_own_pixels_and_records_them(family, tmp_path, fed):
    spec, mean, std = family
    shapes = make_shapes_dataset(tmp_path / "shapes", n_per_class=1, size=40) / "classification"
    argv = ["evaluate", "--task", "knn", "--data", str(shapes), "--resolution", "32", "--workers", "0",
            "--model", spec, "--out", str(tmp_path / "out")]  # fmt: skip
    assert cli(argv) == 0
    assert_own_pixels(fed, mean, std)
    (variant,) = json.loads((tmp_path / "out" / "results.json").read_text())["variants"]
    assert [cell["normalization"] for cell in variant["cells"].values()] == [own_normalisation(mean, std)]


@pytest.mark.slow
def test_the_viewer_feeds_each_model_its_own_pixels(family, photos, fed):
    pytest.importorskip("gradio", reason="the viewer needs the app extra: pip install -e '.[app]'")
    from sinder_hub.app import Viewer

    spec, mean, std = family
    viewer = Viewer([spec], upload_folders=[photos])
    fed.clear()  # what the directions saw while loading is not the viewer's
    answer = viewer.answer(photos / "chelsea.png", resolution=224)
    assert list(answer.views) == ["original"]
    assert_own_pixels(fed, mean, std)
