"""Finding the register neurons of test-time registers (Jiang et al., NeurIPS 2025, step 1) from unlabelled images.

Each image goes through the unedited model. Its outlier tokens are those whose norm after the detection
block is above a threshold (all tokens count, the class token included). Images without any are skipped.
Neuron ``(l, n)`` (input ``n`` of block ``l``'s ``mlp.fc2``: the hidden activation after the
non-linearity) scores, on an image, the mean ``|activation|`` over the image's outlier tokens; with the
sparsity filter (the authors' notebook) that score counts only when at least ``sparsity_fraction`` (50 %)
of the image's tokens are quiet on the neuron, ``|activation| < sparsity_activation`` (0.5; we read the
notebook's "activation below 0.5" as its magnitude, as the score itself is, so that a neuron strongly
negative on every token, possible with SwiGLU, is dense too). Scores are averaged over the images used
(a filtered score counts as 0); the top-k over the layers ``0..highest_layer`` are the register neurons.
Memory stays flat: per image only the per-neuron sums are kept, never the activations. Each batch goes
through the model twice: up to the detection block for the outliers, then up to the highest layer with
hooks that reduce the activations on the spot.

Hyperparameters, in order of precedence: given by the caller; the authors' published values for exactly
the two published models (their family's ``published_registers``, by timm architecture, depth and width); otherwise derived from
the model on the first ``calibration_images`` images (16) of the search, which are searched as well:

- images: 500 (theirs), drawn without replacement with ``seed`` (0) from a sized input (``len`` and
  indexing: a list, a dataset, a tensor of images); the released code draws them unseeded. A stream is
  read in order (``seed`` is then recorded as ``None``);
- detection block: the family's (``families.<family>.registers_detection_block``): the second-to-last
  block for DINOv2 (as the authors for DINOv2-L/14), the last for the others (as for CLIP-B/16; the
  repair's held-out check counts defects there too);
- threshold: the geometric mean of the median norm of the defects (eq. 5, ``defects.defect_mask`` with
  the singular defect direction of the detection block, ``registers.defect_directions``) and the median
  norm of the other patch tokens, at the detection block: the midpoint of the two modes on a log scale,
  where a fixed cutoff such as the authors' 150 for DINOv2-L separates the bimodal norm histogram.
  ``InputError`` if eq. 5 flags nothing or the defects are not at least ``MIN_NORM_RATIO`` (2) times the
  normal norm: the model then has no high-norm outliers to move, or a threshold must be given;
- highest layer: where the outliers first appear, the first block at which the outlier tokens' log norm
  ratio to the median token reaches ``EMERGENCE_FRACTION`` (half) of its value at the detection block
  (mean over the calibration images with outliers). The neurons that write the outliers sit in that
  block's MLP or before it; later layers only carry them;
- top-k: where the sorted scores drop the most (largest ratio between consecutive scores among the best
  ``TOP_K_CAP + 1``; a drop to 0 counts as infinite), capped at ``TOP_K_CAP`` = 50 (the authors' larger
  value): the neurons whose score stands out from the rest. The edit zeroes the chosen neurons on every
  patch, so neurons that do not stand out would only cost fidelity. ``next_scores`` records the best
  scores left out.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from . import families
from .anatomy import describe_model
from .defects import defect_mask
from .errors import InputError
from .families import PublishedRegisters
from .registers import (
    RegisterNeuron,
    SearchImages,
    SearchSettings,
    TestTimeRegisters,
    defect_directions,
    mlp_output,
    registers_of,
)
from .tokens import patch_grid, prepare_blocks

NUM_IMAGES = 500
SEED = 0
CALIBRATION_IMAGES = 16
SPARSITY_ACTIVATION = 0.5
SPARSITY_FRACTION = 0.5
TOP_K_CAP = 50
MIN_NORM_RATIO = 2.0
EMERGENCE_FRACTION = 0.5
NEXT_SCORES = 5


def published_config(model: nn.Module) -> PublishedRegisters | None:
    """The authors' settings when ``model`` is one of the published architectures at its published size
    (its family's ``published_registers``); ``detection_block`` then counts from 0."""
    architecture = families.architecture_of(model)
    for config in families.describe(model).published_registers:
        if (config.architecture, config.depth, config.width) == (architecture, len(model.blocks), model.embed_dim):
            return dataclasses.replace(config, detection_block=config.detection_block % config.depth)
    return None


def _source(published: PublishedRegisters) -> str:
    return f"published (Jiang et al. 2025, {published.architecture})"


# ----------------------------------------------------------------------------------------
# The pieces, each a small pure function of tensors


def image_neuron_scores(
    hidden: torch.Tensor,
    outliers: torch.Tensor,
    sparsity_filter: bool = True,
    sparsity_activation: float = SPARSITY_ACTIVATION,
    sparsity_fraction: float = SPARSITY_FRACTION,
) -> torch.Tensor:
    """Per image and neuron: mean ``|activation|`` over the image's outlier tokens, ``[B, T, M]`` activations and
    ``[B, T]`` bool outliers -> ``[B, M]`` float64; 0 where the filter finds the neuron dense on the image
    (fewer than ``sparsity_fraction`` of its tokens below ``sparsity_activation`` in magnitude) and for an
    image without outliers."""
    magnitude = hidden.abs().double()
    counts = outliers.sum(dim=1, keepdim=True).clamp(min=1)
    scores = torch.einsum("btm,bt->bm", magnitude, outliers.double()) / counts
    if sparsity_filter:
        quiet = (magnitude < sparsity_activation).double().mean(dim=1)
        scores = scores * (quiet >= sparsity_fraction)
    return scores


def threshold_between(defect_norms: torch.Tensor, normal_norms: torch.Tensor, where: str) -> tuple[float, float]:
    """``(threshold, ratio)``: the geometric mean of the median defect and normal token norms, and their ratio.

    ``InputError`` naming ``where`` when there are no defects or they are less than ``MIN_NORM_RATIO`` times
    the normal norm (no high-norm outliers)."""
    if not len(defect_norms):
        raise InputError(f"{where}: eq. 5 flags no defect, so no threshold can be derived (give one)")
    defect, normal = float(defect_norms.median()), float(normal_norms.median())
    ratio = defect / normal
    if ratio < MIN_NORM_RATIO:
        raise InputError(
            f"{where}: the defects' median norm is {ratio:.2f}x the normal tokens' (< {MIN_NORM_RATIO}): "
            "no high-norm outliers to move (give a threshold to search anyway)"
        )
    return math.sqrt(defect * normal), ratio


def emergence_block(log_ratios: torch.Tensor) -> int:
    """First block whose outlier-to-median log norm ratio ``[blocks]`` reaches ``EMERGENCE_FRACTION`` of the last one."""
    reached = (log_ratios >= EMERGENCE_FRACTION * log_ratios[-1]).nonzero()
    return int(reached[0]) if len(reached) else len(log_ratios) - 1


def standout_count(scores: torch.Tensor, cap: int = TOP_K_CAP) -> tuple[int, float]:
    """``(k, drop)``: the number of best scores before the largest drop among ``scores`` (descending, ``[n]``),
    ``1 <= k <= cap``, and that drop (best kept / best left out; ``inf`` for a drop to 0)."""
    top = scores[: cap + 1].double()
    if not len(top) or top[0] <= 0:
        raise InputError("register neuron search: every neuron scored 0 (no outlier activations survive the filter)")
    if len(top) == 1:
        return 1, math.inf
    ratios = top[:-1] / top[1:]  # a drop to 0 gives inf (0 / 0 gives nan, ignored)
    k = int(torch.nan_to_num(ratios, nan=0.0).argmax()) + 1
    return k, float(ratios[k - 1])


# ----------------------------------------------------------------------------------------
# Reading the images


@dataclass
class _Tally:
    seen: int = 0
    unreadable: int = 0
    sizes: set = field(default_factory=set)
    drawn: list[int] = field(default_factory=list)

    def record(self, used: int, outliers_per_image: list[int]) -> SearchImages:
        return SearchImages(
            seen=self.seen,
            used=used,
            skipped=self.seen - used,
            unreadable=self.unreadable,
            outliers_per_image=tuple(outliers_per_image),
            sizes=tuple(sorted(self.sizes)),
            sample_indices=tuple(self.drawn) if self.drawn else None,
        )


def _items(images, seed: int | None) -> Iterator[tuple[int | None, torch.Tensor | None]]:
    """``(index, item)``: a sized input in a random order drawn with ``seed`` (its own order without one),
    a stream in its order (index ``None``). Items are fetched one at a time, when asked for."""
    if not (hasattr(images, "__len__") and hasattr(images, "__getitem__")):
        yield from ((None, item) for item in images)
        return
    if seed is None:
        order = range(len(images))
    else:
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).tolist()
    for index in order:
        yield index, images[index]


def _draw(images, num_images: int, seed: int | None, tally: _Tally) -> Iterator[torch.Tensor]:
    """``[b, 3, R, R]`` batches of the first ``num_images`` images of ``_items`` (``None`` items count too)."""
    for index, item in _items(images, seed):
        if index is not None:
            tally.drawn.append(index)
        if item is None:
            tally.unreadable += 1
        else:
            batch = item if item.dim() == 4 else item[None]
            if batch.dim() != 4 or batch.shape[1] != 3:
                where = (
                    f"search image {index}" if index is not None else f"search image {tally.seen + tally.unreadable}"
                )
                raise InputError(f"{where}: expected [3, R, R] or [B, 3, R, R], got {tuple(item.shape)}")
            batch = batch[: num_images - tally.seen - tally.unreadable]
            tally.seen += len(batch)
            tally.sizes.add(tuple(batch.shape[-2:]))
            yield batch
        if tally.seen + tally.unreadable >= num_images:
            return


def _block_norms(model: nn.Module, images: torch.Tensor, last_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token norms after blocks ``0..last_block`` ``[last_block + 1, B, T]`` and the last block's tokens ``[B, T, D]``."""
    x, blocks = prepare_blocks(model, images)
    norms = []
    for block in blocks[: last_block + 1]:
        x = block(x)
        norms.append(x.float().norm(dim=-1))
    return torch.stack(norms), x


def _add_scores(sums: list[torch.Tensor], layer: int, settings: dict, outliers, fc2, args) -> None:
    sums[layer] += image_neuron_scores(args[0], outliers, **settings).sum(dim=0)


def _score_sums(model: nn.Module, images: torch.Tensor, outliers: torch.Tensor, sums, settings: dict) -> None:
    """Add the images' neuron scores to ``sums`` (one ``[M]`` float64 per layer up to the highest)."""
    handles = [
        mlp_output(model, layer).register_forward_pre_hook(partial(_add_scores, sums, layer, settings, outliers))
        for layer in range(len(sums))
    ]
    try:
        x, blocks = prepare_blocks(model, images)
        for block in blocks[: len(sums)]:
            x = block(x)
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------------------
# The search


@dataclass
class _Calibration:
    """The first images: their batches (searched afterwards), token norms after blocks ``0..detection``
    (``[detection + 1, b, T]`` per batch), and the eq.-5 defect and normal patch-token norms at the detection block."""

    batches: list[torch.Tensor] = field(default_factory=list)
    norms: list[torch.Tensor] = field(default_factory=list)
    defect_norms: list[torch.Tensor] = field(default_factory=list)
    normal_norms: list[torch.Tensor] = field(default_factory=list)

    @property
    def images(self) -> int:
        return sum(len(batch) for batch in self.batches)


def _calibrate(model, stream: Iterator[torch.Tensor], count: int, detection: int, direction) -> _Calibration:
    """Read batches from ``stream`` until ``count`` images; eq. 5 with ``direction`` ``[D]`` unless it is ``None``."""
    calibration = _Calibration()
    for batch in stream:
        norms, tokens = _block_norms(model, batch, detection)
        calibration.batches.append(batch)
        calibration.norms.append(norms)
        if direction is not None:
            for image_tokens in tokens:
                grid = patch_grid(model, image_tokens, tuple(batch.shape[-2:])).float()
                mask, _ = defect_mask(grid, direction.to(grid))
                calibration.defect_norms.append(grid[mask].norm(dim=-1).cpu())
                calibration.normal_norms.append(grid[~mask].norm(dim=-1).cpu())
        if calibration.images >= count:
            break
    return calibration


def _derived_threshold(calibration: _Calibration, detection: int) -> tuple[float, str]:
    defects, normal = torch.cat(calibration.defect_norms), torch.cat(calibration.normal_norms)
    where = f"threshold at block {detection} on {calibration.images} calibration images"
    threshold, ratio = threshold_between(defects, normal, where)
    return threshold, (
        f"derived: geometric mean of the median norms of the {len(defects)} eq.-5 defects "
        f"({float(defects.median()):.4g}) and of the normal patch tokens ({float(normal.median()):.4g}, "
        f"{ratio:.3g}x less) at block {detection}, {calibration.images} calibration images"
    )


def _derived_highest_layer(calibration: _Calibration, threshold: float, detection: int) -> tuple[int, str]:
    ratios = []
    for norms in calibration.norms:  # [blocks, b, T]
        for image in norms.unbind(dim=1):  # [blocks, T]
            outliers = image[-1] > threshold
            if outliers.any():
                ratios.append((image[:, outliers].median(dim=1).values / image.median(dim=1).values).log())
    if not ratios:
        raise InputError(
            f"highest layer: no token above the threshold {threshold:.4g} at block {detection} "
            f"in the {calibration.images} calibration images (give the highest layer)"
        )
    log_ratios = torch.stack(ratios).mean(dim=0)
    layer = emergence_block(log_ratios)
    return layer, (
        f"derived: first block where the outliers' log norm ratio to the median token reaches "
        f"{EMERGENCE_FRACTION:g} of its value at block {detection} ({float(log_ratios[layer]):.3g} of "
        f"{float(log_ratios[-1]):.3g}, {len(ratios)} calibration images with outliers)"
    )


def _search(model, batches: Iterable, threshold: float, highest: int, settings: dict):
    """``(score sums per layer [M] float64, images used, outliers per image)`` over ``(images, detection norms)``."""
    sums = [
        torch.zeros(
            mlp_output(model, layer).weight.shape[1],
            dtype=torch.float64,
            device=next(model.parameters()).device,
        )
        for layer in range(highest + 1)
    ]
    used, outliers_per_image = 0, []
    for images, detection_norms in batches:
        outliers = detection_norms > threshold  # [b, T]
        counts = outliers.sum(dim=1)
        outliers_per_image.extend(counts.tolist())
        has_outliers = counts > 0
        if has_outliers.any():
            _score_sums(model, images[has_outliers], outliers[has_outliers], sums, settings)
            used += int(has_outliers.sum())
    if not used:
        raise InputError(
            f"register neuron search: no token above the threshold {threshold:.4g} at the detection block "
            f"in any of the {len(outliers_per_image)} images"
        )
    return sums, used, outliers_per_image


def _searched_batches(model, calibration: _Calibration, stream: Iterator[torch.Tensor], detection: int):
    """The calibration batches with their stored norms, then the rest of the stream: ``(images, [b, T] norms)``."""
    for batch, norms in zip(calibration.batches, calibration.norms):
        yield batch, norms[-1]
    for batch in stream:
        yield batch, _block_norms(model, batch, detection)[0][-1]


def _pick(given, published: PublishedRegisters | None, name: str):
    """``(value, source)`` of a hyperparameter given by the caller or published; ``None`` when it must be derived."""
    if given is not None:
        return given, "given"
    if published is not None:
        return getattr(published, name), _source(published)
    return None


def _check_arguments(model, num_images: int, calibration_images: int, top_k, highest_layer, directions) -> None:
    depth, dim = len(model.blocks), model.embed_dim
    if registers_of(model) is not None:
        raise InputError(
            "register neuron search: the model already carries test-time registers (search the base model)"
        )
    if num_images < 1 or calibration_images < 1:
        raise InputError(
            f"register neuron search: num_images {num_images} and calibration_images "
            f"{calibration_images} must be at least 1"
        )
    if top_k is not None and top_k < 1:
        raise InputError(f"register neuron search: top_k {top_k} must be at least 1")
    if highest_layer is not None and not 0 <= highest_layer < depth:
        raise InputError(f"register neuron search: highest layer {highest_layer} is not a block (0 to {depth - 1})")
    if directions is not None and tuple(directions.shape) != (depth, dim):
        raise InputError(
            f"register neuron search: directions of shape {tuple(directions.shape)}, expected [{depth}, {dim}]"
        )


def _detection_block(model, detection_block: int | None, published: PublishedRegisters | None) -> tuple[int, str]:
    depth = len(model.blocks)
    picked = _pick(detection_block, published, "detection_block")
    if picked is None:
        family = families.describe(model)
        block = family.registers_detection_block % depth
        where = "the last block" if block == depth - 1 else f"block {block}, {depth - block} from the end"
        default = f" ({family.name}'s default)" if family.registers_detection_block != -1 else ""
        return block, f"derived: {where}{default}"
    block, source = picked
    if not -depth <= block < depth:
        raise InputError(f"register neuron search: detection block {block} is not a block (0 to {depth - 1})")
    return block % depth, source


def _chosen_neurons(sums: list[torch.Tensor], used: int, top_k, published) -> tuple[tuple, tuple, int, str]:
    """``(neurons, next scores, top_k, its source)`` from the per-layer score sums over ``used`` images."""
    scores = torch.cat(sums).cpu() / used
    layers = torch.cat([torch.full((len(layer_sums),), layer) for layer, layer_sums in enumerate(sums)])
    units = torch.cat([torch.arange(len(layer_sums)) for layer_sums in sums])
    order = scores.argsort(descending=True, stable=True)
    picked = _pick(top_k, published, "top_k")
    if picked is None:
        k, drop = standout_count(scores[order])
        source = f"derived: largest drop in the sorted scores ({drop:.3g}x from #{k} to #{k + 1}), cap {TOP_K_CAP}"
    else:
        k, source = picked
    neurons = tuple(RegisterNeuron(int(layers[i]), int(units[i]), float(scores[i])) for i in order[:k])
    return neurons, tuple(float(scores[i]) for i in order[k : k + NEXT_SCORES]), k, source


def find_register_neurons(
    model: nn.Module,
    images: Iterable[torch.Tensor | None],
    *,
    base_model: str,
    base_sha256: str | None = None,
    num_images: int = NUM_IMAGES,
    seed: int | None = SEED,
    detection_block: int | None = None,
    threshold: float | None = None,
    highest_layer: int | None = None,
    top_k: int | None = None,
    sparsity_filter: bool = True,
    directions: torch.Tensor | None = None,
    calibration_images: int = CALIBRATION_IMAGES,
) -> TestTimeRegisters:
    """The register neurons of the unedited ``model`` from normalised ``[3, R, R]`` images or ``[B, 3, R, R]``
    batches (``None`` items are counted as unreadable), with every setting and where it came from.

    ``base_model`` / ``base_sha256`` name the model's spec and weights (recorded only). Hyperparameters left
    ``None`` come from the published configurations or are derived (module docstring); ``directions`` ``[depth, D]`` are the
    singular defect directions for a derived threshold (default ``registers.defect_directions``).
    ``InputError`` for bad arguments or a model without outliers to find neurons for.
    """
    start = time.perf_counter()
    describe_model(model, base_model)
    _check_arguments(model, num_images, calibration_images, top_k, highest_layer, directions)
    published = published_config(model)
    detection, detection_source = _detection_block(model, detection_block, published)
    picked_threshold, picked_highest = (
        _pick(threshold, published, "threshold"),
        _pick(highest_layer, published, "highest_layer"),
    )
    if picked_threshold is None and directions is None:
        directions = defect_directions(model)
    filter_settings = {
        "sparsity_filter": sparsity_filter,
        "sparsity_activation": SPARSITY_ACTIVATION,
        "sparsity_fraction": SPARSITY_FRACTION,
    }
    parameter = next(model.parameters())
    tally = _Tally()
    stream = (batch.to(parameter) for batch in _draw(images, num_images, seed, tally))
    with torch.inference_mode():
        direction = directions[detection] if picked_threshold is None else None
        calibration = _calibrate(model, stream, calibration_images, detection, direction)
        threshold, threshold_source = picked_threshold or _derived_threshold(calibration, detection)
        highest, highest_source = picked_highest or _derived_highest_layer(calibration, threshold, detection)
        batches = _searched_batches(model, calibration, stream, detection)
        sums, used, outliers_per_image = _search(model, batches, threshold, highest, filter_settings)
    neurons, next_scores, top_k, top_k_source = _chosen_neurons(sums, used, top_k, published)
    settings = SearchSettings(
        num_images=num_images,
        seed=seed if tally.drawn else None,
        detection_block=detection,
        detection_block_source=detection_source,
        threshold=float(threshold),
        threshold_source=threshold_source,
        highest_layer=highest,
        highest_layer_source=highest_source,
        top_k=top_k,
        top_k_source=top_k_source,
        **filter_settings,
        calibration_images=calibration.images,
    )
    return TestTimeRegisters(
        base_model=base_model,
        base_sha256=base_sha256,
        neurons=neurons,
        settings=settings,
        images=tally.record(used, outliers_per_image),
        next_scores=next_scores,
        search_seconds=time.perf_counter() - start,
    )
