"""Unsupervised segmentation by clustering: k-means on the patch tokens, Hungarian-matched to the classes.

The validation split's whole images (short side ``R``) are encoded once; their L2-normalised
final-normed patch tokens go to a float16 ``FeatureStore`` on disk. k-means (``clusters``
default: the number of classes) is Lloyd's algorithm, seeded by k-means++ on a sample of at most
``SEED_POINTS`` tokens (whole images of a seeded choice), best inertia of ``restarts``; each
iteration streams the store once and sums per-cluster statistics over processes. Clusters are
painted over their patches (nearest) at each label's full resolution, matched one-to-one to the
classes by the Hungarian algorithm on the pixel counts (clusters left over count as wrong), and
scored by mIoU and pixel accuracy (the spirit of the STEGO / CAUSE comparison of the SINDER paper).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from ..errors import DataError
from .features import as_encoder
from .layouts import dataset_for, subset
from .metrics import Confusion, segmentation_scores
from .streaming import (
    FeatureStore,
    Streaming,
    scratch_folder,
    stream_whole,
)
from .targets import TargetSummary, check_targets, read_mask

SEED_POINTS = 20_000
CHUNK_ROWS = 16_384  # tokens compared with the centroids at once
KMEANS_ITERATIONS = 50
KMEANS_RESTARTS = 3
FIT_SPLITS = ("train", "val")
FIT_HINT = "; --kmeans-fit train (the dinov2 protocol) fits the clusters on the train split, --kmeans-fit val on val"
Statistics = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, float]]


def kmeans_plus_plus(points: torch.Tensor, clusters: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): ``[clusters, D]`` centroids drawn from ``points [n, D]``."""
    centroids = points[torch.randint(len(points), (1,), generator=generator)]
    while len(centroids) < clusters:
        distance = torch.cdist(points, centroids).min(dim=1).values.square()
        weights = distance if distance.sum() > 0 else torch.ones_like(distance)
        centroids = torch.cat([centroids, points[torch.multinomial(weights, 1, generator=generator)]])
    return centroids


def lloyd(centroids: torch.Tensor, statistics: Statistics, iterations: int) -> tuple[torch.Tensor, float]:
    """Lloyd's iterations from ``centroids [K, D]``: ``statistics(centroids) -> (sums [K, D], counts [K], inertia)``
    over all points; an empty cluster keeps its centroid. Returns the final centroids and their inertia."""
    for _ in range(iterations):
        sums, counts, _ = statistics(centroids)
        updated = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
        if torch.allclose(updated, centroids):
            break
        centroids = updated
    return centroids, statistics(centroids)[2]


def _point_statistics(points: torch.Tensor) -> Statistics:
    def statistics(centroids: torch.Tensor):
        distance = torch.cdist(points, centroids)
        assignments = distance.argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assignments, points)
        counts = torch.bincount(assignments, minlength=len(centroids)).to(points.dtype)
        return sums, counts, float(distance.min(dim=1).values.square().sum())

    return statistics


def kmeans(
    points: torch.Tensor,
    clusters: int,
    iterations: int = KMEANS_ITERATIONS,
    restarts: int = KMEANS_RESTARTS,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of points in memory, k-means++ seeding, best of ``restarts``: ``(assignments [n], centroids [k, D])``."""
    points = points.double()
    generator = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(restarts):
        centroids, inertia = lloyd(kmeans_plus_plus(points, clusters, generator), _point_statistics(points), iterations)
        if best is None or inertia < best[0]:
            best = (inertia, centroids)
    return torch.cdist(points, best[1]).argmin(dim=1), best[1].float()


def match_clusters(confusion: torch.Tensor) -> torch.Tensor:
    """Hungarian matching of clusters to labels maximising matched pixels.

    ``confusion [C_labels, K_clusters]`` -> ``label_of_cluster [K]`` (``-1`` for clusters left unmatched when K > C).
    """
    labels, clusters = linear_sum_assignment(confusion.numpy(), maximize=True)
    label_of_cluster = torch.full((confusion.shape[1],), -1, dtype=torch.long)
    label_of_cluster[torch.as_tensor(clusters)] = torch.as_tensor(labels)
    return label_of_cluster


def _stored_statistics(store: FeatureStore, streaming: Streaming) -> Statistics:
    """Lloyd's statistics over every stored token: this process's share, summed over processes (float64)."""
    device = streaming.processes.device

    def statistics(centroids: torch.Tensor):
        centroids = centroids.to(device)
        sums, counts = torch.zeros_like(centroids), torch.zeros(len(centroids), dtype=torch.float64, device=device)
        inertia = torch.zeros(1, dtype=torch.float64, device=device)
        for rows in store.own_rows(CHUNK_ROWS):
            rows = rows.to(device, torch.float64)
            distance = torch.cdist(rows, centroids)
            assignments = distance.argmin(dim=1)
            sums.index_add_(0, assignments, rows)
            counts += torch.bincount(assignments, minlength=len(centroids))
            inertia += distance.min(dim=1).values.square().sum()
        totals = streaming.processes.sum(torch.cat([sums.flatten(), counts, inertia]))
        size = centroids.numel()
        return totals[:size].view_as(centroids), totals[size:-1], float(totals[-1])

    return statistics


def seed_sample(store: FeatureStore, seed: int, streaming: Streaming) -> torch.Tensor:
    """Tokens of whole images of a seeded choice (at most ``SEED_POINTS``), the same on every process ``[n, D]``."""
    sizes = dict(
        item for part in streaming.processes.gather([(i, h * w) for i, _, h, w in store.index]) for item in part
    )
    order = np.random.default_rng([seed, 2]).permutation(sorted(sizes))
    chosen, total = set(), 0
    for index in order.tolist():
        if chosen and total + sizes[index] > SEED_POINTS:
            break
        chosen.add(index)
        total += sizes[index]
    mine = [(index, rows.numpy()) for index, _, rows in store.own() if index in chosen]
    everyone = sorted((item for part in streaming.processes.gather(mine) for item in part), key=lambda item: item[0])
    return torch.from_numpy(np.concatenate([rows for _, rows in everyone])).double()


def cluster_tokens(
    store: FeatureStore, clusters: int, iterations: int, restarts: int, seed: int, streaming: Streaming
) -> torch.Tensor:
    """The best of ``restarts`` k-means runs over every stored token: centroids ``[clusters, D]`` float64."""
    sample = seed_sample(store, seed, streaming)
    generator = torch.Generator().manual_seed(seed)
    statistics = _stored_statistics(store, streaming)
    best = None
    for _ in range(restarts):
        centroids, inertia = lloyd(kmeans_plus_plus(sample, clusters, generator), statistics, iterations)
        if best is None or inertia < best[0]:
            best = (inertia, centroids)
    return best[1]


def _store_tokens(encoder, dataset, samples, sizes, resolution: int, streaming: Streaming, folder, name: str):
    """This process's share of ``samples`` (whole images, short side ``resolution``) as L2-normalised token grids."""
    store = FeatureStore(folder, name, streaming.processes)
    desc = f"kmeans {dataset.title} {name}"
    for indices, pixels, _ in stream_whole(encoder, dataset, samples, sizes, resolution, streaming, desc):
        for index, grid in zip(indices, encoder(pixels)):
            store.append(index, F.normalize(grid, dim=-1), tuple(grid.shape[:2]))
    store.close()
    return store


def kmeans_segmentation(
    encoder,
    data,
    resolution: int = 224,
    clusters: int | None = None,
    seed: int = 0,
    iterations: int = KMEANS_ITERATIONS,
    restarts: int = KMEANS_RESTARTS,
    num_classes: int | None = None,
    streaming: Streaming | None = None,
    max_images: int | None = None,
    layout: str | None = None,
    summary: TargetSummary | None = None,
    fit_split: str = "val",
) -> dict:
    """mIoU and pixel accuracy (percent) of Hungarian-matched k-means clusters of the validation split's patch
    tokens; the clusters are fitted on the tokens of ``fit_split`` (``train``: STEGO's tables; ``val``)."""
    if fit_split not in FIT_SPLITS:
        raise ValueError(f"fit_split {fit_split!r}: expected one of {FIT_SPLITS}")
    encoder, streaming = as_encoder(encoder), streaming or Streaming()
    try:
        dataset = subset(dataset_for(data, "kmeans" if fit_split == "val" else "linseg", layout), max_images)
    except DataError as error:
        raise DataError(f"{error}{FIT_HINT}" if fit_split == "train" else str(error)) from error
    val = dataset.splits["val"]
    splits = tuple(dict.fromkeys((fit_split, "val")))
    summary = summary or check_targets(dataset, splits, num_classes, streaming.workers)
    num_classes, clusters = summary.num_classes, clusters or summary.num_classes
    confusion = Confusion(num_classes, clusters, dataset.layout.ignore_index)
    with scratch_folder(streaming, "kmeans") as folder:
        store = _store_tokens(encoder, dataset, val, summary.sizes["val"], resolution, streaming, folder, "val")
        fit = store
        if fit_split != "val":
            samples, sizes = dataset.splits[fit_split], summary.sizes[fit_split]
            fit = _store_tokens(encoder, dataset, samples, sizes, resolution, streaming, folder, fit_split)
        centroids = cluster_tokens(fit, clusters, iterations, restarts, seed, streaming)
        for index, (h, w), rows in store.own():
            assignments = torch.cdist(rows.double(), centroids.cpu()).argmin(dim=1).view(1, 1, h, w).float()
            labels = torch.from_numpy(read_mask(val[index], dataset.layout))
            painted = F.interpolate(assignments, size=tuple(labels.shape), mode="nearest").long()[0, 0]
            confusion.update(painted, labels)
    per_cluster = confusion.compute()
    label_of_cluster = match_clusters(per_cluster)
    matched = torch.zeros(num_classes, num_classes + 1, dtype=per_cluster.dtype)
    matched.index_add_(1, torch.where(label_of_cluster < 0, num_classes, label_of_cluster), per_cluster)
    return {
        **segmentation_scores(matched),
        "classes": num_classes,
        "clusters": clusters,
        "images": len(val),
        "fit_split": fit_split,
        "fit_images": len(dataset.splits[fit_split]),
        "iterations": iterations,
        "restarts": restarts,
    }
