"""Block families beyond DINOv2: description, directions (eq. 1–4), singular-value layers, RoPE-aware block runs."""

import math

import pytest
import timm
import torch
from timm.layers import LayerNorm
from timm.models.vision_transformer import ResPostBlock, VisionTransformer
from tiny import assert_sampled_map_converges_to_expected
from torch import nn

from sinder_hub import BackboneError
from sinder_hub.analysis import _expected_mlp_map, block_linear_maps, singular_defect_directions
from sinder_hub.anatomy import describe_block, describe_model, get_path, has_class_token
from sinder_hub.singular_values import merge_singular_values, parametrize_singular_values
from sinder_hub.tokens import block_outputs, patch_grid, prepare_blocks

# timm name -> (family, prefix tokens, value layer, layer scales, MLP kind, inner MLP norm)
STOCK = {
    "deit3_small_patch16_224": ("vit", 1, "attn.qkv", ("ls1.gamma", "ls2.gamma"), "gelu", False),
    "vit_base_patch16_clip_224": ("vit", 1, "attn.qkv", (None, None), "gelu", False),
    "vit_base_patch16_clip_quickgelu_224": ("vit", 1, "attn.qkv", (None, None), "quick_gelu", False),
    "vit_base_patch16_siglip_224": ("vit", 0, "attn.qkv", (None, None), "gelu", False),
    "vit_small_patch16_dinov3": ("eva", 5, "attn.qkv", ("gamma_1", "gamma_2"), "gelu", False),
    "vit_small_plus_patch16_dinov3": ("eva", 5, "attn.qkv", ("gamma_1", "gamma_2"), "swiglu_split", False),
    "eva02_small_patch14_224": ("eva", 1, "attn.qkv", (None, None), "swiglu_packed", False),
    "eva02_base_patch14_224": ("eva", 1, "attn.v_proj", (None, None), "swiglu_split", True),
    "vit_base_patch16_dinov3_qkvb": ("eva", 5, "attn.qkv", ("gamma_1", "gamma_2"), "gelu", False),
}
SMALL = dict(embed_dim=32, num_heads=2, depth=2, num_classes=0, dynamic_img_size=True)


def angle_deg(a, b):
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).abs().clamp(max=1)
    return torch.rad2deg(torch.acos(cos))


def small(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """A width-32, depth-2 version of a stock architecture with random weights, biases and norm weights."""
    torch.manual_seed(seed)
    patch = 14 if "patch14" in name else 16
    model = timm.create_model(name, pretrained=False, img_size=4 * patch, **{**SMALL, **kwargs}).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith(("gamma", "gamma_1", "gamma_2")) or (".norm" in key and key.endswith("weight")):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2 if p.dim() >= 2 else 0.05)
    return model


def images_for(model: nn.Module, batch: int = 2) -> torch.Tensor:
    patch = model.patch_embed.patch_size[0]
    return torch.randn(batch, 3, 4 * patch, 5 * patch, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(STOCK))
def test_description_of_stock_blocks(name):
    family, prefix, value, scales, mlp_kind, inner_norm = STOCK[name]
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, depth=1)
    described = describe_model(model, name)
    block = described.blocks[0]
    assert (
        described.family,
        described.num_prefix_tokens,
        block.value,
        (block.layer_scale1, block.layer_scale2),
        block.mlp_kind,
        block.mlp_inner_norm,
    ) == (family, prefix, value, scales, mlp_kind, inner_norm)
    assert described.rope == (family == "eva")
    assert has_class_token(model) == (name != "vit_base_patch16_siglip_224")
    dim = model.embed_dim
    assert block.value_rows == ((0, dim) if value == "attn.v_proj" else (2 * dim, 3 * dim))
    # only the value part, the output projection and the MLP's linears may move; never queries or keys
    movable = dict(block.movable)
    assert not any(path.endswith(("q_proj", "k_proj")) for path in movable)
    assert movable[value] == (None if value == "attn.v_proj" else (2 * dim, 3 * dim))
    assert list(movable)[1:] == [
        "attn.proj",
        *(("mlp.fc1_g", "mlp.fc1_x") if "split" in mlp_kind else ("mlp.fc1",)),
        "mlp.fc2",
    ]


def test_unsupported_blocks_name_the_module_and_what_is_missing():
    with pytest.raises(BackboneError, match="a ResNet is not a supported backbone"), torch.device("meta"):
        describe_model(timm.create_model("resnet18"), "resnet18")
    post_norm = VisionTransformer(
        img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, block_fn=ResPostBlock, num_classes=0
    )
    with pytest.raises(BackboneError, match=r"post: blocks.0: ResPostBlock is not a supported block"):
        describe_model(post_norm, "post")
    inner = small("eva02_small_patch14_224", scale_attn_inner=True)
    with pytest.raises(BackboneError, match=r"blocks.0.attn.norm: an inner attention norm"):
        describe_model(inner)
    gelu = small("deit3_small_patch16_224")
    gelu.blocks[1].mlp.act = nn.Softplus()
    with pytest.raises(BackboneError, match=r"blocks.1.mlp.act: unsupported activation Softplus"):
        singular_defect_directions(gelu, method="expected")
    gelu.blocks[1].mlp.act = nn.GELU()
    gelu.blocks[1].norm2 = nn.BatchNorm1d(32)
    with pytest.raises(
        BackboneError, match=r"blocks.1.norm2: expected a LayerNorm or RmsNorm pre-norm, got BatchNorm1d"
    ):
        parametrize_singular_values(gelu)


def model_with_known_direction(name: str, sigma: float = 5.0):
    """Block 0's attention is ``I + σ u uᵀ`` (u ⟂ 1) through the family's own value and output layers;
    every MLP and block 1 contribute nothing. Layer scales and norm weights are 1."""
    model = small(name)
    described = describe_model(model)
    dim = model.embed_dim
    u = torch.randn(dim, generator=torch.Generator().manual_seed(1))
    u = u - u.mean()
    u = u / u.norm()
    with torch.no_grad():
        for block, layout in zip(model.blocks, described.blocks):
            get_path(block, layout.value).weight.zero_()
            get_path(block, layout.proj).weight.zero_()
            get_path(block, layout.mlp_output).weight.zero_()
            for path in (layout.layer_scale1, layout.layer_scale2):
                if path is not None:
                    get_path(block, path).fill_(1.0)
            block.norm1.weight.fill_(1.0)
        start, stop = described.blocks[0].value_rows
        get_path(model.blocks[0], described.blocks[0].value).weight[start:stop] = torch.eye(dim)
        get_path(model.blocks[0], described.blocks[0].proj).weight.copy_(sigma * torch.outer(u, u))
    return model, u


@pytest.mark.parametrize("name", list(STOCK))
def test_direction_of_a_block_with_known_leading_singular_vector(name):
    model, u = model_with_known_direction(name)
    methods = ["sampled"] + ([] if STOCK[name][5] else ["expected"])
    for method in methods:
        maps = block_linear_maps(model, method=method, samples=2000)
        assert torch.allclose(maps[0].A, 5.0 * torch.outer(u, u).double(), atol=1e-6), method
        assert torch.allclose(maps[0].C, torch.zeros_like(maps[0].C)), method
        directions = singular_defect_directions(model, method=method, samples=2000)
        assert directions.shape == (2, 32)
        assert angle_deg(directions, u).max().item() < 1e-3, method  # G_1 = G_0 = I + 5 u uᵀ


@pytest.mark.parametrize("name", ["deit3_small_patch16_224", "vit_small_patch16_dinov3", "eva02_base_patch14_224"])
def test_attention_map_reads_layer_scale_norm_weight_and_value_rows(name):
    """Eq. 1 with non-trivial layer scale and norm weight: ``A = diag(ls1) W_proj W_v diag(n1) P``."""
    model = small(name)
    block, layout = model.blocks[0], describe_model(model).blocks[0]
    dim = model.embed_dim
    start, stop = layout.value_rows
    W_v = get_path(block, layout.value).weight[start:stop].double()
    W_proj = block.attn.proj.weight.double()
    ls1 = get_path(block, layout.layer_scale1).double() if layout.layer_scale1 else torch.ones(dim, dtype=torch.float64)
    P = torch.eye(dim, dtype=torch.float64) - 1.0 / dim
    expected = torch.diag(ls1) @ W_proj @ W_v @ torch.diag(block.norm1.weight.double()) @ P
    assert torch.allclose(block_linear_maps(model, samples=100)[0].A, expected, atol=1e-12)


def mlp_block(kind: str, dim: int = 12) -> tuple[nn.Module, object]:
    """One block of a small stock model whose MLP is ``kind``, weights ~ N(0, 0.5²)."""
    name = {
        "gelu": "deit3_small_patch16_224",
        "quick_gelu": "vit_base_patch16_clip_quickgelu_224",
        "gelu_tanh": "vit_base_patch16_siglip_224",
        "swiglu_packed": "eva02_small_patch14_224",
        "swiglu_split": "vit_small_plus_patch16_dinov3",
    }[kind]
    extra = {"act_layer": "gelu_tanh"} if kind == "gelu_tanh" else {}
    model = small(name, embed_dim=dim, num_heads=1, depth=1, seed=3, **extra)
    with torch.no_grad():
        for p in model.blocks[0].mlp.parameters():
            p.normal_(0, 0.5)
    block = model.blocks[0]
    layout = describe_block(block)
    assert layout.mlp_kind == kind
    return block, layout


@pytest.mark.parametrize("kind", ["gelu", "quick_gelu", "gelu_tanh", "swiglu_packed", "swiglu_split"])
def test_sampled_least_squares_converges_to_expected_map(kind):
    """Stein's lemma through the block's own MLP: the sampled map's error falls like 1/√n to the expected one."""
    assert_sampled_map_converges_to_expected(*mlp_block(kind))


def test_expected_map_of_quick_gelu_matches_numerical_integration():
    """QuickGELU(a) = a σ(1.702 a): E[QuickGELU'(a)] for a ~ N(b, s²) by a fine Riemann sum, per unit."""
    block, layout = mlp_block("quick_gelu")
    w, b = block.mlp.fc1.weight.double(), block.mlp.fc1.bias.double()
    s = w.norm(dim=1)
    z = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    a = b[:, None] + s[:, None] * z[None, :]
    slope = torch.sigmoid(1.702 * a) + 1.702 * a * torch.sigmoid(1.702 * a) * torch.sigmoid(-1.702 * a)
    density = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    mean_slope = (slope * density).sum(dim=1) * (z[1] - z[0])
    closed = block.mlp.fc2.weight.double() @ (mean_slope[:, None] * w)
    # 96 Gauss-Hermite nodes: ~2e-6 here (QuickGELU's complex poles lie near the real axis); GELU differs by ~1e-2
    assert torch.allclose(_expected_mlp_map(block, layout, "block"), closed, atol=1e-5)


def test_expected_is_refused_for_an_mlp_with_an_inner_norm():
    model = small("eva02_base_patch14_224")
    with pytest.raises(BackboneError, match=r"blocks.0.mlp: method='expected'.*inner LayerNorm: use method='sampled'"):
        singular_defect_directions(model, method="expected")


@pytest.mark.parametrize(
    "name",
    [
        "deit3_small_patch16_224",
        "vit_base_patch16_clip_224",
        "vit_base_patch16_clip_quickgelu_224",
        "vit_base_patch16_siglip_224",
        "vit_small_patch16_dinov3",
        "vit_small_plus_patch16_dinov3",
        "eva02_small_patch14_224",
    ],
)
@pytest.mark.slow
def test_directions_on_stock_random_init_architectures(name):
    """timm's own random initialisation at full width, depth 2: one unit direction per block (sampled, the
    default); the expected linearisation is available for all of them too."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, depth=2, num_classes=0).eval()
    directions = singular_defect_directions(model, samples=3000)
    assert directions.shape == (2, model.embed_dim)
    assert torch.allclose(directions.norm(dim=1), torch.ones(2))
    maps = block_linear_maps(model, method="expected")
    assert len(maps) == 2 and all(torch.isfinite(m.E).all() for m in maps)


@pytest.mark.parametrize("name", list(STOCK))
def test_block_callables_reproduce_forward_features(name):
    """prepare_blocks binds RoPE to Eva blocks; the patch grid drops class + register / storage tokens."""
    model = small(name)
    images = images_for(model)
    x, blocks = prepare_blocks(model, images)
    assert len(blocks) == len(model.blocks)
    with torch.no_grad():
        outputs = block_outputs(model, images)
        reference = model.forward_features(images)
    assert torch.equal(model.norm(outputs[-1]), reference)
    grid = patch_grid(model, outputs[-1], tuple(images.shape[-2:]))
    assert grid.shape == (2, 4, 5, 32)
    assert torch.equal(grid[:, 0, 0], outputs[-1][:, STOCK[name][1]])


@pytest.mark.parametrize(
    "name",
    [
        "vit_small_patch16_dinov3",
        "eva02_small_patch14_224",
        "eva02_base_patch14_224",
        "vit_base_patch16_dinov3_qkvb",
        "vit_base_patch16_clip_224",
    ],
)
def test_singular_value_layers_on_every_family(name):
    """Only the family's movable layers get ε; ε = 0 keeps the outputs; a moved ε is what the attention runs
    (Eva's fused qkv with separate biases reads ``qkv.weight`` itself, so this is where it could be bypassed)."""
    model = small(name)
    reference_state = {k: v.clone() for k, v in model.state_dict().items()}
    images = images_for(model)
    with torch.no_grad():
        before = model.forward_features(images)
    eps = parametrize_singular_values(model)
    layout = describe_model(model).blocks[0]
    assert list(eps)[: len(layout.movable)] == [f"blocks.0.{path}.eps" for path, _ in layout.movable]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == list(eps)
    with torch.no_grad():
        # exact except Eva's fused qkv with separate biases (bias added after the product: float rounding)
        assert torch.allclose(model.forward_features(images), before, rtol=0, atol=1e-6 * before.abs().max())
        value = get_path(model.blocks[0], layout.value)
        value.eps.copy_(0.5 * torch.randn(value.eps.shape, generator=torch.Generator().manual_seed(2)))
        moved = model.forward_features(images)
    # the same change written into a stock model's weight gives the same output
    stock = small(name)
    stock.load_state_dict(reference_state)
    with torch.no_grad():
        get_path(stock.blocks[0], layout.value).weight.copy_(value.merged_weight())
        assert not torch.allclose(moved, before, atol=1e-3)
        assert torch.allclose(moved, stock.forward_features(images), atol=1e-5 * moved.abs().max())
        start, stop = layout.value_rows
        assert torch.equal(value.merged_weight()[:start], reference_state[f"blocks.0.{layout.value}.weight"][:start])
    merge_singular_values(model)
    assert list(model.state_dict()) == list(reference_state)
    if hasattr(model.blocks[0].attn, "qkv_bias_separate"):
        assert model.blocks[0].attn.qkv_bias_separate == stock.blocks[0].attn.qkv_bias_separate
    with torch.no_grad():
        assert torch.allclose(model.forward_features(images), moved, atol=1e-6 * moved.abs().max())


def test_rms_norm_has_no_centering():
    """An RMSNorm pre-norm scales without centring: eq. 1 with ``P = I``."""
    model = small("vit_small_patch16_dinov3")
    block = model.blocks[0]
    rms = timm.layers.RmsNorm(32)
    with torch.no_grad():
        rms.weight.copy_(block.norm1.weight)
    block.norm1 = rms
    start, stop = describe_block(block).value_rows
    expected = (
        block.gamma_1[:, None] * block.attn.proj.weight @ block.attn.qkv.weight[start:stop] * rms.weight
    ).double()
    assert torch.allclose(block_linear_maps(model, samples=100)[0].A, expected, atol=1e-6)
    assert isinstance(model.blocks[1].norm1, LayerNorm)
