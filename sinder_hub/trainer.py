"""The repair loop: SINDER's Algorithm 1, fast, multi-process, resumable.

Read top to bottom: the configuration, the data plan (which image goes where), the two ways
of computing one image's loss (the fast step, and the authors' naive step kept as the
benchmark baseline and test oracle), one optimiser step, checkpoints, held-out evaluation,
the report, and ``repair`` itself.

One optimiser step ("iteration") takes ``images_per_step`` images on every process.
Each image is scanned block by block, each block with an autograd graph of its own of
which only the last ``limit_layers`` are kept (all of them with ``limit_layers = 0``); the
first block with at least ``max(skip_less_than, 1)`` defects gives the loss (eq. 8), which
is back-propagated through the kept graphs only, one block after the other. Gradients of ε
are summed over the step's images and processes and divided by the number of images that
produced a loss. With one image on one process this is exactly the authors' batch-size-1
SGD, and like theirs the run cycles through the images until the clear-rate rule or
``max_steps`` ends it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import shutil
import signal
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import nn
from torch.utils.data import DataLoader

from . import backbones, families
from .analysis import singular_defect_directions
from .data import (
    HELD_OUT_SAMPLES,
    MAX_PIXELS,
    SAMPLE_IMAGE_NAMES,
    ImageFiles,
    collate_one,
    list_images,
    sample_images,
    sinder_transform,
)
from .defects import GAUSSIAN_KERNELS, defect_mask, neighbor_loss
from .errors import InputError, RepairError, RunFolderError
from .files import atomic_path, write_json_atomic
from .runs import REPORT, RunFolder
from .singular_values import (
    factorize_blocks,
    merge_singular_values,
    parametrize_singular_values,
    reference_mode,
    sync_singular_values,
)
from .tokens import patch_grid, prepare_blocks

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "tf32", "bf16")
DIRECTIONS_METHODS = ("sampled", "expected")
MIN_COSINE = 0.9  # a repaired model whose normal tokens move further from the original's is "degraded"


@dataclass
class RepairConfig:
    """Every hyperparameter of a repair run; the defaults reproduce the authors' run."""

    model: str = "vit_giant_patch14_dinov2.lvd142m"
    data: str = ""
    output: str = "sinder-run"
    num_images: int = 30_000
    resolution: int = 518
    lr: float = 0.005
    momentum: float = 0.9
    mask_thr: float = 4.0
    skip_less_than: int = 3
    limit_layers: int = 10
    kernel: int = 3
    temperature: float = 0.1
    window: int = 1000
    stop_clear: float = 0.75
    max_steps: int = 30_000
    images_per_step: int = 1
    precision: str = "tf32"
    checkpoint_blocks: bool = False
    compile: bool = False
    count_batch: int = 4
    seed: int = 0
    directions_method: str = "sampled"
    directions_samples: int = 100_000
    save_every: int = 500
    resume: bool = False
    overwrite: bool = False
    allow_degraded: bool = False
    num_workers: int = 4
    max_pixels: int = MAX_PIXELS
    held_out: tuple[str, ...] = HELD_OUT_SAMPLES
    quiet: bool = False

    # what must match for --resume to continue a run
    RESUME_KEYS = (
        "model",
        "data",
        "num_images",
        "resolution",
        "lr",
        "momentum",
        "mask_thr",
        "skip_less_than",
        "limit_layers",
        "kernel",
        "temperature",
        "window",
        "stop_clear",
        "images_per_step",
        "precision",
        "seed",
        "directions_method",
        "directions_samples",
    )
    HYPERPARAMETERS = (
        "resolution",
        "lr",
        "momentum",
        "mask_thr",
        "skip_less_than",
        "limit_layers",
        "kernel",
        "temperature",
        "window",
        "stop_clear",
        "max_steps",
        "num_images",
        "images_per_step",
        "precision",
        "checkpoint_blocks",
        "compile",
        "count_batch",
        "seed",
        "data",
        "directions_method",
        "directions_samples",
    )

    def hyperparameters(self) -> dict:
        return {key: getattr(self, key) for key in self.HYPERPARAMETERS}

    def validate(self) -> None:
        """Raise ``InputError`` naming the first flag whose value cannot work (no model needed)."""
        checks = [
            ("data", bool(self.data), "a folder of images or a text file listing image paths"),
            ("num_images", self.num_images >= 1, "at least 1"),
            ("resolution", self.resolution >= 1, "a positive multiple of the model's patch size"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "a positive number"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            (
                "mask_thr",
                math.isfinite(self.mask_thr) and self.mask_thr > 0,
                "a positive number of standard deviations",
            ),
            ("skip_less_than", self.skip_less_than >= 0, "0 or more defects"),
            ("limit_layers", self.limit_layers >= 0, "0 (no limit) or a positive number of blocks"),
            ("kernel", self.kernel in GAUSSIAN_KERNELS, f"one of {sorted(GAUSSIAN_KERNELS)}"),
            ("temperature", math.isfinite(self.temperature) and self.temperature > 0, "a positive number"),
            ("window", self.window >= 1, "at least 1 image"),
            ("stop_clear", self.stop_clear > 0, "a positive fraction (above 1 never stops early)"),
            ("max_steps", self.max_steps >= 1, "at least 1"),
            ("images_per_step", self.images_per_step >= 1, "at least 1"),
            ("precision", self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
            ("count_batch", self.count_batch >= 1, "at least 1 block"),
            (
                "directions_method",
                self.directions_method in DIRECTIONS_METHODS,
                f"one of {', '.join(DIRECTIONS_METHODS)}",
            ),
            ("directions_samples", self.directions_samples >= 1, "at least 1"),
            ("save_every", self.save_every >= 0, "0 (only on signals and at the end) or a number of steps"),
            ("num_workers", self.num_workers >= 0, "0 or more"),
            ("max_pixels", self.max_pixels >= 1, "a positive number of pixels"),
            (
                "held_out",
                bool(self.held_out) and all(n in SAMPLE_IMAGE_NAMES for n in self.held_out),
                f"names among {', '.join(SAMPLE_IMAGE_NAMES)}",
            ),
        ]
        for name, ok, expected in checks:
            if not ok:
                value = getattr(self, name)
                shown = " ".join(value) if isinstance(value, tuple) else str(value)
                given = f" {shown}:" if shown else " is required:"
                raise InputError(f"--{name.replace('_', '-')}{given} expected {expected}")


# ----------------------------------------------------------------------------------------
# The data plan: which image each process takes at each step


def select_images(paths: list, num_images: int) -> list:
    """``num_images`` paths at an even stride over the listing (the authors' subset)."""
    stride = max(1, len(paths) // max(num_images, 1))
    return paths[::stride][:num_images]


def data_digest(paths: list[Path]) -> str:
    """sha256 of the selected files' names and sizes: ``--resume`` refuses a changed data set."""
    digest = hashlib.sha256()
    for path in paths:
        size = path.stat().st_size if path.exists() else -1
        digest.update(f"{path}\t{size}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class DataPlan:
    """Step ``t`` takes the images ``(t·K·P + j) mod N`` for ``j < K·P`` (the authors' ``t mod N``
    cycle for ``K = P = 1``); process ``r`` takes the slots ``j = r·K … r·K + K − 1``."""

    num_images: int  # N
    images_per_step: int  # K
    processes: int  # P

    @property
    def per_step(self) -> int:
        return self.images_per_step * self.processes

    def images(self, step: int, rank: int) -> list[int]:
        first = step * self.per_step + rank * self.images_per_step
        return [(first + k) % self.num_images for k in range(self.images_per_step)]

    def sequence(self, rank: int, start_step: int, stop_step: int) -> list[int]:
        """The images process ``rank`` reads, in order, for steps ``start_step … stop_step − 1``."""
        return [index for step in range(start_step, stop_step) for index in self.images(step, rank)]

    def passes(self, steps: int) -> float:
        return steps * self.per_step / self.num_images


# ----------------------------------------------------------------------------------------
# One image's loss: the fast step and the authors' naive step


@dataclass
class ImageLoss:
    """What one image contributed to a step (``block is None``: the image is clear)."""

    block: int | None
    loss: float = 0.0
    defects: int = 0


def _grid(model: nn.Module, tokens: torch.Tensor, image_hw) -> torch.Tensor:
    """``[1, N, D]`` block output -> ``[H, W, D]`` patch grid, at least float32 (detection under bf16)."""
    grid = patch_grid(model, tokens[0], image_hw)
    return grid.float() if grid.dtype in (torch.bfloat16, torch.float16) else grid


def _defect_count(model, tokens, image_hw, direction, config) -> torch.Tensor:
    """Defects in a ``[1, N, D]`` block output, as a 0-d tensor (reading it waits for the device)."""
    mask, _ = defect_mask(_grid(model, tokens, image_hw), direction, mask_thr=config.mask_thr, kernel=config.kernel)
    return mask.sum()


def gives_loss(defects: int, config: RepairConfig) -> bool:
    """Algorithm 1: a block gives the loss with at least ``skip_less_than`` defects, and never with none
    (the authors' code needs one defect, so ``skip_less_than = 0`` behaves like 1)."""
    return defects >= max(config.skip_less_than, 1)


def _loss_at(model, tokens, image_hw, direction, config):
    return neighbor_loss(
        _grid(model, tokens, image_hw),
        direction,
        mask_thr=config.mask_thr,
        kernel=config.kernel,
        temperature=config.temperature,
    )


def _backward(result, block: int) -> ImageLoss:
    if result is None:  # only possible with force_block on a grid without any outlier
        return ImageLoss(block=None)
    result.loss.backward()
    return ImageLoss(block=block, loss=float(result.loss.detach()), defects=int(result.mask.sum()))


def _scan_blocks(model, image, directions, config):
    """Run the blocks one by one, each from a detached copy of the previous block's output so
    that it has an autograd graph of its own; yields ``(index, input, output, defects)``.

    A block's defect count is read (which waits for the device) only once the next block
    has been queued, so a GPU does not idle while the host prepares the next block. A
    caller that stops at block ``i`` should ``close()`` the scan, which frees the block
    queued ahead. With ``config.checkpoint_blocks`` a graph keeps only its block's input
    and the block is run again in the backward (gradient checkpointing: less memory, the
    same gradients, one more forward per back-propagated block).
    """
    image_hw = image.shape[-2:]
    with torch.no_grad():
        x, blocks = prepare_blocks(model, image)
    pending = None
    for index, block in enumerate(blocks):
        inputs = x.detach().requires_grad_()
        if config.checkpoint_blocks:
            x = torch.utils.checkpoint.checkpoint(block, inputs, use_reentrant=False)
        else:
            x = block(inputs)
        with torch.no_grad():
            count = _defect_count(model, x, image_hw, directions[index], config)
        if pending is not None:
            yield pending[0], pending[1], pending[2], int(pending[3])
        pending = (index, inputs, x, count)
    if pending is not None:
        yield pending[0], pending[1], pending[2], int(pending[3])


def fast_image_loss(model, image, directions, config, autocast, force_block: int | None = None) -> ImageLoss:
    """Algorithm 1 for one ``[1, 3, R, R]`` image, computing only what the update needs.

    Each block runs once with an autograd graph of its own (``_scan_blocks``); only the
    graphs of the last ``limit_layers`` blocks are kept (all with ``limit_layers = 0``) and
    no layer is differentiated or factorised until a gradient reaches it. At the first
    block ``i`` that gives a loss (``gives_loss``; or at ``force_block``, for benchmarks,
    which still count every block's defects) the loss is back-propagated through block
    ``i``'s graph, and the gradient at each kept block's input is handed to the graph of
    the block before it. Same gradients as one graph from the start (the naive step); no
    block runs twice and nothing before the window is back-propagated.
    """
    image_hw = image.shape[-2:]
    graphs = deque(maxlen=config.limit_layers or None)  # (input, output) of the window's blocks
    with autocast():
        scan = _scan_blocks(model, image, directions, config)
        for index, inputs, output, defects in scan:
            graphs.append((inputs, output))
            if index == force_block or (force_block is None and gives_loss(defects, config)):
                scan.close()
                result = _loss_at(model, output, image_hw, directions[index], config)
                break
        else:
            return ImageLoss(block=None)
    image_loss = _backward(result, index)
    if image_loss.block is None:
        return image_loss
    graphs = list(graphs)
    for (_, output), (next_inputs, _) in zip(reversed(graphs[:-1]), reversed(graphs[1:])):
        output.backward(next_inputs.grad)
    return image_loss


def _block_and_count(model, block, x, image_hw, direction, config):
    """One block without autograd and its defect count: ``[1, N, D]`` -> (``[1, N, D]``, 0-d count).

    Compiled once by ``compiled_image_loss`` and reused for every block of the same shapes
    (the block is an argument, its weights graph inputs)."""
    y = block(x)
    return y, _defect_count(model, y, image_hw, direction, config)


def _run_block(block, x):
    return block(x)


@functools.cache
def _compiled_block_and_count():
    return torch.compile(_block_and_count, dynamic=False)


@functools.cache
def _compiled_block():
    """One block with autograd (forward and backward compiled), its layers factorised beforehand."""
    return torch.compile(_run_block, dynamic=False)


def compiled_image_loss(model, image, directions, config, autocast, force_block: int | None = None) -> ImageLoss:
    """Algorithm 1 for one ``[1, 3, R, R]`` image with a compiled detection scan (``--compile``).

    The blocks run without autograd through one ``torch.compile``d function (block and
    defect count fused, no autograd graph recorded); the counts stay on the device and are
    read every ``config.count_batch`` blocks, so the scan runs at most ``count_batch − 1``
    blocks past the loss block. Only the inputs of the last ``limit_layers`` blocks are
    kept. For an image with a loss the window is run again with autograd from its first
    block's input, each block compiled with its backward (its layers factorised first, so
    that the compiled backward only projects onto the factors), and back-propagated as in
    the naive step: the same gradients up to the compiled kernels' rounding, for
    ``limit_layers`` more block forwards than ``fast_image_loss``. A clear image costs
    about one no-grad forward.
    """
    image_hw = image.shape[-2:]
    block_and_count = _compiled_block_and_count()
    sync_singular_values(model)  # compiled code reads the weights as they are
    depth, keep = len(model.blocks), config.limit_layers or len(model.blocks)
    found = None
    with torch.no_grad(), autocast():
        x, blocks = prepare_blocks(model, image)
        inputs = deque(maxlen=keep + config.count_batch)  # (index, input) of the latest blocks
        counts = []
        for index, block in enumerate(blocks):
            inputs.append((index, x))
            x, count = block_and_count(model, block, x, image_hw, directions[index], config)
            counts.append(count)
            if len(counts) < config.count_batch and index < depth - 1:
                continue
            first_of_batch = index - len(counts) + 1
            for offset, defects in enumerate(torch.stack(counts).tolist()):
                candidate = first_of_batch + offset
                if candidate == force_block or (force_block is None and gives_loss(int(defects), config)):
                    found = candidate
                    break
            counts = []
            if found is not None:
                break
    if found is None:
        return ImageLoss(block=None)
    start = max(0, found - keep + 1)
    x = next(saved for index, saved in inputs if index == start)
    del inputs
    factorize_blocks(model, range(start, found + 1))
    run_block = _compiled_block()
    with autocast():
        for index in range(start, found + 1):
            if config.checkpoint_blocks:
                x = torch.utils.checkpoint.checkpoint(blocks[index], x, use_reentrant=False)
            else:
                x = run_block(blocks[index], x)
        result = _loss_at(model, x, image_hw, directions[found], config)
    return _backward(result, found)


def naive_image_loss(model, image, directions, config, autocast, force_block: int | None = None) -> ImageLoss:
    """The authors' pattern: every layer's weight rebuilt with autograd on every forward, autograd
    through every block from the start, then the gradients of the blocks outside the window
    discarded (none with ``limit_layers = 0``). Kept as the benchmark baseline and the test oracle."""
    image_hw = image.shape[-2:]
    with autocast(), reference_mode():
        x, blocks = prepare_blocks(model, image)
        for index, block in enumerate(blocks):
            x = block(x)
            defects = int(_defect_count(model, x.detach(), image_hw, directions[index], config))
            if index == force_block or (force_block is None and gives_loss(defects, config)):
                result = _loss_at(model, x, image_hw, directions[index], config)
                break
        else:
            return ImageLoss(block=None)
    loss = _backward(result, index)
    if config.limit_layers:
        for outside in range(0, index - config.limit_layers + 1):
            for parameter in model.blocks[outside].parameters():
                parameter.grad = None
    return loss


# ----------------------------------------------------------------------------------------
# One optimiser step: K images on every process


def synchronise_gradients(parameters: list[nn.Parameter], images_with_loss: int, accelerator) -> int:
    """Sum ε gradients over processes, divide by the step's images with a loss; returns that count.

    A parameter that no image of the step touched keeps ``grad = None`` on every process, so
    SGD leaves it (and its momentum) alone, as in the authors' batch-size-1 loop.
    """
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in parameters])
    touched = torch.tensor([p.grad is not None for p in parameters], dtype=torch.float32, device=flat.device)
    count = torch.tensor([float(images_with_loss)], device=flat.device)
    packed = accelerator.reduce(torch.cat([flat, touched, count]), reduction="sum")
    flat, touched, count = packed[: flat.numel()], packed[flat.numel() : -1], int(packed[-1].item())
    offset = 0
    for parameter, was_touched in zip(parameters, touched.tolist()):
        size = parameter.numel()
        parameter.grad = flat[offset : offset + size].view_as(parameter) / max(count, 1) if was_touched else None
        offset += size
    return count


CLEAR, LOSS, BAD = 1, 0, -1  # what happened to one image slot of a step


@dataclass
class StepResult:
    """One step as every process sees it: per slot (``P·K``, process-major) a flag and a loss block."""

    flags: list[int]  # CLEAR, LOSS or BAD
    blocks: list[int]  # loss block, -1 without a loss
    loss: float  # this process's summed loss
    updated: bool
    nan: bool
    bad_files: list[tuple[int, str]]  # (image index, problem) of the step's unreadable files, all processes


def train_step(model, batch: list, directions, config, autocast, optimizer, parameters, accelerator) -> StepResult:
    """Losses of this process's images (``batch``: ``(index, image | None, problem)``), gradients
    summed over every process, one SGD update unless no image gave a loss or a value is NaN/Inf."""
    optimizer.zero_grad(set_to_none=True)
    flags, blocks, losses, bad = [], [], [], []
    for index, image, problem in batch:
        if image is None:
            flags.append(BAD)
            blocks.append(-1)
            bad.append((index, problem))
            continue
        image_loss = compiled_image_loss if config.compile else fast_image_loss
        result = image_loss(model, image[None].to(accelerator.device, non_blocking=True), directions, config, autocast)
        flags.append(CLEAR if result.block is None else LOSS)
        blocks.append(-1 if result.block is None else result.block)
        losses.append(result.loss)
    local = torch.tensor(flags + blocks, dtype=torch.float32, device=accelerator.device)
    gathered = accelerator.gather(local).view(accelerator.num_processes, 2, len(batch))
    all_flags = [int(f) for f in gathered[:, 0].flatten().tolist()]
    all_blocks = [int(b) for b in gathered[:, 1].flatten().tolist()]
    if BAD in all_flags:
        from accelerate.utils import gather_object

        bad = gather_object(bad) if accelerator.num_processes > 1 else bad
    with_loss = synchronise_gradients(parameters, flags.count(LOSS), accelerator)
    loss = sum(losses)
    finite = math.isfinite(loss) and all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in parameters)
    finite = (
        accelerator.reduce(torch.tensor([0.0 if finite else 1.0], device=accelerator.device), reduction="sum").item()
        == 0
    )
    if with_loss and finite:
        optimizer.step()
    return StepResult(
        flags=all_flags,
        blocks=all_blocks,
        loss=loss,
        updated=bool(with_loss and finite),
        nan=bool(with_loss and not finite),
        bad_files=[tuple(b) for b in bad],
    )


# ----------------------------------------------------------------------------------------
# Training state and checkpoints


@dataclass
class TrainState:
    """Everything a resumed run needs besides ε and the optimiser (which live in their modules)."""

    step: int = 0
    updates: int = 0
    skipped_nan: int = 0
    images_seen: int = 0
    images_clear: int = 0
    images_with_loss: int = 0
    bad_files: list = field(default_factory=list)  # {"path", "problem"}, once per file
    loss_layers: Counter = field(default_factory=Counter)
    clear_window: deque = field(default_factory=deque)
    clear_rate_curve: list = field(default_factory=list)
    elapsed_s: float = 0.0

    def clear_rate(self) -> float:
        return sum(self.clear_window) / max(len(self.clear_window), 1)

    def record(self, step: StepResult, paths: list[Path]) -> None:
        """Count one step's images (identical on every process)."""
        for flag, block in zip(step.flags, step.blocks):
            if flag == BAD:
                continue
            self.images_seen += 1
            self.images_clear += int(flag == CLEAR)
            self.images_with_loss += int(flag == LOSS)
            self.clear_window.append(flag == CLEAR)
            if flag == LOSS:
                self.loss_layers[block] += 1
        if step.bad_files:
            known = {entry["path"] for entry in self.bad_files}
            for index, problem in step.bad_files:
                if str(paths[index]) not in known:
                    log.warning("skipping %s", problem)
                    self.bad_files.append({"path": str(paths[index]), "problem": problem})
                    known.add(str(paths[index]))
        self.updates += int(step.updated)
        self.skipped_nan += int(step.nan)
        self.step += 1
        if self.step % 10 == 0:
            self.clear_rate_curve.append([self.step, self.clear_rate()])


def save_checkpoint(path: Path, state: TrainState, eps: dict, optimizer, config: RepairConfig, digest: str) -> None:
    """Write ε, optimiser, counters, clear window and RNG states atomically, as tensors and plain
    types only, so that ``load_checkpoint`` reads it with ``weights_only=True``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": {key: getattr(config, key) for key in RepairConfig.RESUME_KEYS},
        "data_digest": digest,
        "eps": {name: p.detach().cpu() for name, p in eps.items()},
        "optimizer": optimizer.state_dict(),
        "state": {**asdict(state), "loss_layers": dict(state.loss_layers), "clear_window": list(state.clear_window)},
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: Path, config: RepairConfig, digest: str) -> dict:
    """The checkpoint at ``path`` (never unpickled: ``weights_only=True``), checked to belong to this run."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupt, or holding objects that are not plain data
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise RunFolderError(f"--resume: cannot read checkpoint {path} ({reason})") from None
    if not isinstance(payload, dict) or not {"config", "data_digest", "eps", "optimizer", "state", "rng"} <= set(
        payload
    ):
        raise RunFolderError(f"--resume: {path} is not a sinder-hub checkpoint of this version")
    differing = {k: (v, getattr(config, k)) for k, v in payload["config"].items() if v != getattr(config, k)}
    if differing:
        details = ", ".join(
            f"--{k.replace('_', '-')}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in differing.items()
        )
        raise RunFolderError(f"--resume: {path} belongs to a different run ({details})")
    if payload["data_digest"] != digest:
        raise RunFolderError(
            f"--resume: the images selected from --data {config.data} changed since {path} was written "
            f"(files added, removed or resized); resume with the same data or start a new run"
        )
    return payload


def restore_checkpoint(payload: dict, eps: dict, optimizer, config: RepairConfig) -> TrainState:
    """Put ε, optimiser state and RNG states back; returns the counters."""
    with torch.no_grad():
        for name, parameter in eps.items():
            parameter.copy_(payload["eps"][name])
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["rng"]["torch"])
    if payload["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    saved = payload["state"]
    return TrainState(
        **{
            **saved,
            "loss_layers": Counter({int(k): v for k, v in saved["loss_layers"].items()}),
            "clear_window": deque(saved["clear_window"], maxlen=config.window),
        }
    )


# ----------------------------------------------------------------------------------------
# Held-out evaluation (before / after) and the report


@torch.no_grad()
def held_out_outputs(model, images: dict, directions, config) -> dict:
    """Per image: defects per block, the last block's raw patch grid (pictures) and final features (cosines).

    Always without autocast (float32; TF32 matrix products unless ``--precision fp32``),
    so that runs trained in different precisions are measured alike.
    """
    outputs = {}
    for name, image in images.items():
        x, blocks = prepare_blocks(model, image)
        image_hw = image.shape[-2:]
        defects = []
        for index, block in enumerate(blocks):
            x = block(x)
            grid = _grid(model, x, image_hw)
            mask, _ = defect_mask(grid, directions[index], config.mask_thr, config.kernel)
            defects.append(int(mask.sum()))
        outputs[name] = {
            "defects": defects,
            "mask": mask.cpu(),
            "features": model.norm(x)[0].float().cpu(),
            "grid": grid.float().cpu(),
        }
    return outputs


def compare_held_out(model, before: dict, after: dict) -> dict:
    """Defect counts at the last block before/after, and cosines of normal tokens and of the class
    token (the mean of the patch tokens for models without one) to the original's."""
    prefix = model.num_prefix_tokens
    has_class_token = families.has_class_token(model)
    normal_cos, class_cos = [], []
    for name in before:
        cos = nn.functional.cosine_similarity(before[name]["features"], after[name]["features"], dim=-1)
        normal = ~before[name]["mask"].flatten()
        normal_cos.append(cos[prefix:][normal].mean().item())
        if has_class_token:
            class_cos.append(cos[0].item())
        else:
            pooled = [out[name]["features"][prefix:].mean(0) for out in (before, after)]
            class_cos.append(nn.functional.cosine_similarity(*pooled, dim=0).item())

    def side(outputs):
        return {
            "defects": {n: o["defects"][-1] for n, o in outputs.items()},
            "total": sum(o["defects"][-1] for o in outputs.values()),
            "defects_per_block": [sum(o["defects"][i] for o in outputs.values()) for i in range(len(model.blocks))],
        }

    total_before, total_after = side(before)["total"], side(after)["total"]
    return {
        "before": side(before),
        "after": side(after),
        "defect_reduction": (1 - total_after / total_before) if total_before else None,
        "normal_token_cosine": sum(normal_cos) / len(normal_cos),
        "class_token_cosine": sum(class_cos) / len(class_cos),
        "class_token": "class token" if has_class_token else "mean of the patch tokens",
    }


def judge_outcome(state: TrainState, held_out: dict, num_images: int, model: nn.Module) -> dict:
    """``{"status": "ok" | "degraded" | "failed", "reasons": [...]}``: failed when nothing changed
    (no update), degraded when the repaired tokens moved far from the original's or a weight is not finite."""
    reasons, status = [], "ok"
    if state.updates == 0:
        status = "failed"
        if len(state.bad_files) >= num_images:
            reasons.append(f"0 updates: none of the {num_images} images could be read (see bad_files)")
        elif state.skipped_nan:
            reasons.append(
                f"0 updates: every step with a loss gave a NaN or infinite loss or gradient "
                f"({state.skipped_nan} steps skipped)"
            )
        else:
            reasons.append(
                f"0 updates: all {state.images_seen} images were clear at every block "
                f"(nothing to repair at these --mask-thr / --skip-less-than)"
            )
    not_finite = [name for name, value in model.state_dict().items() if not bool(torch.isfinite(value).all())]
    if not_finite:
        status = "failed"
        reasons.append(
            f"the repaired weights are not finite in {len(not_finite)} tensors ({', '.join(not_finite[:3])})"
        )
    cosine = held_out["normal_token_cosine"]
    if not math.isfinite(cosine) or cosine < MIN_COSINE:
        status = "failed" if status == "failed" else "degraded"
        reasons.append(
            f"normal-token cosine to the original is {cosine:.4f} (< {MIN_COSINE}): the repair changed "
            f"the features too much (try a smaller --lr)"
        )
    return {"status": status, "reasons": reasons}


def build_report(
    config, state, plan, model, source_sha256, held_out_names, held_out, outcome, stopped_because, pictures, accelerator
) -> dict:
    return {
        "sinder_hub_version": __import__("sinder_hub").__version__,
        "source_model": config.model,
        "source_sha256": source_sha256,
        "architecture": model.pretrained_cfg.get("architecture"),
        "hyperparameters": config.hyperparameters(),
        "outcome": outcome,
        "steps": state.step,
        "updates": state.updates,
        "skipped_nan": state.skipped_nan,
        "data_passes": round(plan.passes(state.step), 4),
        "images": {
            "selected": plan.num_images,
            "seen": state.images_seen,
            "clear": state.images_clear,
            "with_loss": state.images_with_loss,
            "skipped_bad": len(state.bad_files),
        },
        "bad_files": state.bad_files,
        "loss_layer_histogram": {str(k): v for k, v in sorted(state.loss_layers.items())},
        "clear_rate_curve": state.clear_rate_curve,
        "stopped_because": stopped_because,
        "wall_time_s": round(state.elapsed_s, 2),
        "hardware": {"device": _device_name(accelerator), "num_processes": accelerator.num_processes},
        "held_out": {"resolution": config.resolution, "images": list(held_out_names), **held_out},
        "pictures": pictures,
    }


# ----------------------------------------------------------------------------------------
# Setup helpers


def set_precision(precision: str):
    """Matmul precision for ``fp32``/``tf32``; returns the autocast context factory (``bf16``).

    Changes ``torch.get_float32_matmul_precision()``: ``repair`` restores the caller's on return.
    """
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    torch.set_float32_matmul_precision("highest" if precision == "fp32" else "high")

    def autocast():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")

    return autocast


def check_compile(device: torch.device) -> None:
    """``--compile`` needs a working ``torch.compile`` backend (a C++ compiler on a CPU, Triton on a
    GPU): compile a tiny function before any slow work, ``InputError`` naming what failed."""
    try:
        torch.compile(lambda x: torch.nn.functional.gelu(x) * 2, dynamic=False)(torch.ones(8, device=device))
    except Exception as error:  # the backend's own exception types vary with the torch version
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise InputError(
            f"--compile: torch.compile does not work on this {device.type} ({reason}); run without --compile"
        ) from None


def weights_sha256(spec: str, model: nn.Module) -> str:
    """sha256 of the source weights file, or of the state dict (keys and bytes) when the source is a name."""
    path = Path(spec)
    if path.is_dir():
        path = next((p for p in (path / "model.safetensors", path / "pytorch_model.bin") if p.exists()), path)
    digest = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
        return digest.hexdigest()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _device_name(accelerator) -> str:
    device = accelerator.device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({os.cpu_count()} cores)"


class _StopSignal:
    """Turns SIGINT/SIGTERM into a flag checked between steps (the run then checkpoints and returns)."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _on_every_process(accelerator, main_only):
    """Run ``main_only()`` on the main process; a ``SinderError`` it raises is raised on every process."""
    from accelerate.utils import broadcast_object_list

    from .errors import SinderError

    error = None
    if accelerator.is_main_process:
        try:
            main_only()
        except SinderError as raised:
            error = raised
    if accelerator.num_processes > 1:
        message = [None if error is None else (type(error), str(error))]
        broadcast_object_list(message)
        if message[0] is not None and error is None:
            kind, text = message[0]
            error = kind(text)
    if error is not None:
        raise error


# ----------------------------------------------------------------------------------------
# The run


@dataclass
class RepairResult:
    output: Path
    report: dict | None  # None when interrupted (a checkpoint was written instead) and on other processes
    interrupted_by: str | None = None


def repair(config: RepairConfig, accelerator=None) -> RepairResult:
    """Repair ``config.model`` on ``config.data`` (Algorithm 1) and write the run folder.

    Every check that needs no model runs first (flags, data, run folder, the checkpoint to
    resume); then the model is loaded. Raises ``InputError`` for bad input, ``RepairError``
    (after writing the report) for a run that failed or degraded the model, unless
    ``allow_degraded``. Restores the caller's float32 matmul precision.
    """
    matmul_precision = torch.get_float32_matmul_precision()
    try:
        return _repair(config, accelerator)
    finally:
        torch.set_float32_matmul_precision(matmul_precision)


def _repair(config: RepairConfig, accelerator) -> RepairResult:
    from accelerate import Accelerator

    # -- everything that can be checked without a model
    config.validate()
    paths = select_images(list_images(config.data), config.num_images)
    digest = data_digest(paths)
    run = RunFolder(config.output, resume=config.resume, overwrite=config.overwrite)
    run.check()
    saved = read_checkpoint(run.checkpoint, config, digest) if config.resume else None
    accelerator = accelerator or Accelerator()
    plan = DataPlan(len(paths), config.images_per_step, accelerator.num_processes)
    _on_every_process(accelerator, run.acquire)
    try:
        return _train(config, accelerator, run, paths, digest, plan, saved)
    except BaseException:
        if accelerator.is_main_process:
            run.release(failed=True)
        raise


def _train(
    config, accelerator, run: RunFolder, paths: list[Path], digest: str, plan: DataPlan, saved: dict | None
) -> RepairResult:
    """Algorithm 1 on a checked configuration and an acquired run folder."""
    device, rank = accelerator.device, accelerator.process_index
    autocast = set_precision(config.precision)
    torch.manual_seed(config.seed)
    started = time.perf_counter()

    # -- model, directions (Algorithm 1, line 1), held-out images before the repair
    if config.compile:
        check_compile(device)
    model = backbones.load_backbone(config.model).to(device).eval()
    patch = model.patch_embed.patch_size
    if config.resolution % patch[0] or config.resolution % patch[1]:
        raise InputError(
            f"--resolution {config.resolution}: expected a multiple of {config.model}'s "
            f"{patch[0]}-px patch size (e.g. {max(1, round(config.resolution / patch[0])) * patch[0]})"
        )
    source_sha256 = weights_sha256(config.model, model) if accelerator.is_main_process else None
    directions = singular_defect_directions(
        model,
        samples=config.directions_samples,
        method=config.directions_method,
        generator=torch.Generator(device=device).manual_seed(config.seed),
    ).to(device)
    transform = sinder_transform(config.resolution)
    held_out_images = sample_images(config.held_out)
    held_out = {name: transform(image)[None].to(device) for name, image in held_out_images.items()}
    before = held_out_outputs(model, held_out, directions, config)

    # -- trainable singular values, optimiser, state
    eps = parametrize_singular_values(model)
    parameters = list(eps.values())
    optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=0.0)
    if saved is not None:
        state = restore_checkpoint(saved, eps, optimizer, config)
    else:
        state = TrainState(clear_window=deque([False] * config.window, maxlen=config.window))
    loader = DataLoader(
        ImageFiles(paths, config.resolution, max_pixels=config.max_pixels),
        batch_size=1,
        sampler=plan.sequence(rank, state.step, config.max_steps),
        num_workers=config.num_workers,
        collate_fn=collate_one,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if config.num_workers else None,
    )
    batches = iter(loader)
    progress = None
    if accelerator.is_main_process and not config.quiet:
        from tqdm.auto import tqdm

        progress = tqdm(total=config.max_steps, initial=state.step, desc="sinder repair", dynamic_ncols=True)

    # -- the loop: one step, its bookkeeping, the stopping rule, checkpoints
    stopped_because, interrupted_by = "max_steps", None
    with _StopSignal() as stop:
        while state.step < config.max_steps:
            batch = [next(batches) for _ in range(config.images_per_step)]
            step = train_step(model, batch, directions, config, autocast, optimizer, parameters, accelerator)
            state.record(step, paths)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(
                    clear=f"{state.clear_rate():.2f}",
                    loss=f"{step.loss:.3f}",
                    layer=next((b for b in reversed(step.blocks) if b >= 0), None),
                )
            if state.clear_rate() >= config.stop_clear:
                stopped_because = "clear_rate"
                break
            if len(state.bad_files) >= plan.num_images:
                stopped_because = "no_readable_images"
                break
            received = accelerator.reduce(
                torch.tensor([1.0 if stop.received else 0.0], device=device), reduction="sum"
            ).item()
            if received or (config.save_every and state.step % config.save_every == 0):
                state.elapsed_s += time.perf_counter() - started
                started = time.perf_counter()
                if accelerator.is_main_process:
                    save_checkpoint(run.checkpoint, state, eps, optimizer, config, digest)
                accelerator.wait_for_everyone()
                if received:
                    interrupted_by = stop.received or "signal"
                    break
    if progress is not None:
        progress.close()
    if interrupted_by:
        if accelerator.is_main_process:
            run.release()
        return RepairResult(output=run.path, report=None, interrupted_by=interrupted_by)

    # -- merge, evaluate, write the run folder (the report last)
    state.elapsed_s += time.perf_counter() - started
    merge_singular_values(model)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return RepairResult(output=run.path, report=None)
    after = held_out_outputs(model, held_out, directions, config)
    if not state.clear_rate_curve or state.clear_rate_curve[-1][0] != state.step:
        state.clear_rate_curve.append([state.step, state.clear_rate()])
    comparison = compare_held_out(model, before, after)
    outcome = judge_outcome(state, comparison, plan.num_images, model)
    keep = outcome["status"] == "ok" or config.allow_degraded
    save_checkpoint(run.checkpoint, state, eps, optimizer, config, digest)
    if keep:
        write_repaired_model(model, run.path)
    pictures = write_pictures(held_out_images, before, after, run.path)
    report = build_report(
        config, state, plan, model, source_sha256, held_out, comparison, outcome, stopped_because, pictures, accelerator
    )
    write_json_atomic(run.path / REPORT, report)
    run.finished()
    run.release()
    accelerator.wait_for_everyone()
    if not keep:
        raise RepairError(
            f"{outcome['status']} run, no model written to {run.path} ({'; '.join(outcome['reasons'])}); "
            f"the report is in {run.path / REPORT}; --allow-degraded keeps such a model"
        )
    return RepairResult(output=run.path, report=report)


def write_repaired_model(model: nn.Module, output: Path) -> None:
    """``config.json`` + ``model.safetensors`` with timm's own ``save_for_hf`` (timm key names),
    written to a temporary folder and renamed into ``output`` file by file."""
    from timm.models._hub import save_for_hf

    staging = output / f".model.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_for_hf(model, str(staging), safe_serialization=True)
        umask = os.umask(0)
        os.umask(umask)
        for name in ("model.safetensors", "config.json"):
            with open(staging / name, "rb+") as handle:
                os.fsync(handle.fileno())
            os.chmod(staging / name, 0o666 & ~umask)  # safetensors writes 0600; a model is for sharing
            os.replace(staging / name, output / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_pictures(images: dict, before: dict, after: dict, output: Path) -> list[str]:
    """One PNG per held-out image (PIL ``images``): last block's token norms and PCA, original vs repaired."""
    from .plots import norm_pca_figure

    names = []
    for name, image in images.items():
        path = output / f"before_after_{name}.png"
        with atomic_path(path) as tmp:
            norm_pca_figure(
                {name: image}, {"original": {name: before[name]["grid"]}, "repaired": {name: after[name]["grid"]}}, tmp
            )
        names.append(path.name)
    return names
