"""A repair run, read top to bottom: checks without a model, set-up, the loop, the finish.

``repair(config)`` is SINDER's Algorithm 1 on a run folder: every check that needs no model
runs first (flags, data, run folder, the checkpoint to resume), then the model loads and is
checked; only then is anything in the run folder replaced. The loop takes one optimiser
step after the other (``step.train_step``) until the clear-rate rule or ``max_steps``, writes
a checkpoint every ``save_every`` steps and on SIGINT/SIGTERM, and times itself: the report
says where the wall time went (set-up, directions, loader waits, images with a loss, clear
images) and the peak memory, so that no benchmark has to reach inside.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import analysis, backbones, report
from ..backbones import weights_sha256
from ..data import ImageFiles, collate_one, list_images, normalization_of, sample_images, sinder_transform
from ..errors import InputError, RepairError, SinderError
from ..files import writing
from ..registers import registers_of
from ..registers_search import threshold_between
from ..runs import REPORT, RunFolder
from ..singular_values import merge_singular_values, parametrize_singular_values
from .config import PRECISIONS, RepairConfig
from .state import (
    DataPlan,
    TrainState,
    check_source,
    data_digest,
    read_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    select_images,
)
from .step import train_step

TIMING_FIELDS = ("setup_s", "directions_s", "held_out_s", "loop_s", "loader_wait_s", "loss_images_s",
                 "clear_images_s", "merge_s", "write_s")  # fmt: skip


@dataclass
class RepairResult:
    output: Path
    report: report.RepairReport | None  # None when interrupted (a checkpoint was written) and on other processes
    interrupted_by: str | None = None


@dataclass
class Run:
    """Everything the loop and the finish need, made by ``set_up``."""

    config: RepairConfig
    accelerator: object
    folder: RunFolder
    paths: list[Path]
    digest: str
    plan: DataPlan
    model: nn.Module
    source: dict  # {"sha256", "num_processes"}
    directions: torch.Tensor
    autocast: object
    held_out_images: dict
    held_out: dict  # name -> [1, 3, R, R] on the device
    before: dict  # report.held_out_outputs of the original
    eps: dict
    optimizer: torch.optim.Optimizer
    state: TrainState
    timings: report.Timings = field(default_factory=report.Timings)
    session_started: float = field(default_factory=time.perf_counter)
    stopped_because: str = "max_steps"

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def checkpoint(self) -> None:
        """Write the checkpoint (main process), the session's time so far added to the state's."""
        self.state.elapsed_s += time.perf_counter() - self.session_started
        self.session_started = time.perf_counter()
        if self.is_main:
            save_checkpoint(
                self.folder.checkpoint, self.state, self.eps, self.optimizer, self.config, self.digest, self.source
            )


def repair(config: RepairConfig, accelerator=None, stop: StopSignal | None = None) -> RepairResult:
    """Repair ``config.model`` on ``config.data`` (Algorithm 1) and write the run folder.

    ``accelerator``: an ``accelerate.Accelerator`` (default: a new one). ``stop``: what tells the loop
    to checkpoint and return (default: a ``StopSignal`` catching SIGINT and SIGTERM).

    Raises ``InputError`` for bad input (before the model loads where no model is needed, and before
    anything in the run folder is replaced), ``OutputError`` when the folder cannot be written, and
    ``RepairError`` (after writing the report) for a run that failed or degraded the model, unless
    ``allow_degraded``. Restores the caller's float32 matmul precision.
    """
    matmul_precision = torch.get_float32_matmul_precision()
    try:
        return _repair(config, accelerator, stop or StopSignal())
    finally:
        torch.set_float32_matmul_precision(matmul_precision)


def _repair(config: RepairConfig, accelerator, stop: StopSignal) -> RepairResult:
    from accelerate import Accelerator

    started = time.perf_counter()
    config.validate()
    paths = select_images(list_images(config.data), config.num_images)
    digest = data_digest(paths)
    folder = RunFolder(config.output, resume=config.resume, overwrite=config.overwrite)
    folder.check()
    folder.check_inputs({"--model": config.model, "--data": config.data})
    accelerator = accelerator or Accelerator()
    saved = read_checkpoint(folder.checkpoint, config, digest, accelerator.num_processes) if config.resume else None
    plan = DataPlan(len(paths), config.images_per_step, accelerator.num_processes)
    on_every_process(accelerator, folder.acquire)
    try:
        run = set_up(config, accelerator, folder, paths, digest, plan, saved, started)
        interrupted_by = train(run, stop)
        if interrupted_by:
            if run.is_main:
                folder.release()
            return RepairResult(output=folder.path, report=None, interrupted_by=interrupted_by)
        return RepairResult(output=folder.path, report=finish(run))
    except BaseException:
        if accelerator.is_main_process:
            folder.release(failed=True)
        raise


def set_up(config, accelerator, folder, paths, digest, plan, saved, started) -> Run:
    """Load and check the model, begin the run folder, compute the directions (Algorithm 1, line 1),
    measure the held-out images before the repair, and make ε, the optimiser and the state."""
    device = accelerator.device
    autocast = set_precision(config.precision)
    torch.manual_seed(config.seed)
    if config.compile:
        check_compile(device, config.compile_backend)
    model = backbones.load_backbone(config.model).to(device).eval()
    if registers_of(model) is not None:
        raise InputError(
            f"--model {config.model} carries test-time registers (hooks, not weights): repair its base model"
        )
    check_resolution(model, config)
    sha256 = weights_sha256(config.model, model) if accelerator.is_main_process else None
    source = {"sha256": sha256, "num_processes": accelerator.num_processes}

    def begin():  # every check has passed: only now is an earlier run replaced
        if saved is not None:
            check_source(saved, source["sha256"], config.model)
        folder.begin()

    timings = report.Timings(setup_s=time.perf_counter() - started)
    tick = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(config.seed)
    directions = analysis.singular_defect_directions(
        model, samples=config.directions_samples, method=config.directions_method, generator=generator
    ).to(device)
    timings.directions_s = time.perf_counter() - tick
    tick = time.perf_counter()
    held_out_images = sample_images(config.held_out)
    transform = sinder_transform(config.resolution, model)
    held_out = {name: transform(image)[None].to(device) for name, image in held_out_images.items()}
    before = report.held_out_outputs(model, held_out, directions, config.mask_thr, config.kernel)
    timings.held_out_s = time.perf_counter() - tick
    if saved is None and not config.allow_no_outliers:  # a resumed run was checked when it began
        check_outliers(config, before)
    on_every_process(accelerator, begin)
    eps = parametrize_singular_values(model)
    optimizer = torch.optim.SGD(list(eps.values()), lr=config.lr, momentum=config.momentum, weight_decay=0.0)
    if saved is not None:
        state = restore_checkpoint(saved, eps, optimizer, config)
    else:
        state = TrainState(clear_window=deque([False] * config.window, maxlen=config.window))
    return Run(
        config=config,
        accelerator=accelerator,
        folder=folder,
        paths=paths,
        digest=digest,
        plan=plan,
        model=model,
        source=source,
        directions=directions,
        autocast=autocast,
        held_out_images=held_out_images,
        held_out=held_out,
        before=before,
        eps=eps,
        optimizer=optimizer,
        state=state,
        timings=timings,
        session_started=started,
    )


def train(run: Run, stop: StopSignal) -> str | None:
    """The loop: steps until the clear-rate rule or ``max_steps``; returns the signal that interrupted it, if any."""
    config, state, accelerator = run.config, run.state, run.accelerator
    device = accelerator.device
    loader = DataLoader(
        ImageFiles(run.paths, config.resolution, max_pixels=config.max_pixels, model=run.model),
        batch_size=1,
        sampler=run.plan.sequence(accelerator.process_index, state.step, config.max_steps),
        num_workers=config.num_workers,
        collate_fn=collate_one,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if config.num_workers else None,
    )
    batches, parameters = iter(loader), list(run.eps.values())
    progress = _progress(run)
    loop_started, stopped_because, interrupted_by = time.perf_counter(), "max_steps", None
    with stop:
        while state.step < config.max_steps:
            waited = time.perf_counter()
            batch = [next(batches) for _ in range(config.images_per_step)]
            state.loader_wait_s += time.perf_counter() - waited
            step = train_step(
                run.model, batch, run.directions, config, run.autocast, run.optimizer, parameters, accelerator
            )
            state.record(step, run.paths)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(
                    clear=f"{state.clear_rate():.2f}",
                    loss=f"{step.loss:.3f}",
                    layer=next((b for b in reversed(step.blocks) if b >= 0), None),
                    waiting=f"{state.loader_wait_s / max(time.perf_counter() - loop_started, 1e-9):.0%}",
                )
            if state.clear_rate() >= config.stop_clear:
                stopped_because = "clear_rate"
                break
            if len(state.bad_files) >= run.plan.num_images:
                stopped_because = "no_readable_images"
                break
            received = accelerator.reduce(
                torch.tensor([1.0 if stop.received else 0.0], device=device), reduction="sum"
            ).item()
            if received or (config.save_every and state.step % config.save_every == 0):
                run.checkpoint()
                accelerator.wait_for_everyone()
                if received:
                    interrupted_by = stop.received or "signal"
                    break
    if progress is not None:
        progress.close()
    run.timings.loop_s = time.perf_counter() - loop_started
    run.stopped_because = stopped_because
    return interrupted_by


def _progress(run: Run):
    if not run.is_main or run.config.quiet:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=run.config.max_steps, initial=run.state.step, desc="sinder repair", dynamic_ncols=True)


def finish(run: Run) -> report.RepairReport | None:
    """Merge ε into the weights, measure the held-out images again, judge, and write the run folder
    (model, pictures, report last); ``RepairError`` after writing the report when the model is not kept."""
    config, state, folder, timings = run.config, run.state, run.folder, run.timings
    tick = time.perf_counter()
    merge_singular_values(run.model)
    timings.merge_s = time.perf_counter() - tick
    if not run.is_main:
        run.accelerator.wait_for_everyone()
        return None
    tick = time.perf_counter()
    after = report.held_out_outputs(run.model, run.held_out, run.directions, config.mask_thr, config.kernel)
    held_out = report.compare_held_out(run.model, run.before, after, config.resolution)
    timings.held_out_s += time.perf_counter() - tick
    if not state.clear_rate_curve or state.clear_rate_curve[-1][0] != state.step:
        state.clear_rate_curve.append([state.step, state.clear_rate()])
    images = report.ImageCounts(
        selected=run.plan.num_images,
        seen=state.images_seen,
        clear=state.images_clear,
        with_loss=state.images_with_loss,
        skipped_bad=len(state.bad_files),
    )
    outcome = report.judge_outcome(state.updates, images, state.skipped_nan, held_out, run.model)
    keep = outcome.status == "ok" or config.allow_degraded
    tick = time.perf_counter()
    run.checkpoint()
    if keep:
        write_repaired_model(run.model, folder.path)
    pictures = report.write_pictures(run.held_out_images, run.before, after, folder.path)
    timings.write_s = time.perf_counter() - tick
    state.elapsed_s += time.perf_counter() - run.session_started
    _copy_state_timings(state, timings, run.accelerator.device)
    repair_report = report.RepairReport(
        sinder_hub_version=__import__("sinder_hub").__version__,
        source_model=config.model,
        source_sha256=run.source["sha256"],
        architecture=run.model.pretrained_cfg.get("architecture"),
        hyperparameters=config.hyperparameters(),
        normalization=normalization_of(run.model).to_json(),
        outcome=outcome,
        steps=state.step,
        updates=state.updates,
        skipped_nan=state.skipped_nan,
        data_passes=round(run.plan.passes(state.step), 4),
        images=images,
        bad_files=state.bad_files,
        loss_layer_histogram={str(k): v for k, v in sorted(state.loss_layers.items())},
        clear_rate_curve=state.clear_rate_curve,
        stopped_because=run.stopped_because,
        wall_time_s=round(state.elapsed_s, 2),
        hardware=report.Hardware(device_name(run.accelerator.device), run.accelerator.num_processes),
        held_out=held_out,
        pictures=pictures,
        timings=timings,
    )
    repair_report.write(folder.path / REPORT)
    folder.finished()
    folder.release()
    run.accelerator.wait_for_everyone()
    if not keep:
        raise RepairError(
            f"{outcome.status} run, no model written to {folder.path} ({'; '.join(outcome.reasons)}); "
            f"the report is in {folder.path / REPORT}; --allow-degraded keeps such a model"
        )
    return repair_report


def _copy_state_timings(state: TrainState, timings: report.Timings, device: torch.device) -> None:
    """The loop's figures over every session, rounded, and the peak memory of this process."""
    timings.loader_wait_s, timings.loss_images_s = state.loader_wait_s, state.loss_images_s
    timings.clear_images_s = state.clear_images_s
    for name in TIMING_FIELDS:
        setattr(timings, name, round(getattr(timings, name), 3))
    timings.peak_memory_gib, timings.peak_memory_kind = peak_memory(device)


def write_repaired_model(model: nn.Module, output: Path) -> None:
    """``config.json`` + ``model.safetensors`` with timm's own ``save_for_hf`` (timm key names),
    written to a temporary folder and renamed into ``output`` file by file."""
    from timm.models._hub import save_for_hf

    staging = output / f".model.tmp-{os.getpid()}"
    try:
        with writing(output / "model.safetensors", "write the repaired model"):
            shutil.rmtree(staging, ignore_errors=True)
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


# ----------------------------------------------------------------------------------------
# The environment: precision, compiler, source digest, device, signals, processes


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


def check_compile(device: torch.device, backend: str) -> None:
    """``--compile`` needs a working ``torch.compile`` backend (inductor: a C++ compiler on a CPU,
    Triton on a GPU): compile a tiny function before any slow work, ``InputError`` naming what failed."""
    try:
        function = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2, dynamic=False, backend=backend)
        function(torch.ones(8, device=device))
    except Exception as error:  # the backend's own exception types vary with the torch version
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise InputError(
            f"--compile: torch.compile does not work on this {device.type} ({reason}); run without --compile"
        ) from None


def check_outliers(config: RepairConfig, before: dict) -> None:
    """``RepairError`` before any training (and before the run folder is touched) when the held-out images
    show no high-norm outliers at the last block: eq. 5 flags nothing, or the flagged tokens' median norm is
    less than ``registers_search.MIN_NORM_RATIO`` times the other patch tokens' (the rule ``registers`` applies).
    ``before``: ``report.held_out_outputs`` of the original (last-block ``grid`` ``[H, W, D]`` and ``mask``)."""
    norms = torch.cat([output["grid"].norm(dim=-1).flatten() for output in before.values()])
    masks = torch.cat([output["mask"].flatten() for output in before.values()])
    where = f"--model {config.model} at the last block of {len(before)} held-out images at {config.resolution} px"
    advice = "nothing to repair; --allow-no-outliers trains anyway"
    if not masks.any():
        raise RepairError(f"{where}: eq. 5 flags no defect (no high-norm outliers): {advice}")
    try:
        threshold_between(norms[masks], norms[~masks], where)
    except InputError as error:  # its advice is the registers' (give a threshold): ours replaces it
        raise RepairError(f"{str(error).split(' (give')[0]}: {advice}") from None


def check_resolution(model: nn.Module, config: RepairConfig) -> None:
    patch = model.patch_embed.patch_size
    if config.resolution % patch[0] or config.resolution % patch[1]:
        example = max(1, round(config.resolution / patch[0])) * patch[0]
        raise InputError(
            f"--resolution {config.resolution}: expected a multiple of {config.model}'s "
            f"{patch[0]}-px patch size (e.g. {example})"
        )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({os.cpu_count()} cores)"


def peak_memory(device: torch.device) -> tuple[float, str]:
    """Peak memory of this process so far, in GiB: CUDA memory allocated on a GPU, else the peak RSS."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3), "cuda allocated"
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3), "process RSS"


class StopSignal:
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


def on_every_process(accelerator, main_only) -> None:
    """Run ``main_only()`` on the main process; a ``SinderError`` it raises is raised on every process."""
    from accelerate.utils import broadcast_object_list

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
