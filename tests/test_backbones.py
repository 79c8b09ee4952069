"""load_backbone on every spec form (weights written by the tests) and every error case."""

import json

import pytest
import safetensors.torch
import timm
import torch
from timm.models import save_for_hf
from timm.models.vision_transformer import VisionTransformer

import sinder_hub
import sinder_hub.downloads
import sinder_hub.planted
from sinder_hub import BackboneError, load_backbone
from sinder_hub.families.dinov2 import infer_architecture

SMALL = dict(embed_dim=192, depth=2, num_heads=3)
STOCK = (
    "vit_small_patch14_dinov2",
    "vit_base_patch14_dinov2",
    "vit_large_patch14_dinov2",
    "vit_giant_patch14_dinov2",
    "vit_small_patch14_reg4_dinov2",
    "vit_base_patch14_reg4_dinov2",
    "vit_large_patch14_reg4_dinov2",
    "vit_giant_patch14_reg4_dinov2",
)


def random_dinov2(architecture: str, seed: int = 0, **kwargs) -> VisionTransformer:
    """Small DINOv2-shaped timm ViT with random non-trivial weights (layer scales, norms, biases)."""
    generator = torch.Generator().manual_seed(seed)
    model = timm.create_model(
        architecture, pretrained=False, dynamic_img_size=True, weight_init="skip", **{**SMALL, **kwargs}
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "norm1.weight", "norm2.weight", "norm.weight")):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_((0.1 if p.dim() >= 2 else 0.05) * torch.randn(p.shape, generator=generator))
    return model


def authors_state_dict(model: VisionTransformer, stray_registers: bool = False) -> dict:
    """``model``'s weights in the authors' / Meta DINOv2 layout (inverse of timm's ``_convert_dinov2``)."""
    out = {}
    for key, value in model.state_dict().items():
        if isinstance(model.blocks[0].mlp, timm.layers.GluMlp):
            key = key.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3")
        out[key] = value.clone()
    if model.reg_token is not None:  # DINOv2 keeps the class position in pos_embed
        class_pos = torch.randn_like(out["cls_token"])
        out["register_tokens"] = out.pop("reg_token")
        out["cls_token"] = out["cls_token"] - class_pos
        out["pos_embed"] = torch.cat([class_pos, out["pos_embed"]], 1)
    elif stray_registers:
        out["register_tokens"] = torch.zeros(1, 0, model.embed_dim)
    out["mask_token"] = torch.zeros(1, model.embed_dim)
    return out


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].shape == sb[key].shape and (sa[key] - sb[key]).abs().max() <= atol, key


@pytest.mark.parametrize(
    "name",
    [
        "vit_small_patch14_dinov2",
        "vit_small_patch14_dinov2.lvd142m",
        "vit_small_patch14_reg4_dinov2",
        "vit_small_patch14_dinov2_sinder",
    ],
)
def test_timm_names_random_init(name):
    model = load_backbone(name, pretrained=False, depth=2)
    assert isinstance(model, VisionTransformer) and not model.training and model.dynamic_img_size
    assert model.pretrained_cfg["architecture"] == name.split(".")[0]
    assert model.forward_features(torch.randn(1, 3, 70, 84)).shape == (1, 1 + model.num_reg_tokens + 30, 384)


def test_caller_overrides_dynamic_img_size():
    assert not load_backbone(
        "vit_small_patch14_dinov2", pretrained=False, depth=1, dynamic_img_size=False
    ).dynamic_img_size


def test_hf_hub_id_passes_through_to_timm(monkeypatch):
    calls, model = [], random_dinov2("vit_small_patch14_dinov2")

    def create_model(name, **kwargs):
        calls.append((name, kwargs))
        return model

    monkeypatch.setattr(sinder_hub.backbones.timm, "create_model", create_model)
    monkeypatch.setattr(sinder_hub.downloads, "_cached", lambda kind, where: True)  # no network in the tests
    load_backbone("hf-hub:someone/repaired-dinov2")
    assert calls == [("hf-hub:someone/repaired-dinov2", dict(pretrained=True, dynamic_img_size=True))]


def test_safetensors_in_timm_layout(tmp_path):
    source = random_dinov2("vit_small_patch14_reg4_dinov2")
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(source.state_dict(), path)
    assert_same_weights(load_backbone(path, architecture="vit_small_patch14_reg4_dinov2", **SMALL), source)
    with pytest.raises(BackboneError, match="architecture="):
        load_backbone(path)


def test_save_for_hf_folder_honours_model_args(tmp_path):
    source = random_dinov2("vit_giant_patch14_dinov2")
    save_for_hf(source, tmp_path, safe_serialization=True)
    model = load_backbone(tmp_path)
    assert model.embed_dim == 192 and len(model.blocks) == 2
    assert_same_weights(model, source)


@pytest.mark.parametrize(
    ("architecture", "wrapper"),
    [
        ("vit_small_patch14_dinov2", None),
        ("vit_giant_patch14_reg4_dinov2", "model"),
        ("vit_giant_patch14_dinov2", "teacher"),
    ],
)
def test_authors_checkpoint(tmp_path, architecture, wrapper):
    source = random_dinov2(architecture)
    checkpoint = authors_state_dict(source)
    if wrapper == "teacher":  # a DINOv2 training checkpoint: backbone + heads
        checkpoint = {"teacher": {**{f"backbone.{k}": v for k, v in checkpoint.items()}, "dino_head.w": torch.ones(1)}}
    elif wrapper:
        checkpoint = {wrapper: checkpoint, "epoch": 3}
    torch.save(checkpoint, tmp_path / "ckpt.pth")
    model = load_backbone(tmp_path / "ckpt.pth", architecture=architecture, **SMALL)
    assert_same_weights(model, source, atol=1e-6)  # cls_token - class_pos + class_pos
    x = torch.randn(1, 3, 56, 70, generator=torch.Generator().manual_seed(0))
    # float32 round-off of the re-associated class token through the blocks: up to 1.03e-5 seen on outputs
    # up to ~6 (reg4; 0.75 of this tolerance at worst over 20 inputs)
    torch.testing.assert_close(model.forward_features(x), source.forward_features(x), rtol=1e-5, atol=1e-5)


def test_authors_checkpoint_inferred_and_stray_registers_dropped(tmp_path, monkeypatch):
    """A stock ViT-S/14 in the authors' layout with an empty ``register_tokens``: no architecture= needed."""
    source = timm.create_model("vit_small_patch14_dinov2", weight_init="skip")
    with torch.no_grad():  # cheap, and a distinct value per tensor shows that each key lands in place
        for index, p in enumerate(source.parameters()):
            p.fill_(index)
    torch.save(authors_state_dict(source, stray_registers=True), tmp_path / "dinov2s_sinder.pth")
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    with pytest.warns(UserWarning, match=r"dropping register_tokens \(1, 0, 384\)"):
        model = load_backbone(tmp_path / "dinov2s_sinder.pth")
    assert loads == [dict(map_location="cpu", weights_only=True)]
    assert model.pretrained_cfg["architecture"] == "vit_small_patch14_dinov2" and model.reg_token is None
    assert_same_weights(model, source)


@pytest.mark.parametrize("architecture", STOCK)
def test_infer_architecture_from_shapes(architecture):
    with torch.device("meta"):
        model = timm.create_model(architecture, weight_init="skip")
    assert infer_architecture(authors_state_dict(model), "ckpt") == architecture
    assert infer_architecture(model.state_dict(), "ckpt") == architecture


def test_infer_architecture_needs_a_stock_shape():
    with pytest.raises(BackboneError, match="embed dim 192, depth 2, GELU MLP and 0 register tokens.*architecture="):
        infer_architecture(random_dinov2("vit_small_patch14_dinov2").state_dict(), "ckpt.pth")


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["vit_small_patch14_dinov2", "vit_giant_patch14_reg4_dinov2"])
def test_transformers_folder(tmp_path, architecture):
    from sinder_hub.convert import to_transformers

    source = random_dinov2(architecture)
    to_transformers(source).save_pretrained(tmp_path)
    model = load_backbone(tmp_path)
    assert model.dynamic_img_size and not model.training
    assert_same_weights(model, source)


def test_transformers_folder_missing_weight_is_an_error(tmp_path):
    from sinder_hub.convert import to_transformers

    to_transformers(random_dinov2("vit_small_patch14_dinov2")).save_pretrained(tmp_path)
    weights = safetensors.torch.load_file(tmp_path / "model.safetensors")
    del weights["layernorm.weight"]
    safetensors.torch.save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BackboneError, match="layernorm.weight"):
        load_backbone(tmp_path)


def test_planted_specs_dispatch_to_planted(monkeypatch):
    calls = []
    monkeypatch.setattr(
        sinder_hub.planted,
        "planted_backbone",
        lambda spec, **kw: calls.append((spec, kw)) or random_dinov2("vit_small_patch14_dinov2").train(),
    )
    model = load_backbone("planted-gelu", seed=3)
    assert calls == [("planted-gelu", {"seed": 3})] and not model.training
    model = load_backbone("planted-dinov3")
    assert calls[-1] == ("planted-dinov3", {})
    with pytest.raises(
        BackboneError, match="planted-gelu, planted-swiglu, planted-deit3, planted-clip, planted-dinov3"
    ):
        load_backbone("planted-nothing")


def test_unknown_name_lists_accepted_forms():
    with pytest.raises(
        BackboneError, match=r"unknown backbone 'vit_tiny_dinov9'.*hf-hub:.*\.safetensors.*planted-swiglu"
    ):
        load_backbone("vit_tiny_dinov9")


@pytest.mark.parametrize("spec", ["missing.pth", "missing_dir/", "./missing.safetensors"])
def test_missing_path_is_named(tmp_path, spec):
    with pytest.raises(BackboneError, match=f"{tmp_path / spec.rstrip('/')} does not exist"):
        load_backbone(tmp_path / spec)


def test_shape_mismatch_names_key_shapes_and_architecture(tmp_path):
    torch.save(authors_state_dict(random_dinov2("vit_small_patch14_dinov2", embed_dim=96)), tmp_path / "a.pth")
    with pytest.raises(
        BackboneError,
        match=r"shape mismatch at cls_token: \(1, 1, 96\), but "
        r"vit_small_patch14_dinov2 expects \(1, 1, 192\)",
    ):
        load_backbone(tmp_path / "a.pth", architecture="vit_small_patch14_dinov2", **SMALL)


def test_missing_keys_are_an_error(tmp_path):
    checkpoint = authors_state_dict(random_dinov2("vit_small_patch14_dinov2"))
    del checkpoint["norm.weight"]
    torch.save(checkpoint, tmp_path / "a.pth")
    with pytest.raises(BackboneError, match=r"missing keys \['norm.weight'\]"):
        load_backbone(tmp_path / "a.pth", architecture="vit_small_patch14_dinov2", **SMALL)


@pytest.mark.parametrize(
    ("name", "kwargs", "found"),
    [
        ("vit_small_patch14_dinov2", dict(patch_size=16), "16-px patches"),
        ("vit_small_patch14_dinov2_sinder", dict(init_values=0), "no layer scale"),
    ],
)
def test_dinov2_specs_must_be_dinov2_like(name, kwargs, found):
    with pytest.raises(BackboneError, match=f"{name} is not a DINOv2-like backbone \\({found}\\): expected"):
        load_backbone(name, pretrained=False, depth=1, **kwargs)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("resnet50", "resnet50: a ResNet is not a supported backbone"),
        ("vit_base_patch16_rpn_224", "vit_base_patch16_rpn_224: blocks.0: ResPostBlock is not a supported block"),
        ("eva02_tiny_patch14_224", None),
    ],
)
def test_unsupported_families_name_the_module(name, message):
    kwargs = dict(scale_attn_inner=True) if message is None else {}
    message = message or r"eva02_tiny_patch14_224: blocks.0.attn.norm: an inner attention norm"
    with pytest.raises(BackboneError, match=message):
        load_backbone(name, pretrained=False, depth=1, **kwargs)


@pytest.mark.parametrize(
    ("name", "prefix", "patch"),
    [
        ("deit3_small_patch16_224", 1, 16),
        ("vit_base_patch16_clip_quickgelu_224", 1, 16),
        ("vit_base_patch16_siglip_224", 0, 16),
        ("vit_small_patch16_dinov3", 5, 16),
        ("vit_small_plus_patch16_dinov3", 5, 16),
        ("eva02_small_patch14_224", 1, 14),
        ("vit_base_patch16_224", 1, 16),
    ],
)
def test_other_families_load(name, prefix, patch):
    model = load_backbone(name, pretrained=False, depth=1)
    assert not model.training and model.dynamic_img_size and model.num_prefix_tokens == prefix
    assert model.forward_features(torch.randn(1, 3, 3 * patch, 5 * patch)).shape[:2] == (1, prefix + 15)


@pytest.mark.parametrize("spec", ["vit_small_patch14_dinov2", "hf-hub:someone/repo", "planted-gelu"])
def test_architecture_only_for_files(spec):
    with pytest.raises(BackboneError, match="architecture= applies to checkpoint files only"):
        load_backbone(spec, architecture="vit_base_patch14_dinov2")


def test_unusable_files_and_folders(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(BackboneError, match="unknown checkpoint type '.bin'"):
        load_backbone(tmp_path / "weights.bin")
    with pytest.raises(BackboneError, match="no config.json"):
        load_backbone(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(BackboneError, match="model_type 'bert'"):
        load_backbone(tmp_path)
