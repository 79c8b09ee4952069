"""The state of a repair run: which image goes where (the data plan), the counters a resumed run
continues, and the checkpoints that hold them (plain tensors and types, read with ``weights_only=True``)."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import RunFolderError
from ..files import atomic_path, writing
from .config import RepairConfig

log = logging.getLogger(__name__)
CHECKPOINT_KEYS = {"config", "data_digest", "eps", "optimizer", "state", "rng"}


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
    loss_images_s: float = 0.0  # this process's time on images with a loss
    clear_images_s: float = 0.0  # and on clear images


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
    elapsed_s: float = 0.0  # the loop's wall time, over every session of a resumed run
    loader_wait_s: float = 0.0  # of which waiting for decoded images
    loss_images_s: float = 0.0  # computing images that gave a loss (scan, loss, backward)
    clear_images_s: float = 0.0  # scanning images that were clear

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
        self.loss_images_s += step.loss_images_s
        self.clear_images_s += step.clear_images_s
        self.updates += int(step.updated)
        self.skipped_nan += int(step.nan)
        self.step += 1
        if self.step % 10 == 0:
            self.clear_rate_curve.append([self.step, self.clear_rate()])


def save_checkpoint(
    path: Path, state: TrainState, eps: dict, optimizer, config: RepairConfig, digest: str, source: dict
) -> None:
    """Write ε, optimiser, counters, clear window and RNG states atomically, as tensors and plain
    types only, so that ``read_checkpoint`` reads it with ``weights_only=True``.

    ``source``: ``{"sha256": of the source weights, "num_processes": of the run}``, which ``--resume``
    must match. A failed write (disk full, read-only folder) raises ``OutputError`` naming the file.
    """
    payload = {
        "config": {key: getattr(config, key) for key in RepairConfig.RESUME_KEYS},
        "data_digest": digest,
        "source": dict(source),
        "eps": {name: p.detach().cpu() for name, p in eps.items()},
        "optimizer": optimizer.state_dict(),
        "state": {**asdict(state), "loss_layers": dict(state.loss_layers), "clear_window": list(state.clear_window)},
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
    }
    with writing(path, "write the checkpoint"):
        path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, "write the checkpoint") as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: Path, config: RepairConfig, digest: str, num_processes: int) -> dict:
    """The checkpoint at ``path`` (never unpickled: ``weights_only=True``), checked to belong to this run:
    the same flags, data and number of processes (the data plan depends on it). The source weights are
    checked once loaded (``check_source``)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupt, or holding objects that are not plain data
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise RunFolderError(f"--resume: cannot read checkpoint {path} ({reason})") from None
    if not isinstance(payload, dict) or not set(payload) >= CHECKPOINT_KEYS:
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
    saved = payload.get("source", {}).get("num_processes", num_processes)
    if saved != num_processes:
        raise RunFolderError(
            f"--resume: {path} was written by a run on {saved} processes and this one has {num_processes}; "
            f"the images each step takes depend on it: resume with {saved} processes "
            f"(accelerate launch --num_processes {saved})"
        )
    return payload


def check_source(payload: dict, sha256: str | None, spec: str) -> None:
    """``RunFolderError`` unless the weights being resumed are those the checkpoint was trained from."""
    saved = payload.get("source", {}).get("sha256")
    if saved is not None and sha256 is not None and saved != sha256:
        raise RunFolderError(
            f"--resume: the weights of --model {spec} changed since the checkpoint was written "
            f"(sha256 {saved[:12]}... then, {sha256[:12]}... now); resume with the same weights or start a new run"
        )


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
