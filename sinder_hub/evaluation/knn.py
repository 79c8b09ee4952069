"""k-NN classification, DINOv2's weighted k-NN (``dinov2/eval/knn.py``; DINO, Caron et al. 2021).

Each image's feature (``class_token_encoder``: the final-normed class token) is L2-normalised; a
validation image's ``k`` most cosine-similar training images vote for their class with weight
``exp(similarity / T)``; top-1 / top-5 accuracy of the votes. Defaults: ``k = 20``, ``T = 0.07``.
The training features (the bank) and the queries are kept on disk in float16 (``FeatureStore``)
and compared block by block; only the running top-k of each query is held in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .features import as_encoder
from .layouts import EvalDataset, dataset_for, spread
from .metrics import TopKAccuracy
from .streaming import FeatureStore, SampleImages, Streaming, chunks, own_share, per_process, scratch_folder, stream

BANK_ROWS = 16_384  # training features compared at once
QUERY_ROWS = 1_024  # validation features compared at once
TRIVIAL_TOP5 = 5


def knn_votes(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> torch.Tensor:
    """DINO's weighted k-NN in memory: cosine similarity to the ``k`` nearest training features, each
    voting ``exp(sim / temperature)`` for its class: ``[Nq, C]`` votes."""
    train = F.normalize(train_features.float(), dim=1)
    query = F.normalize(query_features.float(), dim=1)
    similarity, index = (query @ train.T).topk(min(k, len(train)), dim=1)
    weights = (similarity / temperature).exp()
    votes = torch.zeros(len(query), num_classes)
    return votes.scatter_add_(1, train_labels[index], weights)


def encode_vectors(
    encoder,
    dataset: EvalDataset,
    samples,
    resolution: int,
    store: FeatureStore,
    streaming,
    desc,
    normalise=False,
    resize_ratio: float = 1.0,
) -> FeatureStore:
    """Encode this process's share of ``samples`` (resized to ``resolution / resize_ratio`` and centre-cropped
    to ``resolution``) into ``store`` (L2-normalised if asked)."""
    images = SampleImages(
        dataset,
        samples,
        "class",
        resolution,
        encoder.patch_size,
        streaming.max_pixels,
        resize_ratio=resize_ratio,
        normalization=encoder.normalization,
    )
    batches = chunks(own_share(len(samples), streaming.processes), per_process(streaming))
    for indices, pixels, _ in stream(images, batches, streaming, desc):
        features = encoder(pixels)
        store.append_vectors(indices, F.normalize(features, dim=-1) if normalise else features)
    store.close()
    return store


def nearest(queries: torch.Tensor, bank: FeatureStore, labels: torch.Tensor, k: int, device):
    """``(similarities [n, k'], labels [n, k'])`` of the ``k' = min(k, bank size)`` bank rows nearest to ``queries``."""
    best = torch.full((len(queries), 0), -torch.inf, device=device)
    best_labels = torch.zeros((len(queries), 0), dtype=torch.long, device=device)
    queries = queries.to(device)
    for indices, rows in bank.all_chunks(BANK_ROWS):
        similarity = queries @ rows.to(device).T
        candidates = torch.cat([best, similarity], dim=1)
        candidate_labels = torch.cat(
            [best_labels, labels[torch.as_tensor(indices)].to(device).expand(len(queries), -1)], 1
        )
        best, order = candidates.topk(min(k, candidates.shape[1]), dim=1)
        best_labels = candidate_labels.gather(1, order)
    return best, best_labels


def trivial_notes(num_classes: int, train_images: int, k: int) -> tuple[list[str], list[str]]:
    """``(notes, trivial metrics)``: figures that say nothing about the features."""
    notes, trivial = [], []
    if num_classes <= TRIVIAL_TOP5:
        notes.append(f"top5 is trivial: {num_classes} classes, so every image's class is among its top 5")
        trivial.append("top5")
    if train_images <= k:
        notes.append(
            f"k = {k} but only {train_images} training images: every training image votes for every query "
            "(a weighted class prior, not a nearest-neighbour vote)"
        )
        trivial.append("top1")
    return notes, trivial


def knn_evaluate(
    encoder,
    data,
    resolution: int = 224,
    k: int = 20,
    temperature: float = 0.07,
    streaming: Streaming | None = None,
    max_images: int | None = None,
    layout: str | None = None,
    resize_ratio: float = 1.0,
) -> dict:
    """k-NN top-1 / top-5 (percent) of the validation split against the training split.

    ``data``: a classification dataset folder (ImageNet, class folders) or an ``EvalDataset``;
    ``max_images``: at most this many images per split, evenly spread; images are resized to
    ``resolution / resize_ratio`` and centre-cropped to ``resolution`` (DINOv2: 0.875, 256 -> 224).
    """
    encoder, streaming = as_encoder(encoder), streaming or Streaming()
    dataset = dataset_for(data, "knn", layout)
    train, val = (spread(dataset.splits[split], max_images) for split in ("train", "val"))
    device = streaming.processes.device
    train_labels = torch.tensor([sample.target for sample in train])
    val_labels = torch.tensor([sample.target for sample in val])
    accuracy = TopKAccuracy(len(dataset.classes), device=device)
    with scratch_folder(streaming, "knn") as folder:
        stores = {
            split: encode_vectors(
                encoder,
                dataset,
                samples,
                resolution,
                FeatureStore(folder, split, streaming.processes),
                streaming,
                f"knn {dataset.title} {split}",
                normalise=True,
                resize_ratio=resize_ratio,
            )
            for split, samples in (("train", train), ("val", val))
        }
        for indices, queries in stores["val"].own_chunks(QUERY_ROWS):
            similarity, labels = nearest(queries, stores["train"], train_labels, k, device)
            votes = torch.zeros(len(indices), len(dataset.classes), device=device)
            votes.scatter_add_(1, labels, (similarity / temperature).exp())
            accuracy.update(votes, val_labels[torch.as_tensor(indices)])
    notes, trivial = trivial_notes(len(dataset.classes), len(train), k)
    return {
        **accuracy.compute(),
        "k": k,
        "temperature": temperature,
        "resize_ratio": resize_ratio,
        "classes": dataset.classes,
        "train_images": len(train),
        "val_images": len(val),
        "notes": notes,
        "trivial": trivial,
    }
