"""Position embeddings below 518 px: we keep timm's resampling (what users of the repaired model
run); the authors' DINOv2 code uses a scale factor with an offset of 0.1. How far apart the two are."""

import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from sinder_hub.tokens import embed


def authors_interpolation(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """DINOv2's ``interpolate_pos_encoding`` as the authors run it for repair (offset 0.1, antialias on):
    ``[1, 1 + M², D]`` -> ``[1, 1 + grid², D]``."""
    class_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    M, D = int(math.sqrt(patch_pos.shape[1])), patch_pos.shape[-1]
    scale = (grid + 0.1) / M
    patch_pos = F.interpolate(
        patch_pos.reshape(1, M, M, D).permute(0, 3, 1, 2), scale_factor=(scale, scale), mode="bicubic", antialias=True
    )
    assert patch_pos.shape[-2:] == (grid, grid)
    return torch.cat([class_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, D)], dim=1)


def smooth_table(M: int, D: int) -> torch.Tensor:
    """A smooth 2-D sine-cosine table like a trained one: ``[1, 1 + M², D]``."""
    ys, xs = torch.meshgrid(torch.arange(M, dtype=torch.float64), torch.arange(M, dtype=torch.float64), indexing="ij")
    freqs = 1.0 / 10.0 ** (torch.arange(D // 4, dtype=torch.float64) / (D // 4))
    angles = [coord.flatten()[:, None] * freqs[None] * 0.5 for coord in (ys, xs)]
    table = torch.cat([torch.sin(angles[0]), torch.cos(angles[0]), torch.sin(angles[1]), torch.cos(angles[1])], dim=1)
    return torch.cat([torch.zeros(1, D, dtype=torch.float64), table], dim=0)[None].float()


@pytest.mark.parametrize("resolution", [224, 448])
def test_timm_resampling_vs_the_authors_offset(resolution):
    import timm

    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, dynamic_img_size=True).eval()
    with torch.no_grad():
        model.pos_embed.copy_(smooth_table(37, model.embed_dim))
    grid = resolution // 14
    ours = resample_abs_pos_embed(model.pos_embed, new_size=(grid, grid), num_prefix_tokens=1)
    theirs = authors_interpolation(model.pos_embed, grid)
    table_difference = ((ours - theirs).norm() / theirs.norm()).item()
    # block-0 input: what embed() gives (timm's path) against the same tokens with the authors' table
    image = torch.randn(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = embed(model, image)
        patches = model.patch_embed(image)
        authors_tokens = torch.cat([model.cls_token.expand(1, -1, -1), patches.flatten(1, 2)], dim=1) + theirs
        assert torch.allclose(
            tokens, torch.cat([model.cls_token.expand(1, -1, -1), patches.flatten(1, 2)], 1) + ours, atol=1e-6
        )
    input_difference = ((tokens - authors_tokens).norm() / authors_tokens.norm()).item()
    print(f"{resolution} px: position table {100 * table_difference:.2f}%, block-0 input {100 * input_difference:.2f}%")
    assert 1e-4 < table_difference < 0.05
    assert 0 < input_difference < table_difference
