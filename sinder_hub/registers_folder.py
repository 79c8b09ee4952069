"""A test-time-registers folder: what ``sinder-hub registers`` writes, and a model spec ``load_backbone`` takes.

    OUT/test_time_registers.json   the base model spec and its sha256, the register neurons with their
                                   scores, every setting and where it came from, the images searched
    OUT/registers_report.json      held-out defects before / after and cosines to the original (``RegistersReport``)
    OUT/before_after_<image>.png   last-block token norms and PCA, original vs with test-time registers

``find_registers(config)`` makes one with the same run-folder rules as a repair (never overwritten unless
``overwrite``, nothing removed before the model loaded, a lock, ``INCOMPLETE`` until the report is in
place); ``load_registers_folder(path)`` loads the base model, checks its weights are the ones searched, and
applies the edit (``registers.apply_test_time_registers``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from . import backbones, registers, report
from .data import (
    HELD_OUT_SAMPLES,
    MAX_PIXELS,
    SAMPLE_IMAGE_NAMES,
    ImageFiles,
    list_images,
    normalization_of,
    sample_images,
    sinder_transform,
)
from .errors import BackboneError, InputError, check_flags
from .files import write_text_atomic
from .registers_search import NUM_IMAGES, find_register_neurons
from .runs import INCOMPLETE, RunFiles, RunFolder

REGISTERS_FILE = backbones.REGISTERS_FILE
REGISTERS_REPORT = "registers_report.json"
REGISTERS_FILES = RunFiles(
    kind="test-time registers run",
    report=REGISTERS_REPORT,
    names=(REGISTERS_FILE, REGISTERS_REPORT, INCOMPLETE),
    patterns=("before_after_*.png",),
)


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
            ("images", bool(self.images), "a folder of images or a text file listing image paths"),
            ("num_images", self.num_images >= 1, "at least 1"),
            ("resolution", self.resolution >= 0, "0 (the model's own) or a positive multiple of its patch size"),
            ("threshold", self.threshold is None or self.threshold > 0, "a positive token norm"),
            ("top_k", self.top_k is None or self.top_k >= 1, "at least 1 neuron"),
            ("highest_layer", self.highest_layer is None or self.highest_layer >= 0, "a block index (0 or more)"),
            ("max_pixels", self.max_pixels >= 1, "a positive number of pixels"),
            ("held_out", bool(self.held_out) and all(n in SAMPLE_IMAGE_NAMES for n in self.held_out),
             f"names among {', '.join(SAMPLE_IMAGE_NAMES)}"),
        ]  # fmt: skip
        check_flags(self, checks)


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
    """``ImageFiles`` as the search wants them: a normalised ``[3, R, R]`` tensor, or ``None`` for a bad file."""

    def __init__(self, files: ImageFiles):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        return self.files[index][1]


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
    folder.acquire()
    try:
        model = backbones.load_backbone(config.model)
        if registers.registers_of(model) is not None:
            raise InputError(f"--model {config.model} already carries test-time registers; give its base model")
        resolution = config.resolution or backbones.native_resolution(config.model, model)
        if resolution % model.patch_embed.patch_size[0]:
            raise InputError(f"--resolution {resolution}: expected a multiple of the model's patch size")
        sha256 = backbones.weights_sha256(config.model, model)
        folder.begin()
        result = _search_and_measure(config, model, paths, resolution, sha256, folder.path)
        result.wall_time_s = round(time.perf_counter() - started, 2)
        result.write(folder.path / REGISTERS_REPORT)
        folder.finished()
    except BaseException:
        folder.release(failed=True)
        raise
    folder.release()
    return result


def _search_and_measure(config, model, paths, resolution, sha256, output: Path) -> RegistersReport:
    """The search, the registers file, the held-out comparison and its pictures."""
    files = ImageFiles(paths, resolution, max_pixels=config.max_pixels, model=model)
    found = find_register_neurons(
        model, _Images(files), base_model=_base_spec(config.model), base_sha256=sha256,
        num_images=config.num_images, seed=config.seed, detection_block=config.detection_block,
        threshold=config.threshold, highest_layer=config.highest_layer, top_k=config.top_k,
        sparsity_filter=not config.no_sparsity_filter,
    )  # fmt: skip
    write_text_atomic(output / REGISTERS_FILE, found.to_json())
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
    return RegistersReport(
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
    """The base model of a registers folder with the edit applied; ``BackboneError`` when the base model
    cannot be loaded or its weights are not the ones the neurons were found on."""
    path = Path(path)
    file = path / REGISTERS_FILE
    found = registers.TestTimeRegisters.from_json(file.read_text(encoding="utf-8"), str(file))
    base = found.base_model
    if Path(base).resolve() == path.resolve():
        raise BackboneError(f"{file}: its base model is the folder itself")
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
