"""One optimiser step (one "iteration" of Algorithm 1): ``images_per_step`` images on every process,
their ε gradients summed over the processes and divided by the images that gave a loss, one SGD update.

With one image on one process this is exactly the authors' batch-size-1 SGD; iterations whose loss
or any gradient is NaN or infinite are skipped, as theirs.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from .losses import compiled_image_loss, fast_image_loss
from .state import BAD, CLEAR, LOSS, StepResult


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


def train_step(model, batch: list, directions, config, autocast, optimizer, parameters, accelerator) -> StepResult:
    """Losses of this process's images (``batch``: ``(index, image | None, problem)``), gradients
    summed over every process, one SGD update unless no image gave a loss or a value is NaN/Inf."""
    optimizer.zero_grad(set_to_none=True)
    flags, blocks, losses, bad, seconds = [], [], [], [], {CLEAR: 0.0, LOSS: 0.0}
    image_loss = compiled_image_loss if config.compile else fast_image_loss
    for index, image, problem in batch:
        if image is None:
            flags.append(BAD)
            blocks.append(-1)
            bad.append((index, problem))
            continue
        started = time.perf_counter()
        result = image_loss(model, image[None].to(accelerator.device, non_blocking=True), directions, config, autocast)
        if accelerator.device.type == "cuda":  # the backward is queued, not done: time it where it runs
            torch.cuda.synchronize(accelerator.device)
        flags.append(CLEAR if result.block is None else LOSS)
        seconds[flags[-1]] += time.perf_counter() - started
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
        loss_images_s=seconds[LOSS],
        clear_images_s=seconds[CLEAR],
    )
