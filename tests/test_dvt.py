"""DVT's released files as variants: files in DVT's exact layouts (random weights, optimizer state beside them) load
strictly; the denoised variant equals a hand-written reference (timm ``Block`` + resampled ``pos_embed`` on the normed
last-block patch tokens); a distilled file is stock timm; six variants side by side; export / push refuse a denoiser."""

from __future__ import annotations

import functools
import json

import pytest
import timm
import torch
from cli_checks import cli, one_error_line
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from sinder_hub import dvt
from sinder_hub.backbones import load_backbone
from sinder_hub.errors import BackboneError, InputError
from sinder_hub.evaluation.features import patch_token_encoder
from sinder_hub.tokens import block_outputs
from sinder_hub.variants import MAX_VARIANTS, parse_variants

BASE = "planted-gelu"
OPTIMIZER = {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]}


def reference_block(dim: int, seed: int) -> Block:
    """DVT's denoiser block, written out by hand, with random weights."""
    torch.manual_seed(seed)
    block = Block(
        dim, num_heads=dim // 64, mlp_ratio=4.0, qkv_bias=True, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6)
    )
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.normal_(0, 0.05)
    return block.eval()


def denoiser_checkpoint(dim: int, grid: int, seed: int = 0) -> tuple[dict, Block, torch.Tensor]:
    """A denoiser file's dict in DVT's layout, its block and its ``pos_embed``."""
    block = reference_block(dim, seed)
    pos = torch.randn(1, grid * grid, dim, generator=torch.Generator().manual_seed(seed)) * 0.02
    state = {f"denoiser.{key}": value for key, value in block.state_dict().items()} | {"pos_embed": pos}
    return {"denoiser": state, "optimizer": OPTIMIZER, "step": 7}, block, pos


def reference_denoised(base: nn.Module, block: Block, pos: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """DVT by hand: the base's final-normed last-block tokens, patch tokens + resampled pos_embed through the block."""
    tokens = base.forward_features(images)
    prefix, patches = tokens[:, : base.num_prefix_tokens], tokens[:, base.num_prefix_tokens :]
    grid = [size // base.patch_embed.patch_size[0] for size in images.shape[-2:]]
    return torch.cat([prefix, block(patches + resample_abs_pos_embed(pos, grid, num_prefix_tokens=0))], dim=1)


@pytest.fixture(scope="module")
def base():
    return load_backbone(BASE)


@pytest.fixture(scope="module")
def files(tmp_path_factory, base):
    """``{kind: path}``: DVT's layouts ``{kind}/planted-gelu.pth`` (a denoiser with a 37x37 grid; a distilled copy of
    the base with perturbed weights and the ``model.`` prefix), and the reference block, pos_embed and weights."""
    root = tmp_path_factory.mktemp("dvt")
    checkpoint, block, pos = denoiser_checkpoint(base.embed_dim, 37)
    generator = torch.Generator().manual_seed(1)
    distilled = {
        key: value + 0.01 * torch.randn(value.shape, generator=generator) for key, value in base.state_dict().items()
    }
    paths = {kind: root / kind / f"{BASE}.pth" for kind in ("voc_denoised", "voc_distilled")}
    for path in paths.values():
        path.parent.mkdir()
    torch.save(checkpoint, paths["voc_denoised"])
    torch.save(
        {"model": {f"model.{k}": v for k, v in distilled.items()}, "optimizer": OPTIMIZER, "step": 7},
        paths["voc_distilled"],
    )
    return {**paths, "block": block, "pos": pos, "distilled": distilled}


@pytest.fixture(scope="module")
def denoised(files):
    return load_backbone(files["voc_denoised"])


@pytest.mark.slow
@pytest.mark.parametrize("size", [(518, 518), (224, 280)])  # DVT's native 37x37 grid, and 16x20
def test_denoised_variant_equals_the_hand_written_reference(base, files, denoised, size):
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference_denoised(base, files["block"], files["pos"], images)
        got = denoised.forward_features(images)
        outputs, base_outputs = block_outputs(denoised, images), block_outputs(base, images)
    assert got.shape == expected.shape and (got - expected).abs().max() < 1e-6
    assert not torch.allclose(got[:, 1:], base.forward_features(images)[:, 1:], atol=1e-3)  # it did denoise
    assert torch.equal(outputs[-1], got)  # "the last block's tokens" are DVT's output, in the final norm's space
    for mine, theirs in zip(outputs[:-1], base_outputs[:-1]):
        assert torch.equal(mine, theirs)  # earlier blocks: the base's raw residual stream
    assert denoised.num_prefix_tokens == base.num_prefix_tokens
    assert torch.equal(denoised.forward_head(got, pre_logits=True), got[:, 0])


def test_multi_layer_readers_get_dvts_choice_by_default_and_the_blocks_on_request(base, denoised):
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        last = patch_token_encoder(denoised, 1)(images)
        four = patch_token_encoder(denoised, 4)(images)
        assert torch.equal(four, last.repeat(1, 1, 1, 4))  # DVT's mmseg heads: the denoised map in each layer's place
        denoised.dvt_layers = "blocks"
        try:
            blocks = patch_token_encoder(denoised, 4)(images)
        finally:
            denoised.dvt_layers = "denoised"
        base_four = patch_token_encoder(base, 4)(images)
    width = base.embed_dim
    assert torch.allclose(blocks[..., : 3 * width], base_four[..., : 3 * width], atol=1e-6)
    assert torch.equal(blocks[..., 3 * width :], last)


@pytest.mark.slow
def test_distilled_file_is_the_stock_timm_model_with_its_weights(base, files):
    model = load_backbone(files["voc_distilled"])
    assert type(model) is VisionTransformer and not dvt.is_denoised(model)
    reference = load_backbone(BASE)
    reference.load_state_dict(files["distilled"], strict=True)
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model.forward_features(images), reference.forward_features(images))
        assert not torch.allclose(model.forward_features(images), base.forward_features(images), atol=1e-3)


@pytest.mark.slow
def test_distilled_file_named_by_its_timm_name_loads_headless(tmp_path):
    """DVT's own naming (timm name with tag): created with num_classes=0 and dynamic_img_size, strictly loaded."""
    stock = timm.create_model("deit3_small_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    path = tmp_path / "imgnet_distilled" / "deit3_small_patch16_224.fb_in1k.pth"
    path.parent.mkdir()
    torch.save(
        {"model": {f"model.{k}": v for k, v in stock.state_dict().items()}, "optimizer": OPTIMIZER, "step": 1}, path
    )
    model = load_backbone(path)
    images = torch.randn(1, 3, 224, 160, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model.forward_features(images), stock.forward_features(images))
    assert model.num_classes == 0


def tiny(name: str, **kwargs) -> nn.Module:
    """A small random member of a DVT-released family (width 64, two blocks), as load_backbone makes them."""
    torch.manual_seed(0)
    model = timm.create_model(
        name, pretrained=False, embed_dim=64, depth=2, num_heads=1, dynamic_img_size=True, **kwargs
    )
    return model.eval()


FAMILIES = {
    "dinov2-reg4": lambda: tiny("vit_small_patch14_reg4_dinov2", img_size=56, num_classes=0),
    "deit3": lambda: tiny("deit3_small_patch16_224", img_size=64, num_classes=0),
    "clip": lambda: tiny("vit_base_patch16_clip_224", img_size=64, num_classes=0),
    "eva02": lambda: tiny("eva02_base_patch16_clip_224", img_size=64, num_classes=0),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_released_family_takes_the_denoiser(family):
    base, model = FAMILIES[family](), FAMILIES[family]()
    grid = 37 if base.patch_embed.patch_size[0] == 14 else 32
    checkpoint, block, pos = denoiser_checkpoint(base.embed_dim, grid, seed=3)
    dvt.denoised_backbone(model, checkpoint["denoiser"], family)
    patch = base.patch_embed.patch_size[0]
    for size in ((grid * patch, grid * patch), (4 * patch, 6 * patch)):
        images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            expected = reference_denoised(base, block, pos, images)
            assert (model.forward_features(images) - expected).abs().max() < 1e-5
            assert torch.equal(block_outputs(model, images)[-1], model.forward_features(images))
            spatial, prefix = model.forward_intermediates(
                images, indices=1, return_prefix_tokens=True, intermediates_only=True
            )[0]
        assert prefix.shape[1] == base.num_prefix_tokens and spatial.shape[-2:] == (size[0] // patch, size[1] // patch)


@pytest.mark.slow
def test_a_denoiser_that_does_not_fit_is_one_line_naming_the_file(tmp_path, base, capsys):
    checkpoint, _, _ = denoiser_checkpoint(128, 37)  # another width than the base's
    path = tmp_path / "voc_denoised" / f"{BASE}.pth"
    path.parent.mkdir()
    torch.save(checkpoint, path)
    with pytest.raises(BackboneError, match="shape mismatch at pos_embed"):
        load_backbone(path)
    checkpoint, _, _ = denoiser_checkpoint(base.embed_dim, 37)
    checkpoint["denoiser"]["pos_embed"] = torch.zeros(1, 37 * 36, base.embed_dim)
    torch.save(checkpoint, path)
    one_error_line(
        capsys, cli(["diagnose", "--model", str(path), "--out", str(tmp_path / "o")]), 2, str(path), "pos_embed"
    )


def test_labels_and_six_variants(files):
    variants = parse_variants(
        BASE, [str(files["voc_denoised"]), str(files["voc_distilled"]), "dvt:imgnet_denoised/x", "a", "b"]
    )
    assert [v.label for v in variants] == ["original", "dvt-denoised", "dvt-distilled", "dvt-denoised-2", "a", "b"]
    assert MAX_VARIANTS == 6
    with pytest.raises(InputError, match="at most 5 specs besides --model"):
        parse_variants(BASE, ["a", "b", "c", "d", "e", "f"])


def hub_cache(root, files) -> None:
    """The denoiser file in the hub cache's layout (refs/main -> snapshots/REV/voc_denoised/planted-gelu.pth)."""
    repo = root / f"models--{dvt.DVT_REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    target = repo / "snapshots" / ("0" * 40) / "voc_denoised" / f"{BASE}.pth"
    target.parent.mkdir(parents=True)
    target.write_bytes(files["voc_denoised"].read_bytes())


def test_a_reference_reads_the_hub_cache_first_and_is_one_line_offline(tmp_path, files, denoised, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    reference = f"dvt:voc_denoised/{BASE}"
    code = cli(["diagnose", "--model", reference, "--out", str(tmp_path / "o")])
    one_error_line(capsys, code, 2, reference, "not in the local cache", "HF_HUB_OFFLINE")
    hub_cache(tmp_path / "hub", files)
    model = load_backbone(reference)
    images = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(model.forward_features(images), denoised.forward_features(images))
    one_error_line(
        capsys, cli(["diagnose", "--model", "dvt:voc_noised/x", "--out", str(tmp_path / "o")]), 2, "voc_denoised"
    )


def test_export_and_push_refuse_a_denoiser_before_it_loads(tmp_path, files, denoised, capsys, monkeypatch):
    from sinder_hub.convert import export

    path = str(files["voc_denoised"])
    with pytest.raises(BackboneError, match="DVT-denoised backbone"):
        export(denoised, tmp_path / "model")
    monkeypatch.setattr("sinder_hub.convert.load_backbone", lambda *a, **k: pytest.fail("a model was loaded"))
    one_error_line(capsys, cli(["export", path, "--to", str(tmp_path / "out")]), 2, path, "DVT-denoised", "base model")
    one_error_line(capsys, cli(["push", path, "--repo-id", "u/m", "--dry-run"]), 2, path, "DVT-denoised")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_distilled_file_exports_as_stock_timm_with_a_card_saying_whose(tmp_path, files):
    from sinder_hub.convert import export

    folders = export(files["voc_distilled"], tmp_path / "out", card=True)
    model = timm.create_model(f"local-dir:{folders['timm']}", pretrained=True).eval()
    reference = load_backbone(files["voc_distilled"])
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(model.forward_features(images), reference.forward_features(images))
    card = (folders["timm"] / "README.md").read_text()
    assert f"voc_distilled/{BASE}.pth" in card and "state no licence" in card
    assert "license: unknown" in card and "apache" not in card.lower()  # not the family's licence


@pytest.mark.slow
def test_diagnose_and_evaluate_take_six_variants(tmp_path, files, capsys):
    from sinder_hub.data import sample_images
    from sinder_hub.synthetic import make_shapes_dataset

    imgnet = files["voc_denoised"].parents[1] / "imgnet_denoised" / f"{BASE}.pth"
    imgnet.parent.mkdir(exist_ok=True)
    torch.save(denoiser_checkpoint(384, 37, seed=5)[0], imgnet)
    compare = [str(files["voc_denoised"]), str(files["voc_distilled"]), str(imgnet), "planted-swiglu", f"again={BASE}"]
    image = tmp_path / "astronaut.png"
    sample_images(["astronaut"])["astronaut"].resize((112, 112)).save(image)
    argv = ["diagnose", "--model", BASE, "--compare", *compare, "--images", str(image), "--resolution", "112"]
    assert cli([*argv, "--method", "expected", "--out", str(tmp_path / "diagnose")]) == 0
    report = json.loads((tmp_path / "diagnose" / "report.json").read_text())
    labels = ["original", "dvt-denoised", "dvt-distilled", "dvt-denoised-2", "planted-swiglu", "again"]
    assert list(report) == labels
    assert report["again"]["blocks"][-1]["defects"] == report["original"]["blocks"][-1]["defects"]
    data = make_shapes_dataset(tmp_path / "shapes", n_per_class=2, size=56) / "segmentation"
    argv = [
        "evaluate",
        "--model",
        BASE,
        "--compare",
        *compare,
        "--task",
        "linseg",
        "--layers",
        "4",
        "--data",
        str(data),
    ]
    assert cli([*argv, "--resolution", "56", "--iterations", "5", "--workers", "0", "--out", str(tmp_path / "ev")]) == 0
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert [variant["label"] for variant in results["variants"]] == labels
    assert all(cell["result"] for variant in results["variants"] for cell in variant["cells"].values())
    capsys.readouterr()


@pytest.mark.slow
def test_the_viewer_lays_six_models_out_in_rows_of_three():
    gradio = pytest.importorskip("gradio")
    from sinder_hub.app import COLUMNS_PER_ROW, build_app

    app = build_app(models=[f"m{index}={BASE}" for index in range(6)])  # one model, loaded once
    by_id = {block.elem_id: block for block in app.blocks.values() if getattr(block, "elem_id", None)}
    rows = [by_id[f"column-{index}"].parent.parent for index in range(6)]
    assert all(isinstance(row, gradio.Row) for row in rows)
    assert [rows.index(row) for row in rows] == [index // COLUMNS_PER_ROW * COLUMNS_PER_ROW for index in range(6)]
    assert by_id["input-image"].parent.parent not in rows  # the input has its row; the models fill two below it


def test_a_denoised_variant_keeps_its_base_models_pixels(tmp_path):
    """The denoiser is fed the base's tokens, so every tool must feed the base its own mean and std (CLIP's here)."""
    from sinder_hub.data import IMAGENET, normalization_of

    base = load_backbone("planted-clip")
    path = tmp_path / "voc_denoised" / "planted-clip.pth"
    path.parent.mkdir()
    torch.save(denoiser_checkpoint(base.embed_dim, 32)[0], path)
    assert normalization_of(load_backbone(path)) == normalization_of(base) != IMAGENET
