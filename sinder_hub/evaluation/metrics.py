"""Metrics, accumulated batch by batch and summed over processes: torchmetrics where one fits, tested by hand elsewhere.

- classification: ``MulticlassAccuracy`` (top-1, top-5, micro average = percent of images);
- segmentation: a ``MulticlassConfusionMatrix`` (255 ignored) reduced by ``segmentation_scores``
  to mIoU over the classes present or predicted (torchmetrics' ``MulticlassJaccardIndex`` macro
  average) and pixel accuracy; rectangular matrices (k-means clusters vs classes) are padded;
- depth: ``depth_errors`` per image (RMSE, δ1, AbsRel: no torchmetrics metric is the per-image
  mean of the depth benchmarks), averaged over images with ``MeanMetric``.

Every metric object syncs over the processes of an ``accelerate launch`` when it computes (each
sample is seen by exactly one process), and gives the same answer in one process. torchmetrics is
imported when a metric is made (importing it takes seconds), so checks that fail early stay fast.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = 255
DELTA1 = 1.25


class TopKAccuracy:
    """Top-1 and top-5 accuracy (percent) of ``[N, C]`` scores; ``k`` capped at the number of classes."""

    def __init__(self, num_classes: int, ks: tuple[int, ...] = (1, 5), device=None):
        from torchmetrics.classification import MulticlassAccuracy

        self.metrics = {
            f"top{k}": MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro").to(device)
            for k in ks
        }

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        for metric in self.metrics.values():
            metric.update(scores, labels.to(scores.device))

    def compute(self) -> dict[str, float]:
        return {name: 100.0 * float(metric.compute()) for name, metric in self.metrics.items()}


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Percent of rows of ``scores [N, C]`` whose label is among the top-k (k capped at C): ``{"top1": …, "top5": …}``."""
    accuracy = TopKAccuracy(scores.shape[1], ks, scores.device)
    accuracy.update(scores, labels)
    return accuracy.compute()


class Confusion:
    """A ``[C, P]`` pixel-count matrix (rows: target classes, columns: predictions), ``ignore_index`` targets skipped."""

    def __init__(self, num_classes: int, num_predictions: int | None = None, ignore_index: int = IGNORE_INDEX):
        from torchmetrics.classification import MulticlassConfusionMatrix

        self.shape = (num_classes, num_predictions or num_classes)
        self.metric = MulticlassConfusionMatrix(max(self.shape), ignore_index=ignore_index, validate_args=False)

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        if self.metric.device != predictions.device:
            self.metric = self.metric.to(predictions.device)
        self.metric.update(predictions.flatten(), targets.flatten().to(predictions.device))

    def compute(self) -> torch.Tensor:
        return self.metric.compute()[: self.shape[0], : self.shape[1]].cpu()


def confusion_matrix(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    num_predictions: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """``[C, P]`` pixel counts (``P = num_predictions``, default ``C``), rows = target, columns = prediction; ``ignore_index`` targets skipped."""
    confusion = Confusion(num_classes, num_predictions, ignore_index)
    confusion.update(predictions, targets)
    return confusion.compute()


def segmentation_scores(confusion: torch.Tensor) -> dict:
    """``miou`` and ``pixel_accuracy`` (percent) and per-class ``iou`` of a ``[C, C']`` confusion matrix.

    Rows are target classes, columns predictions; columns beyond ``C`` are predictions of
    no class (they only add false negatives). A class's IoU is ``TP / (TP + FP + FN)``;
    classes neither present nor predicted get ``None`` and are left out of the mean.
    """
    confusion = confusion.double()
    classes = confusion.shape[0]
    true_positive = confusion.diag()
    union = confusion[:, :classes].sum(dim=0) + confusion.sum(dim=1) - true_positive
    iou = [float(tp / u) * 100.0 if u > 0 else None for tp, u in zip(true_positive, union)]
    present = [value for value in iou if value is not None]
    return {
        "miou": sum(present) / len(present) if present else 0.0,
        "pixel_accuracy": 100.0 * float(true_positive.sum() / confusion.sum().clamp_min(1)),
        "iou": iou,
    }


def depth_errors(prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> dict[str, float]:
    """RMSE (metres), δ1 (percent of pixels with ``max(p/t, t/p) < 1.25``) and AbsRel over the ``valid`` pixels of one image."""
    p, t = prediction[valid].double(), target[valid].double()
    ratio = torch.maximum(p / t, t / p)
    return {
        "rmse": float((p - t).square().mean().sqrt()),
        "delta1": 100.0 * float((ratio < DELTA1).double().mean()),
        "abs_rel": float(((p - t).abs() / t).mean()),
    }


class DepthMetrics:
    """The per-image ``depth_errors`` averaged over images."""

    NAMES = ("rmse", "delta1", "abs_rel")

    def __init__(self, device=None):
        from torchmetrics import MeanMetric

        self.means = {name: MeanMetric().to(device) for name in self.NAMES}

    def update(self, prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> None:
        if not bool(valid.any()):
            return
        for name, value in depth_errors(prediction, target, valid).items():
            self.means[name].update(torch.tensor(value, device=self.means[name].device))

    def compute(self) -> dict[str, float]:
        return {name: float(metric.compute()) for name, metric in self.means.items()}
