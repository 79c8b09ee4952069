"""One image's loss (paper Algorithm 1, lines 4-11): the fast step, the compiled one and the authors' naive one.

Each takes a ``[1, 3, R, R]`` image, finds the first block that gives a loss (eq. 5 with at least
``max(skip_less_than, 1)`` defects), computes the neighbour loss there (eq. 6-8) and back-propagates it
into the ε gradients of the window's blocks; an image without such a block is clear. The three
give the same gradients (tested in float64): ``fast_image_loss`` computes only what the update needs,
``compiled_image_loss`` (``--compile``) scans with a ``torch.compile``d no-grad function,
``naive_image_loss`` is the authors' pattern, kept as the benchmark baseline and the test oracle.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn

from ..defects import defect_mask, neighbor_loss
from ..singular_values import factorize_blocks, reference_mode, sync_singular_values
from ..tokens import patch_grid, prepare_blocks
from .config import RepairConfig


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
def _compiled_block_and_count(backend: str):
    return torch.compile(_block_and_count, dynamic=False, backend=backend)


@functools.cache
def _compiled_block(backend: str):
    """One block with autograd (forward and backward compiled), its layers factorised beforehand."""
    return torch.compile(_run_block, dynamic=False, backend=backend)


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
    about one no-grad forward. ``config.compile_backend`` is torch.compile's backend.
    """
    image_hw = image.shape[-2:]
    block_and_count = _compiled_block_and_count(config.compile_backend)
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
    run_block = _compiled_block(config.compile_backend)
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
