"""Feature quality of a frozen backbone: k-NN classification, linear-probe and k-means segmentation.

Every evaluation takes an *encoder*, a function of normalised ``[B, 3, R, R]`` images:
``class_token_encoder(model)`` gives ``[B, D]`` features, ``patch_token_encoder(model)``
``[B, H, W, D]`` (both after the final norm); any other function of that shape works
(hand-crafted or random features as references).

Data layouts (images are read with ``data.load_rgb`` and ``data.sinder_transform(R)``):

- classification: ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*`` (classes = train's
  sub-folders);
- segmentation: ``ROOT/<split>/images/<stem>.<ext>`` with ``ROOT/<split>/masks/<stem>.png``,
  single-channel index masks (mode L or P, VOC-style) of the image's size, 255 = ignore.
  Masks are resized (nearest) and cropped like the images, and scored at ``R x R``. The
  linear probe trains on ``train`` and scores ``val``; k-means clusters and scores ``val``.

Everything is kept in memory: meant for small benchmarks and before/after comparisons.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.transforms import v2

from .data import IMAGE_SUFFIXES, MAX_PIXELS, list_images, load_rgb, sinder_transform
from .errors import DataError
from .tokens import patch_grid

IGNORE_INDEX = 255
TASKS = ("knn", "linseg", "kmeans")
CLASSIFICATION_LAYOUT = "ROOT/train/<class>/ and ROOT/val/<class>/ image folders, at least 2 classes"
SEGMENTATION_LAYOUT = "ROOT/<split>/images/<stem>.* with ROOT/<split>/masks/<stem>.png"
SHOWN = 3
Encoder = Callable[[torch.Tensor], torch.Tensor]


# --- encoders -------------------------------------------------------------------------


def class_token_encoder(model: nn.Module) -> Encoder:
    """``[B, 3, R, R]`` images -> the model's own pooled feature ``[B, D]``: the final-normed class token
    (DINOv2's k-NN feature), or timm's pooling for models without one (SigLIP's attention pool)."""
    device = next(model.parameters()).device

    @torch.inference_mode()
    def encode(images: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(images.to(device)), pre_logits=True).float().cpu()

    return encode


def patch_token_encoder(model: nn.Module) -> Encoder:
    """``[B, 3, R, R]`` images -> final-normed patch tokens ``[B, H, W, D]``."""
    device = next(model.parameters()).device

    @torch.inference_mode()
    def encode(images: torch.Tensor) -> torch.Tensor:
        tokens = model.forward_features(images.to(device))
        return patch_grid(model, tokens, tuple(images.shape[-2:])).float().cpu()

    return encode


def encode_files(
    encoder: Encoder, paths: list[Path], resolution: int, batch_size: int = 16, max_pixels: int | None = MAX_PIXELS
) -> torch.Tensor:
    """Encode image files in batches: ``[N, ...]`` (whatever the encoder returns per image)."""
    transform = sinder_transform(resolution)
    outputs = []
    for start in range(0, len(paths), batch_size):
        batch = torch.stack(
            [
                transform(load_rgb(path, min_size=14, max_pixels=max_pixels))
                for path in paths[start : start + batch_size]
            ]
        )
        outputs.append(encoder(batch))
    return torch.cat(outputs)


# --- data -----------------------------------------------------------------------------


def _layout(root: Path) -> str:
    """What a dataset folder looks like, for error messages."""
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "a single segmentation split (images/ + masks/)"
    splits = [p for p in sorted(root.iterdir()) if p.is_dir()] if root.is_dir() else []
    if any((p / "images").is_dir() and (p / "masks").is_dir() for p in splits):
        return "a segmentation layout (<split>/images/ + <split>/masks/)"
    if any(q.is_dir() for p in splits for q in p.iterdir()):
        return "a classification layout (<split>/<class>/)"
    if root.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir()):
        return "image files directly in it"
    return f"sub-folders {', '.join(p.name for p in splits[:4])}" if splits else "no sub-folders"


def classification_split(
    root: str | Path, split: str, classes: list[str] | None = None
) -> tuple[list[Path], torch.Tensor, list[str]]:
    """Images of ``ROOT/split/<class>/``: ``(paths, labels [N], classes)``; ``classes`` default to the folder's.

    Raises ``DataError`` naming the folder when the layout is not ``CLASSIFICATION_LAYOUT``.
    """
    root = Path(root)
    folder = root / split
    if not folder.is_dir() or ((folder / "images").is_dir() and (folder / "masks").is_dir()):
        raise DataError(f"--data {root}: found {_layout(root)}; knn expects {CLASSIFICATION_LAYOUT}")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if classes is None and len(found) < 2:
        raise DataError(
            f"{folder} has {len(found)} class folder{'s' * (len(found) != 1)} "
            f"({', '.join(found) or 'none'}); knn expects {CLASSIFICATION_LAYOUT}"
        )
    if not found:
        raise DataError(f"{folder} has no class folders; knn expects {CLASSIFICATION_LAYOUT}")
    classes = found if classes is None else classes
    unknown = [name for name in found if name not in classes]
    if unknown:
        raise DataError(f"{folder} has classes {unknown} that are not in the training split")
    paths, labels = [], []
    for name in found:
        for path in list_images(folder / name):
            paths.append(path)
            labels.append(classes.index(name))
    return paths, torch.tensor(labels), classes


def segmentation_split(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """``(image, mask)`` pairs of ``ROOT/split/images/<stem>.*`` and ``ROOT/split/masks/<stem>.png``.

    Raises ``DataError`` naming the folder when the layout is not ``SEGMENTATION_LAYOUT`` or an image has no mask.
    """
    root = Path(root)
    folder = root / split
    if not (folder / "images").is_dir() or not (folder / "masks").is_dir():
        raise DataError(
            f"--data {root}: found {_layout(root)}, no {folder}/images/ + masks/; "
            f"segmentation expects {SEGMENTATION_LAYOUT} (splits: train and val for linseg, val for kmeans)"
        )
    images = list_images(folder / "images")
    orphans = [image.name for image in images if not (folder / "masks" / f"{image.stem}.png").is_file()]
    if orphans:
        raise DataError(
            f"{folder}: {len(orphans)} of {len(images)} images have no mask in {folder / 'masks'} "
            f"({', '.join(orphans[:SHOWN])}{', ...' if len(orphans) > SHOWN else ''}); "
            "expected masks/<stem>.png for every image"
        )
    return [(image, folder / "masks" / f"{image.stem}.png") for image in images]


def check_dataset(root: str | Path, task: str) -> None:
    """Raise ``DataError`` (one line naming the folder) unless ``root`` has the layout ``task`` needs;
    lists files but reads no image, so it runs before any model loads."""
    root = Path(root)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if not root.is_dir():
        raise DataError(
            f"--data {root} is not a folder; expected a dataset folder "
            f"({CLASSIFICATION_LAYOUT if task == 'knn' else SEGMENTATION_LAYOUT})"
        )
    if task == "knn":
        classification_split(root, "val", classification_split(root, "train")[2])
    else:
        for split in ("train", "val") if task == "linseg" else ("val",):
            segmentation_split(root, split)


def load_mask(mask_path: Path, image_path: Path, resolution: int) -> torch.Tensor:
    """An index mask resized (nearest) and centre-cropped like its image: ``[R, R]`` int64."""
    with Image.open(image_path) as image:
        image_size = image.size
    with Image.open(mask_path) as mask:
        if mask.mode not in ("L", "P", "I", "I;16"):
            raise DataError(f"{mask_path}: mask must be a single-channel index image (L or P), got mode {mask.mode}")
        if mask.size != image_size:
            raise DataError(
                f"{mask_path}: mask is {mask.size[0]}x{mask.size[1]} px but its image {image_path} is {image_size[0]}x{image_size[1]}"
            )
        labels = torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())[None]
    labels = v2.functional.resize(labels, resolution, interpolation=v2.InterpolationMode.NEAREST)
    return v2.functional.center_crop(labels, resolution)[0]


def load_segmentation(
    encoder: Encoder,
    pairs: list[tuple[Path, Path]],
    resolution: int,
    batch_size: int = 16,
    max_pixels: int | None = MAX_PIXELS,
):
    """Patch features ``[N, H, W, D]`` and masks ``[N, R, R]`` of ``(image, mask)`` pairs."""
    features = encode_files(encoder, [image for image, _ in pairs], resolution, batch_size, max_pixels)
    masks = torch.stack([load_mask(mask, image, resolution) for image, mask in pairs])
    return features, masks


def _num_classes(*masks: torch.Tensor) -> int:
    labels = torch.cat([m.flatten() for m in masks])
    labels = labels[labels != IGNORE_INDEX]
    if not len(labels):
        raise DataError("the masks hold no labelled pixel (all 255); expected class indices 0-254")
    return int(labels.max()) + 1


# --- metrics --------------------------------------------------------------------------


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Percent of rows of ``scores [N, C]`` whose label is among the top-k (k capped at C): ``{"top1": …, "top5": …}``."""
    ranked = scores.argsort(dim=1, descending=True)
    hits = ranked == labels[:, None]
    return {f"top{k}": 100.0 * float(hits[:, :k].any(dim=1).float().mean()) for k in ks}


def confusion_matrix(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    num_predictions: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """``[C, P]`` pixel counts (``P = num_predictions``, default ``C``), rows = target, columns = prediction; ``ignore_index`` targets skipped."""
    num_predictions = num_predictions or num_classes
    valid = targets != ignore_index
    index = targets[valid] * num_predictions + predictions[valid]
    return torch.bincount(index, minlength=num_classes * num_predictions).view(num_classes, num_predictions)


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
        "miou": sum(present) / len(present),
        "pixel_accuracy": 100.0 * float(true_positive.sum() / confusion.sum()),
        "iou": iou,
    }


# --- k-NN classification ---------------------------------------------------------------


def knn_votes(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> torch.Tensor:
    """DINO's weighted k-NN: cosine similarity to the ``k`` nearest training features, each
    voting ``exp(sim / temperature)`` for its class: ``[Nq, C]`` votes."""
    train = F.normalize(train_features.float(), dim=1)
    query = F.normalize(query_features.float(), dim=1)
    similarity, index = (query @ train.T).topk(min(k, len(train)), dim=1)
    weights = (similarity / temperature).exp()
    votes = torch.zeros(len(query), num_classes)
    return votes.scatter_add_(1, train_labels[index], weights)


def knn_evaluate(
    encoder: Encoder,
    root: str | Path,
    resolution: int = 224,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 16,
    max_pixels: int | None = MAX_PIXELS,
) -> dict:
    """k-NN top-1 / top-5 (percent) of ``ROOT/val`` against ``ROOT/train`` with class-token features."""
    train_paths, train_labels, classes = classification_split(root, "train")
    val_paths, val_labels, _ = classification_split(root, "val", classes)
    train_features = encode_files(encoder, train_paths, resolution, batch_size, max_pixels)
    val_features = encode_files(encoder, val_paths, resolution, batch_size, max_pixels)
    votes = knn_votes(train_features, train_labels, val_features, len(classes), k=k, temperature=temperature)
    return {
        **topk_accuracy(votes, val_labels),
        "k": k,
        "temperature": temperature,
        "classes": classes,
        "train_images": len(train_paths),
        "val_images": len(val_paths),
    }


# --- linear-probe segmentation -----------------------------------------------------------


def patch_label_counts(masks: torch.Tensor, grid: tuple[int, int], num_classes: int) -> torch.Tensor:
    """Pixels of each class under each patch: ``[N, R, R]`` masks -> ``[N, H, W, C]`` counts (``IGNORE_INDEX`` left out).

    Pixels beyond the last whole patch (``R`` not a multiple of the grid) are dropped, as the patch embedding drops them.
    """
    H, W = grid
    patch_h, patch_w = masks.shape[-2] // H, masks.shape[-1] // W
    masks = masks[:, : H * patch_h, : W * patch_w]
    one_hot = F.one_hot(masks.clamp_max(num_classes), num_classes + 1)[..., :num_classes]  # ignored pixels -> zeros
    return one_hot.view(len(masks), H, patch_h, W, patch_w, num_classes).sum(dim=(2, 4)).float()


def train_linear_probe(
    features: torch.Tensor,
    masks: torch.Tensor,
    num_classes: int,
    steps: int = 100,
    weight_decay: float = 1e-4,
    batch_size: int = 16,
) -> Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]:
    """Fit a linear layer on ``[N, H, W, D]`` patch features against ``[N, R, R]`` masks.

    Features are standardised per channel with the training statistics (a frozen batch
    norm). Training runs on the patch grid: each patch's target is the class histogram of
    its pixels (cross-entropy weighted by pixel counts: the loss of nearest-upsampled
    logits, without materialising them), plus ``weight_decay · ‖W‖²``, minimised over the
    whole set by L-BFGS for ``steps`` iterations (the problem is convex, so there is no
    learning rate or seed to tune). Returns ``predict(features [N, H, W, D], size (R, R))
    -> labels [N, R, R]``, which upsamples the logits bilinearly to the mask size.
    """
    mean, std = features.mean(dim=(0, 1, 2)), features.std(dim=(0, 1, 2)).clamp_min(1e-6)
    inputs = ((features - mean) / std).flatten(0, 2)
    counts = patch_label_counts(masks, tuple(features.shape[1:3]), num_classes).flatten(0, 2)
    if counts.sum() == 0:
        raise DataError("the training masks hold no labelled pixel (all 255); expected class indices 0-254")
    linear = nn.Linear(features.shape[-1], num_classes)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimiser = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = (
            -(counts * linear(inputs).log_softmax(dim=-1)).sum() / counts.sum()
            + weight_decay * linear.weight.square().sum()
        )
        loss.backward()
        return loss

    optimiser.step(closure)

    @torch.no_grad()
    def predict(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        labels = []
        for chunk in batch.split(batch_size):
            scores = linear((chunk - mean) / std).permute(0, 3, 1, 2)
            labels.append(F.interpolate(scores, size=size, mode="bilinear", align_corners=False).argmax(dim=1))
        return torch.cat(labels)

    return predict


def linear_probe_segmentation(
    encoder: Encoder,
    root: str | Path,
    resolution: int = 224,
    steps: int = 100,
    weight_decay: float = 1e-4,
    batch_size: int = 16,
    max_pixels: int | None = MAX_PIXELS,
) -> dict:
    """Linear probe on frozen patch features: trained on ``ROOT/train``, mIoU / pixel accuracy on ``ROOT/val``."""
    train_features, train_masks = load_segmentation(
        encoder, segmentation_split(root, "train"), resolution, batch_size, max_pixels
    )
    val_features, val_masks = load_segmentation(
        encoder, segmentation_split(root, "val"), resolution, batch_size, max_pixels
    )
    num_classes = _num_classes(train_masks, val_masks)
    predict = train_linear_probe(
        train_features, train_masks, num_classes, steps=steps, weight_decay=weight_decay, batch_size=batch_size
    )
    scores = segmentation_scores(
        confusion_matrix(predict(val_features, tuple(val_masks.shape[-2:])), val_masks, num_classes)
    )
    return {
        **scores,
        "classes": num_classes,
        "train_images": len(train_masks),
        "val_images": len(val_masks),
        "steps": steps,
    }


# --- unsupervised (k-means) segmentation ---------------------------------------------------


def kmeans(
    points: torch.Tensor, clusters: int, iterations: int = 50, restarts: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding, best of ``restarts``: ``(assignments [n], centroids [k, D])``."""
    points = points.double()
    generator = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(restarts):
        centroids = points[torch.randint(len(points), (1,), generator=generator)]
        while len(centroids) < clusters:
            distance = torch.cdist(points, centroids).min(dim=1).values.square()
            weights = distance if distance.sum() > 0 else torch.ones_like(distance)
            centroids = torch.cat([centroids, points[torch.multinomial(weights, 1, generator=generator)]])
        for _ in range(iterations):
            assignments = torch.cdist(points, centroids).argmin(dim=1)
            updated = torch.stack(
                [
                    points[assignments == c].mean(dim=0) if (assignments == c).any() else centroids[c]
                    for c in range(clusters)
                ]
            )
            if torch.allclose(updated, centroids):
                break
            centroids = updated
        distance = torch.cdist(points, centroids)
        assignments = distance.argmin(dim=1)
        inertia = float(distance.min(dim=1).values.square().sum())
        if best is None or inertia < best[0]:
            best = (inertia, assignments, centroids.float())
    return best[1], best[2]


def match_clusters(confusion: torch.Tensor) -> torch.Tensor:
    """Hungarian matching of clusters to labels maximising matched pixels.

    ``confusion [C_labels, K_clusters]`` -> ``label_of_cluster [K]`` (``-1`` for clusters left unmatched when K > C).
    """
    labels, clusters = linear_sum_assignment(confusion.numpy(), maximize=True)
    label_of_cluster = torch.full((confusion.shape[1],), -1, dtype=torch.long)
    label_of_cluster[torch.as_tensor(clusters)] = torch.as_tensor(labels)
    return label_of_cluster


def kmeans_segmentation(
    encoder: Encoder,
    root: str | Path,
    resolution: int = 224,
    clusters: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    split: str = "val",
    max_pixels: int | None = MAX_PIXELS,
) -> dict:
    """Unsupervised segmentation: k-means on the L2-normalised patch features of ``ROOT/split``
    (``clusters`` default: the number of classes), clusters painted over their patches,
    matched to labels by the Hungarian algorithm, scored by mIoU / pixel accuracy."""
    features, masks = load_segmentation(encoder, segmentation_split(root, split), resolution, batch_size, max_pixels)
    num_classes = _num_classes(masks)
    clusters = clusters or num_classes
    N, H, W, D = features.shape
    assignments, _ = kmeans(F.normalize(features.reshape(-1, D), dim=1), clusters, seed=seed)
    painted = F.interpolate(assignments.view(N, 1, H, W).float(), size=tuple(masks.shape[-2:]), mode="nearest").long()[
        :, 0
    ]
    label_of_cluster = match_clusters(confusion_matrix(painted, masks, num_classes, clusters))
    predictions = label_of_cluster[painted]
    predictions[predictions < 0] = num_classes  # unmatched clusters: wrong for every label
    scores = segmentation_scores(confusion_matrix(predictions, masks, num_classes, num_classes + 1))
    return {**scores, "classes": num_classes, "clusters": clusters, "images": N}
