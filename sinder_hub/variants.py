"""Up to six backbones side by side: ``--model`` (the reference) and ``--compare`` (the others).

``diagnose``, ``evaluate`` and ``view`` compare variants of one backbone, e.g. the original, a
SINDER repair run, a test-time-registers folder, a ``reg4`` model and DVT's denoised and distilled
backbones. Each spec may carry a label, ``LABEL=SPEC``; without one, the first variant is ``original``
and the others are named after what they are (``sinder`` for a repair run folder, ``registers`` for a
test-time-registers folder, ``dvt-denoised`` / ``dvt-distilled`` for a DVT file or ``dvt:`` reference)
or after the spec (a folder's or file's name, a timm name without its tag).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import dvt
from .errors import InputError

MAX_VARIANTS = 6
REFERENCE_LABEL = "original"
LABEL_PATTERN = re.compile(r"[A-Za-z][\w.+-]{0,31}")
# files that say what a folder holds (a repair run, a test-time-registers folder)
KIND_FILES = (("repair_report.json", "sinder"), ("test_time_registers.json", "registers"))


@dataclass(frozen=True)
class Variant:
    """One backbone of a comparison: a short ``label`` for tables and figures and its ``load_backbone`` spec."""

    label: str
    spec: str


def _split_label(text: str) -> tuple[str | None, str]:
    """``"sinder=runs/giant"`` -> ``("sinder", "runs/giant")``; a spec without a label (or an existing path) -> ``(None, text)``."""
    label, sep, spec = text.partition("=")
    if sep and spec and LABEL_PATTERN.fullmatch(label) and not Path(text).expanduser().exists():
        return label, spec
    return None, text


def default_label(spec: str) -> str:
    """A short label for an unlabelled spec (see the module docstring)."""
    dvt_label = dvt.label_of(spec)
    if dvt_label is not None:
        return dvt_label
    path = Path(spec).expanduser()
    if path.is_dir():
        for name, kind in KIND_FILES:
            if (path / name).is_file():
                return kind
        return path.resolve().name or spec
    if path.suffix in (".safetensors", ".pth", ".pt", ".bin"):
        return path.stem
    return spec.removeprefix("hf-hub:").rstrip("/").split("/")[-1].split(".")[0] or spec


def parse_variants(model: str, compare: Sequence[str] | None = None, flag: str = "--compare") -> list[Variant]:
    """``[Variant]`` of ``model`` followed by ``compare``; at most ``MAX_VARIANTS``, labels unique.

    Raises ``InputError`` (one line naming ``flag``) for too many specs or a label given twice.
    """
    texts = [model, *(compare or [])]
    if len(texts) > MAX_VARIANTS:
        raise InputError(
            f"{flag}: at most {MAX_VARIANTS - 1} specs besides --model ({MAX_VARIANTS} variants side by side), "
            f"got {len(texts) - 1}"
        )
    parsed = [_split_label(text) for text in texts]
    explicit = [label for label, _ in parsed if label is not None]
    repeated = sorted({label for label in explicit if explicit.count(label) > 1})
    if repeated:
        raise InputError(f"{flag}: the label {repeated[0]!r} is given twice; expected one label per variant")
    variants, taken = [], set(explicit)
    for index, (label, spec) in enumerate(parsed):
        if label is None:
            base = REFERENCE_LABEL if index == 0 else default_label(spec)
            label, count = base, 1
            while label in taken:
                count += 1
                label = f"{base}-{count}"
        taken.add(label)
        variants.append(Variant(label, spec))
    return variants
