"""Images in, batch by batch, shared over the processes of an ``accelerate launch``; features out to disk.

Who sees what: evaluation splits are dealt round-robin (sample ``i`` to process ``i % P``), so
every sample is scored by exactly one process and metric states are summed once. Training steps
take a global batch from a seeded permutation (the same whatever ``P``) and each process encodes
its ``batch[rank::P]`` share. ``FeatureStore`` keeps features on disk, one file per process, so
k-NN banks, linear-probe caches and k-means data never sit in memory, whatever the dataset size.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.transforms import v2

from ..data import MAX_PIXELS, load_rgb, sinder_transform
from ..errors import DataError, SinderError
from .layouts import EvalDataset, Sample
from .targets import read_depth, read_mask, resize_crop

MODES = ("class", "crop", "whole", "augment")


@dataclass
class Processes:
    """This process among those of an ``accelerate launch`` (one process without an accelerator)."""

    accelerator: object | None = None

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator else 0

    @property
    def world(self) -> int:
        return self.accelerator.num_processes if self.accelerator else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return self.accelerator.device if self.accelerator else torch.device("cpu")

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``tensor`` over the processes (on its own device)."""
        if self.world == 1:
            return tensor
        return self.accelerator.reduce(tensor.to(self.device), reduction="sum").to(tensor.device)

    def gather(self, value) -> list:
        """Every process's ``value`` (any picklable object), in rank order."""
        if self.world == 1:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def on_main(self, function):
        """``function()`` on the main process, its result on every process; a ``SinderError`` it raises is raised on all."""
        outcome = None
        if self.is_main:
            try:
                outcome = ("ok", function())
            except SinderError as error:
                outcome = ("error", (type(error), str(error)))
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            box = [outcome]
            broadcast_object_list(box)
            outcome = box[0]
        if outcome[0] == "error":
            kind, message = outcome[1]
            raise kind(message)
        return outcome[1]


@dataclass
class Streaming:
    """How images flow: ``batch_size`` images per step (over all processes), loader ``workers``,
    the ``processes``, a ``scratch`` folder for features on disk, progress bars on terminals."""

    batch_size: int = 16
    workers: int = 0
    max_pixels: int | None = MAX_PIXELS
    processes: Processes = field(default_factory=Processes)
    scratch: Path | None = None
    label: str = ""


def whole_size(width: int, height: int, resolution: int, patch: int) -> tuple[int, int]:
    """``(H, W)`` a whole image is resized to: short side ``resolution``, both sides rounded to whole patches."""
    scale = resolution / min(width, height)
    return tuple(max(patch, round(side * scale / patch) * patch) for side in (height, width))


@dataclass(frozen=True)
class Augment:
    """mmseg-style random training crops: rescale (ratio drawn from ``scale_range`` of a ``short_side`` x
    ``long_side`` scale, aspect kept), optional ``pre_crop`` ``((H, W), (top, left, bottom, right))`` of
    images of size ``(H, W)``, a random ``crop`` ``(h, w)`` (at most 10 tries to keep the largest class
    under ``cat_max_ratio`` of the labelled pixels), a horizontal flip with probability 0.5 when ``flip``;
    pixels padded with 0 after normalisation, targets with ``pad_target``."""

    crop: tuple[int, int]
    scale_range: tuple[float, float] | None = None
    short_side: int = 512
    long_side: int = 2048
    flip: bool = True
    cat_max_ratio: float | None = None
    ignore_index: int = 255
    pad_target: float = 255
    pre_crop: tuple | None = None


def image_transform(resolution: int, resize_ratio: float = 1.0, normalization=None) -> transforms.Compose:
    """PIL image -> ``[3, R, R]``: ``sinder_transform`` (the model's interpolation and normalisation) with the
    short side resized to ``R / resize_ratio`` before the centre crop ``R`` (DINOv2's classification eval:
    224 / 0.875 = 256)."""
    return sinder_transform(
        resolution, normalization, resize=None if resize_ratio == 1.0 else round(resolution / resize_ratio)
    )


def _random_crop(target: torch.Tensor, size: tuple[int, int], augment: Augment, rng) -> tuple[int, int]:
    """``(top, left)`` of a random ``size`` crop of a target ``[H, W]`` (mmseg's ``RandomCrop``)."""
    height, width = target.shape[-2:]
    for _ in range(10 if augment.cat_max_ratio else 1):
        top = int(rng.integers(0, max(height - size[0], 0) + 1))
        left = int(rng.integers(0, max(width - size[1], 0) + 1))
        part = target[top : top + size[0], left : left + size[1]]
        counts = torch.unique(part[part != augment.ignore_index], return_counts=True)[1]
        if augment.cat_max_ratio is None or (len(counts) > 1 and counts.max() / counts.sum() < augment.cat_max_ratio):
            break
    return top, left


class SampleImages(Dataset):
    """Samples as ``(index, image, target, problem)``; a file that cannot be read gives its ``problem``.

    ``mode``: ``class`` (resize + centre crop to ``R x R``, target = class index), ``crop`` (the
    same for image and mask / depth, nearest), ``whole`` (short side ``R``, whole patches, target
    at its own size), ``augment`` (``augment``'s random crops: items are ``(index, draw)``, the draw
    seeding the crop with ``seed``). ``resize_ratio``: class mode resizes to ``R / ratio`` before
    the crop. ``pixels=False`` gives only the targets (training on stored features).
    """

    def __init__(
        self,
        dataset: EvalDataset,
        samples: list[Sample],
        mode: str,
        resolution: int,
        patch: int,
        max_pixels,
        resize_ratio: float = 1.0,
        augment: Augment | None = None,
        seed: int = 0,
        pixels: bool = True,
        normalization=None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: expected one of {MODES}")
        self.dataset, self.samples, self.mode = dataset, samples, mode
        self.resolution, self.patch, self.max_pixels = resolution, patch, max_pixels
        self.augment, self.seed, self.pixels = augment, seed, pixels
        self.transform = image_transform(resolution, resize_ratio, normalization)  # the encoder's model's own pixels
        self.normalise = transforms.Compose(self.transform.transforms[2:])  # to tensor, normalisation

    def __len__(self) -> int:
        return len(self.samples)

    def target(self, sample: Sample, image_size: tuple[int, int]) -> torch.Tensor | int:
        if self.dataset.kind == "classification":
            return sample.target
        reader = read_depth if self.dataset.kind == "depth" else read_mask
        target = torch.from_numpy(reader(sample, self.dataset.layout, image_size))
        return resize_crop(target, self.resolution) if self.mode == "crop" else target

    def augmented(self, image: Image.Image, target: torch.Tensor, rng) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pixels [3, h, w], target [h, w])``: one random training crop of ``augment``."""
        augment = self.augment
        if augment.pre_crop is not None and tuple(target.shape) == augment.pre_crop[0]:
            top, left, bottom, right = augment.pre_crop[1]
            image, target = image.crop((left, top, right, bottom)), target[top:bottom, left:right]
        if augment.scale_range is not None:
            ratio = rng.uniform(*augment.scale_range)
            factor = min(augment.long_side * ratio / max(image.size), augment.short_side * ratio / min(image.size))
            size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
            image = image.resize(size, Image.Resampling.BILINEAR)
            target = v2.functional.resize(target[None], size[::-1], interpolation=v2.InterpolationMode.NEAREST)[0]
        top, left = _random_crop(target, augment.crop, augment, rng)
        height, width = augment.crop
        target = target[top : top + height, left : left + width]
        image = image.crop((left, top, left + target.shape[1], top + target.shape[0]))
        if augment.flip and rng.random() < 0.5:
            image, target = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), target.flip(-1)
        pixels = self.normalise(image)
        padded = torch.zeros(3, height, width)
        padded[:, : pixels.shape[1], : pixels.shape[2]] = pixels
        full = torch.full((height, width), augment.pad_target, dtype=target.dtype)
        full[: target.shape[0], : target.shape[1]] = target
        return padded, full

    def __getitem__(self, item):
        index, draw = item if isinstance(item, tuple) else (item, None)
        sample = self.samples[index]
        try:
            if not self.pixels:
                return index, torch.zeros(0), self.target(sample, None), None  # sized by the image's header
            image = load_rgb(sample.image, min_size=self.patch, max_pixels=self.max_pixels)
            if self.mode == "augment":
                rng = np.random.default_rng([self.seed, 3, draw, index])
                return index, *self.augmented(image, self.target(sample, image.size), rng), None
            if self.mode == "whole":
                size = whole_size(*image.size, self.resolution, self.patch)
                resize = self.transform.transforms[0]  # the model's interpolation, as in the other modes
                pixels = self.normalise(transforms.functional.resize(image, list(size), resize.interpolation))
            else:
                pixels = self.transform(image)
            return index, pixels, self.target(sample, image.size), None
        except DataError as error:
            return index, None, None, str(error)


def _collate(items):
    """``(indices [B], images [B, 3, H, W], targets)``; targets stacked when they share a shape, else a list."""
    for _, _, _, problem in items:
        if problem is not None:
            return problem
    if not items:
        return [], None, None
    indices = [index for index, *_ in items]
    images = torch.stack([image for _, image, _, _ in items])
    targets = [target for _, _, target, _ in items]
    if isinstance(targets[0], int):
        return indices, images, torch.tensor(targets)
    if all(t.shape == targets[0].shape for t in targets):
        return indices, images, torch.stack(targets)
    return indices, images, targets


def stream(
    images: SampleImages, batches, streaming: Streaming, desc: str, total: int | None = None
) -> Iterator[tuple[list[int], torch.Tensor | None, object]]:
    """``(indices, images, targets)`` of each batch of sample indices (empty batches give ``([], None, None)``).

    A file that cannot be read ends the stream with a ``DataError`` naming it. Progress (images/s,
    counted over all processes) shows on the main process when stderr is a terminal.
    """
    from tqdm.auto import tqdm

    loader = DataLoader(
        images,
        batch_sampler=batches,
        num_workers=streaming.workers,
        collate_fn=_collate,
        persistent_workers=False,
    )
    world = streaming.processes.world
    total = sum(len(batch) for batch in batches) * world if total is None else total
    label = f"{streaming.label}: " if streaming.label else ""
    with tqdm(
        total=total, desc=f"{label}{desc}", unit="img", disable=None if streaming.processes.is_main else True
    ) as bar:
        for batch in loader:
            if isinstance(batch, str):
                raise DataError(batch)
            bar.update(len(batch[0]) * world)
            yield batch


# --- which samples, in which batches -------------------------------------------------------------


def own_share(count: int, processes: Processes) -> list[int]:
    """The sample indices this process scores: ``rank, rank + P, ...``."""
    return list(range(processes.rank, count, processes.world))


def per_process(streaming: Streaming) -> int:
    """Images per batch on each process: ``batch_size`` shared over the processes."""
    return max(1, -(-streaming.batch_size // streaming.processes.world))


def chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[start : start + size] for start in range(0, len(indices), size)]


def by_shape(indices: list[int], shapes: list[tuple[int, int]], size: int) -> list[list[int]]:
    """Batches of at most ``size`` indices whose images share a shape (whole-image evaluation)."""
    batches = []
    for shape in sorted({shapes[i] for i in indices}):
        batches += chunks([i for i in indices if shapes[i] == shape], size)
    return batches


class TrainingBatches:
    """This process's share of ``steps`` global batches drawn from seeded permutations of ``count`` samples.

    Global batch ``t`` is the same for any number of processes; process ``r`` takes ``batch[r::P]``
    (an empty share when the batch is smaller than ``P``).
    """

    def __init__(self, count: int, batch_size: int, steps: int, seed: int, rank: int = 0, world: int = 1):
        self.count, self.batch_size, self.steps, self.seed = count, batch_size, steps, seed
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        order, epoch, start = np.empty(0, dtype=np.int64), 0, 0
        for _ in range(self.steps):
            while len(order) - start < self.batch_size:
                order = np.concatenate(
                    [order[start:], np.random.default_rng([self.seed, epoch]).permutation(self.count)]
                )
                epoch, start = epoch + 1, 0
            batch = order[start : start + self.batch_size]
            start += self.batch_size
            yield batch[self.rank :: self.world].tolist()


@contextmanager
def scratch_folder(streaming: Streaming, name: str) -> Iterator[Path]:
    """The folder for ``name``'s features on disk: ``streaming.scratch / name`` (removed after), else a temporary one."""
    if streaming.scratch is None:
        if streaming.processes.world > 1:
            raise ValueError("several processes need a shared Streaming.scratch folder")
        with tempfile.TemporaryDirectory(prefix=f"sinder-{name}-") as path:
            yield Path(path)
        return
    path = Path(streaming.scratch) / name
    try:
        yield path
    finally:
        streaming.processes.barrier()
        if streaming.processes.is_main:
            shutil.rmtree(path, ignore_errors=True)


# --- features on disk ------------------------------------------------------------------------------


class FeatureStore:
    """Feature rows on disk (float16): each process appends the rows of its samples to its own file.

    ``append(index, rows [n, D], shape)`` records sample ``index``'s ``n`` rows (a vector: ``n = 1``;
    a patch grid: ``n = h·w`` with ``shape = (h, w)``); ``D`` is set by the first rows. After
    ``close()`` (a barrier) any process reads ``own()`` samples back one by one, ``all_chunks`` of
    every process, or ``rows_of(indices)`` for one-row samples of any process.
    """

    def __init__(self, folder: Path, name: str, processes: Processes):
        self.folder, self.name, self.processes = Path(folder), name, processes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.handle = open(self._path(processes.rank, "f16"), "wb")  # noqa: SIM115 (closed in close())
        self.index: list[tuple[int, int, int, int]] = []  # (sample, first row, h, w)
        self.count, self.dim = 0, None
        self._maps = None

    def _path(self, rank: int, suffix: str) -> Path:
        return self.folder / f"{self.name}.{rank}.{suffix}"

    def _write(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to("cpu", torch.float16)
        self.dim = rows.shape[-1]
        rows.reshape(-1, self.dim).numpy().tofile(self.handle)

    def append_vectors(self, indices: list[int], vectors: torch.Tensor) -> None:
        """One row per sample: ``vectors [B, D]`` of samples ``indices``."""
        self._write(vectors)
        self.index += [(index, self.count + i, 1, 1) for i, index in enumerate(indices)]
        self.count += len(indices)

    def append(self, index: int, rows: torch.Tensor, shape: tuple[int, int] = (1, 1)) -> None:
        self._write(rows)
        self.index.append((index, self.count, *shape))
        self.count += shape[0] * shape[1]

    def close(self) -> None:
        """Finish this process's file and wait for the others; ``dim`` is then known on every process."""
        self.handle.close()
        np.save(self._path(self.processes.rank, "npy"), np.asarray(self.index, dtype=np.int64).reshape(-1, 4))
        self.processes.barrier()
        dims = {dim for dim in self.processes.gather(self.dim) if dim is not None}
        self.dim = dims.pop() if dims else 0

    def _index(self, rank: int) -> np.ndarray:
        return np.load(self._path(rank, "npy"))

    def own(self) -> Iterator[tuple[int, tuple[int, int], torch.Tensor]]:
        """``(sample index, (h, w), rows [h·w, D] float32)`` of this process's samples, in their order."""
        with open(self._path(self.processes.rank, "f16"), "rb") as handle:
            for index, _, h, w in self.index:
                rows = np.fromfile(handle, dtype=np.float16, count=h * w * self.dim)
                yield index, (h, w), torch.from_numpy(rows.astype(np.float32)).view(h * w, self.dim)

    def own_rows(self, size: int) -> Iterator[torch.Tensor]:
        """This process's rows ``[n, D]`` float32, ``size`` at a time, whatever sample they belong to."""
        with open(self._path(self.processes.rank, "f16"), "rb") as handle:
            for start in range(0, self.count, size):
                rows = np.fromfile(handle, dtype=np.float16, count=min(size, self.count - start) * self.dim)
                yield torch.from_numpy(rows.astype(np.float32)).view(-1, self.dim)

    def own_chunks(self, size: int) -> Iterator[tuple[list[int], torch.Tensor]]:
        """``(sample indices, rows [n, D])`` of this process's one-row samples, ``size`` at a time."""
        with open(self._path(self.processes.rank, "f16"), "rb") as handle:
            for start in range(0, len(self.index), size):
                part = self.index[start : start + size]
                rows = np.fromfile(handle, dtype=np.float16, count=len(part) * self.dim)
                yield [i for i, *_ in part], torch.from_numpy(rows.astype(np.float32)).view(len(part), self.dim)

    def all_chunks(self, size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """``(sample indices, rows [n, D])`` of every process's one-row samples, ``size`` rows at a time."""
        for rank in range(self.processes.world):
            index = self._index(rank)
            with open(self._path(rank, "f16"), "rb") as handle:
                for start in range(0, len(index), size):
                    count = min(size, len(index) - start)
                    rows = np.fromfile(handle, dtype=np.float16, count=count * self.dim)
                    yield index[start : start + count, 0], torch.from_numpy(rows.astype(np.float32)).view(-1, self.dim)

    def rows_of(self, indices: np.ndarray) -> torch.Tensor:
        """Rows ``[n, D]`` float32 of one-row samples ``indices`` of any process.

        The samples must have been appended round-robin (``own_share`` order): sample ``i`` is row
        ``i // P`` of process ``i % P``'s file.
        """
        world = self.processes.world
        if self._maps is None:
            self._maps = []
            for rank in range(world):
                index = self._index(rank)
                if not np.array_equal(index[:, 0], np.arange(rank, rank + world * len(index), world)):
                    raise ValueError(f"{self.name}: samples were not stored round-robin")
                self._maps.append(np.memmap(self._path(rank, "f16"), np.float16, "r", shape=(len(index), self.dim)))
        indices = np.asarray(indices)
        rows = np.empty((len(indices), self.dim), dtype=np.float32)
        for rank in range(world):
            mine = indices % world == rank
            rows[mine] = self._maps[rank][indices[mine] // world]
        return torch.from_numpy(rows)


def stream_whole(
    encoder, dataset: EvalDataset, samples: list[Sample], sizes, resolution: int, streaming: Streaming, desc: str
) -> Iterator[tuple[list[int], torch.Tensor | None, object]]:
    """``stream`` of this process's share of ``samples`` as whole images (short side ``resolution``, whole
    patches, the encoder's normalisation), batched by shape; ``sizes``: each sample's ``(width, height)``."""
    shapes = [whole_size(width, height, resolution, encoder.patch_size) for width, height in sizes]
    images = SampleImages(
        dataset, samples, "whole", resolution, encoder.patch_size, streaming.max_pixels,
        normalization=encoder.normalization,
    )  # fmt: skip
    batches = by_shape(own_share(len(samples), streaming.processes), shapes, per_process(streaming))
    return stream(images, batches, streaming, desc)
