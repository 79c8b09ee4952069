"""The repair loop: SINDER's Algorithm 1, fast, multi-process, resumable.

Read top to bottom: configuration, the two ways of computing one image's loss (the fast
step and the authors' naive step, which is kept as the benchmark baseline and test
oracle), gradient synchronisation across processes, checkpoints, held-out evaluation,
and ``repair`` itself.

One optimiser step ("iteration") takes ``images_per_step`` images on every process.
Each image is scanned block by block, each block with an autograd graph of its own of
which only the last ``limit_layers`` are kept; the first block with at least
``skip_less_than`` defects gives the loss (eq. 8), which is back-propagated through the
kept graphs only, one block after the other. Gradients of ε are
summed over the step's images and processes and divided by the number of images that
produced a loss. With one image on one process this is exactly the authors' batch-size-1
SGD.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
import torch.utils.checkpoint
from torch.utils.data import DataLoader, Subset

from .analysis import singular_defect_directions
from .data import HELD_OUT_SAMPLES, ImageFiles, collate_one, list_images, sample_images, sinder_transform
from .defects import defect_mask, neighbor_loss
from .singular_values import merge_singular_values, parametrize_singular_values, reference_mode
from .tokens import block_outputs, embed, patch_grid

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "tf32", "bf16")
CHECKPOINT = "checkpoint/state.pt"


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
    seed: int = 0
    directions_method: str = "sampled"
    directions_samples: int = 100_000
    save_every: int = 500
    resume: bool = False
    num_workers: int = 2
    held_out: tuple[str, ...] = HELD_OUT_SAMPLES
    quiet: bool = False

    # what must match for --resume to continue a run
    RESUME_KEYS = ("model", "data", "num_images", "resolution", "lr", "momentum", "mask_thr", "skip_less_than",
                   "limit_layers", "kernel", "temperature", "window", "stop_clear", "images_per_step",
                   "precision", "seed", "directions_method", "directions_samples")

    def hyperparameters(self) -> dict:
        keep = ("resolution", "lr", "momentum", "mask_thr", "skip_less_than", "limit_layers", "kernel", "temperature",
                "window", "stop_clear", "max_steps", "num_images", "images_per_step", "precision", "checkpoint_blocks",
                "seed", "data",
                "directions_method", "directions_samples")
        return {key: getattr(self, key) for key in keep}


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


def _loss_at(model, tokens, image_hw, direction, config):
    return neighbor_loss(_grid(model, tokens, image_hw), direction, mask_thr=config.mask_thr,
                         kernel=config.kernel, temperature=config.temperature)


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
        x = embed(model, image)
    pending = None
    for index, block in enumerate(model.blocks):
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
    graphs of the last ``limit_layers`` blocks are kept (older ones are freed as the scan
    moves on) and no layer is differentiated or factorised until a gradient reaches it.
    At the first block ``i`` with ``≥ skip_less_than`` defects (or at ``force_block``, for
    benchmarks, which still count every block's defects) the loss is back-propagated
    through block ``i``'s graph, and the gradient at each kept block's input is handed to
    the graph of the block before it, down to block ``i - limit_layers + 1``. Same
    gradients as one graph from the start (the naive step); no block runs twice and
    nothing before the window is back-propagated.
    """
    image_hw = image.shape[-2:]
    graphs = deque(maxlen=config.limit_layers)  # (input, output) of the last limit_layers blocks
    with autocast():
        scan = _scan_blocks(model, image, directions, config)
        for index, inputs, output, defects in scan:
            graphs.append((inputs, output))
            if index == force_block or (force_block is None and defects >= config.skip_less_than):
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


def naive_image_loss(model, image, directions, config, autocast, force_block: int | None = None) -> ImageLoss:
    """The authors' pattern: every layer's weight rebuilt with autograd on every forward, autograd
    through every block from the start, then the gradients of the blocks outside the window
    discarded. Kept as the benchmark baseline and the test oracle."""
    image_hw = image.shape[-2:]
    with autocast(), reference_mode():
        x = embed(model, image)
        for index, block in enumerate(model.blocks):
            x = block(x)
            defects = int(_defect_count(model, x.detach(), image_hw, directions[index], config))
            if index == force_block or (force_block is None and defects >= config.skip_less_than):
                result = _loss_at(model, x, image_hw, directions[index], config)
                break
        else:
            return ImageLoss(block=None)
    loss = _backward(result, index)
    for outside in range(0, index - config.limit_layers + 1):
        for parameter in model.blocks[outside].parameters():
            parameter.grad = None
    return loss


# ----------------------------------------------------------------------------------------
# Gradients across images and processes


def synchronise_gradients(parameters: list[nn.Parameter], images_with_loss: int, accelerator) -> int:
    """Sum ε gradients over processes, divide by the step's images with a loss; returns that count.

    A parameter that no image of the step touched keeps ``grad = None`` on every process, so
    SGD leaves it (and its momentum) alone, as in the authors' batch-size-1 loop.
    """
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in parameters])
    touched = torch.tensor([p.grad is not None for p in parameters], dtype=torch.float32, device=flat.device)
    count = torch.tensor([float(images_with_loss)], device=flat.device)
    packed = accelerator.reduce(torch.cat([flat, touched, count]), reduction="sum")
    flat, touched, count = packed[:flat.numel()], packed[flat.numel():-1], int(packed[-1].item())
    offset = 0
    for parameter, was_touched in zip(parameters, touched.tolist()):
        size = parameter.numel()
        parameter.grad = flat[offset:offset + size].view_as(parameter) / max(count, 1) if was_touched else None
        offset += size
    return count


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
    bad_files: list = field(default_factory=list)
    loss_layers: Counter = field(default_factory=Counter)
    clear_window: deque = field(default_factory=deque)
    clear_rate_curve: list = field(default_factory=list)
    elapsed_s: float = 0.0

    def clear_rate(self) -> float:
        return sum(self.clear_window) / max(len(self.clear_window), 1)


def save_checkpoint(path: Path, state: TrainState, eps: dict, optimizer, config: RepairConfig) -> None:
    """Write ε, optimiser, counters, clear window and RNG states atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": {key: getattr(config, key) for key in RepairConfig.RESUME_KEYS},
        "eps": {name: p.detach().cpu() for name, p in eps.items()},
        "optimizer": optimizer.state_dict(),
        "state": {**asdict(state), "loss_layers": dict(state.loss_layers), "clear_window": list(state.clear_window)},
        "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, eps: dict, optimizer, config: RepairConfig) -> TrainState:
    """Restore what ``save_checkpoint`` wrote; refuses a checkpoint of a different run."""
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    differing = {k: (v, getattr(config, k)) for k, v in payload["config"].items() if v != getattr(config, k)}
    if differing:
        details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in differing.items())
        raise ValueError(f"--resume: {path} belongs to a different run ({details})")
    with torch.no_grad():
        for name, parameter in eps.items():
            parameter.copy_(payload["eps"][name])
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["rng"]["torch"])
    if payload["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    saved = payload["state"]
    state = TrainState(**{**saved, "loss_layers": Counter({int(k): v for k, v in saved["loss_layers"].items()}),
                          "clear_window": deque(saved["clear_window"], maxlen=config.window)})
    return state


# ----------------------------------------------------------------------------------------
# Held-out evaluation (before / after)


@torch.no_grad()
def held_out_outputs(model, images: dict, directions, config) -> dict:
    """Per image: defects per block, the last block's raw patch grid (pictures) and final features (cosines).

    Always without autocast (float32; TF32 matrix products unless ``--precision fp32``),
    so that runs trained in different precisions are measured alike.
    """
    outputs = {}
    for name, image in images.items():
        tokens = block_outputs(model, image)
        features = model.norm(tokens[-1])
        image_hw = image.shape[-2:]
        defects = [int(_defect_count(model, t, image_hw, directions[i], config)) for i, t in enumerate(tokens[:-1])]
        last_grid = _grid(model, tokens[-1], image_hw)
        mask, _ = defect_mask(last_grid, directions[-1], config.mask_thr, config.kernel)
        outputs[name] = {"defects": defects + [int(mask.sum())], "mask": mask.cpu(),
                         "features": features[0].float().cpu(), "grid": last_grid.float().cpu()}
    return outputs


def compare_held_out(model, before: dict, after: dict) -> dict:
    """Defect counts at the last block before/after, and cosines of normal and class tokens to the original."""
    prefix = model.num_prefix_tokens
    normal_cos, class_cos = [], []
    for name in before:
        cos = nn.functional.cosine_similarity(before[name]["features"], after[name]["features"], dim=-1)
        normal = ~before[name]["mask"].flatten()
        normal_cos.append(cos[prefix:][normal].mean().item())
        class_cos.append(cos[0].item())
    total_before = sum(out["defects"][-1] for out in before.values())
    total_after = sum(out["defects"][-1] for out in after.values())
    return {
        "before": {"defects": {n: o["defects"][-1] for n, o in before.items()}, "total": total_before,
                   "defects_per_block": [sum(o["defects"][i] for o in before.values()) for i in range(len(model.blocks))]},
        "after": {"defects": {n: o["defects"][-1] for n, o in after.items()}, "total": total_after,
                  "defects_per_block": [sum(o["defects"][i] for o in after.values()) for i in range(len(model.blocks))]},
        "defect_reduction": (1 - total_after / total_before) if total_before else None,
        "normal_token_cosine": sum(normal_cos) / len(normal_cos),
        "class_token_cosine": sum(class_cos) / len(class_cos),
    }


# ----------------------------------------------------------------------------------------
# Setup helpers


def select_images(paths: list, num_images: int) -> list:
    """``num_images`` paths at an even stride over the listing (the authors' subset)."""
    stride = max(1, len(paths) // max(num_images, 1))
    return paths[::stride][:num_images]


def set_precision(precision: str):
    """Matmul precision for ``fp32``/``tf32``; returns the autocast context factory (``bf16``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    torch.set_float32_matmul_precision("highest" if precision == "fp32" else "high")

    def autocast():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")

    return autocast


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


# ----------------------------------------------------------------------------------------
# The run


@dataclass
class RepairResult:
    output: Path
    report: dict | None  # None when interrupted (a checkpoint was written instead)
    interrupted_by: str | None = None


def repair(config: RepairConfig, accelerator=None) -> RepairResult:
    """Repair ``config.model`` on ``config.data`` (Algorithm 1) and write the run folder."""
    from accelerate import Accelerator

    from .backbones import load_backbone

    # data first: a missing or empty folder is an error before any model is loaded
    paths = select_images(list_images(config.data), config.num_images)
    if config.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {config.precision!r}")
    accelerator = accelerator or Accelerator()
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    autocast = set_precision(config.precision)
    torch.manual_seed(config.seed)
    started = time.perf_counter()

    model = load_backbone(config.model).to(device).eval()
    source_sha256 = weights_sha256(config.model, model) if accelerator.is_main_process else None
    directions = singular_defect_directions(  # Algorithm 1, line 1
        model, samples=config.directions_samples, method=config.directions_method,
        generator=torch.Generator(device=device).manual_seed(config.seed)).to(device)
    transform = sinder_transform(config.resolution)
    held_out_images = sample_images(config.held_out)
    held_out = {name: transform(image)[None].to(device) for name, image in held_out_images.items()}
    before = held_out_outputs(model, held_out, directions, config)

    eps = parametrize_singular_values(model)
    parameters = list(eps.values())
    optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=0.0)
    checkpoint = output / CHECKPOINT
    if config.resume:
        state = load_checkpoint(checkpoint, eps, optimizer, config)
    else:
        state = TrainState(clear_window=deque([False] * config.window, maxlen=config.window))

    # image g of the run goes to process (g // K) % world at step g // (K * world)
    per_step = config.images_per_step * world
    num_steps = min(config.max_steps, math.ceil(len(paths) / per_step))
    mine = [g for g in range(len(paths)) if (g // config.images_per_step) % world == rank]
    start_position = sum(1 for g in mine if g < state.step * per_step)
    loader = DataLoader(Subset(ImageFiles(paths, config.resolution), mine[start_position:]), batch_size=1,
                        num_workers=config.num_workers, collate_fn=collate_one)
    batches = iter(loader)

    progress = None
    if accelerator.is_main_process and not config.quiet:
        from tqdm.auto import tqdm
        progress = tqdm(total=num_steps, initial=state.step, desc="sinder repair", dynamic_ncols=True)

    stopped_because, interrupted_by = "data_exhausted", None
    with _StopSignal() as stop:
        while state.step < num_steps:
            # -- one step: K images on every process
            optimizer.zero_grad(set_to_none=True)
            step_images = range(state.step * per_step, min((state.step + 1) * per_step, len(paths)))
            flags, blocks, losses = [], [], []  # per local image slot: 1 clear, 0 loss, -1 no image
            for g in step_images:
                if (g // config.images_per_step) % world != rank:
                    continue
                index, image, problem = next(batches)
                if image is None:
                    state.bad_files.append({"path": str(paths[index]), "problem": problem})
                    log.warning("skipping %s", problem)
                    flags.append(-1)
                    blocks.append(-1)
                    continue
                result = fast_image_loss(model, image[None].to(device), directions, config, autocast)
                flags.append(1 if result.block is None else 0)
                blocks.append(-1 if result.block is None else result.block)
                losses.append(result.loss)
            while len(flags) < config.images_per_step:
                flags.append(-1)
                blocks.append(-1)
            local = torch.tensor(flags + blocks, dtype=torch.float32, device=device)
            gathered = accelerator.gather(local).view(world, 2, config.images_per_step)
            all_flags = gathered[:, 0].flatten().tolist()
            all_blocks = gathered[:, 1].flatten().tolist()
            with_loss = sum(1 for f in all_flags if f == 0)
            loss_value = sum(losses)
            count = synchronise_gradients(parameters, sum(1 for f in flags if f == 0), accelerator)
            assert count == with_loss, (count, with_loss)
            finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in parameters)
            finite = accelerator.reduce(torch.tensor([0.0 if finite and math.isfinite(loss_value) else 1.0],
                                                     device=device), reduction="sum").item() == 0
            if with_loss and finite:
                optimizer.step()
                state.updates += 1
            elif with_loss:
                state.skipped_nan += 1
            # -- bookkeeping, identical on every process
            for flag, block in zip(all_flags, all_blocks):
                if flag < 0:
                    continue
                state.images_seen += 1
                state.images_clear += int(flag == 1)
                state.images_with_loss += int(flag == 0)
                state.clear_window.append(flag == 1)
                if flag == 0:
                    state.loss_layers[int(block)] += 1
            state.step += 1
            if state.step % 10 == 0 or state.step == num_steps:
                state.clear_rate_curve.append([state.step, state.clear_rate()])
            if progress is not None:
                last_block = next((int(b) for b in reversed(all_blocks) if b >= 0), None)
                progress.update(1)
                progress.set_postfix(clear=f"{state.clear_rate():.2f}", layer=last_block, loss=f"{loss_value:.3f}")
            if state.clear_rate() >= config.stop_clear:
                stopped_because = "clear_rate"
                break
            received = accelerator.reduce(torch.tensor([1.0 if stop.received else 0.0], device=device),
                                          reduction="sum").item()
            if received or (config.save_every and state.step % config.save_every == 0):
                state.elapsed_s += time.perf_counter() - started
                started = time.perf_counter()
                if accelerator.is_main_process:
                    save_checkpoint(checkpoint, state, eps, optimizer, config)
                accelerator.wait_for_everyone()
                if received:
                    interrupted_by = stop.received or "signal"
                    break
        else:
            stopped_because = "max_steps" if state.step >= config.max_steps else "data_exhausted"
    if progress is not None:
        progress.close()
    if interrupted_by:
        return RepairResult(output=output, report=None, interrupted_by=interrupted_by)

    # -- merge, evaluate, write the run folder
    state.elapsed_s += time.perf_counter() - started
    merge_singular_values(model)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return RepairResult(output=output, report=None)
    after = held_out_outputs(model, held_out, directions, config)
    if state.clear_rate_curve and state.clear_rate_curve[-1][0] != state.step:
        state.clear_rate_curve.append([state.step, state.clear_rate()])
    save_checkpoint(checkpoint, state, eps, optimizer, config)
    write_repaired_model(model, output)
    pictures = write_pictures(held_out_images, before, after, output)
    report = {
        "sinder_hub_version": __import__("sinder_hub").__version__,
        "source_model": config.model,
        "source_sha256": source_sha256,
        "architecture": model.pretrained_cfg.get("architecture"),
        "hyperparameters": config.hyperparameters(),
        "steps": state.step,
        "updates": state.updates,
        "skipped_nan": state.skipped_nan,
        "images": {"seen": state.images_seen, "clear": state.images_clear, "with_loss": state.images_with_loss,
                   "skipped_bad": len(state.bad_files)},
        "bad_files": state.bad_files,
        "loss_layer_histogram": {str(k): v for k, v in sorted(state.loss_layers.items())},
        "clear_rate_curve": state.clear_rate_curve,
        "stopped_because": stopped_because,
        "wall_time_s": round(state.elapsed_s, 2),
        "hardware": {"device": _device_name(accelerator), "num_processes": world},
        "held_out": {"resolution": config.resolution, "images": list(held_out), **compare_held_out(model, before, after)},
        "pictures": pictures,
    }
    (output / "repair_report.json").write_text(json.dumps(report, indent=2))
    accelerator.wait_for_everyone()
    return RepairResult(output=output, report=report)


def write_repaired_model(model: nn.Module, output: Path) -> None:
    """``config.json`` + ``model.safetensors`` with timm's own ``save_for_hf`` (timm key names)."""
    from timm.models._hub import save_for_hf

    save_for_hf(model, str(output), safe_serialization=True)


def write_pictures(images: dict, before: dict, after: dict, output: Path) -> list[str]:
    """One PNG per held-out image (PIL ``images``): last block's token norms and PCA, original vs repaired."""
    from .plots import norm_pca_figure

    names = []
    for name, image in images.items():
        path = output / f"before_after_{name}.png"
        norm_pca_figure({name: image}, {"original": {name: before[name]["grid"]},
                                        "repaired": {name: after[name]["grid"]}}, path)
        names.append(path.name)
    return names
