"""The *_sinder timm registry names: same layouts as stock DINOv2, the authors' giant weights, local files."""

import pytest
import safetensors.torch
import timm
import torch
from test_backbones import SMALL, assert_same_weights, authors_state_dict, random_dinov2
from timm.models import get_pretrained_cfg

import sinder_hub  # noqa: F401  (registers the names)
from sinder_hub import BackboneError
from sinder_hub.models import BASE_ARCHITECTURES, base_architecture


@pytest.mark.parametrize("name", sorted(BASE_ARCHITECTURES))
def test_sinder_names_match_their_base_architecture(name):
    with torch.device("meta"):  # the giant in seconds and no memory
        ours = timm.create_model(name, pretrained=False, weight_init="skip")
        base = timm.create_model(base_architecture(name), pretrained=False, weight_init="skip")
    assert ours.pretrained_cfg["architecture"] == name and base.pretrained_cfg["architecture"] != name
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
    assert type(ours.blocks[0].mlp) is type(base.blocks[0].mlp) and ours.no_embed_class == base.no_embed_class
    assert ours.pretrained_cfg["input_size"] == (3, 518, 518) and ours.num_classes == 0


@pytest.mark.parametrize("name", ["vit_giant_patch14_dinov2_sinder", "vit_giant_sinder"])
def test_giant_points_at_the_authors_checkpoint(name):
    cfg = get_pretrained_cfg(name)
    assert (cfg.hf_hub_id, cfg.hf_hub_filename) == ("haoqiwang/sinder", "dinov2g_sinder.pth")


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2_sinder", "vit_large_patch14_reg4_dinov2_sinder"])
def test_no_published_weights_says_how_to_load_them(name):
    assert not get_pretrained_cfg(name).has_weights
    with pytest.raises(
        BackboneError, match=f"{name} has no published weights.*pretrained_cfg_overlay=dict\\(file=.*hf-hub:"
    ):
        timm.create_model(name, pretrained=True)


def test_local_safetensors_with_overlay(tmp_path):
    source = random_dinov2("vit_base_patch14_reg4_dinov2")
    safetensors.torch.save_file(source.state_dict(), tmp_path / "model.safetensors")
    model = timm.create_model(
        "vit_base_patch14_reg4_dinov2_sinder",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")),
        **SMALL,
    )
    assert_same_weights(model, source)


def _record_torch_load(monkeypatch) -> list:
    calls, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("weights_only")) or real_load(*a, **k))
    return calls


def test_local_authors_pth_with_overlay(tmp_path, monkeypatch):
    source = random_dinov2("vit_large_patch14_dinov2")
    torch.save(authors_state_dict(source, stray_registers=True), tmp_path / "dinov2l_sinder.pth")
    weights_only = _record_torch_load(monkeypatch)
    with pytest.warns(UserWarning, match="dropping register_tokens"):
        model = timm.create_model(
            "vit_large_patch14_dinov2_sinder",
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(tmp_path / "dinov2l_sinder.pth")),
            **SMALL,
        )
    assert weights_only == [True]
    assert_same_weights(model, source)


def test_giant_downloads_the_authors_file_from_the_hub(tmp_path, monkeypatch):
    """timm's own hub path (hf_hub_id + hf_hub_filename) with the download faked: a shrunken giant whose
    authors'-layout checkpoint has an empty ``register_tokens`` loads with weights_only=True."""
    source = random_dinov2("vit_giant_patch14_dinov2")
    torch.save(authors_state_dict(source, stray_registers=True), tmp_path / "dinov2g_sinder.pth")
    downloads = []

    def hf_hub_download(repo_id, filename, **kwargs):
        downloads.append((repo_id, filename))
        return str(tmp_path / filename)

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", hf_hub_download)
    weights_only = _record_torch_load(monkeypatch)
    with pytest.warns(UserWarning, match="dropping register_tokens"):
        model = timm.create_model("vit_giant_patch14_dinov2_sinder", pretrained=True, **SMALL)
    assert downloads == [("haoqiwang/sinder", "dinov2g_sinder.pth")] and weights_only == [True]
    assert_same_weights(model, source)
