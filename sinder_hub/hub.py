"""Model cards for repaired backbones, and pushing their folders to the Hugging Face hub.

A folder is either timm's (``config.json`` with ``architecture`` + weights) or transformers'
(``config.json`` with ``model_type`` + weights + ``preprocessor_config.json``); a repair run folder
is a timm folder that also holds ``repair_report.json`` and ``before_after_<image>.png``.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError
from safetensors import safe_open

from .errors import InputError, SinderError
from .files import atomic_path
from .runs import INCOMPLETE

# model_cards/ inside the installed package (a wheel), else at the root of a source checkout
TEMPLATES = Path(__file__).resolve().parent / "model_cards"
if not TEMPLATES.is_dir():
    TEMPLATES = Path(__file__).resolve().parents[1] / "model_cards"
CARD_FILE = "README.md"
CONFIG_FILE = "config.json"
REPORT_FILE = "repair_report.json"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TAGS = ["sinder", "vision", "image-feature-extraction", "singular-defects"]  # and the family's tag (FAMILIES)
REPO_ID_PLACEHOLDER = "your-username/your-repo"
DEFAULT_INTERPOLATION_NOTE = (
    "Below that size transformers' plain `Dinov2Model` resamples them without antialiasing, while timm "
    "(and `Dinov2WithRegistersModel`) antialias, so the two libraries give slightly different features there."
)


CLIP_BIBTEX = """@inproceedings{radford2021clip,
  title         = {Learning Transferable Visual Models From Natural Language Supervision},
  author        = {Radford, Alec and Kim, Jong Wook and Hallacy, Chris and Ramesh, Aditya and Goh, Gabriel and Agarwal, Sandhini and Sastry, Girish and Askell, Amanda and Mishkin, Pamela and Clark, Jack and Krueger, Gretchen and Sutskever, Ilya},
  booktitle     = {International Conference on Machine Learning (ICML)},
  year          = {2021},
  eprint        = {2103.00020},
  archivePrefix = {arXiv}
}"""
DINOV3_BIBTEX = """@article{simeoni2025dinov3,
  title         = {{DINOv3}},
  author        = {Sim{\\'e}oni, Oriane and Vo, Huy V. and Seitzer, Maximilian and Baldassarre, Federico and Oquab, Maxime and others},
  journal       = {arXiv preprint arXiv:2508.10104},
  year          = {2025},
  eprint        = {2508.10104},
  archivePrefix = {arXiv}
}"""
DEIT3_BIBTEX = """@inproceedings{touvron2022deit3,
  title         = {{DeiT III}: Revenge of the {ViT}},
  author        = {Touvron, Hugo and Cord, Matthieu and J{\\'e}gou, Herv{\\'e}},
  booktitle     = {European Conference on Computer Vision (ECCV)},
  year          = {2022},
  eprint        = {2204.07118},
  archivePrefix = {arXiv}
}"""
SIGLIP_BIBTEX = """@inproceedings{zhai2023siglip,
  title         = {Sigmoid Loss for Language Image Pre-Training},
  author        = {Zhai, Xiaohua and Mustafa, Basil and Kolesnikov, Alexander and Beyer, Lucas},
  booktitle     = {International Conference on Computer Vision (ICCV)},
  year          = {2023},
  eprint        = {2303.15343},
  archivePrefix = {arXiv}
}"""
EVA02_BIBTEX = """@article{fang2024eva02,
  title         = {{EVA-02}: A Visual Representation for Neon Genesis},
  author        = {Fang, Yuxin and Sun, Quan and Wang, Xinggang and Huang, Tiejun and Wang, Xinlong and Cao, Yue},
  journal       = {Image and Vision Computing},
  year          = {2024},
  eprint        = {2303.11331},
  archivePrefix = {arXiv}
}"""
DINOV2_BIBTEX = """@article{oquab2024dinov2,
  title         = {{DINOv2}: Learning Robust Visual Features without Supervision},
  author        = {Oquab, Maxime and Darcet, Timoth{\\'e}e and Moutakanni, Th{\\'e}o and Vo, Huy V. and Szafraniec, Marc and Khalidov, Vasil and Fernandez, Pierre and Haziza, Daniel and Massa, Francisco and El-Nouby, Alaaeldin and Howes, Russell and Huang, Po-Yao and Xu, Hu and Sharma, Vasu and Li, Shang-Wen and Galuba, Wojciech and Rabbat, Mike and Assran, Mido and Ballas, Nicolas and Synnaeve, Gabriel and Misra, Ishan and Jegou, Herv{\\'e} and Mairal, Julien and Labatut, Patrick and Joulin, Armand and Bojanowski, Piotr},
  journal       = {Transactions on Machine Learning Research},
  year          = {2024},
  eprint        = {2304.07193},
  archivePrefix = {arXiv}
}"""


@dataclass(frozen=True)
class Family:
    """What a card says about a ViT family: its name, hub tag, license, transformers class (``None``
    without a transformers export), the sentence about other input sizes, and its citation."""

    name: str
    tag: str
    license: str
    license_note: str
    model_class: str | None
    interpolation_note: str
    bibtex: str


_ABS_POS_NOTE = "Check features at other input sizes against the original model before relying on them."
FAMILIES = {
    "dinov2": Family(
        "DINOv2",
        "dinov2",
        "apache-2.0",
        "DINOv2's license (Apache-2.0)",
        "Dinov2Model",
        DEFAULT_INTERPOLATION_NOTE,
        DINOV2_BIBTEX,
    ),
    "dinov3": Family(
        "DINOv3",
        "dinov3",
        "other",
        "the DINOv3 License of the original weights",
        "DINOv3ViTModel",
        "It has no absolute position embedding (RoPE only), so nothing is resampled for other "
        "sizes, but features there still differ from those at the training size.",
        DINOV3_BIBTEX,
    ),
    "clip": Family(
        "CLIP",
        "clip",
        "other",
        "the license of the original CLIP weights (OpenAI: MIT; "
        "OpenCLIP / MetaCLIP checkpoints: see their model cards)",
        "CLIPVisionModel",
        "transformers' `CLIPVisionModel` resamples them only with `interpolate_pos_encoding=True`. " + _ABS_POS_NOTE,
        CLIP_BIBTEX,
    ),
    "deit3": Family(
        "DeiT-III", "deit3", "apache-2.0", "DeiT-III's license (Apache-2.0)", None, _ABS_POS_NOTE, DEIT3_BIBTEX
    ),
    "siglip": Family(
        "SigLIP", "siglip", "apache-2.0", "SigLIP's license (Apache-2.0)", None, _ABS_POS_NOTE, SIGLIP_BIBTEX
    ),
    "eva02": Family(
        "EVA02",
        "eva02",
        "mit",
        "EVA02's license (MIT)",
        None,
        "EVA02 resamples its absolute position embedding and RoPE grid for other sizes. " + _ABS_POS_NOTE,
        EVA02_BIBTEX,
    ),
}
TRANSFORMERS_FAMILIES = {
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2",
    "dinov3_vit": "dinov3",
    "clip_vision_model": "clip",
}


def family_of(architecture: str | None, model_type: str | None = None) -> Family:
    """The family of a timm architecture name or a transformers ``model_type`` (DINOv2 when unknown)."""
    if model_type in TRANSFORMERS_FAMILIES:
        return FAMILIES[TRANSFORMERS_FAMILIES[model_type]]
    name = (architecture or "").lower()
    for key, test in (
        ("dinov3", "dinov3" in name),
        ("dinov2", "dinov2" in name),
        ("clip", "_clip_" in name),
        ("siglip", "siglip" in name),
        ("deit3", name.startswith("deit3")),
        ("eva02", name.startswith("eva02")),
    ):
        if test:
            return FAMILIES[key]
    return FAMILIES["dinov2"]


NO_REPORT_REASON = (
    f"this folder has no `{REPORT_FILE}`, the file in which a sinder-hub repair run records what it "
    "measured. The weights were repaired elsewhere (for example, the SINDER authors' released checkpoint "
    "converted to this format) or the report was not kept, and no figure is shown that was not measured "
    "on this exact checkpoint"
)


class PushError(SinderError, RuntimeError):
    """A push that cannot be done or was refused; the message is one line and never contains the token."""


class UnpushableFolderError(PushError, InputError):
    """A folder that is not a finished, loadable model folder (exit code 2: nothing was attempted)."""


@dataclass(frozen=True)
class PushResult:
    """What a push sends (``files``: name, size in bytes), what it leaves out (``left_out``: name, reason)
    and, unless a dry run, where it went."""

    folder: Path
    repo_id: str
    files: list[tuple[str, int]]
    left_out: list[tuple[str, str]]
    card: str
    card_is_new: bool
    commit_url: str | None = None
    pr_url: str | None = None


# ---------------------------------------------------------------- model cards


def detect_kind(folder: str | Path) -> str:
    """``"timm"`` if ``config.json`` has ``architecture``, ``"transformers"`` if it has ``model_type``."""
    config = _read_json(Path(folder) / CONFIG_FILE)
    if "architecture" in config:
        return "timm"
    if "model_type" in config:
        return "transformers"
    raise InputError(f"{Path(folder) / CONFIG_FILE} has neither 'architecture' (timm) nor 'model_type' (transformers)")


def build_model_card(
    folder: str | Path,
    kind: str | None = None,
    report: dict | str | Path | None = None,
    repo_id: str | None = None,
    interpolation_note: str | None = None,
) -> ModelCard:
    """The model card of ``folder``, figures taken only from the repair report.

    ``report`` is the report itself, a path to it, or ``None`` for ``folder/repair_report.json`` (a card
    without figures, saying why, when that file is missing). ``interpolation_note`` replaces the default
    sentence about position-embedding interpolation (e.g. with measured differences).
    """
    folder = Path(folder)
    kind = kind or detect_kind(folder)
    if kind not in ("timm", "transformers"):
        raise ValueError(f"kind must be 'timm' or 'transformers', not {kind!r}")
    report = _load_report(folder, report)
    config = _read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
    variables = _card_variables(folder, kind, config, report, repo_id)
    family = variables.pop("family")
    variables["interpolation_note"] = interpolation_note or family.interpolation_note
    card_data = ModelCardData(
        license=family.license,
        library_name=kind,
        pipeline_tag="image-feature-extraction",
        tags=[family.tag] + TAGS + [kind],
        base_model=variables["base_model"],
        datasets=_hub_datasets(report),
    )
    return ModelCard.from_template(card_data, template_path=str(TEMPLATES / f"{kind}.md"), **variables)


def write_model_card(
    folder: str | Path,
    kind: str | None = None,
    report: dict | str | Path | None = None,
    repo_id: str | None = None,
    interpolation_note: str | None = None,
) -> Path:
    """Write ``folder/README.md`` (see ``build_model_card``) and return its path."""
    path = Path(folder) / CARD_FILE
    card = str(build_model_card(folder, kind, report, repo_id, interpolation_note))
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


def _hub_datasets(report: dict | None) -> list[str] | None:
    """The repair data as hub dataset ids (``hf://datasets/ORG/NAME`` or a hub-cache snapshot path), else ``None``."""
    data = (report or {}).get("hyperparameters", {}).get("data")
    sources = [data] if isinstance(data, str) else data if isinstance(data, list) else []
    patterns = (r"^hf://datasets/([\w.-]+)/([\w.-]+)", r"datasets--([\w.-]+?)--([\w.-]+)/snapshots/")
    ids = [
        f"{match[1]}/{match[2]}"
        for source in sources
        for pattern in patterns
        if (match := re.search(pattern, str(source)))
    ]
    return ids or None


def _card_variables(folder: Path, kind: str, config: dict, report: dict | None, repo_id: str | None) -> dict:
    """Everything the templates print, formatted here so that the templates stay plain."""
    report = report or {}
    source_model = report.get("source_model")
    model_args = config.get("model_args") or report.get("model_args") or {}
    registers = int(model_args.get("reg_tokens") or config.get("num_register_tokens") or 0)
    architecture = report.get("architecture") or config.get("architecture")
    family = family_of(architecture, config.get("model_type"))
    if family.tag == "dinov3" and not registers and config.get("model_type") is None:
        registers = 4  # timm's DINOv3 ViTs have 4 storage tokens built in
    model_class = family.model_class
    if config.get("model_type") == "dinov2_with_registers":
        model_class = "Dinov2WithRegistersModel"
    prefix = "the class token" if family.tag != "siglip" else "nothing (no class token)"
    if registers:
        kind_of = "storage" if family.tag == "dinov3" else "register"
        prefix = f"the class token and {registers} {kind_of} tokens"
    pictures = [
        name
        for name in report.get("pictures") or sorted(p.name for p in folder.glob("before_after_*.png"))
        if (folder / name).is_file()
    ]
    return {
        "title": repo_id.split("/")[-1] if repo_id else f"{family.name} with its singular defects repaired (SINDER)",
        "family": family,
        "family_name": family.name,
        "license_note": family.license_note,
        "family_bibtex": family.bibtex,
        "clip": family.tag == "clip",
        "rope_only": family.tag == "dinov3",
        "repo_id": repo_id or REPO_ID_PLACEHOLDER,
        "repo_id_known": repo_id is not None,
        "kind": kind,
        "source_model": source_model,
        "source_sha256": report.get("source_sha256"),
        "sinder_hub_version": report.get("sinder_hub_version"),
        "base_model": base_model_of(source_model),
        "architecture": architecture,
        "model_class": model_class,
        "prefix_tokens": (family.tag != "siglip") + registers,
        "prefix_description": prefix,
        "processor_resolution": _processor_resolution(folder),
        "native_resolution": _native_resolution(config),
        "has_report": bool(report),
        "no_report_reason": NO_REPORT_REASON,
        "held_out": _held_out(report.get("held_out")),
        "run_rows": _run_rows(report),
        "hyperparameter_rows": [(key, _value(value)) for key, value in (report.get("hyperparameters") or {}).items()],
        "pictures": pictures,
        "outcome_warning": _outcome_warning(report.get("outcome")),
    }


def _outcome_warning(outcome: Any) -> str | None:
    """A sentence for the card when the report's ``outcome.status`` is not ``ok``, else ``None``."""
    if not isinstance(outcome, dict) or outcome.get("status", "ok") == "ok":
        return None
    status = outcome.get("status")
    what = {"degraded": "reports a degraded outcome", "failed": "failed"}.get(status, f"reports the outcome `{status}`")
    reasons = [" ".join(str(reason).split()) for reason in outcome.get("reasons") or []]  # one paragraph
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
    processor = _read_json(path)
    crop, size = processor.get("crop_size"), processor.get("size")
    if processor.get("do_center_crop", True) and isinstance(crop, dict):
        return crop.get("height")
    return size.get("shortest_edge") or size.get("height") if isinstance(size, dict) else None


def _held_out(held_out: dict | None) -> dict | None:
    """Held-out defect counts per image (before, after) and the feature-preservation cosines."""
    if not held_out:
        return None
    before = (held_out.get("before") or {}).get("defects") or {}
    after = (held_out.get("after") or {}).get("defects") or {}
    names = held_out.get("images") or sorted(set(before) | set(after))
    cosines = [
        (label, _number(held_out[key]))
        for label, key in (("normal patch tokens", "normal_token_cosine"), ("class token", "class_token_cosine"))
        if key in held_out
    ]
    return {
        "resolution": held_out.get("resolution"),
        "rows": [(name, _number(before.get(name, "–")), _number(after.get(name, "–"))) for name in names],
        "total_before": _number((held_out.get("before") or {}).get("total", "–")),
        "total_after": _number((held_out.get("after") or {}).get("total", "–")),
        "defect_reduction": _percent(held_out["defect_reduction"]) if "defect_reduction" in held_out else None,
        "cosines": cosines,
    }


def _run_rows(report: dict) -> list[tuple[str, str]]:
    """(label, value) rows describing the training run, only for the keys the report has."""
    images = report.get("images") or {}
    curve = report.get("clear_rate_curve") or []
    hardware = report.get("hardware") or {}
    histogram = report.get("loss_layer_histogram") or {}
    rows = [
        ("optimiser steps", _number(report.get("steps"))),
        ("steps that changed the singular values", _number(report.get("updates"))),
        ("steps skipped (NaN loss or gradient)", _number(report.get("skipped_nan"))),
        ("training images seen", _number(images.get("seen"))),
        ("… already clear (no update needed)", _number(images.get("clear"))),
        ("… with a loss", _number(images.get("with_loss"))),
        ("… skipped (unreadable files)", _number(images.get("skipped_bad"))),
        ("clear rate when the run stopped", _percent(curve[-1][1]) if curve else None),
        ("stopped because", _code(report.get("stopped_because"))),
        (
            "losses per block",
            ", ".join(f"block {block}: {_number(count)}" for block, count in histogram.items()) or None,
        ),
        ("wall time", f"{_number(report['wall_time_s'])} s" if "wall_time_s" in report else None),
        ("hardware", hardware.get("device")),
        ("processes", _number(hardware.get("num_processes"))),
    ]
    return [(label, value) for label, value in rows if value is not None]


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


def _load_report(folder: Path, report: dict | str | Path | None) -> dict | None:
    if isinstance(report, dict):
        return report
    path = Path(report) if report is not None else folder / REPORT_FILE
    return _read_json(path) if path.is_file() else None


def _read_json(path: Path) -> dict:
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


# ---------------------------------------------------------------- push

# The files a model folder consists of, as export writes them (timm save_for_hf, transformers save_pretrained
# with its shards, the image processor, the card, a repair run's report and pictures), plus pickled weights of
# folders saved without safetensors. push uploads these and nothing else; sub-folders (a run's checkpoint/) stay local.
MODEL_FILES = (
    CONFIG_FILE,
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model-*-of-*.bin",
    "pytorch_model.bin.index.json",
    "preprocessor_config.json",
    CARD_FILE,
    REPORT_FILE,
    "before_after_*.png",
)


@dataclass(frozen=True)
class UploadPlan:
    """What a push sends (``files``: name in the repo -> real path inside the folder) and what it leaves out
    (``left_out``: name, reason; a sub-folder's name ends with ``/``)."""

    files: dict[str, Path]
    left_out: list[tuple[str, str]]


def plan_upload(folder: str | Path) -> UploadPlan:
    """The top-level model files of ``folder`` (``MODEL_FILES``) and, with the reason, every entry left out.

    A symlink is uploaded as the file it points to when that file is inside the folder, and left out
    otherwise; pickled weights beside ``.safetensors`` ones are left out (loaders read the latter). Raises
    ``UnpushableFolderError`` when ``folder`` is not a finished model folder: not a folder, a run marked
    ``INCOMPLETE``, no config or weights left to upload, or a ``.safetensors`` file that does not open.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UnpushableFolderError(f"{folder} is not a folder")
    if (folder / INCOMPLETE).exists():
        raise UnpushableFolderError(f"this run is incomplete: {folder} (finish it with --resume or start again)")
    root = folder.resolve()
    files, left_out = {}, []
    for entry in sorted(folder.iterdir()):
        reason = _left_out_because(entry, root)
        if reason is None:
            files[entry.name] = entry.resolve()
        else:
            left_out.append((entry.name + "/" if reason == "sub-folder" else entry.name, reason))
    if any(name.endswith(".safetensors") for name in files):
        for name in [name for name in files if name.startswith("pytorch_model")]:
            del files[name]
            left_out.append((name, "duplicate weights: the .safetensors ones are uploaded"))
    plan = UploadPlan(files, sorted(left_out))
    _check_plan(folder, plan)
    return plan


def _left_out_because(entry: Path, root: Path) -> str | None:
    """Why push leaves the folder entry ``entry`` out, or ``None`` when it uploads it."""
    if entry.is_symlink():
        try:
            target = entry.resolve()
        except (OSError, RuntimeError):  # a symlink loop
            return "broken symlink"
        if not target.is_relative_to(root):
            return "symlink out of the folder"
    if entry.is_dir():
        return "sub-folder"
    if not any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in MODEL_FILES):
        return "not a model file"
    if not entry.is_file():
        return "broken symlink" if entry.is_symlink() else "not a regular file"
    return None


def _check_plan(folder: Path, plan: UploadPlan) -> None:
    """Refuse a plan without config or weights (naming what was left out and why) or with unloadable safetensors."""
    left_out = {name.rstrip("/"): reason for name, reason in plan.left_out}
    problems = []
    if CONFIG_FILE not in plan.files:
        reason = left_out.get(CONFIG_FILE)
        problems.append(f"{CONFIG_FILE} is left out ({reason})" if reason else f"it has no {CONFIG_FILE}")
    if not any(_is_weights(name) for name in plan.files):
        weights_left_out = [f"{name} is left out ({reason})" for name, reason in left_out.items() if _is_weights(name)]
        problems += weights_left_out or ["it has no weights file (model.safetensors or pytorch_model.bin)"]
    if problems:
        raise UnpushableFolderError(f"{folder} cannot be pushed: {'; '.join(problems)}")
    for name, path in plan.files.items():
        if not name.endswith(".safetensors"):
            continue
        try:
            with safe_open(path, framework="pt"):
                pass
        except Exception as error:  # the header is read and checked against the file size
            raise UnpushableFolderError(
                f"{folder / name} does not load, the file is truncated or corrupt "
                f"({str(error).splitlines()[0] if str(error) else type(error).__name__})"
            ) from error


def _is_weights(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in WEIGHT_PATTERNS)


def _model_card(folder: Path, plan: UploadPlan, repo_id: str) -> tuple[str, bool]:
    """The folder's own README.md if it is uploaded, else a card generated for ``repo_id`` (and ``True``).

    The card is built from a temporary folder of links to the uploaded files only, so that a file left out
    (a report or picture symlinked from elsewhere) never shows in it; nothing is written into ``folder``.
    """
    if CARD_FILE in plan.files:
        return plan.files[CARD_FILE].read_text(encoding="utf-8", errors="replace"), False
    with tempfile.TemporaryDirectory(prefix="sinder-card-") as tmp:
        view = Path(tmp) / folder.resolve().name
        view.mkdir()
        for name, path in plan.files.items():
            os.symlink(path, view / name)
        try:
            return str(build_model_card(view, repo_id=repo_id)), True
        except InputError as error:  # an invalid JSON file, named by its place in the folder
            raise UnpushableFolderError(str(error).replace(str(view), str(folder))) from error


def _commit_operations(folder: Path, plan: UploadPlan, card: str, card_is_new: bool) -> list[CommitOperationAdd]:
    """One addition per uploaded file, read from its real path, and the generated card from memory."""
    operations = []
    for name, path in plan.files.items():
        try:
            operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)))
        except (OSError, ValueError) as error:  # unreadable, or gone since the folder was listed
            reason = error.strerror if isinstance(error, OSError) else "no longer a file"
            raise UnpushableFolderError(f"cannot read {folder / name}: {reason} (nothing was uploaded)") from error
    if card_is_new:
        operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card.encode()))
    return operations


def push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> PushResult:
    """Upload the model files of a folder (``plan_upload``) to the model repo ``repo_id`` (created if needed).

    One commit holds exactly the listed files and README.md: the folder's own, else the model card (kind from
    ``config.json``, figures from ``repair_report.json``) sent from memory. The folder is never written to.
    ``dry_run`` only says what would be sent and what is left out: no token, no network. Failures (no token,
    hub unreachable, upload refused) raise ``PushError``. ``token`` defaults to huggingface_hub's
    ``get_token()`` (``HF_TOKEN``, then the ``hf auth login`` file).
    """
    folder = Path(folder)
    plan = plan_upload(folder)
    card, card_is_new = _model_card(folder, plan, repo_id)
    size_of = {name: path.stat().st_size for name, path in plan.files.items()}
    if card_is_new:
        size_of[CARD_FILE] = len(card.encode())
    sizes = sorted(size_of.items())
    result = PushResult(folder, repo_id, sizes, plan.left_out, card, card_is_new)
    if dry_run:
        return result

    token = token or get_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (nothing was uploaded)")
    operations = _commit_operations(folder, plan, card, card_is_new)
    api = HfApi(token=token)
    with _explained(f"creating {repo_id} on {api.endpoint}", token):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not create_pr:
        with _explained(f"creating branch {revision!r} of {repo_id}", token):
            _ensure_branch(api, repo_id, revision)
    with _explained(f"uploading {folder} to {repo_id}", token):
        commit = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload {folder.name} with sinder-hub",
            revision=revision,
            create_pr=create_pr,
        )
    return PushResult(folder, repo_id, sizes, plan.left_out, card, card_is_new, commit.commit_url, commit.pr_url)


def _ensure_branch(api: HfApi, repo_id: str, branch: str) -> None:
    """Create ``branch`` unless it exists (as ``hf upload --revision`` does)."""
    try:
        api.repo_info(repo_id, revision=branch)
    except RevisionNotFoundError:
        api.create_branch(repo_id, branch=branch, exist_ok=True)


@contextmanager
def _explained(action: str, token: str) -> Iterator[None]:
    """Turn the hub client's HTTP, connection and request errors into a one-line ``PushError``."""
    try:
        yield
    except Exception as exc:
        reason = _reason(exc)
        if reason is None:
            raise
        message = " ".join(f"{action} failed: {reason} (the local folder is unchanged)".split())
        raise PushError(message.replace(token, "***")) from exc


def _reason(exc: BaseException) -> str | None:
    """Why a hub call failed, looking through wrapped exceptions; ``None`` for errors that are bugs."""
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for error in chain:
        if isinstance(error, HfHubHTTPError) and error.response is not None:
            detail = error.server_message or str(error).splitlines()[0]
            return f"the hub answered HTTP {error.response.status_code}: {detail}"
    for error in chain:
        if isinstance(error, _connection_errors()):
            return f"could not reach the hub ({type(error).__name__}: {error})"
    if isinstance(chain[0], ValueError):
        return str(chain[0])
    return None


def _connection_errors() -> tuple[type[BaseException], ...]:
    """Transport-level errors of whichever HTTP client this huggingface_hub uses (requests, httpx or httpx2)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        try:
            client = importlib.import_module(module)
        except ImportError:
            continue
        errors += [getattr(client, name) for name in names if hasattr(client, name)]
    return tuple(errors)
