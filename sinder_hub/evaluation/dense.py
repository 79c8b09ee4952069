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

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .layouts import EvalDataset, Sample
from .protocols import MULTISCALE_RATIOS
from .streaming import (
    Augment,
    FeatureStore,
    SampleImages,
    Streaming,
    TrainingBatches,
    chunks,
    own_share,
    per_process,
    scratch_folder,
    stream,
    stream_whole,
    whole_size,
)

STATISTICS_IMAGES = 500
SCHEDULES = ("linear", "poly", "cosine")
TRAIN_CROPS = ("centre", "random", "random-scale")
COSINE_FLOOR = 1e-8  # mmcv's CosineAnnealing min_lr_ratio in DINOv2's depth config
LOSS_ELEMENTS = 2**27  # upsampled logits per loss evaluation (512 MiB of float32), bounding memory


class DenseTask(Protocol):
    """What a dense protocol adds to the loop: its output channels, loss, scores and prediction."""

    channels: int

    def count(self, targets: torch.Tensor) -> int:
        """The units a batch's loss is averaged over (labelled pixels, images with depth)."""

    def loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The summed loss of a few images: head output ``[n, channels, h, w]``, targets ``[n, R, R]``."""

    def score(self, output: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """What test-time views average (probabilities ``[C, H, W]``, depth ``[H, W]``) at a label's size from
        the head output ``[1, channels, h, w]`` (or the sliding window's, at the image's size)."""

    def decide(self, score: torch.Tensor) -> torch.Tensor:
        """The prediction ``[H, W]`` from an averaged score."""


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
    encoder,
    dataset: EvalDataset,
    samples: list[Sample],
    resolution: int,
    streaming: Streaming,
    seed: int,
    stored: StoredCrops | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation ``[D]`` of the patch features of up to ``STATISTICS_IMAGES``
    training images (a seeded choice, the same for any number of processes), float64 sums over processes;
    read from ``stored`` crops when given (the features the head then trains on), else encoded."""
    count = min(STATISTICS_IMAGES, len(samples))
    chosen = sorted(np.random.default_rng([seed, 1]).permutation(len(samples))[:count].tolist())
    if stored is not None:
        mine = chosen[streaming.processes.rank :: streaming.processes.world]
        parts = [stored.features(batch) for batch in chunks(mine, per_process(streaming))]
    else:
        subset = [samples[i] for i in chosen]
        images = SampleImages(
            dataset,
            subset,
            "crop",
            resolution,
            encoder.patch_size,
            streaming.max_pixels,
            normalization=encoder.normalization,
        )
        batches = chunks(own_share(len(subset), streaming.processes), per_process(streaming))
        parts = (encoder(pixels) for _, pixels, _ in stream(images, batches, streaming, f"statistics {dataset.title}"))
    sums = None
    for features in parts:
        features = features.flatten(0, 2).double()
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


@dataclass(frozen=True)
class HeadTraining:
    """How a dense head trains: AdamW for ``iterations`` global batches, the learning-rate ``schedule``
    (``linear`` decay to 0; mmcv's ``poly`` (power 1) and ``cosine`` (to 1e-8 of the rate), each after
    ``warmup`` linear warm-up steps from ``warmup_ratio`` of it), gradient-norm clipping at ``grad_clip``,
    and the training images: ``augment`` (random crops, the backbone runs on every step) or centre
    crops, encoded once into a ``FeatureStore`` when ``stored`` (the same head, to float16 rounding)."""

    iterations: int
    learning_rate: float
    weight_decay: float
    schedule: str = "linear"
    warmup: int = 0
    warmup_ratio: float = 1.0
    grad_clip: float | None = None
    augment: Augment | None = None
    stored: bool = True

    def factor(self, step: int) -> float:
        """The learning rate of ``step`` (0-based) as a fraction of ``learning_rate``."""
        progress = step / self.iterations
        if self.schedule in ("linear", "poly"):  # mmcv's poly of power 1 (DINOv2's) is the linear decay
            regular = 1.0 - progress
        elif self.schedule == "cosine":
            regular = COSINE_FLOOR + (1 - COSINE_FLOOR) * (1 + math.cos(math.pi * progress)) / 2
        else:
            raise ValueError(f"schedule {self.schedule!r}: expected one of {SCHEDULES}")
        if step < self.warmup:
            regular *= 1 - (1 - step / self.warmup) * (1 - self.warmup_ratio)
        return regular


class _Drawn:
    """Training batches whose items carry their step, ``(index, step)``: the draw of each random crop."""

    def __init__(self, batches: TrainingBatches):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for step, batch in enumerate(self.batches):
            yield [(index, step) for index in batch]


@dataclass
class StoredCrops:
    """Every training sample's centre-crop features, encoded once: one float16 row ``[h·w·D]`` per sample in a
    ``FeatureStore`` (round-robin), read back as ``[n, h, w, D]`` by any process."""

    store: FeatureStore
    shape: tuple[int, int, int]

    @classmethod
    def encode(cls, encoder, images: SampleImages, folder, streaming: Streaming, desc: str) -> StoredCrops:
        store, shape = FeatureStore(folder, "train", streaming.processes), None
        batches = chunks(own_share(len(images), streaming.processes), per_process(streaming))
        for indices, pixels, _ in stream(images, batches, streaming, f"{desc} features"):
            features = encoder(pixels)
            shape = tuple(features.shape[1:])
            store.append_vectors(indices, features.flatten(1))
        store.close()
        return cls(store, next(found for found in streaming.processes.gather(shape) if found is not None))

    def features(self, indices: list[int]) -> torch.Tensor:
        return self.store.rows_of(indices).view(len(indices), *self.shape)


def fit_head(
    task: DenseTask,
    encoder,
    dataset: EvalDataset,
    samples: list[Sample],
    resolution: int,
    streaming: Streaming,
    training: HeadTraining,
    seed: int,
    desc: str,
) -> nn.Module:
    """A ``linear_head`` with the training statistics, trained by ``train_head``: on crops stored once when
    ``training.stored`` (statistics and steps then read the same float16 features), else encoded every step."""
    with scratch_folder(streaming, "dense") as folder:
        stored = None
        if training.stored:
            crops = SampleImages(
                dataset,
                samples,
                "crop",
                resolution,
                encoder.patch_size,
                streaming.max_pixels,
                normalization=encoder.normalization,
            )
            stored = StoredCrops.encode(encoder, crops, folder, streaming, desc)
        mean, std = feature_statistics(encoder, dataset, samples, resolution, streaming, seed, stored)
        head = linear_head(mean, std, task.channels, seed).to(streaming.processes.device)
        return train_head(head, task, encoder, dataset, samples, resolution, streaming, training, seed, desc, stored)


def train_head(
    head: nn.Module,
    task: DenseTask,
    encoder,
    dataset: EvalDataset,
    samples: list[Sample],
    resolution: int,
    streaming: Streaming,
    training: HeadTraining,
    seed: int,
    desc: str,
    stored: StoredCrops | None = None,
) -> nn.Module:
    """Train ``head`` for ``training.iterations`` global batches (on ``stored`` crop features when given); every
    process ends with the same head."""
    processes, patch = streaming.processes, encoder.patch_size
    optimiser = torch.optim.AdamW(head.parameters(), lr=training.learning_rate, weight_decay=training.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, training.factor)
    batches = TrainingBatches(
        len(samples), streaming.batch_size, training.iterations, seed, processes.rank, processes.world
    )
    if training.augment is not None:
        images = SampleImages(
            dataset,
            samples,
            "augment",
            resolution,
            patch,
            streaming.max_pixels,
            augment=training.augment,
            seed=seed,
            normalization=encoder.normalization,
        )
        batches = _Drawn(batches)
    elif stored is not None:
        images = SampleImages(dataset, samples, "crop", resolution, patch, streaming.max_pixels, pixels=False)
    else:
        images = SampleImages(
            dataset, samples, "crop", resolution, patch, streaming.max_pixels, normalization=encoder.normalization
        )
    device = next(head.parameters()).device
    total_images = training.iterations * streaming.batch_size
    for indices, pixels, targets in stream(images, batches, streaming, desc, total=total_images):
        if stored is not None and indices:
            features = stored.features(indices).to(device)
        else:
            features = encoder(pixels).to(device).clone() if indices else None  # a normal tensor, fit for autograd
        _step(head, task, features, targets, indices, streaming, device)
        if training.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(head.parameters(), training.grad_clip)
        optimiser.step()
        schedule.step()
    return head


def _step(head, task: DenseTask, features, targets, indices, streaming: Streaming, device) -> None:
    """The summed gradients of one global batch's loss, normalised by the global count, in ``.grad``."""
    for parameter in head.parameters():
        parameter.grad = torch.zeros_like(parameter)
    total = float(
        streaming.processes.sum(torch.tensor([float(task.count(targets)) if indices else 0.0], device=device))
    )
    pixels = int(targets.shape[-1] * targets.shape[-2]) if indices else 1
    step = max(1, LOSS_ELEMENTS // (task.channels * pixels))
    for start in range(0, len(indices) if total > 0 else 0, step):
        part = slice(start, start + step)
        (task.loss(head(features[part]), targets[part].to(device)) / total).backward()
    _sum_gradients(head, streaming)


@dataclass(frozen=True)
class HeadTesting:
    """How a dense head is tested: whole images at short side ``resolution`` (``window`` None) or a sliding
    ``window`` with ``stride`` over them (mmseg's ``slide``), at each of ``ratios`` of that size, with the
    horizontally flipped image too when ``flip``; scores (probabilities, depths) averaged at label size."""

    resolution: int
    window: int | None = None
    stride: int | None = None
    ratios: tuple[float, ...] = (1.0,)
    flip: bool = False


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Where mmseg's ``slide`` inference puts its windows along a side of ``length`` pixels: every ``stride``,
    the last one moved back to end at the border (``ceil((length - window) / stride) + 1`` windows)."""
    count = max(length - window + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride + window, length) - window, 0) for i in range(count)})


def _slide(head, encoder, pixels: torch.Tensor, window: int, stride: int, device) -> torch.Tensor:
    """Head outputs ``[1, C, H, W]`` of one image ``[1, 3, H, W]``: windows' outputs upsampled and averaged."""
    height, width = pixels.shape[-2:]
    tops, lefts = window_starts(height, window, stride), window_starts(width, window, stride)
    total = count = None
    for top in tops:
        for left in lefts:
            crop = pixels[..., top : top + window, left : left + window]
            output = head(encoder(crop).to(device))
            output = F.interpolate(output, size=tuple(crop.shape[-2:]), mode="bilinear", align_corners=False)
            if total is None:
                total = torch.zeros(1, output.shape[1], height, width, device=device)
                count = torch.zeros(1, 1, height, width, device=device)
            total[..., top : top + window, left : left + window] += output
            count[..., top : top + window, left : left + window] += 1
    return total / count


def _view(pixels: torch.Tensor, ratio: float, flip: bool, testing: HeadTesting, patch: int) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` at ``ratio`` of the test size (bilinear, whole patches), flipped if asked."""
    if ratio != 1.0:
        size = whole_size(pixels.shape[-1], pixels.shape[-2], round(testing.resolution * ratio), patch)
        pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
    return pixels.flip(-1) if flip else pixels


def _scores(head, task, encoder, pixels, testing: HeadTesting, sizes, device) -> Iterator[torch.Tensor]:
    """Each image's score at its label size, averaged over ``testing``'s ratios and flips (one image held at a time)."""
    views = [(ratio, flip) for ratio in testing.ratios for flip in ((False, True) if testing.flip else (False,))]
    patch = encoder.patch_size
    outputs = {}
    if testing.window is None:  # whole images: the batch in one pass per view, outputs at patch resolution
        outputs = {view: head(encoder(_view(pixels, *view, testing, patch)).to(device)) for view in views}
    for i, size in enumerate(sizes):
        total = None
        for view in views:
            if testing.window is None:
                output = outputs[view][i : i + 1]
            else:
                image = _view(pixels[i : i + 1], *view, testing, patch)
                output = _slide(head, encoder, image, testing.window, testing.stride, device)
            score = task.score(output, size)
            score = score.flip(-1) if view[1] else score
            total = score if total is None else total + score
        yield total / len(views)


@torch.no_grad()
def predictions(
    head: nn.Module,
    task: DenseTask,
    encoder,
    dataset: EvalDataset,
    samples: list[Sample],
    sizes: list[tuple[int, int]],
    testing: HeadTesting,
    streaming: Streaming,
    desc: str,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(prediction [H, W], target [H, W])`` of this process's share of ``samples``, whole images at label size."""
    resolution = testing.resolution
    device = next(head.parameters()).device
    for _, pixels, targets in stream_whole(encoder, dataset, samples, sizes, resolution, streaming, desc):
        label_sizes = [tuple(target.shape[-2:]) for target in targets]
        for score, target in zip(_scores(head, task, encoder, pixels, testing, label_sizes, device), targets):
            yield task.decide(score), target.to(device)


def _patches(pixels: int, patch: int) -> int:
    """``pixels`` rounded down to whole patches (at least one)."""
    return max(patch, pixels // patch * patch)


def head_plan(settings: dict, patch: int, augment: dict) -> tuple[HeadTraining, HeadTesting]:
    """A protocol's dense settings (``protocols.task_settings``) as training and testing plans.

    Training crops are ``resolution`` x (``crop_width`` or ``resolution``) rounded down to whole
    patches; ``augment`` gives the task's ``Augment`` fields (padding value, class-ratio cap,
    pre-crop). Sliding windows are ``test_resolution`` rounded down to whole patches, with a
    stride of ``stride_ratio`` of that in whole patches; ``multiscale`` tests at
    ``MULTISCALE_RATIOS`` of the size with flips.
    """
    height = _patches(settings["resolution"], patch)
    width = _patches(settings.get("crop_width") or settings["resolution"], patch)
    crop = settings["train_crop"]
    if crop not in TRAIN_CROPS:
        raise ValueError(f"train_crop {crop!r}: expected one of {TRAIN_CROPS}")
    random_crop = None
    if crop != "centre":
        scale = settings.get("scale_range") if crop == "random-scale" else None
        side = settings["resolution"]
        random_crop = Augment((height, width), scale, side, 4 * side, settings["flip"], **augment)
    training = HeadTraining(
        iterations=settings["iterations"],
        learning_rate=settings["learning_rate"],
        weight_decay=settings["weight_decay"],
        schedule=settings["schedule"],
        warmup=settings["warmup"],
        warmup_ratio=settings["warmup_ratio"],
        grad_clip=settings.get("grad_clip"),
        augment=random_crop,
        stored=random_crop is None,
    )
    window = stride = None
    if settings.get("test_mode", "whole") == "slide":
        window = _patches(settings["test_resolution"], patch)
        stride = max(patch, round(window * settings["stride_ratio"] / patch) * patch)
    multiscale = settings.get("multiscale", False)
    testing = HeadTesting(
        resolution=settings["test_resolution"],
        window=window,
        stride=stride,
        ratios=MULTISCALE_RATIOS if multiscale else (1.0,),
        flip=bool(settings.get("test_flip") or multiscale),
    )
    return training, testing
