"""Model cards: YAML metadata, figures only from the repair report, runnable snippets, no-report card."""

from __future__ import annotations

import ast
import json
import re

import pytest
from huggingface_hub import ModelCard

from sinder_hub.cards import base_model_of, build_model_card, detect_kind, write_model_card

REPO_ID = "alice/vit-small-dinov2-sinder"
REPORT = {
    "sinder_hub_version": "0.1.0",
    "source_model": "hf-hub:timm/vit_small_patch14_dinov2.lvd142m",
    "source_sha256": "3ed0e9fefe788ddd61d1e26eba67057e9740a064b009256fbafadf6bb95785ca",
    "architecture": "vit_small_patch14_dinov2",
    "model_args": {"img_size": 518},
    "hyperparameters": {
        "resolution": 224,
        "lr": 0.005,
        "momentum": 0.9,
        "mask_thr": 4.0,
        "skip_less_than": 3,
        "limit_layers": 3,
        "kernel": 3,
        "temperature": 0.1,
        "window": 100,
        "stop_clear": 0.75,
        "max_steps": 300,
        "num_images": 12,
        "images_per_step": 1,
        "precision": "float32",
        "seed": 7,
        "data": "hf://datasets/ILSVRC/imagenet-1k",
    },
    "steps": 137,
    "updates": 98,
    "skipped_nan": 1,
    "images": {"seen": 137, "clear": 39, "with_loss": 98, "skipped_bad": 2},
    "bad_files": [{"path": "broken.jpg", "problem": "truncated"}],
    "loss_layer_histogram": {"4": 95, "5": 3},
    "clear_rate_curve": [[50, 0.12], [100, 0.5], [137, 0.7612345]],
    "stopped_because": "clear_rate",
    "wall_time_s": 63.21734,
    "hardware": {"device": "NVIDIA H100 80GB HBM3", "num_processes": 1},
    "held_out": {
        "resolution": 224,
        "images": ["astronaut", "coffee", "camera"],
        "before": {"defects": {"astronaut": 30, "coffee": 12, "camera": 7}, "total": 49},
        "after": {"defects": {"astronaut": 0, "coffee": 1, "camera": 0}, "total": 1},
        "defect_reduction": 0.9795918,
        "normal_token_cosine": 0.99912345,
        "class_token_cosine": 0.9996,
    },
    "pictures": ["before_after_astronaut.png", "before_after_coffee.png"],
}
NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?(?:e[-+]?\d+)?)(%?)(?!\w)")


def timm_folder(path, report=REPORT):
    path.mkdir()
    config = {
        "architecture": "vit_small_patch14_dinov2",
        "num_classes": 0,
        "num_features": 384,
        "pretrained_cfg": {"input_size": [3, 518, 518]},
        "model_args": {"img_size": 518},
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"weights")
    (path / "before_after_astronaut.png").write_bytes(b"png")  # before_after_coffee.png is missing
    if report is not None:
        (path / "repair_report.json").write_text(json.dumps(report))
    return path


def transformers_folder(path, report=REPORT):
    path.mkdir()
    config = {"model_type": "dinov2", "architectures": ["Dinov2Model"], "image_size": 518, "patch_size": 14}
    (path / "config.json").write_text(json.dumps(config))
    (path / "preprocessor_config.json").write_text(json.dumps({"crop_size": {"height": 224, "width": 224}}))
    (path / "model.safetensors").write_bytes(b"weights")
    if report is not None:
        (path / "repair_report.json").write_text(json.dumps(report))
    return path


FOLDERS = {"timm": timm_folder, "transformers": transformers_folder}


def section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def report_values(obj) -> list[float]:
    """Every number in the report: numeric values, and numbers written inside its strings and keys."""
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)]
    if isinstance(obj, str):
        return [float(token) for token, _ in NUMBER.findall(obj)]
    if isinstance(obj, dict):
        return [v for key, value in obj.items() for v in report_values(key) + report_values(value)]
    if isinstance(obj, list):
        return [v for item in obj for v in report_values(item)]
    return []


def numbers_not_in_report(text: str, report: dict) -> list[str]:
    """Numbers printed in ``text`` that no report value rounds to (``N%`` stands for the fraction N/100).

    A number printed with k decimals stands for anything within half a unit of its last digit.
    """
    values = report_values(report)
    missing = []
    for match in NUMBER.finditer(text):
        token, percent = match.groups()
        mantissa, _, exponent = token.partition("e")
        decimals = len(mantissa.partition(".")[2])
        tolerance = 0.5 * 10.0 ** (int(exponent or 0) - decimals) * (1 + 1e-9)
        printed = float(token) / 100 if percent else float(token)
        scale = 100 if percent else 1
        if not any(abs(printed - value) * scale <= tolerance for value in values):
            missing.append(match.group())
    return missing


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("kind", ["timm", "transformers"])
def test_yaml_metadata(tmp_path, kind):
    folder = FOLDERS[kind](tmp_path / kind)
    card = ModelCard.load(write_model_card(folder, kind, repo_id=REPO_ID))
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0"
    assert data["library_name"] == kind
    assert data["pipeline_tag"] == "image-feature-extraction"
    assert {"dinov2", "sinder", "vision", "image-feature-extraction"} <= set(data["tags"])
    assert data["base_model"] == "timm/vit_small_patch14_dinov2.lvd142m"
    assert data["datasets"] == ["ILSVRC/imagenet-1k"]


def test_kind_is_detected_from_config(tmp_path):
    assert detect_kind(timm_folder(tmp_path / "t")) == "timm"
    assert detect_kind(transformers_folder(tmp_path / "h")) == "transformers"
    assert ModelCard.load(write_model_card(tmp_path / "h")).data.library_name == "transformers"
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="architecture"):
        detect_kind(tmp_path / "x")


@pytest.mark.parametrize("kind", ["timm", "transformers"])
def test_every_figure_comes_from_the_report(tmp_path, kind):
    text = ModelCard.load(write_model_card(FOLDERS[kind](tmp_path / kind), kind, repo_id=REPO_ID)).text
    figures = section(text, "Repair report")
    intro = text[: text.index("\n## ")]
    link_targets = re.compile(r"\]\([^)]*\)")  # URLs are not figures
    assert numbers_not_in_report(link_targets.sub("]", intro + figures), REPORT) == []
    # the section really carries the report's figures
    for expected in (
        "| astronaut | 30 | 0 |",
        "**49**",
        "**1**",
        "98.0%",
        "0.999123",
        "0.9996",
        "137",
        "63.2173 s",
        "NVIDIA H100 80GB HBM3",
        "76.1%",
        "`clear_rate`",
        "| `lr` | 0.005 |",
        "block 4: 95",
    ):
        assert expected in figures, expected
    assert "source weights sha256 `3ed0e9fefe" in intro


def test_number_check_catches_an_invented_figure():
    assert numbers_not_in_report("49 defects before, 0.9996 cosine, 98.0% fewer", REPORT) == []
    assert numbers_not_in_report("trained in 12.5 s, 97% fewer defects, cosine 0.97", REPORT) == ["12.5", "97%", "0.97"]


@pytest.mark.parametrize("kind", ["timm", "transformers"])
def test_usage_snippets_are_valid_python(tmp_path, kind):
    text = ModelCard.load(write_model_card(FOLDERS[kind](tmp_path / kind), kind, repo_id=REPO_ID)).text
    blocks = python_blocks(text)
    assert len(blocks) == 1
    ast.parse(blocks[0])
    if kind == "timm":
        assert f'timm.create_model("hf-hub:{REPO_ID}", pretrained=True' in blocks[0]
    else:
        assert f'Dinov2Model.from_pretrained("{REPO_ID}")' in blocks[0]
        assert f'AutoImageProcessor.from_pretrained("{REPO_ID}")' in blocks[0]


def test_picture_is_linked_only_when_present(tmp_path):
    text = build_model_card(timm_folder(tmp_path / "t"), repo_id=REPO_ID).text
    assert "![before_after_astronaut.png](before_after_astronaut.png)" in text
    assert "before_after_coffee.png" not in text


@pytest.mark.parametrize("kind", ["timm", "transformers"])
def test_card_without_report_says_why(tmp_path, kind):
    """Weights repaired elsewhere (the SINDER authors' checkpoint exported): no figure, and why."""
    folder = FOLDERS[kind](tmp_path / kind, report=None)
    card = ModelCard.load(write_model_card(folder, kind, repo_id=REPO_ID, repaired_elsewhere=True))
    assert "No figures are available for this checkpoint" in card.text
    assert "repair_report.json" in section(card.text, "Repair report")
    assert "|" not in section(card.text, "Repair report")
    assert "base_model" not in card.data.to_dict() and "datasets" not in card.data.to_dict()
    for block in python_blocks(card.text):
        ast.parse(block)


def test_interpolation_note_can_be_filled(tmp_path):
    folder = transformers_folder(tmp_path / "h")
    default = build_model_card(folder).text
    assert "without antialiasing" in section(default, "Limitations")
    measured = build_model_card(folder, interpolation_note="At 224 px the features differ by at most 0.01.").text
    assert "At 224 px the features differ by at most 0.01." in section(measured, "Limitations")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("hf-hub:timm/vit_giant_patch14_dinov2.lvd142m", "timm/vit_giant_patch14_dinov2.lvd142m"),
        ("/root/.cache/huggingface/hub/models--facebook--dinov2-giant/snapshots/611a9d4", "facebook/dinov2-giant"),
        ("vit_giant_patch14_dinov2.lvd142m", "timm/vit_giant_patch14_dinov2.lvd142m"),
        ("vit_giant_patch14_dinov2", "timm/vit_giant_patch14_dinov2.lvd142m"),
        ("planted-swiglu", None),
        ("runs/vit_giant", None),  # load_backbone reads ORG/NAME without hf-hub: as a local path
        ("/data/weights/dinov2.safetensors", None),
        (None, None),
    ],
)
def test_base_model_only_for_hub_sources(source, expected):
    assert base_model_of(source) == expected


def test_local_source_omits_base_model(tmp_path):
    weights = tmp_path / "dinov2_vits14.pth"
    weights.write_bytes(b"w")
    report = {
        **REPORT,
        "source_model": str(weights),
        "hyperparameters": {**REPORT["hyperparameters"], "data": str(tmp_path)},
    }
    card = ModelCard.load(write_model_card(timm_folder(tmp_path / "t", report=report), repo_id=REPO_ID))
    assert "base_model" not in card.data.to_dict() and "datasets" not in card.data.to_dict()
    assert "not a model on the hub" in card.text


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("hf://datasets/ILSVRC/imagenet-1k", ["ILSVRC/imagenet-1k"]),
        ("/root/.cache/huggingface/hub/datasets--ILSVRC--imagenet-1k/snapshots/9fb3b0d/train", ["ILSVRC/imagenet-1k"]),
        ("/data/imagenet/train", None),
        (None, None),
    ],
)
def test_datasets_only_for_hub_data(tmp_path, data, expected):
    report = {**REPORT, "hyperparameters": {**REPORT["hyperparameters"], "data": data}}
    card = build_model_card(timm_folder(tmp_path / "t", report=report))
    assert card.data.to_dict().get("datasets") == expected


@pytest.mark.slow
def test_a_built_wheel_carries_the_card_templates(tmp_path, built_wheel):
    """model_cards/ sits at the repository root; an installed wheel must still find it."""
    import os
    import subprocess
    import sys
    import zipfile

    wheel = built_wheel
    names = zipfile.ZipFile(wheel).namelist()
    assert {"sinder_hub/model_cards/timm.md", "sinder_hub/model_cards/transformers.md"} <= set(names)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True
    )
    folder = timm_folder(tmp_path / "repaired")
    code = (
        "import sinder_hub.cards as cards, sys; print(cards.__file__); "
        f"print('## Repair report' in cards.build_model_card({str(folder)!r}, 'timm', repo_id={REPO_ID!r}).text)"
    )
    found = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
    )
    assert found.returncode == 0, found.stderr[-2000:]
    assert found.stdout.split() == [
        str(target / "sinder_hub" / "cards.py"),
        "True",
    ]  # the installed copy, with its templates


def test_a_vit_of_no_known_family_gets_a_truthful_card(tmp_path):
    """A supervised AugReg ViT is neither DINOv2 nor repaired: its card names it and borrows nothing."""
    from sinder_hub import load_backbone
    from sinder_hub.convert import export

    model = load_backbone("vit_small_patch16_224.augreg_in21k", pretrained=False, depth=1)
    card = ModelCard.load(export(model, tmp_path, format="timm", card=True)["timm"] / "README.md")
    assert "vit_small_patch16_224" in card.text.splitlines()[1]  # the title
    assert "DINOv2" not in card.text.replace("such as DINOv2", "") and "oquab" not in card.text
    assert "It has not been repaired" in card.text and "wang2024sinder" not in card.text
    assert card.data.tags == ["vision", "image-feature-extraction", "timm"] and card.data.license == "other"


@pytest.mark.slow
def test_an_export_without_a_report_is_described_as_exported_not_repaired(tmp_path):
    from sinder_hub.convert import export
    from sinder_hub.planted import planted_backbone

    folders = export(planted_backbone("planted-gelu"), tmp_path, format="both", card=True)
    for kind, folder in folders.items():
        card = ModelCard.load(folder / "README.md")
        assert card.text.splitlines()[1] == "# DINOv2 exported with sinder-hub (not repaired)"
        assert "It has not been repaired" in card.text and "## Repair report" not in card.text
        assert "oquab2024dinov2" in card.text and "wang2024sinder" not in card.text  # the family's citation only
        assert "sinder" not in card.data.tags and card.data.tags[0] == "dinov2" and card.data.tags[-1] == kind


def test_the_authors_repaired_checkpoint_is_described_as_repaired_elsewhere(tmp_path):
    import timm

    from sinder_hub.convert import export

    model = timm.create_model("vit_small_patch14_dinov2_sinder", pretrained=False, depth=1)  # an authors'-style name
    card = ModelCard.load(export(model, tmp_path, format="timm", card=True)["timm"] / "README.md")
    assert card.text.splitlines()[1] == "# DINOv2 repaired with SINDER"
    assert "No figures are available for this checkpoint" in card.text and "wang2024sinder" in card.text


@pytest.mark.parametrize("kind", ["timm", "transformers"])
def test_a_local_source_is_named_by_its_sha256_and_never_by_its_path(kind, tmp_path):
    weights = tmp_path / "private" / "alice-checkpoints" / "dinov2_vits14.pth"
    data = tmp_path / "private" / "photos"
    report = {
        **REPORT,
        "source_model": str(weights),
        "hyperparameters": {**REPORT["hyperparameters"], "data": str(data)},
    }
    card = build_model_card(FOLDERS[kind](tmp_path / kind, report=report), repo_id=REPO_ID)
    text = str(card)
    assert str(tmp_path) not in text and "alice-checkpoints" not in text and "photos" not in text
    assert "a local checkpoint" in text and REPORT["source_sha256"] in text
    assert "| `data` | local images (the path is not published) |" in text


@pytest.mark.parametrize("kind", ["timm", "transformers"])
def test_a_derived_model_declares_its_base_and_the_finetune_relation(kind, tmp_path):
    data = build_model_card(FOLDERS[kind](tmp_path / kind), repo_id=REPO_ID).data.to_dict()
    assert data["base_model"] == "timm/vit_small_patch14_dinov2.lvd142m"
    assert data["base_model_relation"] == "finetune"
    assert data["library_name"] == kind and data["pipeline_tag"] == "image-feature-extraction"
    assert data["license"]


@pytest.mark.parametrize("kind", ["timm", "transformers"])
@pytest.mark.parametrize("after", [0, 3])  # none before: 0 -> 0 and 0 -> 3
def test_a_run_that_removed_no_defect_is_not_called_a_repair(kind, after, tmp_path):
    nothing = {"defects": {"astronaut": 0, "coffee": 0, "camera": 0}, "total": 0}
    held_out = {**REPORT["held_out"], "before": nothing, "after": {**nothing, "total": after}, "defect_reduction": None}
    card = build_model_card(FOLDERS[kind](tmp_path / kind, report={**REPORT, "held_out": held_out}), repo_id=None)
    title = card.text.splitlines()[1]
    assert title == "# DINOv2 after a SINDER run that removed no defect (not repaired)"
    intro = card.text[: card.text.index("\n## ")]
    assert "repaired with" not in intro and "The run removed no singular defect" in intro
    assert f"showed\n0 defective patch tokens at the last block before the run and {after} after" in intro
    assert "What was repaired" not in card.text and "| **total** | **0** |" in card.text
