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

from .dense import fit_head, head_plan, predictions
from .features import as_encoder
from .layouts import dataset_for, subset
from .metrics import IGNORE_INDEX, Confusion, segmentation_scores
from .protocols import QUICK, task_settings
from .streaming import Streaming
from .targets import TargetSummary, check_targets

SEGMENTATION_ITERATIONS = QUICK["linseg"]["iterations"]
SEGMENTATION_LR = QUICK["linseg"]["learning_rate"]
CAT_MAX_RATIO = 0.75  # mmseg's RandomCrop in DINOv2's configs: at most 75 % of a crop's labelled pixels in one class


class Segmentation:
    """``DenseTask`` of linear segmentation: cross-entropy on bilinearly upsampled logits."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.channels, self.ignore_index = num_classes, ignore_index

    def count(self, targets) -> int:
        return sum(int((target != self.ignore_index).sum()) for target in targets)

    def loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = F.interpolate(output, size=tuple(targets.shape[-2:]), mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, targets, ignore_index=self.ignore_index, reduction="sum")

    def score(self, output: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Class probabilities ``[C, H, W]`` at a label's size (mmseg averages the softmax of its views)."""
        return F.interpolate(output, size=size, mode="bilinear", align_corners=False)[0].softmax(dim=0)

    def decide(self, score: torch.Tensor) -> torch.Tensor:
        return score.argmax(dim=0)


def linear_probe_segmentation(
    encoder,
    data,
    resolution: int | None = None,
    iterations: int | None = None,
    learning_rate: float | None = None,
    weight_decay: float | None = None,
    seed: int = 0,
    num_classes: int | None = None,
    streaming: Streaming | None = None,
    max_images: int | None = None,
    layout: str | None = None,
    summary: TargetSummary | None = None,
    protocol: str = "quick",
    settings: dict | None = None,
) -> dict:
    """A linear head trained on the training split: mIoU, pixel accuracy and per-class IoU (percent) on val.

    ``data``: a segmentation dataset folder or ``EvalDataset``; ``summary``: its checked masks
    (``check_targets``; checked here when not given); ``num_classes`` for the project's own layout.
    ``protocol``'s settings (``protocols.task_settings``), with the arguments given and ``settings``
    on top; the result's ``settings`` are the values used.
    """
    given = dict(resolution=resolution, iterations=iterations, learning_rate=learning_rate, weight_decay=weight_decay)
    settings = task_settings(protocol, "linseg", {**given, **(settings or {})})
    encoder, streaming = as_encoder(encoder), streaming or Streaming()
    dataset = subset(dataset_for(data, "linseg", layout), max_images)
    train, val = dataset.splits["train"], dataset.splits["val"]
    summary = summary or check_targets(dataset, ("train", "val"), num_classes, streaming.workers)
    ignore = dataset.layout.ignore_index
    training, testing = head_plan(
        settings, encoder.patch_size, dict(cat_max_ratio=CAT_MAX_RATIO, ignore_index=ignore, pad_target=ignore)
    )
    resolution = settings["resolution"]
    task = Segmentation(summary.num_classes, ignore)
    desc = f"linseg {dataset.title}"
    head = fit_head(task, encoder, dataset, train, resolution, streaming, training, seed, desc)
    confusion = Confusion(summary.num_classes, ignore_index=ignore)
    for prediction, target in predictions(
        head, task, encoder, dataset, val, summary.sizes["val"], testing, streaming, f"{desc} val"
    ):
        confusion.update(prediction, target)
    return {
        **segmentation_scores(confusion.compute()),
        "classes": summary.num_classes,
        "train_images": len(train),
        "val_images": len(val),
        "iterations": settings["iterations"],
        "learning_rate": settings["learning_rate"],
        "settings": settings,
    }
