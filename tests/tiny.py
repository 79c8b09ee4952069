"""Tiny random DINOv2-style timm ViTs for fast tests (weights non-trivial, deterministic), and checks shared by test files."""

import timm
import torch
from timm.layers import SwiGLUPacked
from torch import nn


def tiny_vit(
    mlp: str = "gelu", reg_tokens: int = 0, embed_dim: int = 32, depth: int = 3, seed: int = 0, img_size: int = 56
):
    """A ``[B, 3, 56, 56]`` -> 4x4-patch-grid ViT with random weights, layer scales and norm weights."""
    torch.manual_seed(seed)
    kwargs = dict(
        img_size=img_size,
        patch_size=14,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=2,
        init_values=1.0,
        dynamic_img_size=True,
        num_classes=0,
        reg_tokens=reg_tokens,
        no_embed_class=reg_tokens > 0,
    )
    if mlp == "swiglu":
        kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, mlp_ratio=2.66667 * 2)
    model = timm.models.vision_transformer.VisionTransformer(**kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.normal_(0, 0.2)
            else:
                p.normal_(0, 0.05)
    return model.eval()


def assert_sampled_map_converges_to_expected(block: nn.Module, layout, dim: int = 12) -> None:
    """Stein's lemma through ``block``'s own MLP: the sampled least-squares map's error to the expected map
    falls like 1/√n (2k, 32k, 512k samples)."""
    from sinder_hub.analysis import _expected_mlp_map, _sampled_mlp_map

    expected = _expected_mlp_map(block, layout, "block")
    errors = []
    for samples in (2_000, 32_000, 512_000):
        sampled = _sampled_mlp_map(block, layout, dim, samples, torch.Generator().manual_seed(0))
        errors.append(((sampled - expected).norm() / expected.norm()).item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.25 * errors[0]  # 256x the samples: ideally 16x smaller, at least 4x
    assert errors[2] < 0.01


def stand_in_backbones(monkeypatch, img_size: int) -> list[str]:
    """``sinder_hub.backbones.load_backbone`` replaced by tiny random ViTs seeded by the spec (``tiny_vit(seed=
    len(spec))``): the list of specs it was asked for, in order."""
    import sinder_hub.backbones

    asked = []

    def load(spec: str):
        asked.append(spec)
        return tiny_vit(seed=len(spec), img_size=img_size)

    monkeypatch.setattr(sinder_hub.backbones, "load_backbone", load)
    return asked
