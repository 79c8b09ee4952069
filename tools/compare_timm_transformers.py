"""timm forward_features vs transformers last_hidden_state of the same (random, small) DINOv2 weights.

    python tools/compare_timm_transformers.py

Prints, per model type and input size, the max |difference| and that max relative to the largest |feature|.
At the native size (518) the two agree; below it, plain transformers Dinov2 resamples the position
embeddings without antialiasing while timm (and Dinov2WithRegisters) antialias. ``smooth`` position
embeddings (low-frequency, like trained ones) show the gap more realistically than white noise.
"""

from __future__ import annotations

import math

import timm
import torch

from sinder_hub.convert import to_transformers
from sinder_hub.data import sample_images, sinder_transform

MODEL_TYPES = {
    "gelu": "vit_small_patch14_dinov2",
    "swiglu": "vit_giant_patch14_dinov2",
    "gelu+reg4": "vit_small_patch14_reg4_dinov2",
    "swiglu+reg4": "vit_giant_patch14_reg4_dinov2",
}
SMALL = dict(embed_dim=192, depth=4, num_heads=3)
SIZES = (518, 224)


def random_dinov2(architecture: str, smooth_pos: bool, seed: int = 0) -> torch.nn.Module:
    """Small DINOv2-shaped timm ViT with non-trivial random weights, layer scales and norms."""
    generator = torch.Generator().manual_seed(seed)
    model = timm.create_model(architecture, pretrained=False, dynamic_img_size=True, **SMALL).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "norm1.weight", "norm2.weight", "norm.weight")):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=generator))
            elif p.dim() >= 2:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
        if smooth_pos:
            grid, dim = model.patch_embed.grid_size, model.embed_dim
            y, x = torch.meshgrid(*(torch.linspace(0, 1, n) for n in grid), indexing="ij")
            freqs = 3 * torch.rand(2, dim, generator=generator)
            phase = 2 * math.pi * torch.rand(dim, generator=generator)
            field = torch.sin(2 * math.pi * (y[..., None] * freqs[0] + x[..., None] * freqs[1]) + phase)
            model.pos_embed[0, -grid[0] * grid[1] :] = 0.5 * field.flatten(0, 1)
    return model


@torch.no_grad()
def differences(model: torch.nn.Module, hf_model: torch.nn.Module, image, size: int) -> tuple[float, float]:
    """(max |timm - transformers|, that / max |timm feature|) on ``image`` at ``size`` px."""
    pixels = sinder_transform(size)(image)[None]
    ours = model.forward_features(pixels)
    theirs = hf_model(pixel_values=pixels).last_hidden_state
    diff = (ours - theirs).abs().max().item()
    return diff, diff / ours.abs().max().item()


def main() -> None:
    image = sample_images(["astronaut"])["astronaut"]
    print(f"{'model':<12} {'pos_embed':<9} {'size':>4} {'max abs diff':>13} {'relative':>10}")
    for name, architecture in MODEL_TYPES.items():
        for smooth in (False, True):
            model = random_dinov2(architecture, smooth)
            hf_model = to_transformers(model)
            for size in SIZES:
                diff, rel = differences(model, hf_model, image, size)
                print(f"{name:<12} {'smooth' if smooth else 'random':<9} {size:>4} {diff:>13.3e} {rel:>10.3e}")


if __name__ == "__main__":
    main()
