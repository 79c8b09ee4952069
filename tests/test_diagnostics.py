import json
import math

import pytest
import timm
import torch

from sinder_hub.diagnostics import (
    angle_to_direction,
    block_statistics,
    defect_report,
    last_block_grids,
    mean_pairwise_angle,
    pairwise_angles,
)

D = 8


def unit(index: int) -> torch.Tensor:
    return torch.eye(D)[index]


def test_pairwise_angles_use_the_plain_angle():
    vectors = torch.stack([unit(0), -unit(0), 3 * unit(1)])
    assert pairwise_angles(vectors).tolist() == pytest.approx([180.0, 90.0, 90.0])
    assert mean_pairwise_angle(vectors) == pytest.approx(120.0)
    assert mean_pairwise_angle(vectors[:1]) is None


def test_angle_to_direction_is_acute_and_sign_invariant():
    tokens = torch.stack([-unit(0), unit(1), unit(0) + unit(1), 5 * unit(0) - 5 * unit(1)])
    assert angle_to_direction(tokens, unit(0)).tolist() == pytest.approx([0.0, 90.0, 45.0, 45.0])
    assert angle_to_direction(tokens, -unit(0)).tolist() == pytest.approx([0.0, 90.0, 45.0, 45.0])


def planted_grid() -> torch.Tensor:
    """7x7 grid of normal tokens 2·e1, defects 10·e0 at (2, 3) and 10·(cos5° e0 + sin5° e2) at (4, 4)."""
    grid = 2 * unit(1).expand(7, 7, D).clone()
    grid[2, 3] = 10 * unit(0)
    five = math.radians(5)
    grid[4, 4] = 10 * (math.cos(five) * unit(0) + math.sin(five) * unit(2))
    return grid


def test_block_statistics_on_a_planted_grid():
    stats = block_statistics(planted_grid(), unit(0))
    assert stats["defects"] == 2
    assert stats["norm_defective"] == pytest.approx(10.0)
    assert stats["norm_normal"] == pytest.approx(2.0)
    assert stats["within_angle"] == pytest.approx(5.0)
    # 1081 normal pairs at 0°, 47·2 normal-defect pairs at 90°, one defect pair at 5°, over 49·48/2 pairs
    assert stats["all_tokens_angle"] == pytest.approx((94 * 90 + 5) / 1176)


def test_block_statistics_never_count_border_tokens():
    grid = planted_grid()
    grid[0, 3] = 10 * unit(0)  # a third outlier widens the spread: 3σ still separates them
    stats = block_statistics(grid, unit(0), mask_thr=3.0)
    assert stats["defects"] == 2
    assert stats["norm_normal"] == pytest.approx((46 * 2 + 10) / 47)


def test_block_statistics_without_defects():
    stats = block_statistics(2 * unit(1).expand(7, 7, D).clone(), unit(0))
    assert stats["defects"] == 0
    assert stats["norm_defective"] is None and stats["within_angle"] is None
    assert stats["norm_normal"] == pytest.approx(2.0)


RESOLUTION = 112  # 8x8 patch grid
DEFECT_POSITIONS = [(2, 3), (5, 4)]


@pytest.fixture(scope="module")
def crude_planted_model():
    """A random 3-block DINOv2-style ViT whose position embedding carries 500·ν at two positions.

    Layer scale starts at 1e-5, so the planted tokens keep their direction through all blocks.
    """
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=RESOLUTION, dynamic_img_size=True, depth=3
    ).eval()
    direction = torch.nn.functional.normalize(torch.randn(model.embed_dim), dim=0)
    with torch.no_grad():
        grid_pos = model.pos_embed[0, model.num_prefix_tokens :].view(8, 8, -1)
        for row, col in DEFECT_POSITIONS:
            grid_pos[row, col] += 500 * direction
    return model, direction


@pytest.fixture(scope="module")
def crude_images():
    generator = torch.Generator().manual_seed(1)
    return {f"noise{i}": torch.randn(3, RESOLUTION, RESOLUTION, generator=generator) for i in range(3)}


def test_defect_report_finds_the_planted_defects(crude_planted_model, crude_images):
    model, direction = crude_planted_model
    directions = direction.expand(len(model.blocks), -1)
    report = defect_report(model, crude_images, directions)
    json.dumps(report, allow_nan=False)
    assert report["images"] == list(crude_images)
    assert report["grid"] == {name: [8, 8] for name in crude_images}
    assert report["depth"] == 3 and report["dim"] == model.embed_dim
    for index, block in enumerate(report["blocks"]):
        assert block["block"] == index
        assert block["defects"] == {name: 2 for name in crude_images}
        assert block["defects_per_image"] == 2
        assert block["defect_positions"] == {name: [list(p) for p in DEFECT_POSITIONS] for name in crude_images}
        assert block["norm_defective"] > 4 * block["norm_normal"]
        assert block["within_angle"] < 3.0 and block["between_angle"] < 3.0
        assert block["all_tokens_angle"] > 30.0
        assert block["angle_singular_empirical"] < 2.0
        assert len(block["empirical_direction"]) == model.embed_dim
        angles = block["token_angles"]["noise0"]
        assert len(angles) == 64 and max(angles) <= 90.0
        defect_angles = [angles[r * 8 + c] for r, c in DEFECT_POSITIONS]
        assert (
            max(defect_angles) < 3.0 < min(a for i, a in enumerate(angles) if (i // 8, i % 8) not in DEFECT_POSITIONS)
        )


def test_defect_report_statistics_match_block_statistics(crude_planted_model, crude_images):
    model, direction = crude_planted_model
    directions = direction.expand(len(model.blocks), -1)
    report = defect_report(model, {"noise1": crude_images["noise1"]}, directions)
    grid = last_block_grids(model, {"noise1": crude_images["noise1"]})["noise1"]
    stats = block_statistics(grid, direction)
    last = report["blocks"][-1]
    for key in ("norm_defective", "norm_normal", "within_angle", "all_tokens_angle"):
        assert last[key] == pytest.approx(stats[key], rel=1e-5)
    assert last["between_angle"] is None  # one image has no pair of mean defects


def test_defect_report_rejects_wrong_directions(crude_planted_model, crude_images):
    model, direction = crude_planted_model
    with pytest.raises(ValueError, match="2 directions for a model of 3 blocks"):
        defect_report(model, crude_images, direction.expand(2, -1))
