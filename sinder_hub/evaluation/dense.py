"""Dense linear heads trained on the fly on a frozen backbone: the shared loop of linseg and depth.

The head is DINOv2's ``BNHead`` without its extras: a batch norm over the feature channels and a
1x1 convolution. The batch norm uses the training split's statistics (mean and variance of every
patch feature of up to ``STATISTICS_IMAGES`` training images, one streamed pass), so the head is
the same function whatever the number of processes; its affine part is folded into the
convolution. Training streams global batches of ``batch_size`` resized and centre-cropped images
through the backbone, a ``DenseTask`` turns the head's output into a loss at the crop's label
resolution, gradients are summed over processes, and AdamW steps with a linear decay to 0.
Evaluation runs whole images (short side ``R``) and scores at each label's own resolution.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
from torch import nn

from .layouts import EvalDataset, Sample
from .streaming import (
    SampleImages,
    Streaming,
    TrainingBatches,
    by_shape,
    chunks,
    own_share,
    per_process,
    stream,
    whole_size,
)

STATISTICS_IMAGES = 500
LOSS_ELEMENTS = 2**27  # upsampled logits per loss evaluation (512 MiB of float32), bounding memory


class DenseTask(Protocol):
    """What a dense protocol adds to the loop: its output channels, loss and prediction."""

    channels: int

    def count(self, targets: torch.Tensor) -> int:
        """The units a batch's loss is averaged over (labelled pixels, images with depth)."""

    def loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The summed loss of a few images: head output ``[n, channels, h, w]``, targets ``[n, R, R]``."""

    def predict(self, output: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The prediction ``[H, W]`` at a label's size from the head output ``[1, channels, h, w]``."""


class Standardise(nn.Module):
    """``[B, h, w, D]`` features -> ``[B, D, h, w]``, standardised with fixed per-channel statistics."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return ((features - self.mean) / self.std).permute(0, 3, 1, 2)


def linear_head(mean: torch.Tensor, std: torch.Tensor, channels: int, seed: int) -> nn.Sequential:
    """Batch norm with the training statistics, then a 1x1 convolution (init N(0, 0.01), bias 0, as mmseg's ``conv_seg``)."""
    conv = nn.Conv2d(len(mean), channels, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.01)
        conv.bias.zero_()
    return nn.Sequential(Standardise(mean, std), conv)


def feature_statistics(
    encoder, dataset: EvalDataset, samples: list[Sample], resolution: int, streaming: Streaming, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation ``[D]`` of the patch features of up to ``STATISTICS_IMAGES``
    training images (a seeded choice, the same for any number of processes), float64 sums over processes."""
    count = min(STATISTICS_IMAGES, len(samples))
    chosen = sorted(np.random.default_rng([seed, 1]).permutation(len(samples))[:count].tolist())
    subset = [samples[i] for i in chosen]
    images = SampleImages(
        dataset, subset, "crop", resolution, encoder.patch_size, streaming.max_pixels, encoder.normalization
    )
    batches = chunks(own_share(len(subset), streaming.processes), per_process(streaming))
    sums = None
    for _, pixels, _ in stream(images, batches, streaming, f"statistics {dataset.title}"):
        features = encoder(pixels).flatten(0, 2).double()
        part = torch.stack([features.sum(0), features.square().sum(0), torch.full_like(features[0], len(features))])
        sums = part.cpu() if sums is None else sums + part.cpu()
    dims = {size for size in streaming.processes.gather(None if sums is None else sums.shape[1]) if size}
    sums = streaming.processes.sum(sums if sums is not None else torch.zeros(3, dims.pop(), dtype=torch.float64))
    mean = sums[0] / sums[2]
    std = (sums[1] / sums[2] - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


def _sum_gradients(head: nn.Module, streaming: Streaming) -> None:
    parameters = [p for p in head.parameters() if p.requires_grad]
    flat = streaming.processes.sum(torch.cat([p.grad.flatten() for p in parameters]))
    for parameter, part in zip(parameters, flat.split([p.numel() for p in parameters])):
        parameter.grad.copy_(part.view_as(parameter))


def train_head(
    head: nn.Module,
    task: DenseTask,
    encoder,
    dataset: EvalDataset,
    samples: list[Sample],
    resolution: int,
    streaming: Streaming,
    iterations: int,
    learning_rate: float,
    weight_decay: float,
    seed: int,
    desc: str,
) -> nn.Module:
    """Train ``head`` for ``iterations`` global batches; every process ends with the same head."""
    processes = streaming.processes
    optimiser = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1.0 - step / iterations)
    batches = TrainingBatches(len(samples), streaming.batch_size, iterations, seed, processes.rank, processes.world)
    images = SampleImages(
        dataset, samples, "crop", resolution, encoder.patch_size, streaming.max_pixels, encoder.normalization
    )
    device = next(head.parameters()).device
    for indices, pixels, targets in stream(images, batches, streaming, desc, total=iterations * streaming.batch_size):
        for parameter in head.parameters():
            parameter.grad = torch.zeros_like(parameter)
        features = encoder(pixels).to(device).clone() if indices else None  # a normal tensor, fit for autograd
        total = float(processes.sum(torch.tensor([float(task.count(targets)) if indices else 0.0], device=device)))
        step = max(1, LOSS_ELEMENTS // (task.channels * resolution * resolution))
        for start in range(0, len(indices) if total > 0 else 0, step):
            part = slice(start, start + step)
            (task.loss(head(features[part]), targets[part].to(device)) / total).backward()
        _sum_gradients(head, streaming)
        optimiser.step()
        schedule.step()
    return head


@torch.no_grad()
def predictions(
    head: nn.Module,
    task: DenseTask,
    encoder,
    dataset: EvalDataset,
    samples: list[Sample],
    sizes: list[tuple[int, int]],
    resolution: int,
    streaming: Streaming,
    desc: str,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(prediction [H, W], target [H, W])`` of this process's share of ``samples``, whole images at label size."""
    shapes = [whole_size(width, height, resolution, encoder.patch_size) for width, height in sizes]
    batches = by_shape(own_share(len(samples), streaming.processes), shapes, per_process(streaming))
    images = SampleImages(
        dataset, samples, "whole", resolution, encoder.patch_size, streaming.max_pixels, encoder.normalization
    )
    device = next(head.parameters()).device
    for _, pixels, targets in stream(images, batches, streaming, desc):
        outputs = head(encoder(pixels).to(device))
        for i, target in enumerate(targets):
            yield task.predict(outputs[i : i + 1], tuple(target.shape[-2:])), target.to(device)
