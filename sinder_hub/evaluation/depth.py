"""Linear monocular depth, DINOv2's linear depth protocol (Linear 1 / Linear 4), scored on NYU Depth v2.

Features: ``depth_token_encoder(model, layers)``, raw patch tokens each beside its block's class
token, of the last block (Linear 1) or of four spread blocks (Linear 4, DINOv2's table). Head:
batch norm + 1x1 convolution to 256 bins (``dense.linear_head``), upsampled 4x bilinearly; the
depth is the bins' centres (uniform over ``[min_depth, max_depth]``, 1e-3 to 10 m) weighted by
``relu(logits) + 0.1``, normalised (DINOv2's ``classify=True``, ``bins_strategy="UD"``,
``norm_strategy="linear"``), then upsampled bilinearly to the label. Loss: the scale-invariant log
loss ``sqrt(Var(g) + 0.15 Mean(g)^2)``, ``g = log(pred) - log(gt)`` of one image, averaged over
images. Evaluation: whole images (short side ``R``), predictions at the label's full resolution,
pixels with ``min_depth < gt < max_depth`` inside the Eigen crop (NYU's 480 x 640 labels);
RMSE (m), δ1 (percent of pixels within 1.25x) and AbsRel per image, averaged over images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dense import fit_head, head_plan, predictions
from .features import as_encoder
from .layouts import dataset_for, subset
from .metrics import DepthMetrics
from .protocols import QUICK, task_settings
from .streaming import Streaming
from .targets import TargetSummary, check_targets

BINS = 256
DEPTH_ITERATIONS = QUICK["depth"]["iterations"]
DEPTH_LR = QUICK["depth"]["learning_rate"]
BIN_FLOOR = 0.1  # DINOv2's "linear" normalisation: relu(logits) + 0.1
UPSAMPLE = 4
EIGEN_CROP = ((480, 640), (slice(45, 471), slice(41, 601)))  # NYU's evaluation crop (Eigen et al. 2014)
SIG_LAMBDA = 0.15
GRADIENT_EPS = 1e-3  # DINOv2's GradientLoss: log(depth + 0.001)


class Depth:
    """``DenseTask`` of linear depth over ``BINS`` uniform bins."""

    def __init__(self, min_depth: float, max_depth: float, gradient_loss: float = 0.0):
        self.channels, self.min_depth, self.max_depth = BINS, min_depth, max_depth
        self.gradient_loss = gradient_loss
        self.bins = torch.linspace(min_depth, max_depth, BINS)

    def depth(self, output: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Head output ``[n, BINS, h, w]`` -> depth ``[n, H, W]`` in metres."""
        logits = F.interpolate(output, scale_factor=UPSAMPLE, mode="bilinear", align_corners=False)
        weights = logits.relu() + BIN_FLOOR
        weights = weights / weights.sum(dim=1, keepdim=True)
        depth = torch.einsum("bkhw,k->bhw", weights, self.bins.to(output.device))[:, None]
        return F.interpolate(depth, size=size, mode="bilinear", align_corners=False)[:, 0]

    def valid(self, target: torch.Tensor) -> torch.Tensor:
        return (target > self.min_depth) & (target < self.max_depth)

    def count(self, targets) -> int:
        return sum(int(self.valid(target).any()) for target in targets)

    def loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The scale-invariant log loss of each image with depth (+ ``gradient_loss`` x its gradient loss), summed."""
        depths, total = self.depth(output, tuple(targets.shape[-2:])), output.sum() * 0.0
        for depth, target in zip(depths, targets):
            valid = self.valid(target)
            if bool(valid.any()):
                g = depth[valid].log() - target[valid].log()
                total = total + (g.var(unbiased=False) + SIG_LAMBDA * g.mean().square()).sqrt()
                if self.gradient_loss:
                    total = total + self.gradient_loss * gradient_loss(depth, target, valid)
        return total

    def score(self, output: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Depth ``[H, W]`` at a label's size, clamped to the depth range (views average depths)."""
        return self.depth(output, size)[0].clamp(self.min_depth, self.max_depth)

    def decide(self, score: torch.Tensor) -> torch.Tensor:
        return score


def gradient_loss(depth: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The multi-scale gradient-matching loss of one image ``[H, W]`` (MegaDepth's, as DINOv2's depth
    ``GradientLoss``): at strides 1, 2, 4, 6, absolute differences two pixels apart of the log-depth
    error, over pairs of valid pixels, divided by the valid pixels of that scale."""
    total = depth.sum() * 0.0
    error = (depth + GRADIENT_EPS).log() - (target + GRADIENT_EPS).log()
    for stride in (1, 2, 4, 6):
        e, mask = error[::stride, ::stride], valid[::stride, ::stride].to(error.dtype)
        e = e * mask
        vertical = (e[:-2] - e[2:]).abs() * mask[:-2] * mask[2:]
        horizontal = (e[:, :-2] - e[:, 2:]).abs() * mask[:, :-2] * mask[:, 2:]
        total = total + (vertical.sum() + horizontal.sum()) / mask.sum().clamp_min(1)
    return total


def evaluation_mask(target: torch.Tensor, task: Depth) -> torch.Tensor:
    """The scored pixels of a label: valid depth, inside the Eigen crop for NYU's 480 x 640 labels."""
    valid = task.valid(target)
    size, (rows, cols) = EIGEN_CROP
    if tuple(target.shape) == size:
        crop = torch.zeros_like(valid)
        crop[rows, cols] = True
        valid &= crop
    return valid


def linear_depth(
    encoder,
    data,
    resolution: int | None = None,
    iterations: int | None = None,
    learning_rate: float | None = None,
    weight_decay: float | None = None,
    seed: int = 0,
    streaming: Streaming | None = None,
    max_images: int | None = None,
    layout: str | None = None,
    summary: TargetSummary | None = None,
    protocol: str = "quick",
    settings: dict | None = None,
) -> dict:
    """A linear depth head trained on the training split: RMSE, δ1 and AbsRel on the test split.

    ``protocol``'s settings (``protocols.task_settings``), with the arguments given and ``settings``
    on top; the result's ``settings`` are the values used.
    """
    given = dict(resolution=resolution, iterations=iterations, learning_rate=learning_rate, weight_decay=weight_decay)
    settings = task_settings(protocol, "depth", {**given, **(settings or {})})
    encoder, streaming = as_encoder(encoder), streaming or Streaming()
    dataset = subset(dataset_for(data, "depth", layout), max_images)
    train, val = dataset.splits["train"], dataset.splits["val"]
    summary = summary or check_targets(dataset, ("train", "val"), workers=streaming.workers)
    size, (rows, cols) = EIGEN_CROP
    eigen = (size, (rows.start, cols.start, rows.stop, cols.stop))
    training, testing = head_plan(settings, encoder.patch_size, dict(pad_target=0.0, pre_crop=eigen))
    resolution = settings["resolution"]
    task = Depth(dataset.layout.min_depth, dataset.layout.max_depth, settings["gradient_loss"])
    desc = f"depth {dataset.title}"
    head = fit_head(task, encoder, dataset, train, resolution, streaming, training, seed, desc)
    metrics = DepthMetrics(streaming.processes.device)
    for prediction, target in predictions(
        head, task, encoder, dataset, val, summary.sizes["val"], testing, streaming, f"{desc} val"
    ):
        metrics.update(prediction, target, evaluation_mask(target, task))
    return {
        **metrics.compute(),
        "train_images": len(train),
        "val_images": len(val),
        "iterations": settings["iterations"],
        "learning_rate": settings["learning_rate"],
        "min_depth": task.min_depth,
        "max_depth": task.max_depth,
        "settings": settings,
    }
