"""The comparison of one ``sinder-hub evaluate``: ``results.json``, a Markdown table in the paper's layout and a bar chart.

``results.json`` (written last, atomically, after every finished variant)::

    {"generator": "sinder-hub evaluate", "format": 1,
     "settings": {...every setting but the variants...},
     "columns": [{"cell": "VOC2012/linseg-L1", "metric": "miou", "title": "VOC2012 linseg-L1 miou"}, ...],
     "data_sha256": {dataset name: sha256 of its files' contents},
     "variants": [{"label", "model", "weights_sha256", "key", "cells": {cell: {"key", "result"}}}, ...],
     "files": {"results.md": sha256, "results.png": sha256}}

A cell's key hashes the variant (its spec, and the sha256 of its weights when they are files),
the dataset (root, layout, images per split, and ``data_sha256``: the sha256 of the CONTENTS of
every file the cell reads, see ``dataset_sha256``) and every protocol setting, so a later command
with one more variant reuses the finished ones, and a cell whose weights or data changed is run
again. An output folder whose files are not this command's own, or were made with other settings
or other variants, is refused unless ``--overwrite``; one command at a time writes it (``.lock``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import DataError, InputError, RunFolderError
from ..files import atomic_path, sha256_file, write_text_atomic, writing
from ..runs import LOCK, lock_folder

GENERATOR = "sinder-hub evaluate"
FORMAT = 1
RESULTS_JSON, RESULTS_MD, RESULTS_PNG = "results.json", "results.md", "results.png"
FILES = (RESULTS_JSON, RESULTS_MD, RESULTS_PNG)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".json")
LOWER_IS_BETTER = ("rmse", "abs_rel")
TRIVIAL_MARK = "†"
PANELS_PER_ROW = 4


def _readable_sha256(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as error:
        raise DataError(
            f"{path}: cannot read it ({error.strerror or error}); every listed file must be readable"
        ) from error


def dataset_sha256(dataset, workers: int = 1, progress=None) -> str:
    """sha256 over every sample of every split of an ``EvalDataset``, in order: the split, the image's path
    (relative to the root), the sha256 of its contents, the target (a class name, or the mask / depth file's
    path and contents' sha256), and the class list. Contents, not sizes and times: ``cp -p`` and a file
    rewritten within the clock's granularity keep both. ``workers`` threads read the files."""
    root = dataset.root.resolve()
    files = list(dict.fromkeys(f for samples in dataset.splits.values() for s in samples for f in _files_of(s)))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        hashes = pool.map(_readable_sha256, files)
        if progress is not None:
            hashes = progress(hashes, len(files), f"digest {dataset.title}")
        sha256 = dict(zip(files, hashes))
    digest = hashlib.sha256(json.dumps(dataset.classes).encode())
    for split, samples in sorted(dataset.splits.items()):
        for sample in samples:
            target = dataset.classes[sample.target] if isinstance(sample.target, int) else None
            parts = [split, *(f"{_relative(f, root)}\0{sha256[f]}" for f in _files_of(sample)), str(target)]
            digest.update(("\t".join(parts) + "\n").encode())
    return digest.hexdigest()


def _files_of(sample) -> tuple[Path, ...]:
    return (sample.image,) if isinstance(sample.target, int) else (sample.image, sample.target)


def _relative(path: Path, root: Path) -> str:
    return os.path.relpath(path.resolve(), root)


def weights_sha256(spec: str) -> str | None:
    """sha256 of a spec's weights when they are files (a file, or the weight and config files at a folder's top
    level), else ``None`` (a timm or hub name: the spec alone keys it)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
            digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\0".encode())
        return digest.hexdigest()
    return None


def key_of(record) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


class OutputFolder:
    """``--out DIR``: what it holds, what may be reused, and the atomic writes of the three files."""

    def __init__(self, path: str | Path, overwrite: bool = False, flag: str = "--out"):
        self.path, self.overwrite, self.flag = Path(path), overwrite, flag

    def _refuse(self, reason: str) -> None:
        raise RunFolderError(f"{self.flag} {self.path} {reason}; use --overwrite or another {self.flag}")

    def previous(self, settings: dict, variants) -> dict | None:
        """The results this folder holds that this command may reuse (``None``: nothing to reuse).

        Raises ``RunFolderError`` (one line, before any slow work) unless ``overwrite`` when the
        folder holds files that are not this command's own, or results of other settings or variants.
        """
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"{self.flag} {self.path} is a file; expected a folder for {', '.join(FILES)}")
        present = [name for name in FILES if (self.path / name).exists()]
        if self.overwrite or not present:
            return None
        if RESULTS_JSON not in present:
            self._refuse(f"holds {present[0]} but no {RESULTS_JSON}: not the results of sinder-hub evaluate")
        try:
            document = json.loads((self.path / RESULTS_JSON).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            document = None
        if not isinstance(document, dict) or document.get("generator") != GENERATOR:
            self._refuse(f"holds a {RESULTS_JSON} that sinder-hub evaluate did not write")
        for name in present[1:]:
            if sha256_file(self.path / name) != document.get("files", {}).get(name):
                self._refuse(f"holds a {name} that was changed after sinder-hub evaluate wrote it")
        old = document.get("settings", {})
        for key in sorted(set(old) | set(settings)):
            if old.get(key) != settings.get(key):
                self._refuse(f"holds results made with {key} = {old.get(key)!r}, not {settings.get(key)!r}")
        listed = {(variant.label, variant.spec) for variant in variants}
        for variant in document.get("variants", []):
            if (variant["label"], variant["model"]) not in listed:
                self._refuse(
                    f"holds results of the variant {variant['label']} ({variant['model']}), which this command "
                    "does not list (list it again to keep it)"
                )
        return document

    def check_inputs(self, inputs: list[tuple[str, str]]) -> None:
        """``RunFolderError`` when the folder is, or lies inside, a folder ``(flag, path)`` the command reads: a
        dataset (the results would become its files) or a model folder (they would change its weights' digest)."""
        output = self.path.expanduser().resolve()
        for flag, spec in inputs:
            source = Path(str(spec)).expanduser()
            if source.is_dir() and (output == source.resolve() or source.resolve() in output.parents):
                where = "is" if output == source.resolve() else "lies inside"
                raise RunFolderError(
                    f"{self.flag} {self.path} {where} the {flag} {spec} that the command reads; "
                    f"write the results into another folder"
                )

    def lock(self) -> None:
        """Create the folder if needed and take its ``.lock`` (``RunFolderError``, one line, when another
        command holds it); nothing else in it is touched."""
        with writing(self.path, f"create the {self.flag} folder"):
            self.path.mkdir(parents=True, exist_ok=True)
        lock_folder(self.path, self.flag)

    def unlock(self) -> None:
        (self.path / LOCK).unlink(missing_ok=True)

    def write(self, document: dict) -> None:
        """Write the table, the chart and then ``results.json`` (recording the other two's sha256), each atomically."""
        self.path.mkdir(parents=True, exist_ok=True)
        markdown = markdown_table(document)
        chart = bar_chart(document)
        write_text_atomic(self.path / RESULTS_MD, markdown)
        with atomic_path(self.path / RESULTS_PNG) as tmp:
            tmp.write_bytes(chart)
        document["files"] = {
            RESULTS_MD: hashlib.sha256(markdown.encode("utf-8")).hexdigest(),
            RESULTS_PNG: hashlib.sha256(chart).hexdigest(),
        }
        write_text_atomic(self.path / RESULTS_JSON, json.dumps(document, indent=2))


# --- rendering ---------------------------------------------------------------------------------


def _cell(variant: dict, column: dict):
    """``(value, trivial)`` of a column for a variant (``(None, False)`` when missing)."""
    result = variant["cells"].get(column["cell"], {}).get("result", {})
    return result.get(column["metric"]), column["metric"] in result.get("trivial", [])


def _title(column: dict) -> str:
    arrow = "↓" if column["metric"] in LOWER_IS_BETTER else "↑"
    return f"{column['title']} {arrow}"


def markdown_table(document: dict) -> str:
    """Rows: variants; columns: metrics (``†``: a figure that says nothing about the features, see the notes)."""
    columns = document["columns"]
    lines = [
        "| variant | " + " | ".join(_title(column) for column in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    notes = []
    for variant in document["variants"]:
        values = []
        for column in columns:
            value, trivial = _cell(variant, column)
            values.append("–" if value is None else f"{value:.2f}{TRIVIAL_MARK if trivial else ''}")
        lines.append(f"| {variant['label']} (`{variant['model']}`) | " + " | ".join(values) + " |")
        for cell, entry in variant["cells"].items():
            notes += [f"{cell}: {note}" for note in entry["result"].get("notes", []) if f"{cell}: {note}" not in notes]
    text = "\n".join(lines) + "\n"
    settings = document["settings"]
    text += f"\nProtocol {settings.get('protocol', 'quick')} (every value: results.json), seed {settings['seed']}"
    text += f", at most {settings['max_images']} images per split.\n" if settings.get("max_images") else ".\n"
    if notes:
        text += "\n" + "".join(f"- {TRIVIAL_MARK} {note}\n" for note in notes)
    return text


def bar_chart(document: dict) -> bytes:
    """A PNG: one panel per column (``PANELS_PER_ROW`` to a row), one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns, variants = document["columns"], document["variants"]
    across = min(PANELS_PER_ROW, len(columns))
    down = -(-len(columns) // across)
    width = 1.2 + 0.6 * len(variants)
    figure, axes = plt.subplots(down, across, figsize=(width * across, 2.8 * down), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis in axes.flat[len(columns) :]:
        axis.set_visible(False)
    for axis, column in zip(axes.flat, columns):
        values = [_cell(variant, column)[0] for variant in variants]
        heights = [value if value is not None else 0.0 for value in values]
        bars = axis.bar(range(len(variants)), heights, color=colours[: len(variants)])
        for bar, value in zip(bars, values):
            label = "–" if value is None else f"{value:.3g}"
            axis.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
        axis.set_ylim(0, 1.2 * max(heights + [1e-9]))
        axis.set_xticks(range(len(variants)), [variant["label"] for variant in variants], rotation=30, ha="right")
        axis.set_title(_title(column), fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
