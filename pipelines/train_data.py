"""Training data for both stages: ImageFolder splits, augmentation, per-rank samplers and the patch inputs.

Everything here is plain PyTorch (it runs inside the Ray Train workers, and in the benchmark's plain loop):

- stage I and ``--role patch`` (on the fly) read the augmented image at ``image_size``;
- ``--role glance`` reads the augmented image resized to K;
- ``--role patch --patches DIR`` reads the precomputed K x K crops from Parquet (``pipelines.patch_dataset``),
  each loader process of each rank reading a run of shards of its own a window at a time
  (``ShardWindowBatchSampler``), so the cluster reads each shard about once per epoch and each loader process
  caches only its current window.

Images stay ``uint8`` until the training step (``anchornet.preprocessing.to_float``): the models normalise.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision.transforms import v2

from anchornet import storage
from anchornet.image_folder import (
    ImageFolderDataset,
    ImageFolderIndex,
    evenly_spaced,
    holdout_digest,
    holdout_indices,
    scan_image_folder,
)
from anchornet.preprocessing import ImageDecodeError, Preprocessing

__all__ = [
    "DEFAULT_SHUFFLE_WINDOW",
    "SKIPPED_LABEL",
    "DataSplits",
    "ShardWindowBatchSampler",
    "ShardWindowSampler",
    "TrainingImages",
    "epoch_loader",
    "eval_preprocessing",
    "holdout_record",
    "limit_index",
    "scan_splits",
    "shard_cache_size",
    "shards_of",
    "train_transform",
    "val_image_dataset",
    "val_loader",
    "window_order",
]


HOLDOUT_SPLIT = "train"  # the split the held-out images come from: the one both stages train on
# Shards shuffled together (--shuffle-window): memory per loader process (window + 1 shards' encoded patches, ~18 MB
# per 1000-image shard) against mixing. Shards of the default --shard-order mixed each hold a sample of all classes,
# so any window mixes them; 16 shuffles a loader process's run of up to 16 shards (imagenette: 10 in all) whole.
# On shards of --shard-order sorted (one or two classes each) it mixes 16 to 32 of ImageNet's classes at a time.
DEFAULT_SHUFFLE_WINDOW = 16


class DataSplits:
    """The ``train/`` and ``val/`` indexes of a data root, with one class list (train's).

    ``holdout`` holds the images of ``train/`` left out of training (``holdout_indices``), ``train`` the rest.
    """

    def __init__(
        self,
        train: ImageFolderIndex,
        val: ImageFolderIndex,
        holdout: ImageFolderIndex | None = None,
        listed: tuple[ImageFolderIndex, ImageFolderIndex] | None = None,
    ) -> None:
        self.train = train
        self.val = val
        self.holdout = holdout if holdout is not None else ImageFolderIndex(train.root, train.classes, [])
        #: ``train/`` and ``val/`` as listed, before the held-out images and ``limit`` (``save_listing``)
        self.listed = listed if listed is not None else (train, val)

    @property
    def classes(self) -> list[str]:
        return self.train.classes


def scan_splits(
    root: str,
    *,
    classes: Sequence[str] | None = None,
    limit: int | None = None,
    holdout_size: int = 0,
    holdout_seed: int = 0,
    listing: str | None = None,
) -> DataSplits:
    """Index ``ROOT/train`` and ``ROOT/val`` (local or ``s3://``); val must use train's classes.

    ``listing`` (a ``save_listing`` file) takes the two indexes from there instead of listing the tree again: the
    training job's driver lists it once and every worker, and every restart, reads that one file (on S3 ImageNet's
    listing is ~1,300 requests one after another, and the tree may change under a running job).

    ``classes`` pins the class list (a checkpoint's). ``holdout_size`` images of the whole ``train/``, drawn
    with ``holdout_seed`` (``anchornet.image_folder.holdout_indices``, as ``jobs/evaluate.py`` draws them), are
    left out of ``train`` into ``holdout``. ``limit`` then keeps ``limit`` images per split, evenly spaced over
    the sorted index, so every class keeps some (tests and quick runs).
    Raises ``FileNotFoundError`` / ``ValueError`` with one-line messages for missing, empty or malformed trees, and
    for held-out images that take every training image of a class.
    """
    if listing is not None:
        train, val = load_listing(listing)
        if classes is not None and list(classes) != train.classes:
            raise ValueError(f"{listing} was listed with other classes than asked for")
    else:
        train = scan_image_folder(storage.join(root, HOLDOUT_SPLIT), classes=classes)
        if empty := _empty_classes(train):
            raise ValueError(
                f"{storage.join(root, HOLDOUT_SPLIT)} has no images of class {_shown(empty)}: the model would get an "
                "output it never trains; remove the empty folder or add images"
            )
        try:
            val = scan_image_folder(storage.join(root, "val"), classes=train.classes)
        except ValueError as err:
            raise ValueError(f"val/ does not match train/: {err}") from err
    listed = (train, val)
    held = set(holdout_indices(train, holdout_size, holdout_seed))
    if len(held) >= len(train):
        raise ValueError(f"holdout-size {holdout_size} leaves none of the {len(train)} train/ images for training")
    kept = [item for i, item in enumerate(train.items) if i not in held]
    holdout = ImageFolderIndex(train.root, train.classes, [item for i, item in enumerate(train.items) if i in held])
    train = ImageFolderIndex(train.root, train.classes, kept) if held else train
    if held and (empty := _empty_classes(train)):
        raise ValueError(
            f"--holdout-size {holdout_size} with --holdout-seed {holdout_seed} holds out every train/ image of class "
            f"{_shown(empty)}: the model would get an output it never trains; pass a smaller --holdout-size or "
            "another --holdout-seed"
        )
    if limit is not None:
        train, val = limit_index(train, limit), limit_index(val, limit)
    return DataSplits(train, val, holdout, listed=listed)


def _empty_classes(index: ImageFolderIndex) -> list[str]:
    """The classes of ``index`` without an image in it."""
    seen = {label for _, label in index.items}
    return [name for label, name in enumerate(index.classes) if label not in seen]


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def save_listing(uri: str, train: ImageFolderIndex, val: ImageFolderIndex) -> None:
    """Write the two indexes of a tree (``DataSplits.listed``) to one Parquet file, for ``scan_splits(listing=)``."""
    rows = [("train", train), ("val", val)]
    table = pa.table(
        {
            "split": [name for name, index in rows for _ in index.items],
            "image_id": [rel for _, index in rows for rel, _ in index.items],
            "label": pa.array([label for _, index in rows for _, label in index.items], pa.int32()),
        }
    ).replace_schema_metadata(
        {"classes": json.dumps(train.classes), "roots": json.dumps({"train": train.root, "val": val.root})}
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    storage.write_bytes(uri, sink.getvalue().to_pybytes())


def load_listing(uri: str) -> tuple[ImageFolderIndex, ImageFolderIndex]:
    """The ``train/`` and ``val/`` indexes ``save_listing`` wrote."""
    table = pq.read_table(pa.BufferReader(storage.read_bytes(uri)))
    meta = table.schema.metadata or {}
    classes, roots = json.loads(meta[b"classes"]), json.loads(meta[b"roots"])
    columns = table.to_pydict()
    items: dict[str, list[tuple[str, int]]] = {"train": [], "val": []}
    for split, rel, label in zip(columns["split"], columns["image_id"], columns["label"], strict=True):
        items[split].append((rel, label))
    return (
        ImageFolderIndex(roots["train"], classes, items["train"]),
        ImageFolderIndex(roots["val"], classes, items["val"]),
    )


def holdout_record(splits: DataSplits, size: int, seed: int) -> dict[str, Any]:
    """What a checkpoint card records of the images left out of training (``provenance["holdout"]``)."""
    ids = [path for path, _ in splits.holdout.items]
    return {"split": HOLDOUT_SPLIT, "size": size, "seed": seed, "images": len(ids), "sha256": holdout_digest(ids)}


def limit_index(index: ImageFolderIndex, limit: int) -> ImageFolderIndex:
    """``limit`` items evenly spaced over ``index`` (all of it when it is smaller)."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if len(index) <= limit:
        return index
    return ImageFolderIndex(root=index.root, classes=index.classes, items=evenly_spaced(index.items, limit))


def train_transform(
    image_size: int, *, min_scale: float = 0.08, output_size: int | None = None
) -> Callable[..., torch.Tensor]:
    """RandomResizedCrop(``image_size``, scale=(min_scale, 1)) + horizontal flip, on a PIL image; uint8 out.

    ``output_size`` resizes the augmented image once more (the glance network's K x K input).
    """
    steps: list[Callable] = [
        v2.PILToTensor(),
        v2.RandomResizedCrop(image_size, scale=(min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if output_size is not None and output_size != image_size:
        steps.append(v2.Resize([output_size, output_size], antialias=True))
    return v2.Compose(steps)


def eval_preprocessing(preprocessing: Preprocessing, output_size: int | None = None) -> Callable[..., torch.Tensor]:
    """The card's deterministic preprocessing, optionally resized to ``output_size`` (glance)."""
    if output_size is None or output_size == preprocessing.image_size:
        return preprocessing
    return v2.Compose([preprocessing, v2.Resize([output_size, output_size], antialias=True)])


#: Consecutive undecodable images after which ``TrainingImages`` gives up: a broken tree, not a bad file.
MAX_CONSECUTIVE_UNDECODABLE = 16


class TrainingImages(ImageFolderDataset):
    """An ``ImageFolderDataset`` that one bad file cannot stop: an image that does not decode (corrupt, truncated,
    not an image, over the pixel limit: ``ImageDecodeError``) is replaced by the next one of the index that does,
    with one warning per file and process (on stderr, which Ray forwards to the driver).

    Without this, such a file, read in every epoch, fails its worker on every restart of the run at the same
    place. The substitution keeps every rank's step count. Read errors (``OSError``: S3, NFS) still fail the
    worker: they may pass, and the restart retries them. ``MAX_CONSECUTIVE_UNDECODABLE`` bad files in a row
    raise ``ImageDecodeError`` naming the first.

    ``substitute_label`` (validation: ``SKIPPED_LABEL``) labels a replaced sample instead of the next image's own
    label, so that the accuracy can leave it out rather than count the next image twice.
    """

    def __init__(
        self, index: ImageFolderIndex, transform: Callable[..., torch.Tensor], substitute_label: int | None = None
    ) -> None:
        super().__init__(index, transform=transform)
        self.substitute_label = substitute_label
        self._warned: set[int] = set()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = self._position(i)  # IndexError past the end: the substitution must not wrap iteration around
        first: ImageDecodeError | None = None
        for k in range(min(len(self), MAX_CONSECUTIVE_UNDECODABLE)):
            j = (i + k) % len(self)
            try:
                image, label = super().__getitem__(j)
            except ImageDecodeError as err:
                first = first or err
                if j not in self._warned:
                    self._warned.add(j)
                    print(
                        f"warning: skipping {err} (the next image of the index takes its place)",
                        file=sys.stderr,
                        flush=True,
                    )
                continue
            return image, label if k == 0 or self.substitute_label is None else self.substitute_label
        raise ImageDecodeError(
            f"{min(len(self), MAX_CONSECUTIVE_UNDECODABLE)} consecutive images from {self.index.uri(i)} on cannot "
            f"be decoded (first: {first})"
        )


#: The label of a validation sample whose image did not decode (``val_image_dataset``): no accuracy counts it.
SKIPPED_LABEL = -1


def image_dataset(index: ImageFolderIndex, transform: Callable[..., torch.Tensor]) -> Dataset:
    """The training job's training images of ``index``: ``TrainingImages`` (an undecodable file is replaced by the
    next image, with a warning)."""
    return TrainingImages(index, transform)


def val_image_dataset(index: ImageFolderIndex, transform: Callable[..., torch.Tensor]) -> Dataset:
    """The training job's validation images: an undecodable file does not stop the run either, but its sample is
    labelled ``SKIPPED_LABEL`` and left out of the val top-1, which stays exact over the images that decode."""
    return TrainingImages(index, transform, substitute_label=SKIPPED_LABEL)


class FlipDataset(Dataset):
    """Random horizontal flip over a dataset of ``(uint8 (3, K, K), label)`` (precomputed patches)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.flip = v2.RandomHorizontalFlip()

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[i]
        return self.flip(image), label


def shards_of(dataset: Dataset) -> np.ndarray | None:
    """The shard of every sample of ``dataset`` (``int64``, one per index), through the wrappers the training job
    puts around a ``PatchDataset`` (``FlipDataset``, ``Subset``); ``None`` for a dataset without shards."""
    if isinstance(dataset, FlipDataset):
        return shards_of(dataset.dataset)
    if isinstance(dataset, Subset):
        inner = shards_of(dataset.dataset)
        return None if inner is None else inner[np.asarray(dataset.indices, dtype=np.int64)]
    sample_shards = getattr(dataset, "sample_shards", None)
    return np.asarray(sample_shards(), dtype=np.int64) if callable(sample_shards) else None


def shard_cache_size(window: int) -> int:
    """``max_cached_shards`` for a dataset read by one reader of ``ShardWindowBatchSampler`` (or in
    ``window_order``): the window, plus one shard of slack.

    A loader process reads its own shards a window at a time, in order, so once it reaches its next window it
    never returns to the previous one, and the LRU evicts those shards first: ``window`` shards would do. The
    slack keeps a reader that gets a little ahead at a window change (one more shard open) from evicting a shard
    of the window it still reads.
    """
    return window + 1


def _check_window(window: int) -> None:
    if window < 1:
        raise ValueError(f"shuffle window must be at least 1 shard, got {window}")


def _windowed(units: np.ndarray, sequence: np.ndarray, *, window: int, rng: np.random.Generator) -> np.ndarray:
    """The samples (indices into ``units``, the unit of each sample) of the units in ``sequence``, a window at a
    time: ``sequence`` is cut, in its order, into ``ceil(len / window)`` windows of consecutive units, as equal as
    possible (10 units with window 8 make two windows of 5, not 8 + 2, so no stretch of the epoch mixes only a
    couple of units); the samples of each window are shuffled together and the windows follow one another."""
    if len(sequence) == 0:
        return np.zeros(0, dtype=np.int64)
    groups = math.ceil(len(sequence) / window)
    window_of = np.full(int(max(units.max(), sequence.max())) + 1, -1, dtype=np.int64)
    window_of[sequence] = np.arange(len(sequence)) * groups // len(sequence)
    samples = rng.permutation(np.flatnonzero(window_of[units] >= 0))
    return samples[np.argsort(window_of[units[samples]], kind="stable")]


def window_order(shards: np.ndarray | Sequence[int], *, window: int, seed: int, epoch: int) -> np.ndarray:
    """One reader's sample order over all of ``shards``, a window of shards at a time; a function of (shards,
    window, seed, epoch) only.

    The shards that hold samples are permuted and cut, in that order, into ``ceil(S / window)`` windows of at
    most ``window`` consecutive shards, as equal as possible; the samples of each window are shuffled together
    and the windows concatenated. Returns indices into ``shards``, window after window.
    """
    _check_window(window)
    shards = np.asarray(shards, dtype=np.int64)
    if len(shards) == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([seed % 2**64, epoch])
    return _windowed(shards, rng.permutation(np.unique(shards)), window=window, rng=rng)


class ShardWindowSampler(Sampler[int]):
    """``window_order`` as a sampler, for a single reader: one process, no ranks, no loader processes.

    With a ``PatchDataset`` of ``max_cached_shards=shard_cache_size(window)`` it loads each shard once per epoch.
    The training job, which has ranks and loader processes, uses ``ShardWindowBatchSampler`` instead: this order
    split over several readers would make every one of them load every shard.
    """

    def __init__(self, shards: np.ndarray | Sequence[int], *, window: int, seed: int, epoch: int) -> None:
        self.indices = window_order(shards, window=window, seed=seed, epoch=epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices.tolist())


class ShardWindowBatchSampler(Sampler[list[int]]):
    """One rank's training batches of precomputed patches, such that the cluster reads each shard about once per
    epoch.

    A reader is one loader process of one rank (a rank with ``loader_workers=0`` is one reader): reader
    ``rank * L + w``, ``L = max(1, loader_workers)``. Each epoch the shards are permuted with (seed, epoch) alone,
    their samples laid end to end in that order, and the sequence cut into ``R = world_size * L`` equal runs of
    ``N // R`` samples, one per reader: a reader reads the shards of its run, and only a shard cut by a run's end
    is read by two readers (R - 1 shards at most, ~5 % more reads at ImageNet's 1,281 shards and 64 readers;
    with fewer shards than readers a shard is shared by several). Each reader reads its run ``window`` (part-)
    shards at a time (``_windowed``; its samples' order depends on (seed, epoch, reader) too) and cuts it into
    batches of ``batch_size``. Every reader has the same share, so every rank takes the same number of steps
    (DDP's all-reduce waits for all), and an epoch leaves out under one batch per reader plus ``N mod R`` samples,
    a different part each epoch.

    Batch ``t * L + w`` of this rank is reader ``w``'s ``t``-th: the ``DataLoader`` (``in_order=True``, the
    default) hands batch indices to its loader processes round-robin, so process ``w`` reads reader ``w``'s
    shards only, a window at a time, and a ``PatchDataset`` of ``max_cached_shards=shard_cache_size(window)``
    loads each of them once. Without loader processes the rank's one reader is read in process.

    A share under ``batch_size`` samples (a tiny dataset) makes every reader yield one batch of its whole share, so
    it still trains, as with ``DistributedSampler``; with fewer samples than readers each rank is one reader, and
    with fewer samples than ranks the sampler refuses (``ValueError``). Deterministic in (shards, window, seed,
    epoch, world_size, loader_workers, batch_size): a resumed run draws the same batches as an unbroken one.
    """

    def __init__(
        self,
        shards: np.ndarray | Sequence[int],
        *,
        window: int,
        seed: int,
        epoch: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        loader_workers: int = 0,
    ) -> None:
        _check_window(window)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if loader_workers < 0:
            raise ValueError(f"loader_workers must be at least 0, got {loader_workers}")
        shards = np.asarray(shards, dtype=np.int64)
        if 0 < len(shards) < world_size:
            raise ValueError(f"{len(shards)} samples cannot give each of {world_size} ranks one")
        # Fewer samples than readers (a tiny run): one run per rank, its loader processes taking its batches in turn.
        self.loader_processes = max(1, loader_workers) if len(shards) >= world_size * max(1, loader_workers) else 1
        self.readers = world_size * self.loader_processes
        self.batches = np.zeros((0, batch_size), dtype=np.int64)
        share = len(shards) // self.readers
        if share == 0:
            return
        entropy = [seed % 2**64, epoch]
        present, shard = np.unique(shards, return_inverse=True)
        rank_of = np.empty(len(present), dtype=np.int64)
        rank_of[np.random.default_rng(entropy).permutation(len(present))] = np.arange(len(present))
        sequence = np.argsort(rank_of[shard], kind="stable")  # the samples, shard after shard in permuted order
        size = min(batch_size, share)
        per_reader = share // size
        mine: list[np.ndarray] = []
        for reader in range(rank * self.loader_processes, (rank + 1) * self.loader_processes):
            run = sequence[reader * share : (reader + 1) * share]
            units = rank_of[shard[run]]  # each sample's shard, numbered in permuted order: the run's are ascending
            rng = np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(reader,)))
            order = run[_windowed(units, np.unique(units), window=window, rng=rng)]
            mine.append(order[: per_reader * size].reshape(per_reader, size))
        # (L, m, size) -> (m, L, size): batch t * L + w is reader w's t-th.
        self.batches = np.stack(mine, axis=1).reshape(-1, size)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches.tolist())


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """One seed per (run seed, epoch, rank): a resumed run draws the same augmentations as an unbroken one."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % 2**63


def epoch_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    num_workers: int,
    pin_memory: bool = False,
    shards: np.ndarray | None = None,
    shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
) -> DataLoader:
    """This rank's shuffled training loader for ``epoch``.

    A ``DistributedSampler`` (also for one worker: same code path) shards and shuffles with ``seed`` and the
    epoch, and the last incomplete batch is dropped (BatchNorm and equal step counts across ranks). Given
    ``shards`` (``shards_of(dataset)``: precomputed patches), a ``ShardWindowBatchSampler`` makes the batches
    instead: each of this rank's ``num_workers`` loader processes reads shards of its own, ``shuffle_window`` at a
    time, so each shard is read about once per epoch over all ranks and processes. The loader's generator, which seeds
    the augmentation RNG of each loader process, is derived from (seed, epoch, rank), so augmentation does not
    depend on where a run was resumed.
    """
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch, rank))
    torch.manual_seed(epoch_seed(seed, epoch, rank))  # augmentation in-process when num_workers == 0
    if shards is not None:
        samples = len(dataset)  # type: ignore[arg-type]
        if len(shards) != samples:
            raise ValueError(f"shards has {len(shards)} entries for a dataset of {samples} samples")
        batches = ShardWindowBatchSampler(
            shards,
            window=shuffle_window,
            seed=seed,
            epoch=epoch,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            loader_workers=num_workers,
        )
        return DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=num_workers,
            generator=generator,
            pin_memory=pin_memory,
            persistent_workers=False,
        )  # in_order=True (the default): batch t * L + w goes to loader process w, reader w's
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    per_rank = len(sampler)
    return DataLoader(
        dataset,
        batch_size=max(1, min(batch_size, per_rank)),
        sampler=sampler,
        num_workers=num_workers,
        generator=generator,
        drop_last=per_rank >= batch_size,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def val_loader(
    dataset: Dataset, *, batch_size: int, rank: int, world_size: int, num_workers: int, pin_memory: bool = False
) -> DataLoader:
    """This rank's share of the validation set: every ``world_size``-th item, no padding, so top-1 is exact.

    Read in the dataset's order (for precomputed patches: shard by shard, so a bounded cache suffices)."""
    shard = Subset(dataset, range(rank, len(dataset), world_size))  # type: ignore[arg-type]
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory)
