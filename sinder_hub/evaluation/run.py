"""One ``sinder-hub evaluate``: variants x datasets x protocols, checked up front, run in a fixed order, tabled.

``plan_cells`` reads the layouts (names only), ``check_datasets`` reads every mask and depth map
(main process), ``evaluate_variants`` loads the variants that have no finished results (a bad
spec fails before any work), runs every cell with the same data order and seeds for each, and
writes the output folder after each variant.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .. import __version__
from ..data import NORMALIZATION_SOURCE, normalization_of
from ..errors import DataError, InputError
from .depth import linear_depth
from .features import (
    class_and_mean_encoder,
    class_token_encoder,
    depth_token_encoder,
    patch_token_encoder,
)
from .kmeans import FIT_HINT, kmeans_segmentation
from .knn import knn_evaluate
from .layouts import LAYOUTS, TASK_KINDS, TASK_SPLITS, EvalDataset, dataset_for, detect_layout, open_dataset, subset
from .linear import linear_classification
from .linseg import linear_probe_segmentation
from .protocols import task_settings
from .splits import DatasetOptions
from .streaming import Streaming
from .table import FORMAT, GENERATOR, OutputFolder, dataset_sha256, key_of, weights_sha256
from .targets import TargetSummary, check_targets

LAYERED = ("linseg", "depth")
LINEAR_INPUTS = ("class", "class+mean")
TABLE_METRICS = {
    "knn": ("top1",),
    "linear": ("top1",),
    "linseg": ("miou",),
    "kmeans": ("miou",),
    "depth": ("rmse", "delta1"),
}
OVERRIDES = (  # EvaluationSettings fields a preset gives unless the flag is given (None = not given)
    "resolution",
    "batch_size",
    "iterations",
    "learning_rate",
    "weight_decay",
    "schedule",
    "warmup",
    "train_crop",
    "test_mode",
    "test_resolution",
    "multiscale",
    "gradient_loss",
    "resize_ratio",
    "fit_split",
)


@dataclass(frozen=True)
class EvaluationSettings:
    """Every setting that changes a figure (workers, ``--max-pixels`` and the process count do not)."""

    protocol: str = "dinov2"
    resolution: int | None = None
    batch_size: int | None = None
    seed: int = 0
    max_images: int | None = None
    layers: tuple[int, ...] = (1,)
    linear_input: str = "class+mean"
    iterations: int | None = None
    learning_rate: float | None = None
    clusters: int | None = None
    num_classes: int | None = None
    precision: str = "fp32"
    k: int = 20
    temperature: float = 0.07
    dataset_options: DatasetOptions = field(default_factory=DatasetOptions)  # --depth-scale, --split-file
    weight_decay: float | None = None
    schedule: str | None = None
    warmup: int | None = None
    train_crop: str | None = None
    test_mode: str | None = None
    test_resolution: int | None = None
    multiscale: bool | None = None
    gradient_loss: float | None = None
    resize_ratio: float | None = None
    fit_split: str | None = None

    def task(self, task: str) -> dict:
        """The protocol's settings of ``task`` with the flags given on top (``protocols.task_settings``)."""
        return task_settings(self.protocol, task, {name: getattr(self, name) for name in OVERRIDES})


@dataclass(frozen=True)
class Cell:
    """One protocol on one dataset: a group of table columns."""

    name: str  # the dataset's name in the table
    dataset: EvalDataset = field(compare=False)
    task: str
    layers: int | None = None

    @property
    def id(self) -> str:
        return f"{self.name}/{self.task}" + (f"-L{self.layers}" if self.layers else "")

    def settings(self, settings: EvaluationSettings) -> dict:
        """The settings this cell's figures depend on: the protocol's values for its task, flags on top."""
        record = {"task": self.task, **settings.task(self.task), "seed": settings.seed, "precision": settings.precision}
        if self.task in ("knn", "linear"):
            record.pop("batch_size", None)  # images per forward pass only
        if self.task == "knn":
            record.update(k=settings.k, temperature=settings.temperature)
        if self.task in LAYERED:
            record.update(layers=self.layers)
        if self.task == "linear":
            record.update(linear_input=settings.linear_input)
        if self.task == "kmeans":
            record.update(clusters=settings.clusters)
        if self.dataset.layout.name == "image-mask-folders":
            record.update(num_classes=settings.num_classes)
        return record

    def title(self, settings: EvaluationSettings) -> str:
        """The column's name, saying what the head is fed and how it is tested: linseg's last block (DINOv2's
        "Linear") or last 4 blocks, "+ multiscale" with DINOv2's multi-scale + flip test (last 4 blocks with
        it: DINOv2's "Multiscale"); depth's last block or 4 spread blocks."""
        if self.task not in LAYERED:
            return f"{self.name} {self.task}"
        if self.task == "depth":
            return f"{self.name} depth {'last block' if self.layers == 1 else f'{self.layers} spread blocks'}"
        blocks = "last block" if self.layers == 1 else f"last {self.layers} blocks"
        return f"{self.name} linseg {blocks}" + (" + multiscale" if settings.task("linseg")["multiscale"] else "")


def _kind(root, layout: str | None, task: str) -> str | None:
    if not root.is_dir():
        dataset_for(root, task, layout)  # raises: not a folder
    name = layout or detect_layout(root)
    if name is not None and name not in LAYOUTS:
        raise InputError(f"--layout {name}: unknown layout; expected one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name].kind if name else None


def plan_cells(tasks: list[str], data: list, layouts: list[str | None], settings: EvaluationSettings) -> list[Cell]:
    """The cells of ``tasks`` on the datasets ``data`` (each task on every dataset it applies to).

    Reads names only (layouts, splits, target files); raises ``DataError`` / ``InputError`` in one
    line for a dataset no task applies to, a task no dataset fits, or a missing part of a layout.
    """
    kinds = [_kind(root, layout, tasks[0]) for root, layout in zip(data, layouts)]
    for task in tasks:
        if not any(kind == TASK_KINDS[task] for kind in kinds):
            if len(data) == 1:
                dataset_for(data[0], task, layouts[0])  # raises the message naming what was found
            raise DataError(f"--task {task}: none of --data is a {TASK_KINDS[task]} dataset")
    cells, names = [], set()
    for root, layout, kind in zip(data, layouts, kinds):
        mine = [task for task in tasks if TASK_KINDS[task] == kind]
        if kind is None:
            open_dataset(root, layout)  # raises: no known layout, naming what was found
        if not mine:
            raise DataError(f"--data {root}: a {kind} dataset, which none of --task {' '.join(tasks)} uses")
        needs = {task: TASK_SPLITS.get(task, ("train", "val")) for task in mine}
        if "kmeans" in needs:
            needs["kmeans"] = tuple(dict.fromkeys((settings.task("kmeans")["fit_split"], "val")))
        splits = tuple(sorted({split for task in mine for split in needs[task]}))
        try:
            dataset = subset(open_dataset(root, layout, splits, options=settings.dataset_options), settings.max_images)
        except DataError as error:
            raise DataError(f"{error}{FIT_HINT}" if "train" in needs.get("kmeans", ()) else str(error)) from error
        name, count = dataset.title, 1
        while name in names:
            count += 1
            name = f"{dataset.title}-{count}"
        names.add(name)
        for task in mine:
            cells += [Cell(name, dataset, task, layers) for layers in (settings.layers if task in LAYERED else (None,))]
    return cells


def settings_record(cells: list[Cell], settings: EvaluationSettings) -> dict:
    """The settings of a results.json: compared with a previous one before any work."""
    data = {}
    for cell in cells:
        data[cell.name] = {
            "root": str(cell.dataset.root.resolve()),
            "layout": cell.dataset.layout.name,
            "images": {split: len(samples) for split, samples in cell.dataset.splits.items()},
        }
    tasks = list(dict.fromkeys(cell.task for cell in cells))
    return {
        **asdict(settings),
        "layers": list(settings.layers),
        "tasks": tasks,
        "cells": [cell.id for cell in cells],
        "data": data,
    }


def check_split_sizes(cells: list[Cell]) -> None:
    """``DataError`` naming the dataset folder and split when a split a cell reads has no images (the
    classification layouts already refuse empty class folders and fewer than two classes)."""
    for cell in cells:
        dataset = cell.dataset
        for split in TASK_SPLITS.get(cell.task, ("train", "val")):
            if not dataset.splits[split]:
                folder = dataset.layout.split_names.get(split, split)
                raise DataError(
                    f"--data {dataset.root}: its {split} split ({folder}) holds no images; {cell.task} needs at least one"
                )


def check_datasets(
    cells: list[Cell], settings: EvaluationSettings, workers: int, progress=None
) -> dict[str, TargetSummary]:
    """Every mask and depth map of every dataset, checked once: ``{dataset name: TargetSummary}``."""
    check_split_sizes(cells)
    summaries = {}
    for cell in cells:
        if cell.name not in summaries:
            splits = tuple(cell.dataset.splits)
            summaries[cell.name] = check_targets(cell.dataset, splits, settings.num_classes, workers, progress)
    return summaries


def check_clusters(cells: list[Cell], settings: EvaluationSettings, summaries: dict, patches: dict) -> None:
    """``InputError`` when a kmeans cell asks for more clusters than its validation images have patch tokens
    (at least ``(resolution / patch)²`` each, for the largest patch of the variants whose patch is known)."""
    patch = max((p for _, p in patches.values() if p), default=None)
    for cell in cells:
        if cell.task != "kmeans" or patch is None:
            continue
        clusters = settings.clusters or summaries[cell.name].num_classes
        resolution = settings.task("kmeans")["resolution"]
        tokens = len(cell.dataset.splits["val"]) * (resolution // patch) ** 2
        if clusters > tokens:
            raise InputError(
                f"--clusters {clusters}: more than the {tokens} patch tokens of {cell.dataset.root}'s val split at "
                f"--resolution {resolution} ({patch}-px patches); expected at most {tokens}"
            )


def patch_size_of(spec: str) -> int | None:
    """A variant's patch side read without its weights: a timm name, a planted fixture, a folder's
    ``config.json`` (timm's or transformers'), a registers folder's base model; ``None`` where only the
    weights say (a ``.pth``, an ``hf-hub:`` id) or the spec is bad (its loader then names the fault)."""
    import timm
    import torch

    from ..planted import PLANTED_VARIANTS
    from ..registers_folder import REGISTERS_FILE

    path = Path(spec).expanduser()
    config, registers = path / "config.json", path / REGISTERS_FILE
    try:
        if spec.startswith("planted-"):
            name, args = PLANTED_VARIANTS[spec]
        elif path.is_dir() and config.is_file():
            found = json.loads(config.read_text(encoding="utf-8"))
            if "architecture" not in found:  # a transformers config
                return int((found.get("vision_config") or found)["patch_size"])
            name, args = found["architecture"], found.get("model_args") or {}
        elif path.is_dir() and registers.is_file():
            base = json.loads(registers.read_text(encoding="utf-8"))["base_model"]
            return None if Path(base).expanduser().resolve() == path.resolve() else patch_size_of(base)
        elif not path.exists() and timm.is_model(spec):
            name, args = spec, {}
        else:
            return None
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **{**args, "dynamic_img_size": True})
        return int(model.patch_embed.patch_size[0])
    except Exception:  # noqa: BLE001 - any fault of the spec is the loader's to name, once it is asked
        return None


def check_resolution(resolution: int | None, patches: dict[str, tuple[str, int | None]]) -> None:
    """``InputError`` naming ``--resolution`` unless it is a whole number of every variant's patches
    (``patches``: ``{label: (spec, patch side or None)}``); ``None`` (no flag): the presets' sizes, 224 px
    where the whole crop is fed and rounded down to whole patches elsewhere."""
    if resolution is None:
        return
    for label, (spec, patch) in patches.items():
        if patch and resolution % patch:
            below, above = resolution // patch * patch, (resolution // patch + 1) * patch
            raise InputError(
                f"--resolution {resolution}: not a multiple of the {patch}-px patches of {label} ({spec}); "
                f"expected e.g. {below or above} or {above}"
            )


def run_cell(model, cell: Cell, settings: EvaluationSettings, summary: TargetSummary, streaming: Streaming) -> dict:
    """One protocol on one dataset with one backbone, with the protocol's settings of its task."""
    precision, seed, chosen = settings.precision, settings.seed, settings.task(cell.task)
    resolution = chosen["resolution"]
    if cell.task == "knn":
        encoder = class_token_encoder(model, precision)
        ratio = chosen["resize_ratio"]
        return knn_evaluate(
            encoder, cell.dataset, resolution, settings.k, settings.temperature, streaming, resize_ratio=ratio
        )
    if cell.task == "linear":
        make = class_token_encoder if settings.linear_input == "class" else class_and_mean_encoder
        return {
            **linear_classification(
                make(model, precision),
                cell.dataset,
                resolution,
                chosen["iterations"],
                seed=seed,
                streaming=streaming,
                resize_ratio=chosen["resize_ratio"],
            ),
            "input": settings.linear_input,
        }
    if cell.task == "kmeans":
        encoder = patch_token_encoder(model, 1, precision)
        return kmeans_segmentation(
            encoder,
            cell.dataset,
            resolution,
            settings.clusters,
            seed,
            streaming=streaming,
            summary=summary,
            fit_split=chosen["fit_split"],
        )
    dense = replace(streaming, batch_size=chosen["batch_size"])
    common = dict(seed=seed, streaming=dense, summary=summary, protocol=settings.protocol, settings=chosen)
    if cell.task == "linseg":
        encoder = patch_token_encoder(model, cell.layers, precision)
        return {**linear_probe_segmentation(encoder, cell.dataset, **common), "layers": cell.layers}
    encoder = depth_token_encoder(model, cell.layers, precision)
    return {**linear_depth(encoder, cell.dataset, **common), "layers": cell.layers}


def data_digests(cells: list[Cell], workers: int = 1, progress=None) -> dict[str, str]:
    """``{dataset name: dataset_sha256}``, each dataset's files read once (main process, before any model)."""
    digests = {}
    for cell in cells:
        if cell.name not in digests:
            digests[cell.name] = dataset_sha256(cell.dataset, workers, progress)
    return digests


def _variant_record(variant, cells: list[Cell], settings: EvaluationSettings, data: dict, digests: dict) -> dict:
    sha256 = weights_sha256(variant.spec)
    key = key_of({"model": variant.spec, "weights_sha256": sha256, "normalization": NORMALIZATION_SOURCE})
    cell_keys = {cell.id: key_of([key, data[cell.name], digests[cell.name], cell.settings(settings)]) for cell in cells}
    return {"label": variant.label, "model": variant.spec, "weights_sha256": sha256, "key": key, "cell_keys": cell_keys}


def new_document(cells: list[Cell], settings: EvaluationSettings) -> dict:
    """A results.json without variants yet: the settings and the table's columns."""
    return {
        "generator": GENERATOR,
        "format": FORMAT,
        "sinder_hub_version": __version__,
        "settings": settings_record(cells, settings),
        "protocol_settings": {task: settings.task(task) for task in dict.fromkeys(cell.task for cell in cells)},
        "columns": [
            {"cell": cell.id, "metric": metric, "title": f"{cell.title(settings)} {metric}"}
            for cell in cells
            for metric in TABLE_METRICS[cell.task]
        ],
        "variants": [],
    }


def evaluate_variants(
    variants,
    cells: list[Cell],
    settings: EvaluationSettings,
    summaries: dict[str, TargetSummary],
    streaming: Streaming,
    load: Callable,
    output: OutputFolder | None = None,
    previous: dict | None = None,
    report: Callable[[str], None] = print,
    digests: dict[str, str] | None = None,
) -> dict:
    """Results of every cell for every variant, reusing the cells of ``previous`` results with the same key
    (the same weights, settings and ``digests``: the data's contents, ``data_digests`` when not given)."""
    document = new_document(cells, settings)
    if digests is None:
        digests = streaming.processes.on_main(lambda: data_digests(cells, max(1, streaming.workers)))
    document["data_sha256"] = digests
    data = document["settings"]["data"]
    records = [_variant_record(variant, cells, settings, data, digests) for variant in variants]
    finished = {}
    for old in (previous or {}).get("variants", []):
        finished.update({entry["key"]: entry for entry in old["cells"].values()})
    todo = [r for r in records if any(key not in finished for key in r["cell_keys"].values())]
    models = {r["label"]: load(r["model"]) for r in todo}  # a bad spec fails before any work
    _check_layers(models, cells, settings)
    for variant in records:
        entry = {key: value for key, value in variant.items() if key != "cell_keys"}
        entry["cells"] = {}
        if variant["label"] not in models:
            report(
                f"{variant['label']}: reusing its finished results in {output.path if output else 'the previous results'}"
            )
        model = models.pop(variant["label"], None)
        model = model.to(streaming.processes.device) if model is not None else None
        for cell in cells:
            key = variant["cell_keys"][cell.id]
            if key in finished:
                entry["cells"][cell.id] = finished[key]
                continue
            streaming.label = variant["label"]
            result = run_cell(model, cell, settings, summaries[cell.name], streaming)
            entry["cells"][cell.id] = {"key": key, "result": result, "normalization": normalization_of(model).to_json()}
        document["variants"].append(entry)
        del model
        if output is not None:
            streaming.processes.on_main(lambda: output.write(document))
    return document


def _check_layers(models: dict, cells: list[Cell], settings: EvaluationSettings) -> None:
    layers = max((cell.layers for cell in cells if cell.layers), default=1)
    check_resolution(settings.resolution, {label: (label, m.patch_embed.patch_size[0]) for label, m in models.items()})
    for label, model in models.items():
        if layers > len(model.blocks):
            raise InputError(f"--layers {layers}: the variant {label} has only {len(model.blocks)} blocks")
