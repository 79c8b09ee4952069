"""Linear classification probe, DINOv2's linear evaluation (``dinov2/eval/linear.py``) on frozen features.

Input (``--linear-input``): ``class`` (the final-normed class token, ``class_token_encoder``) or
``class+mean`` (the class token beside the mean final-normed patch token, DINOv2's ``avgpool``,
``class_and_mean_encoder``), of the last block. As DINOv2 does, one linear layer per learning
rate of its grid (``DINOV2_LEARNING_RATES`` x batch / 256) is trained at once (init N(0, 0.01),
SGD, momentum 0.9, no weight decay, cosine schedule to 0, 12,500 steps of batch 1024 by default)
and the best head on the validation split is reported. We encode each image once (resize +
centre crop, no augmentation) into a float16 ``FeatureStore`` on disk, train from it (the same
steps on every process: the heads are identical) and score each process's share of the validation split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .features import as_encoder
from .knn import encode_vectors, trivial_notes
from .layouts import dataset_for, spread
from .metrics import TopKAccuracy
from .streaming import FeatureStore, Streaming, TrainingBatches, scratch_folder

DINOV2_LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
LINEAR_ITERATIONS = 12_500
LINEAR_BATCH = 1_024
QUERY_ROWS = 4_096


def train_linear_heads(
    store: FeatureStore,
    labels: torch.Tensor,
    num_classes: int,
    learning_rates: tuple[float, ...],
    iterations: int,
    batch_size: int,
    seed: int,
    device,
) -> nn.ModuleList:
    """One ``nn.Linear(D, C)`` per learning rate, trained together on the stored features (each with its own lr)."""
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(labels))
    heads = nn.ModuleList()
    for _ in learning_rates:
        head = nn.Linear(store.dim, num_classes)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
            head.bias.zero_()
        heads.append(head)
    heads = heads.to(device)
    groups = [{"params": head.parameters(), "lr": lr * batch_size / 256} for head, lr in zip(heads, learning_rates)]
    optimiser = torch.optim.SGD(groups, momentum=0.9, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, iterations, eta_min=0)
    for batch in TrainingBatches(len(labels), batch_size, iterations, seed):
        inputs, targets = store.rows_of(batch).to(device), labels[batch].to(device)
        loss = sum(F.cross_entropy(head(inputs), targets) for head in heads)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    return heads


def linear_classification(
    encoder,
    data,
    resolution: int = 224,
    iterations: int = LINEAR_ITERATIONS,
    batch_size: int = LINEAR_BATCH,
    learning_rates: tuple[float, ...] = DINOV2_LEARNING_RATES,
    seed: int = 0,
    streaming: Streaming | None = None,
    max_images: int | None = None,
    layout: str | None = None,
    resize_ratio: float = 1.0,
) -> dict:
    """Top-1 / top-5 (percent) of the best linear head on the validation split, and its learning rate.

    Images are resized to ``resolution / resize_ratio`` and centre-cropped to ``resolution``."""
    encoder, streaming = as_encoder(encoder), streaming or Streaming()
    dataset = dataset_for(data, "linear", layout)
    train, val = (spread(dataset.splits[split], max_images) for split in ("train", "val"))
    device, classes = streaming.processes.device, len(dataset.classes)
    val_labels = torch.tensor([sample.target for sample in val])
    with scratch_folder(streaming, "linear") as folder:
        stores = {
            split: encode_vectors(
                encoder,
                dataset,
                samples,
                resolution,
                FeatureStore(folder, split, streaming.processes),
                streaming,
                f"linear {dataset.title} {split}",
                resize_ratio=resize_ratio,
            )
            for split, samples in (("train", train), ("val", val))
        }
        train_labels = torch.tensor([sample.target for sample in train])
        heads = train_linear_heads(
            stores["train"], train_labels, classes, learning_rates, iterations, batch_size, seed, device
        )
        accuracies = [TopKAccuracy(classes, device=device) for _ in heads]
        with torch.no_grad():
            for indices, rows in stores["val"].own_chunks(QUERY_ROWS):
                for head, accuracy in zip(heads, accuracies):
                    accuracy.update(head(rows.to(device)), val_labels[torch.as_tensor(indices)])
    scores = [accuracy.compute() for accuracy in accuracies]
    best = max(range(len(scores)), key=lambda i: scores[i]["top1"])
    notes, trivial = trivial_notes(classes, len(train), 0)
    return {
        **scores[best],
        "learning_rate": learning_rates[best],
        "iterations": iterations,
        "resize_ratio": resize_ratio,
        "batch_size": min(batch_size, len(train)),
        "classes": dataset.classes,
        "train_images": len(train),
        "val_images": len(val),
        "notes": notes,
        "trivial": trivial,
    }
