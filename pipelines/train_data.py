"""Training data for both stages: ImageFolder splits, augmentation, per-rank samplers and the patch inputs.

Everything here is plain PyTorch (it runs inside the Ray Train workers, and in the benchmark's plain loop):

- stage I and ``--role patch`` (on the fly) read the augmented image at ``image_size``;
- ``--role glance`` reads the augmented image resized to K;
- ``--role patch --patches DIR`` reads the precomputed K x K crops from Parquet (``pipelines.patch_dataset``).

Images stay ``uint8`` until the training step (``anchornet.preprocessing.to_float``): the models normalise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.transforms import v2

from anchornet import storage
from anchornet.image_folder import (
    ImageFolderDataset,
    ImageFolderIndex,
    holdout_digest,
    holdout_indices,
    scan_image_folder,
)
from anchornet.preprocessing import Preprocessing

__all__ = [
    "DataSplits",
    "epoch_loader",
    "eval_preprocessing",
    "holdout_record",
    "limit_index",
    "scan_splits",
    "train_transform",
    "val_loader",
]


HOLDOUT_SPLIT = "train"  # the split the held-out images come from: the one both stages train on


class DataSplits:
    """The ``train/`` and ``val/`` indexes of a data root, with one class list (train's).

    ``holdout`` holds the images of ``train/`` left out of training (``holdout_indices``), ``train`` the rest.
    """

    def __init__(self, train: ImageFolderIndex, val: ImageFolderIndex, holdout: ImageFolderIndex | None = None) -> None:
        self.train = train
        self.val = val
        self.holdout = holdout if holdout is not None else ImageFolderIndex(train.root, train.classes, [])

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
) -> DataSplits:
    """Index ``ROOT/train`` and ``ROOT/val`` (local or ``s3://``); val must use train's classes.

    ``classes`` pins the class list (a checkpoint's). ``holdout_size`` images of the whole ``train/``, drawn
    with ``holdout_seed`` (``anchornet.image_folder.holdout_indices``, as ``jobs/evaluate.py`` draws them), are
    left out of ``train`` into ``holdout``. ``limit`` then keeps ``limit`` images per split, evenly spaced over
    the sorted index, so every class keeps some (tests and quick runs).
    Raises ``FileNotFoundError`` / ``ValueError`` with one-line messages for missing, empty or malformed trees.
    """
    train = scan_image_folder(storage.join(root, HOLDOUT_SPLIT), classes=classes)
    try:
        val = scan_image_folder(storage.join(root, "val"), classes=train.classes)
    except ValueError as err:
        raise ValueError(f"val/ does not match train/: {err}") from err
    held = set(holdout_indices(train, holdout_size, holdout_seed))
    if len(held) >= len(train):
        raise ValueError(f"holdout-size {holdout_size} leaves none of the {len(train)} train/ images for training")
    kept = [item for i, item in enumerate(train.items) if i not in held]
    holdout = ImageFolderIndex(train.root, train.classes, [item for i, item in enumerate(train.items) if i in held])
    train = ImageFolderIndex(train.root, train.classes, kept) if held else train
    if limit is not None:
        train, val = limit_index(train, limit), limit_index(val, limit)
    return DataSplits(train, val, holdout)


def holdout_record(splits: DataSplits, size: int, seed: int) -> dict[str, Any]:
    """What a checkpoint card records of the images left out of training (``provenance["holdout"]``)."""
    ids = [path for path, _ in splits.holdout.items]
    return {"split": HOLDOUT_SPLIT, "size": size, "seed": seed, "images": len(ids), "sha256": holdout_digest(ids)}


def limit_index(index: ImageFolderIndex, limit: int) -> ImageFolderIndex:
    """``limit`` items evenly spaced over ``index`` (all of it when it is smaller)."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    n = len(index)
    if n <= limit:
        return index
    picks = [index.items[math.floor(i * n / limit)] for i in range(limit)]
    return ImageFolderIndex(root=index.root, classes=index.classes, items=picks)


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


def image_dataset(index: ImageFolderIndex, transform: Callable[..., torch.Tensor]) -> Dataset:
    return ImageFolderDataset(index, transform=transform)


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
) -> DataLoader:
    """This rank's shuffled training loader for ``epoch``.

    A ``DistributedSampler`` (also for one worker: same code path) shards and shuffles with ``seed`` and the
    epoch; the loader's generator, which seeds the augmentation RNG of each loader process, is derived from
    (seed, epoch, rank), so augmentation does not depend on where a run was resumed. The last incomplete
    batch is dropped (BatchNorm and equal step counts across ranks).
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch, rank))
    torch.manual_seed(epoch_seed(seed, epoch, rank))  # augmentation in-process when num_workers == 0
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
    """This rank's share of the validation set: every ``world_size``-th item, no padding, so top-1 is exact."""
    shard = Subset(dataset, range(rank, len(dataset), world_size))  # type: ignore[arg-type]
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory)
