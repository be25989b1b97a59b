"""Ray Train for both stages: stage I (AnchorNet from scratch) and stage II (the glance and patch classifiers).

One code path from one CPU worker to many GPU nodes: a ``TorchTrainer`` runs ``train_loop_per_worker`` on
``num_workers`` workers (DDP through ``ray.train.torch.prepare_model``; torch ``DataLoader``s over images with a
``DistributedSampler``, or over precomputed patches with a ``ShardWindowBatchSampler``, moved to the device by
``prepare_data_loader``).
Each epoch every worker reports train loss/accuracy and val top-1 (summed over workers), and rank 0 attaches
a checkpoint with the model, optimizer, epoch and history (the lr schedule is rebuilt from the epoch and the
current flags). Ray keeps them under ``OUT/ray_<stage>``.

Fault tolerance: ``FailureConfig(max_failures)`` restarts a crashed worker group from the last checkpoint,
and re-running the same command with the same ``OUT`` resumes a killed run (Train V2 finds the run by
``RunConfig(storage_path=OUT, name=...)``; ``ray.train.get_checkpoint()`` hands the loop its state).
At the end the driver writes the self-describing checkpoint (``anchornet.save_checkpoint``) to
``OUT/<stage>.pt``: ``anchornet.pt``, ``glance.pt`` or ``patch.pt``.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from anchornet import storage
from anchornet.cam import class_activation_map
from anchornet.checkpoint import CheckpointError, ModelCard, load_checkpoint, save_checkpoint
from anchornet.classifiers import (
    WeightsUnavailableError,
    build_classifier,
    classifier_names,
    imagenet_indices,
    is_classifier_name,
)
from anchornet.early_exit import resize_square
from anchornet.model import AnchorNet, anchornet_test
from anchornet.patches import crop_patches, select_patches
from anchornet.preprocessing import Preprocessing, to_float
from pipelines import train_data
from pipelines.cluster import alive_nodes, local_paths_warning, unreachable_address

if TYPE_CHECKING:
    from pipelines.patch_dataset import PatchDataset

__all__ = [
    "STAGES",
    "FlagError",
    "Task",
    "TrainConfig",
    "TrainError",
    "TrainOutcome",
    "add_common_arguments",
    "anchornet_receptive_field",
    "build_task",
    "config_from_args",
    "final_checkpoint_uri",
    "lr_at",
    "make_optimizer",
    "run_training",
    "train_in_process",
    "train_loop_per_worker",
]

STAGES = ("anchornet", "glance", "patch")
ANCHORNET_ARCHS = ("anchornet", "anchornet_test")
STATE_FILE = "train_state.pt"
BASE_LR = {"anchornet": 0.1, "glance": 0.01, "patch": 0.01}  # per 256 images (REFERENCE.md section 6)
# What a re-run into the same OUT must keep (it resumes the same run): the optimizer, the global batch and the
# held-out images. ``epochs`` may change (the schedule is rebuilt for it), and so may the resources, and
# ``shuffle_window``: it bounds each loader process's memory, so a run that ran out of memory must be resumable with
# a smaller one (its remaining epochs then draw another order than an unbroken run's, as another seed would).
RESUME_FIXED = (
    "lr",
    "batch_size",
    "momentum",
    "nesterov",
    "weight_decay",
    "schedule",
    "milestones",
    "holdout_size",
    "holdout_seed",
    "num_patches",  # stage II: what each step trains on, and the classifier's input side
    "patch_size",
)


class TrainError(RuntimeError):
    """Training could not start or did not finish; the message is one line for the user."""


class FlagError(TrainError):
    """A flag that contradicts an input, found before Ray starts (``--image-size`` smaller than the ``--anchornet``
    receptive field, say): a bad flag, so the jobs exit with status 2 as for the flags argparse refuses."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; validated on construction, plain values only (it travels to workers).

    ``batch_size`` is the global batch in images (split evenly over workers), so a recipe means the same on one
    CPU and on eight GPUs; for the patch role each image contributes up to ``num_patches`` patches to the step,
    cropped on the fly or read precomputed (``Task.batch_sizes``). ``lr=None`` scales the stage's base lr
    linearly: ``BASE_LR[stage] * batch_size / 256``. The step schedule multiplies the lr by 0.1 at ``milestones``
    (fractions of ``epochs``); cosine decays it to 0 over ``epochs``. ``holdout_size`` images of ``train/``,
    drawn with ``holdout_seed`` (``anchornet.image_folder.holdout_indices``), are left out of training so that
    ``jobs/evaluate.py`` can fit the early-exit thresholds on images the models have not seen (0: train on all
    of ``train/``). ``shuffle_window`` (patch role from ``patches`` only): shards of precomputed patches shuffled
    together by each loader process (``train_data.ShardWindowBatchSampler``); each loader process caches that
    many shards' encoded patches plus one (``train_data.shard_cache_size``), so it trades memory against how well
    an epoch is mixed.

    ``amp`` runs the trained model's forward pass and loss under bfloat16 autocast (``train_epoch``); the weights,
    the optimizer, validation and the frozen AnchorNet's patch choice stay float32. ``channels_last`` keeps the
    trained model in channels-last memory layout (``training_model``). Both may change on resume.

    ``listing`` is set by ``run_training``, not by users: the ``train_data.save_listing`` file of the tree the
    driver listed, which the workers read instead of listing it again.

    Test-only fields (no CLI help): ``limit`` keeps that many images per split (evenly spaced),
    ``crash_at_epoch=k`` makes the last worker raise at the start of epoch ``k`` (k >= 1) of an attempt that
    did not start from a checkpoint, so ``FailureConfig`` restarts the group from epoch ``k - 1``'s checkpoint
    (once), or the run fails when ``max_failures=0`` and a re-run resumes it.
    """

    data: str
    output: str
    stage: str = "anchornet"
    arch: str = "anchornet"
    weights: str | None = None
    anchornet: str | None = None
    patches: str | None = None
    epochs: int = 100
    batch_size: int = 256
    lr: float | None = None
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    schedule: str = "step"
    milestones: tuple[float, ...] = (0.3, 0.6, 0.9)
    image_size: int = 224
    resize_size: int = 256
    min_scale: float = 0.08
    patch_size: int | None = None
    num_patches: int = 4
    shuffle_window: int = train_data.DEFAULT_SHUFFLE_WINDOW
    amp: bool = False
    channels_last: bool = False
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = None
    threads: int | None = None
    loader_workers: int = 2
    seed: int = 0
    holdout_size: int = 0
    holdout_seed: int = 0
    max_failures: int = 3
    keep_checkpoints: int = 2
    limit: int | None = None
    crash_at_epoch: int | None = None
    listing: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.stage not in STAGES:
            problems.append(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.stage == "anchornet" and self.arch not in ANCHORNET_ARCHS:
            problems.append(f"stage I trains {' or '.join(ANCHORNET_ARCHS)}, got arch {self.arch!r}")
        if self.stage != "anchornet" and not is_classifier_name(self.arch):
            problems.append(
                f"unknown classifier {self.arch!r}; known: {', '.join(classifier_names())} or any torchvision "
                "classification model"
            )
        if self.stage == "anchornet" and (self.weights or self.anchornet or self.patches):
            problems.append("--weights, --anchornet and --patches are for stage II (train_classifier.py)")
        if self.stage == "glance" and self.patches:
            problems.append("--patches is for --role patch")
        if self.stage == "patch" and not (self.patches or self.anchornet):
            problems.append("--role patch needs --patches PARQUET_DIR or --anchornet CKPT")
        at_least_one = ("epochs", "batch_size", "num_workers", "image_size", "num_patches", "shuffle_window")
        for name in (*at_least_one, "keep_checkpoints"):
            if getattr(self, name) < 1:
                problems.append(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if not self.momentum >= 0:
            problems.append(f"momentum must be >= 0, got {self.momentum}")
        if self.stage == "anchornet" and self.arch in ANCHORNET_ARCHS and self.image_size >= 1:
            k = anchornet_receptive_field(self.arch)
            if self.image_size < k:
                problems.append(f"image-size {self.image_size} is smaller than {self.arch}'s receptive field ({k} px)")
        if self.resize_size < self.image_size:
            problems.append(f"resize-size ({self.resize_size}) must be at least image-size ({self.image_size})")
        if not 0 < self.min_scale <= 1:
            problems.append(f"min-scale must be in (0, 1], got {self.min_scale}")
        if self.schedule not in ("step", "cosine"):
            problems.append(f"schedule must be 'step' or 'cosine', got {self.schedule!r}")
        if any(not 0 < m < 1 for m in self.milestones):
            problems.append(f"milestones are fractions of the epochs in (0, 1), got {self.milestones}")
        if self.patch_size is not None and not 1 <= self.patch_size <= self.image_size:
            problems.append(f"patch-size must be in [1, image-size], got {self.patch_size}")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            problems.append(f"cpus-per-worker must be positive, got {self.cpus_per_worker}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads must be at least 1, got {self.threads}")
        if self.loader_workers < 0 or self.max_failures < -1 or self.weight_decay < 0:
            problems.append("loader-workers and weight-decay must be >= 0, max-failures >= -1")
        if self.holdout_size < 0:
            problems.append(f"holdout-size must be >= 0, got {self.holdout_size}")
        if self.limit is not None and self.limit < 1:
            problems.append(f"limit must be at least 1, got {self.limit}")
        if self.crash_at_epoch is not None and not 1 <= self.crash_at_epoch < self.epochs:
            problems.append(f"crash_at_epoch must be in [1, epochs), got {self.crash_at_epoch}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else BASE_LR[self.stage] * self.batch_size / 256

    @property
    def run_name(self) -> str:
        """Ray Train's run name under ``output``: the same OUT and stage resume the same run."""
        return f"ray_{self.stage}"

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(image_size=self.image_size, resize_size=self.resize_size)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["milestones"] = list(self.milestones)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "milestones" in values:
            values["milestones"] = tuple(values["milestones"])
        return cls(**values)


def final_checkpoint_uri(config: TrainConfig) -> str:
    """Where the final self-describing checkpoint goes: ``OUT/anchornet.pt``, ``OUT/glance.pt``, ``OUT/patch.pt``."""
    return storage.join(config.output, f"{config.stage}.pt")


# ---------------------------------------------------------------------------------------------------------------
# The task of each stage: its model, datasets and how a batch becomes (logits, targets).


@dataclass
class Task:
    """One stage's model and data. ``inputs(images, labels)`` turns a loader batch into model inputs.

    The patch role cuts ``window x window`` patches (K: the frozen AnchorNet's receptive field, or the side of the
    precomputed ones) and resizes them to ``input_size`` when ``--patch-size`` differs, as
    ``EarlyExitClassifier(patch_size=...)`` does at inference. ``train_per_image`` / ``val_per_image``: loader
    samples per image, ``num_patches`` for a precomputed patch set (one patch per sample), else 1.
    """

    config: TrainConfig
    classes: list[str]
    model: nn.Module
    train_set: Dataset
    val_set: Dataset
    input_size: int
    frozen: AnchorNet | None = None  # the patch role's proposal network, eval mode, never trained
    window: int | None = None  # the patch role's K; None for stage I and glance (their images are the inputs)
    train_per_image: int = 1
    val_per_image: int = 1

    def inputs(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``uint8`` loader images to float ``[0, 1]`` model inputs; the patch role crops and resizes here."""
        if self.window is None:
            return to_float(images), labels
        with torch.no_grad():
            floats = to_float(images)
            if images.shape[-1] == self.window:  # precomputed K x K patches (or images of one window)
                return resize_square(floats, self.input_size), labels
            if self.frozen is None:
                raise ValueError(f"expected {self.window} x {self.window} patches, got {tuple(images.shape[-2:])}")
            cam, _ = class_activation_map(self.frozen, floats)
            selection = select_patches(cam, self.frozen.receptive_field, self.config.num_patches)
            crops = crop_patches(floats, selection.boxes, self.window)  # (B, k, 3, K, K)
            valid = selection.valid
            return resize_square(crops[valid], self.input_size), labels[:, None].expand_as(valid)[valid]

    def batch_sizes(self, world_size: int) -> tuple[int, int]:
        """Each worker's (train, val) loader batch: ``batch_size`` images per step over all workers, counted in
        loader samples (``num_patches`` per image for precomputed patches)."""
        batch = self.config.batch_size
        return math.ceil(batch * self.train_per_image / world_size), math.ceil(batch * self.val_per_image / world_size)

    def to(self, device: torch.device) -> Task:
        if self.frozen is not None:
            self.frozen = self.frozen.to(device).eval()
        return self


def _anchornet_model(arch: str, num_classes: int) -> AnchorNet:
    return anchornet_test(num_classes) if arch == "anchornet_test" else AnchorNet(num_classes)


@functools.cache
def anchornet_receptive_field(arch: str) -> int:
    """K of a stage I architecture (``ANCHORNET_ARCHS``), from its shapes alone."""
    with torch.device("meta"):  # no memory, no initialisation cost
        return _anchornet_model(arch, 1).receptive_field.size


def _load_anchornet(uri: str, classes: list[str]) -> tuple[AnchorNet, ModelCard]:
    try:
        model, card = load_checkpoint(uri)
    except CheckpointError as err:
        raise CheckpointError(f"--anchornet {err}") from err
    if card.kind != "anchornet":
        raise CheckpointError(f"--anchornet {uri} holds a {card.kind}, not an AnchorNet")
    if card.class_names is not None and list(card.class_names) != list(classes):
        raise CheckpointError(f"class mismatch: --anchornet {uri} was trained on other classes than the data")
    return model, card  # type: ignore[return-value]


def patch_size_for(config: TrainConfig, anchornet: AnchorNet | None = None) -> int:
    """The classifier's input side: ``--patch-size``, else K, the AnchorNet's receptive field (95 for Table 1)."""
    if config.patch_size is not None:
        return config.patch_size
    if anchornet is not None:
        return anchornet.receptive_field.size
    return AnchorNet(1).receptive_field.size


def build_task(config: TrainConfig, *, with_weights: bool = True) -> Task:
    """Index the data and build the stage's model and datasets (runs in each worker, and in the benchmark)."""
    if config.stage == "patch" and config.patches:
        from pipelines.patch_dataset import PatchDataset  # the precompute job's reader

        # Bounded caches: train is read a window of shards at a time (epoch_loader's ShardWindowBatchSampler), val in
        # shard order; unbounded, every loader process would end up holding all the encoded patches.
        cached = train_data.shard_cache_size(config.shuffle_window)
        train_uri = storage.join(config.patches, "train")
        train_set = PatchDataset(train_uri, role="patch", num_patches=config.num_patches, max_cached_shards=cached)
        classes = list(train_set.classes)
        window = int(train_set.patch_size)
        splits = _splits(config, classes=classes, limit=None)
        picks = _patch_picks(config, train_set, splits)
        val_uri = storage.join(config.patches, "val")
        frozen = None
        val_per_image = config.num_patches
        if storage.exists(val_uri):
            val_set: Dataset = PatchDataset(
                val_uri, role="patch", num_patches=config.num_patches, max_cached_shards=cached
            )
        elif config.anchornet:
            val_per_image = 1
            frozen, _ = _load_anchornet(config.anchornet, classes)
            val = splits.val if config.limit is None else train_data.limit_index(splits.val, config.limit)
            val_set = train_data.val_image_dataset(val, config.preprocessing)
        else:
            raise ValueError(_no_patch_val(val_uri))
        if picks is not None:  # an array, not a list: forked loader processes would copy a list of ints they read
            train_set = torch.utils.data.Subset(train_set, np.asarray(picks, dtype=np.int64))
        model = _classifier(config, classes, with_weights)
        return Task(
            config,
            classes,
            model,
            train_data.FlipDataset(train_set),
            val_set,
            config.patch_size or window,
            frozen,
            window=window,
            train_per_image=config.num_patches,
            val_per_image=val_per_image,
        )

    splits = _splits(config)
    classes = splits.classes
    n = len(classes)
    if config.stage == "anchornet":
        model: nn.Module = _anchornet_model(config.arch, n)
        transform = train_data.train_transform(config.image_size, min_scale=config.min_scale)
        return Task(
            config,
            classes,
            model,
            train_data.image_dataset(splits.train, transform),
            train_data.val_image_dataset(splits.val, config.preprocessing),
            config.image_size,
        )
    frozen = _load_anchornet(config.anchornet, classes)[0] if config.anchornet else None
    size = patch_size_for(config, frozen)
    model = _classifier(config, classes, with_weights)
    if config.stage == "glance":
        transform = train_data.train_transform(config.image_size, min_scale=config.min_scale, output_size=size)
        val_transform = train_data.eval_preprocessing(config.preprocessing, size)
        frozen = None
    else:  # patch, on the fly from the frozen AnchorNet
        transform = train_data.train_transform(config.image_size, min_scale=config.min_scale)
        val_transform = config.preprocessing
    return Task(
        config,
        classes,
        model,
        train_data.image_dataset(splits.train, transform),
        train_data.val_image_dataset(splits.val, val_transform),
        size,
        frozen,
        window=frozen.receptive_field.size if frozen is not None else None,
    )


def _splits(config: TrainConfig, *, classes: list[str] | None = None, limit: int | None = -1) -> train_data.DataSplits:
    """``config.data``'s splits with the held-out images left out of train (``limit=-1``: the config's)."""
    return train_data.scan_splits(
        config.data,
        classes=classes,
        limit=config.limit if limit == -1 else limit,
        holdout_size=config.holdout_size,
        holdout_seed=config.holdout_seed,
        listing=config.listing,
    )


def _no_patch_val(val_uri: str) -> str:
    return f"no {val_uri}: precompute val patches there or pass --anchornet for validation"


def _patch_picks(config: TrainConfig, patches: PatchDataset, splits: train_data.DataSplits) -> list[int] | None:
    """The samples of the precomputed train patches to train on (``None``: all): without the held-out images'
    patches, then ``limit`` evenly spaced ones (every class keeps some)."""
    picks = list(range(len(patches)))
    if config.holdout_size:
        held = {path for path, _ in splits.holdout.items}
        known = held | {path for path, _ in splits.train.items}
        ranges = patches.image_samples()
        strangers = [image_id for image_id, _ in ranges if image_id not in known]
        if strangers:
            raise ValueError(
                f"{len(strangers)} images of --patches {config.patches}/train (e.g. {strangers[0]}) are not in "
                f"{config.data}/train, so the held-out images cannot be left out: precompute the patches of that tree"
            )
        picks = [i for image_id, samples in ranges if image_id not in held for i in samples]
    if config.limit is not None:
        n = len(picks)
        picks = [picks[i] for i in sorted({math.floor(i * n / config.limit) for i in range(min(config.limit, n))})]
    return picks if config.holdout_size or config.limit is not None else None


def _classifier(config: TrainConfig, classes: list[str], with_weights: bool) -> nn.Module:
    """The stage II network; ``weights="imagenet"`` keeps the head rows of the matching ImageNet classes when the
    class names are WordNet ids (Imagenette's are), a new random head otherwise."""
    weights = config.weights if with_weights else None
    return build_classifier(config.arch, len(classes), weights=weights, head_from=imagenet_head(classes, weights))


def imagenet_head(classes: list[str], weights: str | None) -> list[int] | None:
    """ImageNet-1k indices of ``classes`` for ``head_from`` when starting from ImageNet weights, else ``None``."""
    if weights != "imagenet":
        return None
    try:
        return imagenet_indices(classes)
    except ValueError:
        return None


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """The bare architecture of ``config`` (no weights): what the final checkpoint is written from."""
    if config.stage == "anchornet":
        return _anchornet_model(config.arch, num_classes)
    return build_classifier(config.arch, num_classes)


def lr_at(config: TrainConfig, epoch: int) -> float:
    """The recipe's lr in ``epoch`` (0-based) of ``config.epochs``: x0.1 at each milestone (step), or the cosine
    from ``learning_rate`` to 0 (closed form, as ``CosineAnnealingLR(T_max=epochs)``)."""
    if config.schedule == "cosine":
        return config.learning_rate * (1 + math.cos(math.pi * epoch / config.epochs)) / 2
    milestones = sorted({max(1, round(m * config.epochs)) for m in config.milestones})
    return config.learning_rate * 0.1 ** bisect.bisect_right(milestones, epoch)


def make_optimizer(
    config: TrainConfig, model: nn.Module, *, start_epoch: int = 0, state: dict[str, Any] | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD (momentum, Nesterov, weight decay) and the per-epoch schedule of the recipe, at ``start_epoch``.

    ``state`` (a saved ``optimizer.state_dict()``, when resuming) restores the momentum buffers only: the
    hyper-parameters and the schedule always come from ``config``, so a run resumed with more ``epochs`` gets,
    from ``start_epoch`` on, the lr of a fresh run with that many epochs (``lr_at``).
    """
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.learning_rate,
        momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0,
        weight_decay=config.weight_decay,
    )
    if state is not None:
        optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group.update(
            lr=config.learning_rate,
            initial_lr=config.learning_rate,
            momentum=config.momentum,
            nesterov=config.nesterov and config.momentum > 0,
            weight_decay=config.weight_decay,
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: lr_at(config, epoch) / config.learning_rate, last_epoch=start_epoch - 1
    )
    return optimizer, scheduler


def train_epoch(
    task: Task,
    model: nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    *,
    amp: bool = False,
) -> tuple[float, int, int]:
    """One pass over ``loader``; returns (summed loss, correct, samples) of this worker.

    ``amp``: the model's forward pass and the loss under bfloat16 autocast (no gradient scaling: bfloat16 has
    float32's range); ``task.inputs`` (the frozen AnchorNet's CAM and patch choice) stays float32.
    """
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        inputs, targets = task.inputs(images, labels)
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(inputs)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * targets.numel()
        correct += int((logits.argmax(1) == targets).sum())
        seen += targets.numel()
    return loss_sum, correct, seen


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, loader: Any) -> tuple[int, int]:
    """(correct top-1, samples) of this worker's share of the val set (patch role: per patch); samples labelled
    ``train_data.SKIPPED_LABEL`` (an image that did not decode) count nowhere.

    Pass the bare module, not the DDP wrapper: DDP's forward broadcasts buffers (a collective), which hangs
    when some rank has no val images and so never calls forward.
    """
    model.eval()
    correct, seen = 0, 0
    for images, labels in loader:
        inputs, targets = task.inputs(images, labels)
        counted = targets != train_data.SKIPPED_LABEL
        correct += int(((model(inputs).argmax(1) == targets) & counted).sum())
        seen += int(counted.sum())
    return correct, seen


# ---------------------------------------------------------------------------------------------------------------
# The Ray Train loop (runs in every worker).


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def _broadcast_buffers(model: nn.Module) -> None:
    """Every rank takes rank 0's buffers (BatchNorm statistics), as DDP's forward would: val top-1 is then that
    of the model rank 0 checkpoints. Called by every rank, whatever its share of the val set."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def validation_loader(task: Task, rank: int, world: int, device: torch.device) -> DataLoader:
    """This rank's share of the val set, in order."""
    return train_data.val_loader(
        task.val_set,
        batch_size=task.batch_sizes(world)[1],
        rank=rank,
        world_size=world,
        num_workers=task.config.loader_workers,
        pin_memory=device.type == "cuda",
    )


def training_model(task: Task, device: torch.device) -> nn.Module:
    """``task.model`` on ``device``, in channels-last memory layout with ``channels_last`` (cuDNN's fast convolution
    kernels want it: ``benchmarks/train_precision.py``); the checkpointed weights are the same either way."""
    task.model = task.model.to(device)
    if task.config.channels_last:
        task.model = task.model.to(memory_format=torch.channels_last)
    return task.model


@dataclass
class EpochRun:
    """What every epoch of a run uses: the task, the model (DDP-wrapped under Ray), its optimizer, schedule and loss,
    the val loader, the shard of each train sample (``train_data.shards_of``), and this rank's place."""

    task: Task
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    validation: Any
    shards: np.ndarray | None
    device: torch.device
    rank: int = 0
    world: int = 1


def run_epoch(
    run: EpochRun, *, epoch: int, start_epoch: int, prepare: Callable[[Any], Any] = lambda loader: loader
) -> dict[str, Any]:
    """Train ``epoch`` (0-based), step the schedule, validate, and return the epoch's metrics summed over ranks.

    ``prepare`` wraps the epoch's train loader (Ray's ``prepare_data_loader`` moves batches to the device).
    """
    config, task = run.task.config, run.task
    started = time.perf_counter()
    loader = train_data.epoch_loader(
        task.train_set,
        batch_size=task.batch_sizes(run.world)[0],
        epoch=epoch,
        seed=config.seed,
        rank=run.rank,
        world_size=run.world,
        num_workers=config.loader_workers,
        pin_memory=run.device.type == "cuda",
        shards=run.shards,
        shuffle_window=config.shuffle_window,
    )
    lr = run.optimizer.param_groups[0]["lr"]
    loss_sum, correct, seen = train_epoch(
        task, run.model, prepare(loader), run.optimizer, run.criterion, amp=config.amp
    )
    run.scheduler.step()
    train_seconds = time.perf_counter() - started
    _broadcast_buffers(_unwrap(run.model))
    val_correct, val_seen = evaluate(task, _unwrap(run.model), run.validation)
    loss_sum, correct, seen, val_correct, val_seen = _all_reduce(
        [loss_sum, correct, seen, val_correct, val_seen], run.device
    )
    return {
        "epoch": epoch,
        "train_loss": loss_sum / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "val_top1": val_correct / max(val_seen, 1),
        "lr": lr,
        "train_samples": int(seen),
        "train_images_per_s": seen / train_seconds / (config.num_patches if config.stage == "patch" else 1),
        "epoch_seconds": time.perf_counter() - started,
        "start_epoch": start_epoch,  # where this attempt began: shows restarts and resumes
    }


def epoch_line(config: TrainConfig, metrics: Mapping[str, Any]) -> str:
    """The progress line of one epoch."""
    return (
        f"[{config.stage}] epoch {metrics['epoch'] + 1}/{config.epochs}  loss {metrics['train_loss']:.4f}  "
        f"acc {metrics['train_acc']:.4f}  val top-1 {metrics['val_top1']:.4f}  lr {metrics['lr']:.4g}  "
        f"{metrics['train_images_per_s']:.1f} img/s  {metrics['epoch_seconds']:.0f} s"
    )


def train_loop_per_worker(config_dict: dict[str, Any]) -> None:
    """Train ``config_dict`` (a ``TrainConfig.to_dict()``) on this worker, resuming from Ray's checkpoint."""
    import ray.train
    import ray.train.torch

    config = TrainConfig.from_dict(config_dict)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config.threads or max(1, round(config.cpus_per_worker or 1)))
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    task = build_task(config).to(device)
    model = ray.train.torch.prepare_model(training_model(task, device))
    criterion = nn.CrossEntropyLoss()
    history: list[dict[str, Any]] = []
    start_epoch = 0
    optimizer_state = None

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
        if state["classes"] != task.classes:
            raise ValueError("class mismatch: the checkpoint being resumed was trained on other classes")
        _unwrap(model).load_state_dict(state["model"])
        optimizer_state = state["optimizer"]
        start_epoch, history = state["epoch"] + 1, state["history"]
        if start_epoch > config.epochs:
            raise ValueError(
                f"this run has trained {start_epoch} epochs already: --epochs {config.epochs} cannot undo that "
                "(raise it, or use a new --output)"
            )
    # The schedule is rebuilt from this run's config (a re-run may raise --epochs), not restored.
    optimizer, scheduler = make_optimizer(config, model, start_epoch=start_epoch, state=optimizer_state)

    validation = validation_loader(task, rank, world, device)
    validation = ray.train.torch.prepare_data_loader(validation, add_dist_sampler=False)
    shards = train_data.shards_of(task.train_set)  # precomputed patches: shuffled a window of shards at a time
    run = EpochRun(task, model, optimizer, scheduler, criterion, validation, shards, device, rank=rank, world=world)
    for epoch in range(start_epoch, config.epochs):
        if config.crash_at_epoch == epoch and checkpoint is None and rank == world - 1:
            time.sleep(2.0)  # let the controller register the last report first, as a real crash would
            raise RuntimeError(f"injected crash at epoch {epoch} (crash_at_epoch, test only)")
        metrics = run_epoch(
            run,
            epoch=epoch,
            start_epoch=start_epoch,
            prepare=lambda loader: ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False),
        )
        history.append(metrics)
        with tempfile.TemporaryDirectory() as directory:
            report_checkpoint = None
            if rank == 0:
                state = {
                    "model": _unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch,
                    "classes": task.classes,
                    "input_size": task.input_size,
                    "history": history,
                }
                torch.save(state, Path(directory) / STATE_FILE)
                report_checkpoint = ray.train.Checkpoint.from_directory(directory)
                # sys.__stdout__: Train V2 tees plain print() to its logger too, so the line would show twice
                print(epoch_line(config, metrics), file=sys.__stdout__, flush=True)
            ray.train.report(metrics, checkpoint=report_checkpoint)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


# ---------------------------------------------------------------------------------------------------------------
# The driver.


@dataclass(frozen=True)
class TrainOutcome:
    """What a finished run left behind."""

    checkpoint: str
    card: ModelCard
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    seconds: float


def _preflight(config: TrainConfig) -> tuple[list[str], dict[str, Any]]:
    """Check the data, the input checkpoints and any earlier run in OUT before starting workers.

    Returns the classes and the held-out images' record for the card (``train_data.holdout_record``).
    """
    window = None  # K of the precomputed patches
    crops_on_the_fly = config.stage == "patch" and config.anchornet is not None  # the frozen AnchorNet crops images
    if config.stage == "patch" and config.patches:
        try:
            from pipelines.patch_dataset import PatchDataset
        except ImportError as err:
            raise TrainError(f"--patches needs pipelines.patch_dataset ({err})") from err
        patches = PatchDataset(storage.join(config.patches, "train"), role="patch", num_patches=config.num_patches)
        classes = list(patches.classes)
        window = int(patches.patch_size)
        splits = _splits(config, classes=classes, limit=None)
        _patch_picks(config, patches, splits)
        val_uri = storage.join(config.patches, "val")
        if storage.exists(val_uri):
            crops_on_the_fly = False
            val_patches = PatchDataset(val_uri, role="patch", num_patches=config.num_patches)
            if list(val_patches.classes) != classes:
                raise ValueError(f"{val_uri} and {config.patches}/train hold different classes")
            if int(val_patches.patch_size) != window:
                raise TrainError(
                    f"{val_uri} holds {val_patches.patch_size} px patches but {config.patches}/train {window} px ones"
                )
        elif not config.anchornet:
            raise TrainError(_no_patch_val(val_uri))
    else:
        splits = _splits(config)
        classes = splits.classes
    if config.anchornet:
        anchornet, _ = _load_anchornet(config.anchornet, classes)
        k = anchornet.receptive_field.size
        if crops_on_the_fly and config.image_size < k:
            raise FlagError(
                f"--image-size {config.image_size} is smaller than the --anchornet receptive field ({k} px): "
                "it crops patches of that side"
            )
        if crops_on_the_fly and window is not None and window != k:
            raise TrainError(
                f"--patches {config.patches}/train holds {window} px patches but --anchornet {config.anchornet} "
                f"crops val at {k} px: precompute val/ too, or pass the AnchorNet that cut them"
            )
    if config.stage != "anchornet":
        size = config.patch_size or window or (k if config.anchornet else patch_size_for(config))
        _check_architecture(config, len(classes), size)
    if config.weights is not None:
        _check_weights(config, classes)
    holdout = train_data.holdout_record(splits, config.holdout_size, config.holdout_seed)
    resuming = _has_checkpoints(config)
    manifest_uri = storage.join(config.output, f"{config.run_name}.json")
    manifest = {
        "stage": config.stage,
        "arch": config.arch,
        "classes": classes,
        "batch_unit": "images",
        "holdout": holdout,
    }
    if storage.exists(manifest_uri):
        earlier = json.loads(storage.read_bytes(manifest_uri))
        for key in ("stage", "arch", "classes"):
            if earlier.get(key) != manifest[key]:
                what = "classes" if key == "classes" else f"{key} {earlier.get(key)!r}"
                raise TrainError(
                    f"{config.output} holds a run with different {what}: use a new --output to start afresh"
                )
        earlier_config, hint = _in_images(earlier), ""
        changed = changed_on_resume(earlier_config, config)
        if earlier_config is not earlier.get("config"):
            hint = (
                f"; it was started when --batch-size counted precomputed patches: resume it with --batch-size "
                f"{earlier_config['batch_size']:g} --lr {earlier_config['lr']:g}"
            )
        if changed and resuming:
            raise TrainError(
                f"{config.output} holds a run with other {', '.join(changed)} (a re-run resumes it and may change "
                f"only --epochs and the resources): use the same values or a new --output{hint}"
            )
        held_before = earlier.get("holdout")  # runs started before 2026-11-27 did not record it
        if resuming and holdout["images"] and held_before and held_before.get("sha256") != holdout["sha256"]:
            raise TrainError(
                f"{config.output} holds a run that held out other images of train/ ({held_before.get('images')} "
                f"images, sha256 {str(held_before.get('sha256'))[:12]}; now {holdout['images']}, "
                f"{holdout['sha256'][:12]}): train/ changed since it started, and the held-out draw depends on every "
                "file of it; restore train/ as it was, or use a new --output"
            )
        # nothing to resume (no checkpoint yet): this run starts afresh with its own recipe and held-out images, and
        # its manifest must say so even when no flag changed (train/ may have)
        record = not resuming
    else:
        try:
            storage.makedirs(config.output)
        except OSError as err:  # a file of that name, no permission
            raise TrainError(f"cannot create --output {config.output}: {_first_line(err)}") from err
        record = True
    trained = _trained_epochs(config) if resuming else None
    if trained is not None and trained > config.epochs:
        raise FlagError(
            f"{config.output} holds a run that has trained {trained} epochs already: --epochs {config.epochs} "
            "cannot undo that (raise it, or use a new --output)"
        )
    if record:
        storage.write_bytes(manifest_uri, json.dumps({**manifest, "config": config.to_dict()}, indent=1).encode())
    train_data.save_listing(listing_uri(config), *splits.listed)  # what the workers read instead of listing again
    return classes, holdout


def listing_uri(config: TrainConfig) -> str:
    """Where the driver writes the tree it listed for this run's workers (``TrainConfig.listing``)."""
    return storage.join(config.output, f"{config.run_name}.listing.parquet")


def _config_defaults() -> dict[str, Any]:
    """``TrainConfig``'s default of every field: what a run manifest that does not record a setting ran with."""
    return {f.name: f.default for f in fields(TrainConfig)}


def _in_images(manifest: dict[str, Any]) -> dict[str, Any]:
    """The earlier run's config with ``batch_size`` in images and its effective lr, for ``changed_on_resume``.

    Manifests without ``batch_unit`` predate 2026-11-27, when a patch-role run from ``--patches`` counted
    ``--batch-size`` in patches: its step took ``batch_size / num_patches`` images at the lr of ``batch_size``
    patches. Others come back as they are (the same object)."""
    earlier = manifest.get("config", {})
    if manifest.get("batch_unit") or manifest.get("stage") != "patch" or not earlier.get("patches"):
        return earlier
    defaults = _config_defaults()
    patches = earlier.get("batch_size", defaults["batch_size"])
    lr = earlier.get("lr") or BASE_LR["patch"] * patches / 256
    return {**earlier, "batch_size": patches / earlier.get("num_patches", defaults["num_patches"]), "lr": lr}


def _has_checkpoints(config: TrainConfig) -> bool:
    """Whether Ray Train will resume the run in OUT: it restores from its checkpoint manager's snapshot, written
    with the first reported checkpoint (``ray.train.v2``'s ``checkpoint_manager_snapshot.json``)."""
    return storage.exists(storage.join(config.output, config.run_name, "checkpoint_manager_snapshot.json"))


def _trained_epochs(config: TrainConfig) -> int | None:
    """Epochs the run in OUT has trained, from its latest checkpoint's metrics in Ray's snapshot (None: unknown)."""
    uri = storage.join(config.output, config.run_name, "checkpoint_manager_snapshot.json")
    try:
        latest = json.loads(storage.read_bytes(uri)).get("latest_checkpoint_result") or {}
        return int(latest["metrics"]["epoch"]) + 1
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # the workers check it again when they load the checkpoint


def changed_on_resume(earlier: dict[str, Any], config: TrainConfig) -> list[str]:
    """The ``RESUME_FIXED`` settings (as flags) of ``config`` that differ from an earlier run's config dict.

    lr compares the effective peak lr; settings the earlier run did not record count as their defaults.
    """
    if not earlier:
        return []
    defaults = _config_defaults()
    now = config.to_dict()
    changed = []
    for key in RESUME_FIXED:
        if key == "milestones" and config.schedule == "cosine" == earlier.get("schedule", defaults["schedule"]):
            continue  # unused by the cosine schedule
        if key == "lr":
            batch = earlier.get("batch_size", defaults["batch_size"])
            then = earlier.get("lr") or BASE_LR[config.stage] * batch / 256
            differs = not math.isclose(then, config.learning_rate, rel_tol=1e-9)
        else:
            then = earlier.get(key, defaults[key])
            differs = (list(then) if key == "milestones" else then) != now[key]
        if differs:
            changed.append(key.replace("_", "-"))
    return changed


def _check_architecture(config: TrainConfig, num_classes: int, size: int) -> None:
    """One training step's forward pass of ``--arch`` on two ``size`` x ``size`` images, before Ray starts: a
    torchvision model that cannot take that input, or that trains with extra outputs, fails in one line here
    instead of in every worker attempt."""
    model = build_classifier(config.arch, num_classes).train()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, 3, size, size))
    except Exception as err:  # whatever the architecture raises: too small an input, mostly
        raise TrainError(f"--arch {config.arch} cannot train on {size} x {size} inputs: {_first_line(err)}") from err
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        kind = type(out).__name__ if not isinstance(out, torch.Tensor) else f"shape {tuple(out.shape)}"
        raise TrainError(f"--arch {config.arch} returns {kind} in training, not (batch, {num_classes}) logits")


def _check_weights(config: TrainConfig, classes: list[str]) -> None:
    """``--weights`` builds the classifier here, before Ray starts: offline ImageNet weights, a checkpoint of
    other classes or a state dict of another shape fail in one line instead of in every worker attempt."""
    if config.weights != "imagenet":
        try:
            data = storage.read_bytes(config.weights)
        except FileNotFoundError:
            raise
        except OSError as err:  # a directory, no permission on S3
            raise CheckpointError(f"cannot read --weights {config.weights}: {_first_line(err)}") from err
        try:
            _, card = load_checkpoint(config.weights, data)
        except CheckpointError:
            card = None  # a plain state dict: build_classifier checks its shapes
        if card is not None and card.class_names is not None and list(card.class_names) != classes:
            raise CheckpointError(f"class mismatch: --weights {config.weights} was trained on other classes")
    try:
        _classifier(config, classes, with_weights=True)
    except WeightsUnavailableError as err:
        raise TrainError(f"--weights imagenet: {err.reason}; pass --weights PATH (a local file or s3:// URI)") from err
    except (RuntimeError, KeyError) as err:  # load_state_dict lists one missing key or shape per line: keep them
        raise TrainError(
            f"--weights {config.weights} does not fit {config.arch} with {len(classes)} classes: "
            f"{' '.join(str(err).split())[:1000]}"
        ) from err
    except ValueError as err:  # not a torch file, or no state dict in it
        raise CheckpointError(f"--weights: {_first_line(err)}") from err


def _resources(config: TrainConfig) -> tuple[float, int]:
    """CPUs per worker and torch threads: the flags, else an even share of the cluster's CPUs (never a hang)."""
    import ray

    cpus = config.cpus_per_worker
    if cpus is None:
        cpus = default_cpus_per_worker(ray.nodes(), config.num_workers, use_gpu=config.use_gpu)
    return cpus, config.threads or max(1, round(cpus))


def default_cpus_per_worker(nodes: Sequence[Mapping[str, Any]], num_workers: int, *, use_gpu: bool) -> float:
    """``--cpus-per-worker``'s default: 1 with GPUs; else the alive nodes' CPUs shared evenly (whole CPUs when
    there are enough), but never more than the largest node has: a worker's bundle must fit on one node, or the
    run waits for it forever (``nodes`` as ``ray.nodes()`` lists them)."""
    if use_gpu:
        return 1.0
    per_node = [float(node.get("Resources", {}).get("CPU", 0)) for node in alive_nodes(nodes)]
    total = sum(per_node) or 1.0  # none yet (an autoscaling cluster's CPU-less head): 1, which any node fits
    share = max(total // num_workers, 0.0) or total / num_workers
    return min(share, max(per_node, default=0.0) or share)


def _storage(output: str) -> tuple[str, Any]:
    if storage.is_remote(output):
        fs, path = storage.resolve(output)
        return path, fs
    return str(Path(output).expanduser().resolve()), None


def run_training(config: TrainConfig, *, ray_address: str | None = None, verbose: bool = True) -> TrainOutcome:
    """Train ``config`` and write ``final_checkpoint_uri``; the data and inputs are checked before Ray starts.

    Uses the current Ray cluster, or joins ``ray_address`` / starts a local one (shut down at the end).
    Raises ``TrainError`` (and ``ValueError``/``FileNotFoundError``/``CheckpointError`` from the checks) with
    one-line messages.
    """
    import ray

    started = time.perf_counter()
    config = _absolute_paths(config)
    if storage.exists(final_checkpoint_uri(config)) and not _has_checkpoints(config):
        raise TrainError(
            f"{config.output} holds a finished run that Ray cannot resume (trained --in-process, or its Ray run "
            f"directory {config.run_name} is gone): use a new --output"
        )
    classes, holdout = _preflight(replace(config, listing=None))  # lists the tree
    config = replace(config, listing=listing_uri(config))
    own_ray = not ray.is_initialized()
    if own_ray and (problem := unreachable_address(ray_address or os.environ.get("RAY_ADDRESS"))):
        raise TrainError(problem)
    if own_ray:
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        ray.init(address=ray_address)
    try:
        return _fit(config, classes, holdout, started, verbose)
    finally:
        if own_ray:
            ray.shutdown()


def _absolute_paths(config: TrainConfig) -> TrainConfig:
    """``config`` with its local paths made absolute: Ray workers do not run in the driver's directory."""

    def absolute(uri: str | None) -> str | None:
        if uri is None or uri == "imagenet" or storage.is_remote(uri):
            return uri
        return os.path.abspath(os.path.expanduser(uri))

    keys = ("data", "output", "patches", "anchornet", "weights")
    return TrainConfig.from_dict({**config.to_dict(), **{key: absolute(getattr(config, key)) for key in keys}})


def _starting_weights(config: TrainConfig) -> str:
    """Where a stage II classifier starts, for the first line of a run: the paper fine-tunes pretrained weights, so
    random ones are said with the flag that gives those (stage I starts from scratch: nothing to say)."""
    if config.stage == "anchornet":
        return ""
    if config.weights is None:
        return ", random weights: --weights imagenet fine-tunes pretrained ones as the paper does"
    return f", from {config.weights} weights" if config.weights == "imagenet" else f", from {config.weights}"


def _fit(
    config: TrainConfig, classes: list[str], holdout: dict[str, Any], started: float, verbose: bool
) -> TrainOutcome:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    cpus, threads = _resources(config)
    config = TrainConfig.from_dict({**config.to_dict(), "cpus_per_worker": cpus, "threads": threads})
    paths = {key: getattr(config, key) for key in ("data", "output", "patches", "anchornet", "weights")}
    paths["weights"] = None if config.weights == "imagenet" else config.weights
    warning = local_paths_warning(
        ray.nodes(), paths, "the workers on other nodes do not find their inputs, and checkpoints land on their disks"
    )
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    storage_path, filesystem = _storage(config.output)
    if verbose:
        print(
            f"training {config.stage} ({config.arch}{_starting_weights(config)}) on {len(classes)} classes from "
            f"{config.data}: {config.epochs} epochs, batch {config.batch_size}, lr {config.learning_rate:g}, "
            f"{config.num_workers} worker(s) x {cpus:g} CPU{' + 1 GPU' if config.use_gpu else ''}, "
            f"{threads} thread(s), seed {config.seed}, {holdout['images']} train/ images held out"
            f"{f', shuffled {config.shuffle_window} shards at a time' if config.patches else ''}; "
            f"Ray runs in {storage.join(config.output, config.run_name)}",
            flush=True,
        )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config.to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if config.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=config.run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise TrainError(f"training failed: {_first_line(err)}") from err
    if result.error is not None:
        raise TrainError(f"training failed: {_first_line(result.error)}")
    if result.checkpoint is None:
        raise TrainError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    runner = {"ray": ray.__version__, "host": platform.node(), "ray_run": storage.join(config.output, config.run_name)}
    return _finish(config, state, holdout, runner, started)


def _finish(
    config: TrainConfig, state: Mapping[str, Any], holdout: dict[str, Any], runner: dict[str, Any], started: float
) -> TrainOutcome:
    """Write ``final_checkpoint_uri`` from the last epoch's training state; ``runner`` says where it ran."""
    model = build_model(config, len(state["classes"]))
    model.load_state_dict(state["model"])
    metrics = dict(state["history"][-1])
    uri = final_checkpoint_uri(config)
    card = save_checkpoint(
        model,
        uri,
        input_size=state["input_size"],
        class_names=state["classes"],
        preprocessing=config.preprocessing,
        provenance={
            "stage": config.stage,
            "data": config.data,
            "config": config.to_dict(),
            "holdout": holdout,  # the images of train/ left out of training (jobs/evaluate.py fits on them)
            **runner,
        },
        role=config.stage,
        metrics=metrics,
        history=state["history"],
    )
    return TrainOutcome(uri, card, metrics, list(state["history"]), time.perf_counter() - started)


class _OnDevice:
    """A loader whose batches are moved to ``device`` (what Ray's ``prepare_data_loader`` does in the workers)."""

    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


def train_in_process(config: TrainConfig, *, verbose: bool = True) -> TrainOutcome:
    """Train ``config`` in this process, without Ray, and write the same ``final_checkpoint_uri``.

    The epochs are ``train_loop_per_worker``'s (``run_epoch``: same data, augmentation, schedule and metrics) on one
    device, CUDA device 0 with ``use_gpu``; there are no workers to restart and no run to resume, so a failure
    loses the run. For one machine where Ray is not installed (``--in-process``); the card's provenance says
    ``"runner": "in-process"`` and names the device. Same checks before the first epoch as ``run_training``.
    """
    started = time.perf_counter()
    config = _absolute_paths(config)  # the card records where the inputs were, as the Ray driver's does
    if config.num_workers != 1:
        raise FlagError(f"--in-process trains in one process: --num-workers must be 1, got {config.num_workers}")
    if config.use_gpu and not torch.cuda.is_available():
        raise FlagError("--use-gpu: torch sees no CUDA device here")
    if storage.exists(final_checkpoint_uri(config)) or _has_checkpoints(config):
        raise TrainError(f"{config.output} holds a run already: --in-process does not resume runs; use a new --output")
    classes, holdout = _preflight(replace(config, listing=None))
    config = replace(config, listing=listing_uri(config))
    device = torch.device("cuda", 0) if config.use_gpu else torch.device("cpu")
    threads = config.threads or (max(1, round(config.cpus_per_worker)) if config.cpus_per_worker else None)
    if threads:  # as a Ray worker's; without either flag, torch's default (every core)
        torch.set_num_threads(threads)
    device_name = torch.cuda.get_device_name(device) if config.use_gpu else f"cpu ({platform.machine()})"
    if verbose:
        print(
            f"training {config.stage} ({config.arch}{_starting_weights(config)}) on {len(classes)} classes from "
            f"{config.data} in this process "
            f"on {device_name}, {torch.get_num_threads()} thread(s): {config.epochs} epochs, batch "
            f"{config.batch_size}, lr {config.learning_rate:g}, {holdout['images']} train/ images held out",
            flush=True,
        )
    try:
        torch.manual_seed(config.seed)
        task = build_task(config).to(device)
        model = training_model(task, device)
        optimizer, scheduler = make_optimizer(config, model)
        validation = _OnDevice(validation_loader(task, 0, 1, device), device)
        shards = train_data.shards_of(task.train_set)
        run = EpochRun(task, model, optimizer, scheduler, nn.CrossEntropyLoss(), validation, shards, device)
        history: list[dict[str, Any]] = []
        prepare = functools.partial(_OnDevice, device=device)
        for epoch in range(config.epochs):
            history.append(run_epoch(run, epoch=epoch, start_epoch=0, prepare=prepare))
            if verbose:
                print(epoch_line(config, history[-1]), flush=True)
    except TrainError:
        raise
    except (RuntimeError, OSError) as err:  # CUDA out of memory, a read that failed, a loader process that died
        raise TrainError(f"training failed: {_first_line(err)}") from err
    state = {
        "model": {key: value.cpu() for key, value in model.state_dict().items()},
        "classes": task.classes,
        "input_size": task.input_size,
        "history": history,
    }
    runner = {"runner": "in-process", "device": device_name, "host": platform.node(), "torch": torch.__version__}
    return _finish(config, state, holdout, runner, started)


def _first_line(err: BaseException) -> str:
    """The innermost useful line of a (possibly wrapped) worker error."""
    text = str(err).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if ("Error" in line or "Exception" in line) and ":" in line and not line.startswith("File "):
            return line
    return lines[0] if lines else type(err).__name__


# ---------------------------------------------------------------------------------------------------------------
# Command-line pieces shared by jobs/train_anchornet.py and jobs/train_classifier.py.


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``error: ...``) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_common_arguments(parser: argparse.ArgumentParser, *, epochs: int, schedule: str) -> None:
    parser.add_argument("--data", required=True, help="ROOT with train/ and val/ ImageFolder trees (local or s3://)")
    parser.add_argument("--output", required=True, help="OUT (local or s3://): Ray checkpoints and the final .pt")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="global batch in images (patch role: up to --num-patches patches each), split over workers",
    )
    parser.add_argument("--lr", type=float, default=None, help="peak lr (default: base lr x batch / 256)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--schedule", choices=("step", "cosine"), default=schedule)
    parser.add_argument("--image-size", type=int, default=224, help="training crop side")
    parser.add_argument("--resize-size", type=int, default=None, help="val: resize shorter side (default size/0.875)")
    parser.add_argument("--min-scale", type=float, default=0.08, help="RandomResizedCrop minimum area fraction")
    parser.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (DDP ranks)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--cpus-per-worker", type=float, default=None, help="default: an even share of the CPUs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: its CPUs)")
    parser.add_argument("--loader-workers", type=int, default=2, help="DataLoader processes per worker")
    parser.add_argument(
        "--amp",
        action="store_true",
        help="bfloat16 autocast for the forward pass and loss (weights, optimizer and validation stay float32)",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="keep the model in channels-last memory layout (faster convolutions on GPUs, see docs/training.md)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--holdout-size",
        type=int,
        default=0,
        help="leave this many train/ images out of training, for jobs/evaluate.py's thresholds (default: 0)",
    )
    parser.add_argument("--holdout-seed", type=int, default=0, help="which images --holdout-size leaves out")
    parser.add_argument("--max-failures", type=int, default=3, help="worker-group restarts (-1: unlimited)")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="train in this process without Ray (one device: the CPU, or CUDA with --use-gpu); no restarts, no resume",
    )
    parser.add_argument("--keep-checkpoints", type=int, default=2)
    parser.add_argument(
        "--address",
        "--ray-address",
        dest="ray_address",
        default=None,
        help="Ray cluster to join (default: RAY_ADDRESS or local)",
    )
    # Test-only (see TrainConfig): not in --help.
    parser.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--crash-at-epoch", type=int, default=None, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace, **stage: Any) -> TrainConfig:
    resize = args.resize_size if args.resize_size is not None else round(args.image_size / 0.875)
    return TrainConfig(
        data=args.data,
        output=args.output,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        image_size=args.image_size,
        resize_size=resize,
        min_scale=args.min_scale,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker,
        threads=args.threads,
        loader_workers=args.loader_workers,
        amp=args.amp,
        channels_last=args.channels_last,
        seed=args.seed,
        holdout_size=args.holdout_size,
        holdout_seed=args.holdout_seed,
        max_failures=args.max_failures,
        keep_checkpoints=args.keep_checkpoints,
        limit=args.limit,
        crash_at_epoch=args.crash_at_epoch,
        **stage,
    )


def run_job(config: TrainConfig, ray_address: str | None = None, *, in_process: bool = False) -> int:
    """Train (on Ray, or ``train_in_process``) and print where the checkpoint is; a user error is one line on stderr
    and exit status 1 (2 for a flag that contradicts an input, ``FlagError``)."""
    try:
        if in_process and ray_address:
            raise FlagError("--in-process runs without Ray: drop --address")
        outcome = train_in_process(config) if in_process else run_training(config, ray_address=ray_address)
    except FlagError as err:
        print(f"error: {_first_line(err)}", file=sys.stderr)
        return 2
    except (TrainError, CheckpointError, ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {_first_line(err)}", file=sys.stderr)
        return 1
    m = outcome.metrics
    print(
        f"done: {config.stage} val top-1 {m['val_top1']:.4f} after {m['epoch'] + 1} epochs "
        f"({outcome.card.gmacs:.3f} GMACs at {outcome.card.input_size}px), {outcome.seconds:.0f} s"
    )
    print(f"checkpoint: {outcome.checkpoint}")
    return 0
