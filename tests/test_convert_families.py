"""transformers export of CLIP and DINOv3 ViTs: folders that stock transformers loads with the timm features."""

import json
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import ModelCard
from test_backbones import assert_same_weights

import sinder_hub
from sinder_hub import BackboneError
from sinder_hub.cards import build_model_card
from sinder_hub.convert import export, save_timm, to_transformers
from sinder_hub.families.clip import from_transformers as clip_from_transformers
from sinder_hub.families.dinov3 import from_transformers as dinov3_from_transformers

# name -> (transformers class, timm model args); depth 2 keeps them fast, 224 px is their native size
FAMILIES = {
    "vit_base_patch16_clip_224": ("CLIPVisionModel", {}),
    "vit_base_patch16_clip_quickgelu_224": ("CLIPVisionModel", {}),
    "vit_small_patch16_dinov3": ("DINOv3ViTModel", {"img_size": 224}),
    "vit_small_plus_patch16_dinov3": ("DINOv3ViTModel", {"img_size": 224}),
    "vit_small_patch16_dinov3_qkvb": ("DINOv3ViTModel", {"img_size": 224}),  # Eva's separate q_bias / v_bias
}
STOCK_LOADER = textwrap.dedent("""
    import sys

    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from transformers import AutoImageProcessor, AutoModel

    image = load_file(sys.argv[1])["image"]
    out = {}
    for folder in sys.argv[2:]:
        model = AutoModel.from_pretrained(folder).eval()
        pixels = AutoImageProcessor.from_pretrained(folder)(Image.new("RGB", (320, 240)), return_tensors="pt")
        assert pixels["pixel_values"].shape == (1, 3, 224, 224), pixels["pixel_values"].shape
        with torch.no_grad():
            outputs = model(pixel_values=image)
        if type(model).__name__ == "CLIPVisionModel":  # last_hidden_state is before post_layernorm
            out[folder] = model.post_layernorm(outputs.last_hidden_state)
            out[folder + "/pooler"] = outputs.pooler_output
        else:
            out[folder] = outputs.last_hidden_state
        out[folder + "/class"] = torch.tensor([ord(c) for c in type(model).__name__])
    assert "sinder_hub" not in sys.modules
    save_file(out, sys.argv[1] + ".out")
""")


def random_model(name: str, seed: int, **kwargs) -> torch.nn.Module:
    """A depth-2 stock timm model whose every tensor is random (not timm's init: zero biases, 1e-5 layer scales)."""
    model = timm.create_model(name, pretrained=False, depth=2, num_classes=0, **kwargs)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.normal_(1.0 if p.dim() == 1 and p.shape[0] == model.embed_dim else 0.0, 0.05, generator=generator)
    return model.eval()


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / ours.abs().max()).item()


@pytest.mark.slow
def test_stock_transformers_loads_the_timm_features(tmp_path):
    """export(format="transformers") of CLIP (GELU, QuickGELU, the planted fixture) and DINOv3 (GELU, SwiGLU) models;
    a subprocess that never imports sinder_hub loads each folder with AutoModel and gets timm's forward_features."""
    models = {name: random_model(name, seed, **args) for seed, (name, (_, args)) in enumerate(FAMILIES.items())}
    models["planted-clip"] = sinder_hub.load_backbone("planted-clip")
    for name, model in models.items():
        export(model, tmp_path / name, format="transformers")
    config = json.loads((tmp_path / "vit_base_patch16_clip_quickgelu_224/config.json").read_text())
    assert (config["model_type"], config["hidden_act"], config["layer_norm_eps"]) == (
        "clip_vision_model",
        "quick_gelu",
        1e-5,
    )
    assert json.loads((tmp_path / "vit_base_patch16_clip_224/config.json").read_text())["hidden_act"] == "gelu"
    config = json.loads((tmp_path / "vit_small_plus_patch16_dinov3/config.json").read_text())
    assert (config["model_type"], config["use_gated_mlp"], config["num_register_tokens"]) == ("dinov3_vit", True, 4)
    processor = json.loads((tmp_path / "planted-clip/preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "CLIPImageProcessor" and processor["image_mean"][0] == 0.48145466

    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    safetensors.torch.save_file({"image": image}, tmp_path / "image.safetensors")
    subprocess.run(
        [
            sys.executable,
            "-c",
            STOCK_LOADER,
            str(tmp_path / "image.safetensors"),
            *(str(tmp_path / name) for name in models),
        ],
        check=True,
        cwd=tmp_path,
    )
    loaded = safetensors.torch.load_file(tmp_path / "image.safetensors.out")
    with torch.no_grad():
        for name, model in models.items():
            folder = str(tmp_path / name)
            expected_class = FAMILIES.get(name, ("CLIPVisionModel",))[0]
            assert "".join(map(chr, loaded[folder + "/class"].tolist())) == expected_class
            ours = model.forward_features(image)
            assert loaded[folder].shape == ours.shape, name
            print(f"{name:<36} {expected_class:<16} max relative difference {relative(ours, loaded[folder]):.2e}")
            assert relative(ours, loaded[folder]) <= 1e-4, name
            if expected_class == "CLIPVisionModel":
                assert relative(ours[:, 0], loaded[folder + "/pooler"]) <= 1e-4, name


@pytest.mark.parametrize(
    "name, args",
    [
        ("vit_base_patch16_clip_quickgelu_224", {}),
        ("vit_base_patch16_clip_224", {}),
        ("vit_small_patch16_dinov3", {"img_size": 224}),
        ("vit_small_plus_patch16_dinov3", {"img_size": 224}),
        ("vit_small_patch16_dinov3_qkvb", {"img_size": 224}),
    ],
)
def test_round_trip_is_exact(name, args):
    model = random_model(name, 7, **args)
    hf_model = to_transformers(model)
    back = (clip_from_transformers if "clip" in name else dinov3_from_transformers)(hf_model)
    assert back.pretrained_cfg["architecture"] == name
    assert_same_weights(back, model)


@pytest.mark.slow
def test_what_transformers_cannot_hold_is_refused():
    with pytest.raises(BackboneError, match="absolute position embedding.*use_abs_pos_emb=True"):
        to_transformers(sinder_hub.load_backbone("planted-dinov3"))
    with pytest.raises(ValueError, match=r"no transformers counterpart: \['head.weight', 'head.bias'\]"):
        to_transformers(timm.create_model("vit_base_patch16_clip_224", pretrained=False, depth=1))  # the projection
    model = random_model("vit_base_patch16_clip_224", 0)
    model.patch_embed.proj.bias = torch.nn.Parameter(torch.zeros(model.embed_dim))
    with pytest.raises(BackboneError, match="patch-embedding bias"):
        to_transformers(model)
    with pytest.raises(BackboneError, match="not a DINOv2-like backbone"):
        to_transformers(random_model("deit3_small_patch16_224", 0))


@pytest.mark.parametrize(
    "name, family, citation, base_model",
    [
        (
            "vit_base_patch16_clip_224.openai",
            "CLIP",
            "Learning Transferable Visual Models From Natural Language Supervision",
            "timm/vit_base_patch16_clip_224.openai",
        ),
        (
            "deit3_small_patch16_224.fb_in1k",
            "DeiT-III",
            "{DeiT III}: Revenge of the {ViT}",
            "timm/deit3_small_patch16_224.fb_in1k",
        ),
    ],
)
def test_card_of_a_timm_folder_names_its_family(tmp_path, name, family, citation, base_model):
    save_timm(random_model(name.split(".")[0], 0), tmp_path)
    (tmp_path / "repair_report.json").write_text(json.dumps({"source_model": name, "steps": 3}))
    card = build_model_card(tmp_path, repo_id="alice/repaired")
    assert card.data.base_model == base_model
    assert card.text.startswith(f"\n# repaired\n\nA {family} vision transformer for [timm]")
    assert citation in card.text and "wang2024sinder" in card.text and "oquab2024dinov2" not in card.text


def test_card_of_a_clip_transformers_folder(tmp_path):
    export(random_model("vit_base_patch16_clip_quickgelu_224", 0), tmp_path, format="transformers")
    (tmp_path / "repair_report.json").write_text(
        json.dumps({"source_model": "vit_base_patch16_clip_quickgelu_224.openai"})
    )
    card = ModelCard(str(build_model_card(tmp_path, repo_id="alice/repaired")))
    assert card.data.base_model == "timm/vit_base_patch16_clip_224.openai"  # timm's hub repo for these weights
    assert "clip" in card.data.tags and "dinov2" not in card.data.tags
    assert 'CLIPVisionModel.from_pretrained("alice/repaired")' in card.text
    assert "model.post_layernorm(model(**inputs).last_hidden_state)" in card.text
    assert "Radford" in card.text


def test_card_of_a_dinov3_transformers_folder(tmp_path):
    export(random_model("vit_small_patch16_dinov3", 0, img_size=224), tmp_path, format="transformers")
    card = ModelCard(str(build_model_card(tmp_path, repo_id="alice/repaired")))
    assert "dinov3" in card.data.tags and card.data.license == "other"
    assert 'DINOv3ViTModel.from_pretrained("alice/repaired")' in card.text
    assert "tokens[:, 5:]  # drop the class token and 4 storage tokens" in card.text
    assert (
        "simeoni2025dinov3" in card.text and "The model was trained for 224 px inputs. It has no absolute" in card.text
    )
