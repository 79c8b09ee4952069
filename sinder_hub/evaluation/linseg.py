"""Linear semantic segmentation, DINOv2's linear protocol (the SINDER paper's Linear 1 / Linear 4).

Features: ``patch_token_encoder(model, layers)``, the final-normed patch tokens of the last block
(Linear 1) or of the last four concatenated (Linear 4). Head: batch norm + 1x1 convolution
(``dense.linear_head``), logits upsampled bilinearly to the labels, pixel-wise cross-entropy with
255 ignored. Training: resized and centre-cropped ``R x R`` images, AdamW (lr 1e-3, weight decay
1e-4, as DINOv2's mmseg configs), linear decay; evaluation: whole images (short side ``R``), logits
upsampled bilinearly to each label's full resolution, mIoU over the classes present or predicted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dense import feature_statistics, linear_head, predictions, train_head
from .features import as_encoder
from .layouts import dataset_for, subset
from .metrics import IGNORE_INDEX, Confusion, segmentation_scores
from .streaming import Streaming
from .targets import TargetSummary, check_targets

SEGMENTATION_ITERATIONS = 4_000
SEGMENTATION_LR = 1e-3
SEGMENTATION_WEIGHT_DECAY = 1e-4


class Segmentation:
    """``DenseTask`` of linear segmentation: cross-entropy on bilinearly upsampled logits."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.channels, self.ignore_index = num_classes, ignore_index

    def count(self, targets) -> int:
        return sum(int((target != self.ignore_index).sum()) for target in targets)

    def loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = F.interpolate(output, size=tuple(targets.shape[-2:]), mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, targets, ignore_index=self.ignore_index, reduction="sum")

    def predict(self, output: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(output, size=size, mode="bilinear", align_corners=False).argmax(dim=1)[0]


def linear_probe_segmentation(
    encoder,
    data,
    resolution: int = 224,
    iterations: int = SEGMENTATION_ITERATIONS,
    learning_rate: float = SEGMENTATION_LR,
    weight_decay: float = SEGMENTATION_WEIGHT_DECAY,
    seed: int = 0,
    num_classes: int | None = None,
    streaming: Streaming | None = None,
    max_images: int | None = None,
    layout: str | None = None,
    summary: TargetSummary | None = None,
) -> dict:
    """A linear head trained on the training split: mIoU, pixel accuracy and per-class IoU (percent) on val.

    ``data``: a segmentation dataset folder or ``EvalDataset``; ``summary``: its checked masks
    (``check_targets``; checked here when not given); ``num_classes`` for the project's own layout.
    """
    encoder, streaming = as_encoder(encoder), streaming or Streaming()
    dataset = subset(dataset_for(data, "linseg", layout), max_images)
    train, val = dataset.splits["train"], dataset.splits["val"]
    summary = summary or check_targets(dataset, ("train", "val"), num_classes, streaming.workers)
    device = streaming.processes.device
    mean, std = feature_statistics(encoder, dataset, train, resolution, streaming, seed)
    task = Segmentation(summary.num_classes, dataset.layout.ignore_index)
    head = linear_head(mean, std, task.channels, seed).to(device)
    desc = f"linseg {dataset.title}"
    train_head(
        head, task, encoder, dataset, train, resolution, streaming, iterations, learning_rate, weight_decay, seed, desc
    )
    confusion = Confusion(summary.num_classes, ignore_index=dataset.layout.ignore_index)
    for prediction, target in predictions(
        head, task, encoder, dataset, val, summary.sizes["val"], resolution, streaming, f"{desc} val"
    ):
        confusion.update(prediction, target)
    return {
        **segmentation_scores(confusion.compute()),
        "classes": summary.num_classes,
        "train_images": len(train),
        "val_images": len(val),
        "iterations": iterations,
        "learning_rate": learning_rate,
    }
