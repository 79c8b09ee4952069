"""timm <-> transformers: same features, exact round trip, folders that stock timm / transformers load."""

import json
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import timm
import torch
from test_backbones import assert_same_weights, random_dinov2
from timm.models import save_for_hf

import sinder_hub.cards
from sinder_hub import BackboneError
from sinder_hub.convert import export, save_timm, to_transformers
from sinder_hub.families.dinov2 import from_transformers, timm_architecture, transformers_config

MODEL_TYPES = {
    "gelu": "vit_small_patch14_dinov2",
    "swiglu": "vit_giant_patch14_dinov2",
    "gelu+reg4": "vit_small_patch14_reg4_dinov2",
    "swiglu+reg4": "vit_giant_patch14_reg4_dinov2",
}


@pytest.fixture(scope="module", params=list(MODEL_TYPES))
def pair(request):
    """(model type, timm model, its transformers conversion, {size: (timm, transformers) features})."""
    model = random_dinov2(MODEL_TYPES[request.param])
    hf_model = to_transformers(model)
    features = {}
    with torch.no_grad():
        for size in (518, 224):
            image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
            features[size] = model.forward_features(image), hf_model(pixel_values=image).last_hidden_state
    return request.param, model, hf_model, features


def test_same_features_at_518(pair):
    kind, model, hf_model, features = pair
    assert type(hf_model).__name__ == ("Dinov2WithRegistersModel" if "reg4" in kind else "Dinov2Model")
    ours, theirs = features[518]
    assert ours.shape == theirs.shape == (1, 1 + model.num_reg_tokens + 37 * 37, 192)
    assert (ours - theirs).abs().max() <= 1e-4 * ours.abs().max()


def test_round_trip_is_exact(pair):
    _, model, hf_model, _ = pair
    back = from_transformers(hf_model)
    assert back.pretrained_cfg["architecture"] == model.pretrained_cfg["architecture"] and back.dynamic_img_size
    assert_same_weights(back, model)


def test_below_518_only_plain_dinov2_differs(pair):
    """Plain transformers Dinov2 resamples position embeddings without antialias, timm and
    Dinov2WithRegisters with: at 224 the features of plain models differ, register models agree."""
    kind, _, _, features = pair
    for size, (ours, theirs) in features.items():
        diff = (ours - theirs).abs().max().item()
        print(f"{kind:<12} {size}px max abs diff {diff:.3e} relative {diff / ours.abs().max().item():.3e}")
    ours, theirs = features[224]
    assert ((ours - theirs).abs().max() <= 1e-4 * ours.abs().max()) == ("reg4" in kind)


def test_stock_shape_converts_to_stock_name():
    with torch.device("meta"):
        model = timm.create_model("vit_giant_patch14_reg4_dinov2_sinder", weight_init="skip")
    config = transformers_config(model)
    assert (config.hidden_size, config.num_hidden_layers, config.mlp_ratio, config.num_register_tokens) == (
        1536,
        40,
        4,
        4,
    )
    architecture, model_args = timm_architecture(config)
    assert (architecture, model_args) == ("vit_giant_patch14_reg4_dinov2", {"img_size": 518})


def test_head_has_no_transformers_counterpart():
    model = random_dinov2("vit_small_patch14_dinov2", num_classes=10)
    with pytest.raises(ValueError, match=r"no transformers counterpart: \['head.weight', 'head.bias'\]"):
        to_transformers(model)


STOCK_LOADER = textwrap.dedent("""
    import sys, timm, torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoImageProcessor, AutoModel
    from PIL import Image
    out, image = {}, load_file(sys.argv[1])["image"]
    for name in sys.argv[2:]:
        timm_model = timm.create_model(f"local-dir:{name}/timm", pretrained=True).eval()
        hf_model = AutoModel.from_pretrained(f"{name}/transformers").eval()
        processor = AutoImageProcessor.from_pretrained(f"{name}/transformers")
        pixels = processor(Image.new("RGB", (320, 240)), return_tensors="pt")["pixel_values"]
        assert pixels.shape == (1, 3, 224, 224), pixels.shape
        with torch.no_grad():
            out[f"{name}/timm"] = timm_model.forward_features(image)
            out[f"{name}/transformers"] = hf_model(pixel_values=image).last_hidden_state
    assert "sinder_hub" not in sys.modules
    save_file(out, sys.argv[1] + ".out")
""")


@pytest.mark.slow
def test_exported_folders_load_in_stock_timm_and_transformers(tmp_path):
    """A repair run folder (with report) and a *_sinder model, exported as both; loaded in a subprocess
    that never imports sinder_hub, they give the features of the model they came from."""
    run = random_dinov2("vit_small_patch14_dinov2")
    save_for_hf(run, tmp_path / "run", safe_serialization=True)
    (tmp_path / "run" / "repair_report.json").write_text(json.dumps({"steps": 3}))
    (tmp_path / "run" / "before_after_astronaut.png").write_bytes(b"picture")
    sinder = random_dinov2("vit_giant_patch14_reg4_dinov2_sinder")
    folders = {
        "run": export(tmp_path / "run", tmp_path / "out_run", format="both"),
        "sinder": export(sinder, tmp_path / "out_sinder", format="both"),
    }
    assert folders["run"] == {"timm": tmp_path / "out_run/timm", "transformers": tmp_path / "out_run/transformers"}
    for kind in ("timm", "transformers"):
        assert json.loads((tmp_path / "out_run" / kind / "repair_report.json").read_text()) == {"steps": 3}
        assert (tmp_path / "out_run" / kind / "before_after_astronaut.png").read_bytes() == b"picture"
        assert not (tmp_path / "out_sinder" / kind / "repair_report.json").exists()
    assert (
        json.loads((tmp_path / "out_sinder/timm/config.json").read_text())["architecture"]
        == "vit_giant_patch14_reg4_dinov2"
    )
    processor = json.loads((tmp_path / "out_run/transformers/preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "BitImageProcessor" and processor["resample"] == 3
    assert (processor["size"], processor["crop_size"]) == ({"shortest_edge": 256}, {"height": 224, "width": 224})
    assert (processor["image_mean"], processor["image_std"]) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])

    image = torch.randn(1, 3, 518, 518)
    safetensors.torch.save_file({"image": image}, tmp_path / "image.safetensors")
    subprocess.run(
        [
            sys.executable,
            "-c",
            STOCK_LOADER,
            str(tmp_path / "image.safetensors"),
            str(tmp_path / "out_run"),
            str(tmp_path / "out_sinder"),
        ],
        check=True,
        cwd=tmp_path,
    )
    loaded = safetensors.torch.load_file(tmp_path / "image.safetensors.out")
    with torch.no_grad():
        for name, model in (("out_run", run), ("out_sinder", sinder)):
            expected = model.forward_features(image)
            for kind in ("timm", "transformers"):
                assert (loaded[f"{tmp_path / name}/{kind}"] - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_export_single_format_and_card_hook(tmp_path, monkeypatch):
    cards = []
    monkeypatch.setattr(
        sinder_hub.cards,
        "write_model_card",
        lambda folder, kind, **kwargs: cards.append(
            (folder.parent, kind, sorted(path.name for path in folder.iterdir()))
        ),
    )
    model = random_dinov2("vit_small_patch14_dinov2")
    assert export(model, tmp_path, format="transformers", card=True) == {"transformers": tmp_path}
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "dinov2"
    # the card is written in the staging folder, beside the files it describes, before they are moved in
    assert cards == [(tmp_path, "transformers", ["config.json", "model.safetensors", "preprocessor_config.json"])]
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        export(model, tmp_path, format="onnx")


def test_export_tool(tmp_path, monkeypatch):
    from sinder_hub.commands import export as tool

    save_for_hf(random_dinov2("vit_small_patch14_dinov2"), tmp_path / "run", safe_serialization=True)
    tool.main([str(tmp_path / "run"), "--to", str(tmp_path / "out"), "--format", "timm"])
    assert json.loads((tmp_path / "out/config.json").read_text())["architecture"] == "vit_small_patch14_dinov2"

    calls = []
    monkeypatch.setattr(tool, "load_backbone", lambda path, architecture: calls.append((path, architecture)) or "model")
    monkeypatch.setattr(
        tool,
        "export",
        lambda source, to, format, card, overwrite: calls.append((source, to, format, card, overwrite)) or {},
    )
    (tmp_path / "dinov2g_sinder.pth").write_bytes(b"")
    tool.main(["--from-authors", str(tmp_path / "dinov2g_sinder.pth"), "--to", str(tmp_path / "authors")])
    assert calls == [
        (tmp_path / "dinov2g_sinder.pth", "vit_giant_patch14_dinov2_sinder"),
        ("model", str(tmp_path / "authors"), "both", False, False),
    ]
    with pytest.raises(SystemExit):
        tool.main(["run", "--from-authors", "x.pth", "--to", "out"])


OTHER_FAMILY_LOADER = textwrap.dedent("""
    import sys

    import timm
    import torch
    from safetensors.torch import load_file, save_file

    image = load_file(sys.argv[1])["image"]
    out = {}
    for folder in sys.argv[2:]:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        with torch.no_grad():
            out[folder] = model.forward_features(image)
    assert "sinder_hub" not in sys.modules
    save_file(out, sys.argv[1] + ".out")
""")
OTHER_FAMILIES = (
    "deit3_small_patch16_224",
    "vit_base_patch16_clip_quickgelu_224",
    "vit_base_patch16_siglip_224",
    "vit_small_patch16_dinov3",
    "vit_small_plus_patch16_dinov3",
)


@pytest.mark.slow
def test_other_families_export_to_stock_timm_folders(tmp_path):
    """save_timm of DeiT-III, CLIP, SigLIP and DINOv3 (Eva) models: a subprocess that never imports sinder_hub
    loads each folder with timm's ``local-dir:`` and gets the same features; transformers export is refused
    for DeiT-III and SigLIP."""
    models = {}
    for index, name in enumerate(OTHER_FAMILIES):
        model = sinder_hub.load_backbone(name, pretrained=False, depth=2, embed_dim=64, num_heads=2, img_size=64)
        with torch.no_grad():
            for p in model.parameters():  # not timm's init: every tensor matters
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(index))
        folder = tmp_path / name
        save_timm(model, folder)
        assert json.loads((folder / "config.json").read_text())["architecture"] == name
        models[str(folder)] = model
    for name in ("deit3_small_patch16_224", "vit_base_patch16_siglip_224"):  # CLIP, DINOv3: test_convert_families
        with pytest.raises(BackboneError, match="not a DINOv2-like backbone"):
            to_transformers(models[str(tmp_path / name)])
    image = torch.randn(1, 3, 64, 64)
    safetensors.torch.save_file({"image": image}, tmp_path / "image.safetensors")
    subprocess.run(
        [sys.executable, "-c", OTHER_FAMILY_LOADER, str(tmp_path / "image.safetensors"), *models],
        check=True,
        cwd=tmp_path,
    )
    loaded = safetensors.torch.load_file(tmp_path / "image.safetensors.out")
    with torch.no_grad():
        for folder, model in models.items():
            assert torch.equal(loaded[folder], model.forward_features(image)), folder
