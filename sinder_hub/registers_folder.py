"""A test-time-registers folder: what ``sinder-hub registers`` writes, and a model spec ``load_backbone`` takes.

    OUT/test_time_registers.json   the base model spec and its sha256, the register neurons with their
                                   scores, every setting and where it came from, the images searched
    OUT/registers_report.json      held-out defects before / after and cosines to the original (``RegistersReport``)
    OUT/before_after_<image>.png   last-block token norms and PCA, original vs with test-time registers

``find_registers(config)`` makes one with the same run-folder rules as a repair (never overwritten unless
``overwrite``, nothing removed before the model loaded, a lock, ``INCOMPLETE`` until the report is in
place), and never in a folder that holds a model or inside the images it reads; the registers file is
written last but the report, so a run that fails or is stopped (SIGINT, SIGTERM) leaves nothing that loads.
``load_registers_folder(path)`` checks the registers file field by field (types, never a bool for a number),
loads the base model (never itself a registers folder), checks its weights are the ones searched, and
applies the edit (``registers.apply_test_time_registers``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import signal
import threading
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from . import backbones, registers, report
from .data import (
    HELD_OUT_SAMPLES,
    IMAGE_SUFFIXES,
    MAX_PIXELS,
    SAMPLE_IMAGE_NAMES,
    ImageFiles,
    list_images,
    normalization_of,
    sample_images,
    sinder_transform,
)
from .errors import BackboneError, DataError, InputError, RunFolderError, SinderError, check_flags
from .files import write_text_atomic
from .registers_search import NUM_IMAGES, TOP_K_CAP, find_register_neurons
from .runs import INCOMPLETE, RunFiles, RunFolder

REGISTERS_FILE = backbones.REGISTERS_FILE
REGISTERS_REPORT = "registers_report.json"
REGISTERS_FILES = RunFiles(
    kind="test-time registers run",
    report=REGISTERS_REPORT,
    names=(REGISTERS_FILE, REGISTERS_REPORT, INCOMPLETE),
    patterns=("before_after_*.png",),
)
MAX_TOP_K = 10 * TOP_K_CAP  # --top-k above it zeroes so many neurons on every patch that the features drift
# what makes a folder a model (a timm or transformers folder, or weights): a registers run never writes beside it
MODEL_FILES = ("config.json", "*.safetensors", "pytorch_model*.bin", "*.pth", "*.pt")


class RunInterrupted(SinderError):
    """SIGINT or SIGTERM stopped a run that cannot be resumed; exit code 130, as an interrupted repair."""

    exit_code = 130


@dataclass
class RegistersConfig:
    """The settings of ``sinder-hub registers``; ``None`` search settings come from the model (see ``registers_search``)."""

    model: str = "vit_large_patch14_dinov2.lvd142m"
    images: str = ""
    output: str = "test-time-registers"
    num_images: int = NUM_IMAGES
    seed: int = 0
    resolution: int = 0  # 0: the model's own (224 for planted-*, 518 for DINOv2)
    detection_block: int | None = None
    threshold: float | None = None
    highest_layer: int | None = None
    top_k: int | None = None
    no_sparsity_filter: bool = False
    held_out: tuple[str, ...] = HELD_OUT_SAMPLES
    max_pixels: int = MAX_PIXELS
    overwrite: bool = False

    def validate(self) -> None:
        """``InputError`` naming the first flag whose value cannot work (no model needed)."""
        checks = [
            ("model", bool(self.model.strip()), "a model spec (timm name, hf-hub:id, folder, planted-swiglu...)"),
            ("images", bool(self.images), "a folder of images or a text file listing image paths"),
            ("num_images", self.num_images >= 1, "at least 1"),
            ("resolution", 0 <= self.resolution <= backbones.MAX_RESOLUTION,
             f"0 (the model's own) or a multiple of its patch size up to {backbones.MAX_RESOLUTION} px"),
            ("threshold", self.threshold is None or self.threshold > 0, "a positive token norm"),
            ("top_k", self.top_k is None or 1 <= self.top_k <= MAX_TOP_K,
             f"1 to {MAX_TOP_K} neurons (ten times the most the authors published)"),
            ("highest_layer", self.highest_layer is None or self.highest_layer >= 0, "a block index (0 or more)"),
            ("max_pixels", self.max_pixels >= 1, "a positive number of pixels"),
            ("held_out", bool(self.held_out) and all(n in SAMPLE_IMAGE_NAMES for n in self.held_out),
             f"names among {', '.join(SAMPLE_IMAGE_NAMES)}"),
        ]  # fmt: skip
        check_flags(self, checks)
        images = Path(self.images).expanduser()
        if images.is_file() and images.suffix.lower() in IMAGE_SUFFIXES:
            raise DataError(
                f"--images {self.images} is an image file; expected a folder of images or a text file listing image paths"
            )


@dataclass
class RegistersReport(report.Record):
    """What a registers run measured (``registers_report.json``)."""

    sinder_hub_version: str | None = None
    base_model: str | None = None
    base_sha256: str | None = None
    neurons: list[list] = field(default_factory=list)  # [layer, unit, score]
    settings: dict = field(default_factory=dict)  # every search setting and its source
    images: dict = field(default_factory=dict)  # seen, used, skipped, unreadable
    normalization: dict | None = None  # data.Normalization.to_json() of the pixels searched and measured
    held_out: report.HeldOut | None = None
    search_seconds: float | None = None
    wall_time_s: float | None = None
    pictures: list[str] = field(default_factory=list)
    schema_version: int = 2  # 2: normalization recorded


class _Images(Dataset):
    """``ImageFiles`` as the search wants them: a normalised ``[3, R, R]`` tensor, or ``None`` for a bad file;
    counts what it served, so that a search that saw no readable image says so."""

    def __init__(self, files: ImageFiles):
        self.files = files
        self.readable, self.unreadable, self.problem = 0, 0, None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        _, image, problem = self.files[index]
        if image is None:
            self.unreadable += 1
            self.problem = self.problem or problem
        else:
            self.readable += 1
        return image

    def check_any_readable(self, source: str) -> None:
        """``DataError`` naming ``--images`` when every image served so far was unreadable (or none was served)."""
        if not self.readable:
            raise DataError(
                f"--images {source}: none of the {self.unreadable} images drawn could be read (e.g. {self.problem}); "
                f"expected image files of at least {self.files.min_size} px a side"
            )


def _base_spec(spec: str) -> str:
    """A path spec made absolute (the folder may be read from elsewhere); names and planted specs as given."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if not spec.startswith(("planted-", "hf-hub:")) and path.exists() else spec


def find_registers(config: RegistersConfig) -> RegistersReport:
    """Find the register neurons of ``config.model`` on ``config.images`` and write the registers folder."""
    started = time.perf_counter()
    config.validate()
    paths = list_images(config.images)
    folder = RunFolder(config.output, overwrite=config.overwrite, files=REGISTERS_FILES)
    folder.check()
    folder.check_inputs({"--model": config.model, "--images": config.images})
    check_output(folder.path, config.images)
    with _interrupting_signals(folder.path):
        folder.acquire()
        try:
            model = backbones.load_backbone(config.model)
            if registers.registers_of(model) is not None:
                raise InputError(f"--model {config.model} already carries test-time registers; give its base model")
            resolution = config.resolution or backbones.native_resolution(config.model, model)
            backbones.check_resolution(model, config.model, resolution)
            sha256 = backbones.weights_sha256(config.model, model)
            folder.begin()
            found, result = _search_and_measure(config, model, paths, resolution, sha256, folder.path)
            result.wall_time_s = round(time.perf_counter() - started, 2)
            write_text_atomic(folder.path / REGISTERS_FILE, found.to_json())
            result.write(folder.path / REGISTERS_REPORT)
            folder.finished()
        except BaseException:
            folder.release(failed=True)
            raise
        folder.release()
    return result


def check_output(output: Path, images: str) -> None:
    """``RunFolderError`` for an ``--output`` that holds a model (even with ``--overwrite``: the folder would mean two
    things) or lies inside the ``--images`` folder (the next search would read the run's own pictures)."""
    entries = sorted(p.name for p in output.iterdir()) if output.is_dir() else []
    held = [name for name in entries if any(fnmatch.fnmatchcase(name, pattern) for pattern in MODEL_FILES)]
    if held:
        raise RunFolderError(
            f"--output {output} holds a model ({', '.join(held[:3])}); a registers folder there would mean two "
            "things (the model, or the registers that edit a base model); choose another folder"
        )
    source, target = Path(images).expanduser().resolve(), output.resolve()
    if source.is_dir() and source in target.parents:
        raise RunFolderError(
            f"--output {output} lies inside --images {images}: a later search there would read this run's pictures; "
            "write the registers folder elsewhere"
        )


@contextlib.contextmanager
def _interrupting_signals(output: Path):
    """SIGINT and SIGTERM raise ``RunInterrupted`` at once (there is nothing to resume; the run cleans up after
    itself); the previous handlers come back afterwards. Only in the main thread, where handlers can be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise RunInterrupted(
            f"interrupted by {signal.Signals(signum).name}: the registers run into --output {output} stopped "
            "before it finished and left nothing that loads; run the command again"
        )

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _search_and_measure(config, model, paths, resolution, sha256, output: Path):
    """The search, the held-out comparison and its pictures: ``(TestTimeRegisters, RegistersReport)``."""
    images = _Images(ImageFiles(paths, resolution, max_pixels=config.max_pixels, model=model))
    try:
        found = find_register_neurons(
            model, images, base_model=_base_spec(config.model), base_sha256=sha256,
            num_images=config.num_images, seed=config.seed, detection_block=config.detection_block,
            threshold=config.threshold, highest_layer=config.highest_layer, top_k=config.top_k,
            sparsity_filter=not config.no_sparsity_filter,
        )  # fmt: skip
    except Exception as error:  # whatever the search fails with on no images, the cause is the images
        images.check_any_readable(config.images)
        raise error
    transform = sinder_transform(resolution, model)
    held_out_images = sample_images(config.held_out)
    images = {name: transform(image)[None] for name, image in held_out_images.items()}
    directions = registers.defect_directions(model)
    before = report.held_out_outputs(model, images, directions)
    registers.apply_test_time_registers(model, found)
    try:
        after = report.held_out_outputs(model, images, directions)
    finally:
        registers.remove_test_time_registers(model)
    pictures = report.write_pictures(held_out_images, before, after, output, labels=("original", "registers"))
    return found, RegistersReport(
        sinder_hub_version=__import__("sinder_hub").__version__,
        base_model=found.base_model,
        base_sha256=sha256,
        neurons=[[n.layer, n.unit, n.score] for n in found.neurons],
        settings=_settings(found),
        normalization=normalization_of(model).to_json(),
        images={key: getattr(found.images, key) for key in ("seen", "used", "skipped", "unreadable")},
        held_out=report.compare_held_out(model, before, after, resolution),
        search_seconds=found.search_seconds,
        pictures=pictures,
    )


def _settings(found: registers.TestTimeRegisters) -> dict:
    from dataclasses import asdict

    return asdict(found.settings) if found.settings is not None else {}


def load_registers_folder(path: str | Path, pretrained: bool = True, **model_kwargs):
    """The base model of a registers folder with the edit applied; ``BackboneError`` when the registers file is
    not one (``read_registers_file``), the base model is itself a registers folder or cannot be loaded, or its
    weights are not the ones the neurons were found on."""
    path = Path(path)
    file = path / REGISTERS_FILE
    found = read_registers_file(file)
    base = found.base_model
    base_path = Path(base).expanduser()
    if not base.startswith(("planted-", "hf-hub:")) and (base_path / REGISTERS_FILE).is_file():
        itself = "the folder itself" if base_path.resolve() == path.resolve() else "another test-time-registers folder"
        raise BackboneError(
            f"{file}: its base model {base} is {itself}; a base model is a model without test-time registers"
        )
    try:
        model = backbones.load_backbone(base, pretrained=pretrained, **model_kwargs)
    except BackboneError as error:
        raise BackboneError(f"{file}: its base model cannot be loaded: {error}") from error
    if pretrained and found.base_sha256 is not None:
        sha256 = backbones.weights_sha256(base, model)
        if sha256 != found.base_sha256:
            raise BackboneError(
                f"{file}: the neurons were found on weights with sha256 {found.base_sha256[:12]}..., but {base} "
                f"now has {sha256[:12]}...; run sinder-hub registers again on these weights"
            )
    return registers.apply_test_time_registers(model, found)


def read_registers_file(file: Path) -> registers.TestTimeRegisters:
    """``test_time_registers.json``, checked field by field against ``TestTimeRegisters`` before it is used:
    ``BackboneError`` naming the file and the first field of the wrong type (a bool is not a number), a missing
    or unknown field, JSON that does not parse or nests too deeply, or an empty base model."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        detail = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise BackboneError(f"{file}: not a valid registers file ({type(error).__name__}: {detail})") from None
    problem = json_problem(data, registers.TestTimeRegisters, "")
    if problem is None and not data["base_model"].strip():
        problem = "base_model: expected a model spec, found an empty string"
    if problem is not None:
        raise BackboneError(f"{file}: {problem}")
    return registers.TestTimeRegisters.from_json(json.dumps(data), str(file))


def json_problem(value, kind, where: str, nullable: bool = False) -> str | None:
    """Where parsed JSON ``value`` does not fit the type ``kind`` (a dataclass, ``X | None``, ``tuple[X, ...]``,
    ``list``, ``dict``, ``int``, ``float``, ``str``, ``bool``), e.g. ``neurons[0].layer: expected an integer, found
    "4"``; ``None`` when it fits. ``bool`` is never taken for a number, nor a number for a ``bool``."""
    name = where or "the file"
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            return f"{name}: expected an object, found {_shown(value)}"
        hints, known = typing.get_type_hints(kind), {item.name: item for item in dataclasses.fields(kind)}
        unknown = sorted(set(value) - set(known))
        if unknown:
            return f"{where + '.' if where else ''}{unknown[0]}: not a field of a registers file"
        for item in known.values():
            inner = f"{where}.{item.name}" if where else item.name
            if item.name not in value:
                required = item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
                if required:
                    return f"{inner}: missing"
            elif (problem := json_problem(value[item.name], hints[item.name], inner)) is not None:
                return problem
        return None
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner_kind,) = [arg for arg in args if arg is not type(None)]
        return json_problem(value, inner_kind, where, nullable=type(None) in args)
    if origin in (tuple, list):
        if not isinstance(value, list):
            return f"{name}: expected a list, found {_shown(value)}"
        items = args[:1] if origin is list or args[-1:] == (Ellipsis,) else args
        if origin is tuple and args[-1:] != (Ellipsis,) and len(value) != len(args):
            return f"{name}: expected a list of {len(args)}, found {len(value)} items"
        for index, item in enumerate(value):
            if (problem := json_problem(item, items[min(index, len(items) - 1)], f"{where}[{index}]")) is not None:
                return problem
        return None
    expected = {int: (int,), float: (int, float), str: (str,), bool: (bool,), dict: (dict,), list: (list,)}
    allowed = expected.get(origin or kind)
    if allowed is None or type(value) in allowed:
        return None
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object"}
    return (
        f"{name}: expected {words.get(origin or kind, 'a list')}{' or null' if nullable else ''}, found {_shown(value)}"
    )


def _shown(value) -> str:
    """A JSON value as the user wrote it, cut short."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
