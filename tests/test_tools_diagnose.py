import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from sinder_hub.cli import main as cli_main
from sinder_hub.plots import angle_violin_figure, norm_pca_figure, pca_rgb

ROOT = Path(__file__).resolve().parents[1]


def is_png(path: Path) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG" and min(image.size) > 100


def test_pca_rgb_separates_the_outlier_token():
    grid = torch.zeros(4, 4, 6)
    grid[..., 1] = torch.arange(16.0).view(4, 4)
    grid[2, 2, 0] = 100.0
    rgb = pca_rgb(grid)
    assert rgb.shape == (4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert rgb[2, 2, 0] == 1.0 and (rgb[..., 0] < 0.1).sum() == 15


def test_norm_pca_figure_with_two_models(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images = {"a": Image.new("RGB", (80, 60), "red"), "b": torch.zeros(3, 56, 56)}
    grids = {
        label: {name: torch.randn(4, 4, 8, generator=generator) for name in images}
        for label in ("original", "repaired")
    }
    path = norm_pca_figure(images, grids, tmp_path / "fig" / "norm_pca.png")
    assert is_png(path)
    with pytest.raises(ValueError, match="'repaired', 'c'"):
        norm_pca_figure({**images, "c": images["a"]}, grids, tmp_path / "bad.png")


def test_angle_violin_figure_from_hand_built_angles(tmp_path):
    report = {
        "blocks": [
            {
                "token_angles": {"x": [80.0, 85.0, 88.0, 2.0]},
                "defect_positions": {"x": [[1, 1]]},
                "angle_singular_empirical": 2.0,
            },
            {"token_angles": {"x": [70.0, 75.0, 89.0, 60.0]}, "angle_singular_empirical": None},
        ]
    }
    assert is_png(angle_violin_figure(report, tmp_path / "one.png"))
    assert is_png(angle_violin_figure(report, tmp_path / "two.png", compare=report))


@pytest.mark.slow
def test_diagnose_planted_swiglu_end_to_end(tmp_path, capsys):
    pytest.importorskip("sinder_hub.backbones")
    planted_module = pytest.importorskip("sinder_hub.planted")
    argv = ["diagnose", "--model", "planted-swiglu", "--out", str(tmp_path), "--method", "expected",
            "--images", *(str(p) for p in sample_files(tmp_path / "images"))]  # fmt: skip
    assert cli_main(argv) == 0  # in this process: `tools/diagnose.py` is a three-line wrapper of it
    printed = capsys.readouterr().out
    assert "sing-vs-emp" in printed
    report = json.loads((tmp_path / "report.json").read_text())["original"]
    assert report["model"] == "planted-swiglu" and report["resolution"] == 224
    blocks = report["blocks"]
    planted = planted_module.PLANTED_BLOCK
    for block in blocks[planted:]:
        assert block["defects_per_image"] >= 1
        assert block["norm_defective"] > 3 * block["norm_normal"]
        # half-triggered planted tokens widen the pairwise angles, still far below all tokens' ~60°
        assert block["within_angle"] < 40 and block["between_angle"] < 40
        assert block["angle_singular_empirical"] < 5
    assert blocks[-1]["all_tokens_angle"] > 30
    assert is_png(tmp_path / "norm_pca.png") and is_png(tmp_path / "angles.png")


def sample_files(folder: Path) -> list[Path]:
    """Three sample images written as files, to exercise --images."""
    from sinder_hub.data import sample_images

    folder.mkdir()
    paths = []
    for name, image in sample_images(["astronaut", "coffee", "chelsea"]).items():
        paths.append(folder / f"{name}.png")
        image.save(paths[-1])
    return paths


def test_diagnose_names_a_missing_image(tmp_path):
    from sinder_hub.commands import diagnose
    from sinder_hub.errors import DataError

    missing = tmp_path / "nope.png"
    with pytest.raises(DataError, match="--images .*nope.png does not exist"):
        diagnose.main(["--model", "planted-swiglu", "--images", str(missing), "--out", str(tmp_path)])
