"""Model cards for the backbones sinder-hub writes: what the model is, what was done to it, what was measured.

A folder is timm's (``config.json`` with ``architecture`` + weights) or transformers'
(``config.json`` with ``model_type`` + weights + ``preprocessor_config.json``); a repair run folder
is a timm folder that also holds ``repair_report.json`` and ``before_after_<image>.png``.

The family (name, licence, tags, citation, wording) comes from ``sinder_hub.families``; the
figures only from the repair report (``report.RepairReport``). A card says one of three things:
repaired by sinder-hub (a report, its figures shown), repaired elsewhere (no report, a ``*_sinder``
source such as the SINDER authors' checkpoint: no figure), or exported only (no report: the card
says the model was not repaired here and cites nothing it did not use).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from . import families
from .errors import InputError
from .files import atomic_path
from .planted import PLANTED_VARIANTS
from .report import REPORT_FILE, HeldOut, Outcome, RepairReport

# model_cards/ inside the installed package (a wheel), else at the root of a source checkout
TEMPLATES = Path(__file__).resolve().parent / "model_cards"
if not TEMPLATES.is_dir():
    TEMPLATES = Path(__file__).resolve().parents[1] / "model_cards"
CARD_FILE = "README.md"
CONFIG_FILE = "config.json"
TAGS = ["sinder", "vision", "image-feature-extraction", "singular-defects"]  # after the family's tag
EXPORT_TAGS = ["vision", "image-feature-extraction"]  # a model that was not repaired
REPO_ID_PLACEHOLDER = "your-username/your-repo"
REPAIRED, REPAIRED_ELSEWHERE, EXPORTED = "repaired", "repaired elsewhere", "exported"
REMOVED_NOTHING = "removed nothing"  # a repair run whose held-out defects did not go down (none to begin with)
NO_REPORT_REASON = (
    f"this folder has no `{REPORT_FILE}`, the file in which a sinder-hub repair run records what it "
    "measured. The weights were repaired elsewhere (for example, the SINDER authors' released checkpoint "
    "converted to this format) or the report was not kept, and no figure is shown that was not measured "
    "on this exact checkpoint"
)


def detect_kind(folder: str | Path) -> str:
    """``"timm"`` if ``config.json`` has ``architecture``, ``"transformers"`` if it has ``model_type``."""
    config = read_json(Path(folder) / CONFIG_FILE)
    if "architecture" in config:
        return "timm"
    if "model_type" in config:
        return "transformers"
    raise InputError(f"{Path(folder) / CONFIG_FILE} has neither 'architecture' (timm) nor 'model_type' (transformers)")


def build_model_card(
    folder: str | Path,
    kind: str | None = None,
    report: RepairReport | dict | str | Path | None = None,
    repo_id: str | None = None,
    interpolation_note: str | None = None,
    repaired_elsewhere: bool = False,
) -> ModelCard:
    """The model card of ``folder``, figures taken only from the repair report.

    ``report`` is the report itself (typed or as JSON), a path to it, or ``None`` for
    ``folder/repair_report.json``. Without a report the card says the model was only exported, unless
    ``repaired_elsewhere`` (e.g. the SINDER authors' checkpoint), when it says so and shows no figure.
    ``interpolation_note`` replaces the family's sentence about other input sizes (e.g. with measured
    differences).
    """
    folder = Path(folder)
    kind = kind or detect_kind(folder)
    if kind not in ("timm", "transformers"):
        raise ValueError(f"kind must be 'timm' or 'transformers', not {kind!r}")
    report = load_report(folder, report)
    config = read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
    state = _state(report, repaired_elsewhere)
    variables = card_variables(folder, kind, config, report or RepairReport(), repo_id, state)
    family = variables.pop("family")
    variables["interpolation_note"] = interpolation_note or family.interpolation_note
    card_data = ModelCardData(
        license=family.license,
        library_name=kind,
        pipeline_tag="image-feature-extraction",
        tags=[*([family.tag] if family.tag else []), *(EXPORT_TAGS if state == EXPORTED else TAGS), kind],
        base_model=variables["base_model"],
        base_model_relation="finetune" if variables["base_model"] else None,  # the hub's word for changed weights
        datasets=_hub_datasets(report),
    )
    return ModelCard.from_template(card_data, template_path=str(TEMPLATES / f"{kind}.md"), **variables)


def write_model_card(
    folder: str | Path,
    kind: str | None = None,
    report: RepairReport | dict | str | Path | None = None,
    repo_id: str | None = None,
    interpolation_note: str | None = None,
    repaired_elsewhere: bool = False,
) -> Path:
    """Write ``folder/README.md`` (see ``build_model_card``) and return its path."""
    path = Path(folder) / CARD_FILE
    card = str(build_model_card(folder, kind, report, repo_id, interpolation_note, repaired_elsewhere))
    with atomic_path(path) as tmp:
        tmp.write_text(card, encoding="utf-8")
    return path


def base_model_of(source_model: str | None) -> str | None:
    """The hub repo a repair started from, or ``None`` when the source is not known to be one.

    As in ``load_backbone``: ``hf-hub:ORG/NAME`` is a hub id, a timm name (``vit_giant_patch14_dinov2.lvd142m``,
    with or without its tag) maps to timm's own ``hf_hub_id`` for it, and anything else is a local path
    (``ORG/NAME`` without the prefix too) or a planted model; a path inside the hub cache
    (``.../models--ORG--NAME/snapshots/...``) names its repo.
    """
    if not source_model:
        return None
    if source_model.startswith("hf-hub:"):
        return source_model.removeprefix("hf-hub:")
    if cached := re.search(r"models--([\w.-]+?)--([\w.-]+)/snapshots/", source_model):
        return f"{cached[1]}/{cached[2]}"
    if re.fullmatch(r"[\w-]+(\.[\w-]+)?", source_model):
        import timm.models

        try:
            return timm.models.get_pretrained_cfg(source_model, allow_unregistered=False).hf_hub_id or None
        except RuntimeError:  # not a timm model with pretrained weights (e.g. planted-swiglu)
            return None
    return None


def _state(report: RepairReport | None, repaired_elsewhere: bool) -> str:
    """What the card may say: repaired only when the report's held-out defects went down."""
    if report is None:
        return REPAIRED_ELSEWHERE if repaired_elsewhere else EXPORTED
    held_out = report.held_out
    if held_out is not None and (not held_out.before.total or held_out.after.total >= held_out.before.total):
        return REMOVED_NOTHING
    return REPAIRED


def source_words(source_model: str | None) -> str | None:
    """The source as a public card names it, never a local path: its hub id, a planted fixture's name,
    else "a local checkpoint" (the card gives its weights' sha256 beside it)."""
    if not source_model:
        return None
    if base := base_model_of(source_model):
        return f"`{base}`"
    if source_model in PLANTED_VARIANTS:
        return f"`{source_model}` (a synthetic sinder-hub fixture)"
    return "a local checkpoint"


def _hub_datasets(report: RepairReport | None) -> list[str] | None:
    """The repair data as hub dataset ids (``hf://datasets/ORG/NAME`` or a hub-cache snapshot path), else ``None``."""
    data = (report.hyperparameters if report is not None else {}).get("data")
    sources = [data] if isinstance(data, str) else data if isinstance(data, list) else []
    patterns = (r"^hf://datasets/([\w.-]+)/([\w.-]+)", r"datasets--([\w.-]+?)--([\w.-]+)/snapshots/")
    ids = [f"{m[1]}/{m[2]}" for source in sources for pattern in patterns if (m := re.search(pattern, str(source)))]
    return ids or None


def _prefix_tokens(family: families.Family, config: dict) -> tuple[int, str]:
    """How many tokens precede the patches, and the words for them."""
    model_args = config.get("model_args") or {}
    extra = int(model_args.get("reg_tokens") or config.get("num_register_tokens") or 0)
    if not extra and config.get("model_type") is None:
        extra = family.builtin_extra_tokens
    class_token = int(family.class_token)
    words = "the class token" if class_token else "nothing (no class token)"
    if extra:
        words = f"{'the class token and ' if class_token else ''}{extra} {family.extra_tokens} tokens"
    return class_token + extra, words


def card_variables(
    folder: Path, kind: str, config: dict, report: RepairReport, repo_id: str | None, state: str
) -> dict:
    """Everything the templates print, formatted here so that the templates stay plain."""
    architecture = report.architecture or config.get("architecture")
    family = families.describe(architecture, model_type=config.get("model_type"))
    counterpart = family.transformers
    model_class = counterpart.model_class if counterpart else None
    if config.get("model_type") == "dinov2_with_registers":
        model_class = "Dinov2WithRegistersModel"
    prefix_tokens, prefix_words = _prefix_tokens(family, config)
    name = family.name if family is not families.GENERIC else f"`{architecture}`"
    what = {REPAIRED: "with its singular defects repaired (SINDER)", REPAIRED_ELSEWHERE: "repaired with SINDER",
            EXPORTED: "exported with sinder-hub (not repaired)",
            REMOVED_NOTHING: "after a SINDER run that removed no defect (not repaired)"}[state]  # fmt: skip
    short_name = family.name if family is not families.GENERIC else architecture or "Vision transformer"
    pictures = [n for n in report.pictures or sorted(p.name for p in folder.glob("before_after_*.png"))
                if (folder / n).is_file()]  # fmt: skip
    return {
        "title": repo_id.split("/")[-1] if repo_id else f"{short_name} {what}",
        "family": family,
        "family_name": name,
        "license_note": family.license_note,
        "family_bibtex": family.bibtex or "",
        "final_norm": counterpart.final_norm if counterpart else None,
        "rope_only": not family.absolute_positions,
        "repo_id": repo_id or REPO_ID_PLACEHOLDER,
        "repo_id_known": repo_id is not None,
        "kind": kind,
        "state": state,
        "source_model": source_words(report.source_model),
        "source_sha256": report.source_sha256,
        "sinder_hub_version": report.sinder_hub_version,
        "base_model": base_model_of(report.source_model),
        "architecture": architecture,
        "model_class": model_class,
        "prefix_tokens": prefix_tokens,
        "prefix_description": prefix_words,
        "processor_resolution": _processor_resolution(folder),
        "native_resolution": _native_resolution(config),
        "has_report": state in (REPAIRED, REMOVED_NOTHING),
        "no_report_reason": NO_REPORT_REASON,
        "held_out": _held_out(report.held_out),
        "run_rows": _run_rows(report),
        "hyperparameter_rows": _hyperparameter_rows(report),
        "pictures": pictures,
        "outcome_warning": _outcome_warning(report.outcome),
    }


def _outcome_warning(outcome: Outcome | None) -> str | None:
    """A sentence for the card when the report's ``outcome.status`` is not ``ok``, else ``None``."""
    if outcome is None or outcome.status in (None, "ok"):
        return None
    status = outcome.status
    what = {"degraded": "reports a degraded outcome", "failed": "failed"}.get(status, f"reports the outcome `{status}`")
    reasons = [" ".join(str(reason).split()) for reason in outcome.reasons or []]  # one paragraph
    why = f"Reasons recorded in `{REPORT_FILE}`: {'; '.join(reasons)}." if reasons else "No reason was recorded."
    return f"**Warning: the repair run that produced these weights {what}.** {why} Check the figures below before using this model."


def _native_resolution(config: dict) -> int | None:
    """Input size the position embeddings were trained for, from a timm or transformers config."""
    size = (config.get("model_args") or {}).get("img_size") or config.get("image_size")
    if size is None:
        size = (config.get("pretrained_cfg") or {}).get("input_size", [None])[-1]
    return size[-1] if isinstance(size, (list, tuple)) else size


def _processor_resolution(folder: Path) -> int | None:
    """Crop size fed by the transformers image processor, from ``preprocessor_config.json``."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    processor = read_json(path)
    crop, size = processor.get("crop_size"), processor.get("size")
    if processor.get("do_center_crop", True) and isinstance(crop, dict):
        return crop.get("height")
    return size.get("shortest_edge") or size.get("height") if isinstance(size, dict) else None


def _held_out(held_out: HeldOut | None) -> dict | None:
    """Held-out defect counts per image (before, after) and the feature-preservation cosines."""
    if held_out is None:
        return None
    before, after = held_out.before.defects, held_out.after.defects
    names = held_out.images or sorted(set(before) | set(after))
    cosines = [
        (label, _number(value))
        for label, value in (
            ("normal patch tokens", held_out.normal_token_cosine),
            ("class token", held_out.class_token_cosine),
        )
        if value is not None
    ]
    return {
        "resolution": held_out.resolution,
        "rows": [(name, _number(before.get(name, "–")), _number(after.get(name, "–"))) for name in names],
        "total_before": _number(held_out.before.total) or "–",
        "total_after": _number(held_out.after.total) or "–",
        "defect_reduction": _percent(held_out.defect_reduction),
        "cosines": cosines,
    }


def _run_rows(report: RepairReport) -> list[tuple[str, str]]:
    """(label, value) rows describing the training run, only for what the report holds."""
    images, curve, hardware = report.images, report.clear_rate_curve, report.hardware
    histogram = report.loss_layer_histogram
    rows = [
        ("optimiser steps", _number(report.steps)),
        ("steps that changed the singular values", _number(report.updates)),
        ("steps skipped (NaN loss or gradient)", _number(report.skipped_nan)),
        ("training images seen", _number(images.seen)),
        ("… already clear (no update needed)", _number(images.clear)),
        ("… with a loss", _number(images.with_loss)),
        ("… skipped (unreadable files)", _number(images.skipped_bad)),
        ("clear rate when the run stopped", _percent(curve[-1][1]) if curve else None),
        ("stopped because", _code(report.stopped_because)),
        ("losses per block", ", ".join(f"block {b}: {_number(count)}" for b, count in histogram.items()) or None),
        ("wall time", f"{_number(report.wall_time_s)} s" if report.wall_time_s is not None else None),
        ("hardware", hardware.device),
        ("processes", _number(hardware.num_processes)),
    ]
    return [(label, value) for label, value in rows if value is not None]


def _hyperparameter_rows(report: RepairReport) -> list[tuple[str, str]]:
    """The report's hyperparameters for the card; the training data by its hub dataset id, never a local path."""
    rows = []
    for key, value in report.hyperparameters.items():
        if key == "data":
            ids = _hub_datasets(report)
            value = ", ".join(f"`{i}`" for i in ids) if ids else "local images (the path is not published)"
            rows.append((key, value))
        else:
            rows.append((key, _value(value)))
    return rows


def _number(value: Any) -> str | None:
    """A report number as printed on the card: integers as is, floats to 6 significant digits."""
    if value is None:
        return None
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _percent(fraction: Any) -> str | None:
    return None if fraction is None else f"{100 * float(fraction):.1f}%"


def _code(text: Any) -> str | None:
    return None if text is None else f"`{text}`"


def _value(value: Any) -> str:
    """A hyperparameter for a markdown table cell."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _number(value)
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{json.dumps(value)}`".replace("|", "\\|")


def load_report(folder: Path, report: RepairReport | dict | str | Path | None) -> RepairReport | None:
    """The typed report: given, or read from a path or ``folder/repair_report.json`` (``None`` without one)."""
    if isinstance(report, RepairReport):
        return report
    if isinstance(report, dict):
        return RepairReport.from_json(report)
    path = Path(report) if report is not None else folder / REPORT_FILE
    return RepairReport.from_json(read_json(path)) if path.is_file() else None


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; ``InputError`` naming the file and the position of invalid JSON."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from error
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, found a {type(data).__name__}")
    return data
