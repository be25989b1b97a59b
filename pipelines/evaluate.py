"""Evaluation: accuracy against MACs (anytime and budgeted), AnchorNet against random patches, real time.

Runs in one process with plain PyTorch (no Ray needed: the test set is small next to training), plus
``--loader-workers`` decoding processes. The
thresholds of the budgeted curve are fitted on held-out images, never on the images they are tested on: by
default the images the training jobs left out of the *training* split (``--holdout-size``, recorded in the
cards), with a warning when the models were trained on them (thresholds fitted on training images are biased
high). For models trained on all of it, ``--holdout-split`` set to the test split fits on a seeded part of the
test split and tests on the rest.
Writes a Markdown and CSV table, the fitted budgets as a thresholds JSON (deployable), a plot of accuracy
against GMACs and a gallery of CAMs with the chosen patches.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import posixpath
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.fs as pafs
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from anchornet import storage
from anchornet.cam import class_activation_map
from anchornet.checkpoint import ModelCard, load_checkpoint
from anchornet.classifiers import build_classifier, imagenet_indices
from anchornet.early_exit import EarlyExitClassifier, cumulative_step_macs
from anchornet.image_folder import (
    ImageFolderDataset,
    ImageFolderIndex,
    evenly_spaced,
    holdout_digest,
    holdout_indices,
    scan_image_folder,
)
from anchornet.macs import count_macs
from anchornet.model import AnchorNet
from anchornet.patches import select_patches
from anchornet.preprocessing import Preprocessing, to_float
from anchornet.thresholds import (
    BudgetPoint,
    StepTable,
    anytime_accuracy,
    anytime_macs,
    budgeted_search,
    save_thresholds,
)
from pipelines.train_data import HOLDOUT_SPLIT  # the split the training jobs train on and hold images out of

__all__ = [
    "Curve",
    "EvaluateConfig",
    "EvaluationReport",
    "Holdout",
    "evaluation_indices",
    "resolve_holdout",
    "run_evaluation",
]

DEFAULT_HOLDOUT_SIZE = 1000
NO_LOWER = 1e-6  # a tolerance for float32 rounding only: one image of 2,925 is 3.4e-4
FALLBACK_CURVE = "AnchorNet patches + glance + full fallback"


@dataclass(frozen=True)
class EvaluateConfig:
    """Arguments of ``jobs/evaluate.py``; see its ``--help``.

    ``holdout_split``, ``holdout_size`` and ``holdout_seed`` left ``None`` come from the held-out images the
    glance (else patch) card records (``--holdout-size`` of the training jobs), else ``train``, 1000, ``seed``.
    ``holdout_split`` may be the test split itself: its held-out images are then left out of the test set.
    """

    data: str
    anchornet: str
    glance: str
    patch: str
    output: str
    full: str | None = None
    full_arch: str | None = None
    split: str = "val"
    holdout_split: str | None = None
    holdout_size: int | None = None
    holdout_seed: int | None = None
    limit: int | None = None
    batch_size: int = 64
    num_patches: int = 4
    iou_threshold: float = 0.3
    seed: int = 0
    gallery: int = 8
    timing_batch: int = 64
    timing_repeats: int = 3
    threads: int | None = None
    loader_workers: int = 0
    fallback: bool = False

    def __post_init__(self) -> None:
        if (self.full is None) == (self.full_arch is None):
            raise ValueError("give exactly one full-224 baseline: --full CKPT or --full-arch NAME (ImageNet weights)")
        for name in ("holdout_size", "batch_size", "num_patches", "timing_batch", "timing_repeats", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError("--limit must be at least 1")
        if self.loader_workers < 0:
            raise ValueError("--loader-workers must be at least 0")


@dataclass
class Curve:
    """One accuracy-against-cost curve: ``points`` are ``(label, gmacs, accuracy)``."""

    name: str
    protocol: str
    points: list[tuple[str, float, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Holdout:
    """The held-out images the thresholds are fitted on, and whether the models were trained without them.

    ``overlaps`` names each model trained on some of them (or that cannot be shown not to be); empty when the
    thresholds are unbiased. ``from_cards``: they are the images the cards record (split, size and seed all the
    cards', given as flags or not). ``from_test_split``: they are part of the test split and left out of the test set.
    """

    split: str
    size: int
    seed: int
    from_cards: bool
    indices: list[int]
    overlaps: list[str]
    from_test_split: bool = False

    @property
    def disjoint(self) -> bool:
        return not self.overlaps

    @property
    def warning(self) -> str | None:
        if self.disjoint:
            return None
        return (
            f"thresholds are fitted on images the models were trained on ({'; '.join(self.overlaps)}), so they are "
            "biased high: train with --holdout-size N and evaluate with the same held-out images, or fit on part "
            "of the test split (--holdout-split set to the test split; those images are left out of the test)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "size": self.size,
            "seed": self.seed,
            "images": len(self.indices),
            "from_cards": self.from_cards,
            "from_test_split": self.from_test_split,
            "disjoint_from_training": self.disjoint,
            "warning": self.warning,
        }


def _recorded(card: ModelCard) -> dict[str, Any] | None:
    """The held-out images a training job recorded on ``card`` (``None`` when it trained on all of train/)."""
    record = card.provenance.get("holdout")
    return record if isinstance(record, dict) and record.get("size", 0) > 0 else None


def resolve_holdout(
    config: EvaluateConfig,
    cards: dict[str, ModelCard],
    classes: list[str],
    test_index: ImageFolderIndex | None = None,
) -> tuple[Holdout, ImageFolderIndex]:
    """The held-out images to fit the thresholds on and the index of their split, checked against what each
    model (``cards``: flag -> card) was trained on.

    Unset flags take the glance (else patch) card's record. A model counts as trained without those images
    when the split is not train/, or when its card records held-out images of this tree (same ids digest)
    that include them. When the split is the test split, the held-out images are drawn from it and
    :func:`evaluation_indices` leaves them out of the test set; at least one test image must remain. The test
    split's ``test_index``, when given, is reused for that instead of listing the split again.
    """
    recorded = _recorded(cards["--glance"]) or _recorded(cards["--patch"])
    split = config.holdout_split or (recorded["split"] if recorded else HOLDOUT_SPLIT)
    split = posixpath.normpath(split)  # "train/" and "./train" are train
    if config.holdout_size is not None:
        size, size_from = config.holdout_size, f"--holdout-size {config.holdout_size}"
    elif recorded:
        size = int(recorded["size"])
        size_from = f"the held-out size the cards record ({size} of {recorded['split']}/; no --holdout-size given)"
    else:
        size, size_from = DEFAULT_HOLDOUT_SIZE, f"the default --holdout-size {DEFAULT_HOLDOUT_SIZE}"
    seed = config.holdout_seed if config.holdout_seed is not None else recorded["seed"] if recorded else config.seed
    from_test_split = split == posixpath.normpath(config.split)
    if from_test_split and test_index is not None:
        index = test_index
    else:
        index = scan_image_folder(storage.join(config.data, split), classes=classes)
    if from_test_split and size >= len(index):
        raise ValueError(
            f"{size_from} leaves no test images: the held-out images come from the test split ({split}), which "
            f"has {len(index)}; pass a smaller --holdout-size"
        )
    indices = holdout_indices(index, size, seed)
    overlaps = []
    if split == HOLDOUT_SPLIT:
        chosen = {index.items[i][0] for i in indices}
        for flag, card in cards.items():
            record = _recorded(card)
            if record is None:
                overlaps.append(f"{flag} trained on all of {HOLDOUT_SPLIT}/")
                continue
            held = [index.items[i][0] for i in holdout_indices(index, int(record["size"]), int(record["seed"]))]
            if record.get("sha256") not in (None, holdout_digest(held)):
                overlaps.append(f"{flag} held out other images (another tree?)")
            elif not chosen <= set(held):
                overlaps.append(f"{flag} trained on {len(chosen - set(held))} of them")
    from_cards = recorded is not None and (split, size, seed) == (
        posixpath.normpath(recorded["split"]),
        int(recorded["size"]),
        int(recorded["seed"]),
    )
    return Holdout(split, size, seed, from_cards, indices, overlaps, from_test_split), index


def evaluation_indices(num_images: int, holdout: Holdout, limit: int | None = None) -> list[int]:
    """The test split's images to evaluate: all of them, less the held-out ones when they come from the test
    split (disjoint by construction), then ``limit`` of those evenly spaced (the index is sorted by class: the
    first ``limit`` would be one or two classes)."""
    held = set(holdout.indices) if holdout.from_test_split else set()
    kept = [i for i in range(num_images) if i not in held]
    return kept if limit is None else evenly_spaced(kept, limit)


@dataclass
class EvaluationReport:
    curves: list[Curve]
    full_accuracy: float
    full_gmacs: float
    full_kind: str
    timing: dict[str, float]
    answers: dict[str, float | None]
    num_test: int
    num_holdout: int
    files: list[str]
    holdout: dict[str, Any] = field(default_factory=dict)


def _log(message: str) -> None:
    print(f"[evaluate] {message}", flush=True)


def _batches(
    dataset: ImageFolderDataset | Subset, batch_size: int, what: str, loader_workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``dataset`` in order, in batches, as floats; ``loader_workers`` processes read and decode ahead (0: this
    one, image after image: on S3 each image's request latency then adds up)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=loader_workers)
    done, total, last = 0, len(dataset), time.monotonic()
    for images, labels in loader:
        yield to_float(images), labels
        done += len(labels)
        if time.monotonic() - last > 10 or done == total:
            _log(f"{what}: {done}/{total} images")
            last = time.monotonic()


def _prepare_output(output: str) -> None:
    """Create the report directory and check that it takes a file, before any model runs: a report that cannot be
    written should fail in seconds, not after every evaluation pass. Raises ``OSError`` with one line."""
    probe = storage.join(output, f".evaluate-probe-{uuid.uuid4().hex}")
    try:
        storage.makedirs(output)
        storage.write_bytes(probe, b"")
        _remove(probe)
    except OSError as err:
        raise OSError(f"--output {output} cannot be written: {_one_line(err.strerror or err)}") from err


def _remove(uri: str) -> None:
    """Delete the file at ``uri`` when there is one (local or S3)."""
    fs, path = storage.resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def _one_line(value: object) -> str:
    return " ".join(str(value).split())


def _load_classifier(path: str, flag: str) -> tuple[nn.Module, ModelCard]:
    """The classifier checkpoint given as ``flag``; ``ValueError`` (one line) for a checkpoint of another kind."""
    model, card = load_checkpoint(path)
    if card.kind != "classifier":
        article = "an" if card.kind[:1] in tuple("aeiou") else "a"
        raise ValueError(f"{flag} {path} is {article} {card.kind} checkpoint, not a classifier")
    return model, card


def _full_model(
    config: EvaluateConfig, classes: list[str], checkpoint: tuple[nn.Module, ModelCard] | None
) -> tuple[nn.Module, str]:
    """The full-224 baseline: the ``--full`` ``checkpoint`` (already loaded), else ``--full-arch`` with ImageNet
    weights restricted to ``classes``."""
    if checkpoint is not None:
        model, card = checkpoint
        _check_classes(card, classes, "--full")
        return model, f"{card.arch['name']} fine-tuned at {card.input_size} ({config.full})"
    model = build_classifier(config.full_arch, len(classes), weights="imagenet", head_from=imagenet_indices(classes))
    return model.eval(), f"{config.full_arch} ImageNet-pretrained, restricted to the dataset's {len(classes)} classes"


def _check_classes(card: ModelCard, classes: list[str], flag: str) -> None:
    if card.class_names is not None and list(card.class_names) != list(classes):
        raise ValueError(
            f"{flag}: the checkpoint's classes differ from the data's ({len(card.class_names)} vs {len(classes)})"
        )


def _tables(
    engine: EarlyExitClassifier,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    full: nn.Module | None,
    fallback: bool = False,
) -> tuple[dict[bool, StepTable], torch.Tensor, torch.Tensor | None, StepTable | None]:
    """Every image's steps as ``StepTable``s, with the glance (``True``) and without it (``False``), its label and
    the full network's prediction; with ``fallback``, also the table of the cascade that ends with ``full`` as its
    fallback step. Each batch is reduced to its tables at once: the raw ``(N, T, classes)`` step logits of
    ImageNet's 50,000 val images would hold ~1 GB per patch policy."""
    tables: dict[bool, list[StepTable]] = {True: [], False: []}
    labels, full_predictions, fallback_tables = [], [], []
    with torch.inference_mode():
        for images, y in batches:
            out, _ = engine.step_logits(images)
            tables[True].append(StepTable.from_logits(out, y))
            tables[False].append(StepTable.from_logits(out[:, 1:], y))
            labels.append(y)
            if full is not None:
                full_logits = full(images)
                full_predictions.append(full_logits.argmax(1))
                if fallback:
                    steps = torch.cat([out, full_logits[:, None].to(out.dtype)], 1)
                    fallback_tables.append(StepTable.from_logits(steps, y, fallback=True))
    predictions = torch.cat(full_predictions) if full is not None else None
    fallback_table = StepTable.concat(fallback_tables) if fallback_tables else None
    tables_by_glance = {glance: StepTable.concat(parts) for glance, parts in tables.items()}
    return tables_by_glance, torch.cat(labels), predictions, fallback_table


def _curves(
    name: str,
    split_tables: dict[str, dict[bool, StepTable]],
    macs: tuple[int, int, int],
    num_steps: int,
    with_glance: bool,
) -> list[Curve]:
    anchornet_macs, glance_macs, patch_macs = macs
    if with_glance:
        step_macs = cumulative_step_macs(anchornet_macs, glance_macs, patch_macs, num_steps)
    else:
        step_macs = [anchornet_macs + t * patch_macs for t in range(1, num_steps)]
    tables = {split: by_glance[with_glance] for split, by_glance in split_tables.items()}
    return _curves_of(name, tables, step_macs)


def _curves_of(name: str, tables: dict[str, StepTable], step_macs: list[int]) -> list[Curve]:
    """The anytime curve on ``tables["test"]`` and the budgeted one fitted on ``tables["holdout"]``."""
    anytime = Curve(name, "anytime")
    test = tables["test"]
    for t, (acc, cost) in enumerate(zip(anytime_accuracy(test), anytime_macs(test, step_macs), strict=True), start=1):
        anytime.points.append((f"t={t}", cost / 1e9, acc))
    budgeted = Curve(name, "budgeted")
    for point in budgeted_search(tables["holdout"], tables["test"], step_macs):
        budgeted.points.append((point.name, point.expected_macs / 1e9, point.accuracy))
    return [anytime, budgeted]


def _cheapest_match(curve: Curve, target: float, tolerance: float = 0.005) -> tuple[str, float, float] | None:
    """The cheapest point of ``curve`` within ``tolerance`` of ``target`` accuracy (``NO_LOWER``: not below it)."""
    matching = [p for p in curve.points if p[2] >= target - tolerance]
    return min(matching, key=lambda p: p[1]) if matching else None


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run_evaluation(config: EvaluateConfig) -> EvaluationReport:
    """Evaluate the pipeline and write the report under ``config.output``; returns what it wrote."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    _prepare_output(config.output)
    anchornet, anchornet_card = load_checkpoint(config.anchornet)
    if not isinstance(anchornet, AnchorNet):
        raise ValueError(f"--anchornet {config.anchornet} is a {anchornet_card.kind} checkpoint, not an AnchorNet one")
    glance, glance_card = _load_classifier(config.glance, "--glance")
    patch, patch_card = _load_classifier(config.patch, "--patch")
    full_checkpoint = _load_classifier(config.full, "--full") if config.full is not None else None
    preprocessing = (
        Preprocessing.from_dict(anchornet_card.preprocessing) if anchornet_card.preprocessing else Preprocessing()
    )
    image_size = preprocessing.image_size
    if config.fallback and full_checkpoint is not None and full_checkpoint[1].input_size != image_size:
        # the cascade runs its fallback step on the preprocessed image as is, as Serve's --fallback does
        raise ValueError(
            f"--fallback: the --full classifier works at {full_checkpoint[1].input_size} px but the images are "
            f"preprocessed to {image_size} px: give one at {image_size} px (jobs/export_classifier.py --input-size "
            f"{image_size}), as jobs/serve.py --fallback needs"
        )
    test_index = scan_image_folder(storage.join(config.data, config.split), classes=anchornet_card.class_names)
    classes = test_index.classes
    for card, flag in ((glance_card, "--glance"), (patch_card, "--patch")):
        _check_classes(card, classes, flag)
    if glance_card.input_size != patch_card.input_size:
        raise ValueError(
            f"--glance runs at {glance_card.input_size} px and --patch at {patch_card.input_size} px: the engine runs "
            "both at one side (train them with the same --patch-size)"
        )
    cards = {"--anchornet": anchornet_card, "--glance": glance_card, "--patch": patch_card}
    holdout, holdout_index = resolve_holdout(config, cards, classes, test_index)
    if holdout.warning:
        print(f"[evaluate] warning: {holdout.warning}", file=sys.stderr, flush=True)
    test_set: ImageFolderDataset | Subset = ImageFolderDataset(test_index, preprocessing)
    if config.limit is not None or holdout.from_test_split:
        test_set = Subset(test_set, evaluation_indices(len(test_index), holdout, config.limit))
    holdout_set = Subset(ImageFolderDataset(holdout_index, preprocessing), holdout.indices)
    full, full_kind = _full_model(config, classes, full_checkpoint)
    full_macs = count_macs(full, image_size)
    _log(
        f"{len(test_set)} test images ({config.split}{', less the held-out ones' if holdout.from_test_split else ''}), "
        f"{len(holdout_set)} held-out images ({holdout.split}, seed {holdout.seed}"
        f"{', as the cards record' if holdout.from_cards else ''}) for thresholds"
    )

    thresholds = [math.inf] * config.num_patches
    engines = {
        policy: EarlyExitClassifier(
            anchornet, glance, patch, thresholds, config.num_patches, config.iou_threshold,
            patch_policy=policy, generator=torch.Generator().manual_seed(config.seed) if policy == "random" else None,
            image_size=(image_size, image_size), patch_size=glance_card.input_size,
        ).eval()
        for policy in ("anchornet", "random")
    }  # fmt: skip
    outputs: dict[str, dict[str, dict[bool, StepTable]]] = {policy: {} for policy in engines}
    fallback_tables: dict[str, StepTable] = {}  # the cascade with the full network as its fallback step
    labels: dict[str, torch.Tensor] = {}
    full_predictions = None
    for split, dataset in (("holdout", holdout_set), ("test", test_set)):
        for policy, engine in engines.items():
            if policy == "random":
                engine.generator.manual_seed(config.seed)
            want_full = policy == "anchornet" and (split == "test" or config.fallback)
            out, y, predictions, fallback_table = _tables(
                engine,
                _batches(dataset, config.batch_size, f"{split}/{policy}", config.loader_workers),
                full if want_full else None,
                fallback=config.fallback,
            )
            outputs[policy][split] = out
            labels[split] = y
            if fallback_table is not None:
                fallback_tables[split] = fallback_table
            if want_full and split == "test":
                full_predictions = predictions
    full_accuracy = (full_predictions == labels["test"]).float().mean().item()

    num_steps = config.num_patches + 1
    engine = engines["anchornet"]
    macs = (engine.anchornet_macs, engine.glance_macs, engine.patch_macs)
    random_macs = (0, engine.glance_macs, engine.patch_macs)
    curves = [
        *_curves("AnchorNet patches + glance", outputs["anchornet"], macs, num_steps, with_glance=True),
        *_curves("random patches + glance", outputs["random"], random_macs, num_steps, with_glance=True),
        *_curves("AnchorNet patches only", outputs["anchornet"], macs, num_steps, with_glance=False),
        *_curves("random patches only", outputs["random"], random_macs, num_steps, with_glance=False),
    ]
    main_budgeted = curves[1]
    deployed_tables = {split: by_glance[True] for split, by_glance in outputs["anchornet"].items()}
    if config.fallback:
        # The cascade ends with the full network: its budgets are the ones to deploy (jobs/serve.py --fallback).
        engine = EarlyExitClassifier(
            anchornet, glance, patch, [math.inf] * num_steps, config.num_patches, config.iou_threshold,
            image_size=(image_size, image_size), patch_size=glance_card.input_size, fallback_net=full,
        ).eval()  # fmt: skip
        fallback_curves = _curves_of(FALLBACK_CURVE, fallback_tables, engine.step_macs)
        curves += fallback_curves
        main_budgeted = fallback_curves[1]
        deployed_tables = fallback_tables
    match = _cheapest_match(main_budgeted, full_accuracy)
    no_lower = _cheapest_match(main_budgeted, full_accuracy, tolerance=NO_LOWER)

    # Budgets fitted on the held-out split: the deployable thresholds of the serving application.
    budgets = budgeted_search(deployed_tables["holdout"], deployed_tables["test"], engine.step_macs)
    storage.makedirs(config.output)
    save_thresholds(
        budgets,
        storage.join(config.output, "thresholds.json"),
        num_patches=config.num_patches,
        fallback=config.fallback,
    )

    # timed at the cheapest budget as accurate as the full network, else within 0.5 points, else the most accurate
    timing = _measure_time(engine, full, test_set, config, budgets, no_lower or match, full_macs)
    anytime_gain = [
        a[2] - r[2] for a, r in zip(curves[0].points, curves[2].points, strict=True)
    ]  # AnchorNet minus random at each step, with glance
    patch_only_gain = [a[2] - r[2] for a, r in zip(curves[4].points, curves[6].points, strict=True)]
    answers: dict[str, float | None] = {
        "min_gain_over_random_with_glance_points": 100 * min(anytime_gain[1:]) if len(anytime_gain) > 1 else None,
        "min_gain_over_random_patches_only_points": 100 * min(patch_only_gain),
        "max_gain_over_random_patches_only_points": 100 * max(patch_only_gain),
        "fraction_of_full_macs_at_full_accuracy": match[1] * 1e9 / full_macs if match else None,
        "fraction_of_full_macs_at_no_lower_accuracy": no_lower[1] * 1e9 / full_macs if no_lower else None,
        "time_speedup_over_macs_speedup": timing.get("time_over_macs"),
    }
    gallery = _gallery(config, anchornet, test_set, classes)
    files = _write_report(
        config, curves, full_accuracy, full_macs, full_kind, timing, answers, len(test_set), holdout, bool(gallery)
    )
    files += gallery
    return EvaluationReport(
        curves=curves, full_accuracy=full_accuracy, full_gmacs=full_macs / 1e9, full_kind=full_kind, timing=timing,
        answers=answers, num_test=len(test_set), num_holdout=len(holdout_set), files=files, holdout=holdout.to_dict(),
    )  # fmt: skip


def _measure_time(
    engine: EarlyExitClassifier,
    full: nn.Module,
    test_set: ImageFolderDataset | Subset,
    config: EvaluateConfig,
    budgets: Sequence[BudgetPoint],
    match: tuple[str, float, float] | None,
    full_macs: int,
) -> dict[str, float]:
    """ms/image of the batched early-exit engine against the full-224 network on the same batch and cores: a batch
    of test images evenly spaced over the (class-sorted) test set, so the budget's exits are those of all classes."""
    count = min(config.timing_batch, len(test_set))
    images = torch.stack([test_set[i][0] for i in evenly_spaced(range(len(test_set)), count)])
    images = to_float(images)
    chosen = next((b for b in budgets if match and b.name == match[0]), None) or max(budgets, key=lambda b: b.accuracy)
    engine.thresholds = chosen.thresholds
    with torch.inference_mode():
        engine_s = _time(lambda: engine.predict(images), config.timing_repeats)
        full_s = _time(lambda: full(images), config.timing_repeats)
        engine_macs = engine.predict(images).macs.double().mean().item()
    time_speedup = full_s / engine_s
    macs_speedup = full_macs / engine_macs
    _log(f"timing at budget {chosen.name}: {1000 * engine_s / count:.2f} ms/image vs {1000 * full_s / count:.2f} full")
    return {
        "budget": chosen.name,
        "batch": count,
        "threads": torch.get_num_threads(),
        "engine_ms_per_image": 1000 * engine_s / count,
        "full_ms_per_image": 1000 * full_s / count,
        "engine_images_per_s": count / engine_s,
        "full_images_per_s": count / full_s,
        "engine_gmacs_per_image": engine_macs / 1e9,
        "time_speedup": time_speedup,
        "macs_speedup": macs_speedup,
        "time_over_macs": time_speedup / macs_speedup,
    }


def _write_report(
    config: EvaluateConfig,
    curves: list[Curve],
    full_accuracy: float,
    full_macs: int,
    full_kind: str,
    timing: dict[str, float],
    answers: dict[str, float | None],
    num_test: int,
    holdout: Holdout,
    gallery: bool,
) -> list[str]:
    """results.csv, results.md (linking gallery.png only when ``gallery``: written by this run), metrics.json and
    the plot."""
    rows = [(c.name, c.protocol, label, gmacs, acc) for c in curves for label, gmacs, acc in c.points]
    rows.append(("full-224 network", "single", "224", full_macs / 1e9, full_accuracy))
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["curve", "protocol", "point", "gmacs", "top1"])
    writer.writerows((a, b, c, f"{d:.4f}", f"{e:.4f}") for a, b, c, d, e in rows)
    csv_uri = storage.join(config.output, "results.csv")
    storage.write_bytes(csv_uri, text.getvalue().encode())

    anytime = [c for c in curves if c.protocol == "anytime"]
    longest = max(anytime, key=lambda c: len(c.points))  # with a fallback: one step more
    lines = [
        "# AnchorNet evaluation",
        "",
        f"Test split `{config.split}` ({num_test} images"
        f"{', the held-out ones left out' if holdout.from_test_split else ''}); thresholds fitted on "
        f"{len(holdout.indices)} held-out images of `{holdout.split}` (seed {holdout.seed}). "
        f"Full-224 baseline: {full_kind}: "
        f"**{100 * full_accuracy:.2f} %** top-1 at {full_macs / 1e9:.4f} GMACs.",
        "",
        *([f"**Warning:** the {holdout.warning}.", ""] if holdout.warning else []),
        "## Anytime prediction (every image exits at step t)",
        "",
        "Step t = 1 is the glance; with the glance, step t uses t - 1 patches; without it, t patches"
        + ("; with the full fallback, the last step is the full network alone." if config.fallback else "."),
        "",
        "| curve | " + " | ".join(label for label, _, _ in longest.points) + " |",
        "|---|" + "---|" * len(longest.points),
    ]
    for curve in anytime:
        cells = [f"{100 * acc:.2f} % @ {gmacs:.3f} G" for _, gmacs, acc in curve.points]
        cells += ["-"] * (len(longest.points) - len(cells))
        lines.append(f"| {curve.name} | " + " | ".join(cells) + " |")
    lines += ["", "## Budgeted batch classification (thresholds from the held-out split)", ""]
    lines += ["| curve | GMACs | top-1 |", "|---|---|---|"]
    for curve in (c for c in curves if c.protocol == "budgeted"):
        for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
            label, gmacs, acc = curve.points[round(fraction * (len(curve.points) - 1))]
            lines.append(f"| {curve.name} ({label}) | {gmacs:.3f} | {100 * acc:.2f} % |")
    lines += [
        "",
        "## Real time",
        "",
        f"Batch {timing['batch']}, {timing['threads']} threads, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, budget {timing['budget']}: "
        f"early exit {timing['engine_ms_per_image']:.2f} ms/image "
        f"({timing['engine_gmacs_per_image']:.3f} GMACs) against {timing['full_ms_per_image']:.2f} ms/image for the "
        f"full network: time speed-up {timing['time_speedup']:.2f}x "
        f"for a MACs speed-up of {timing['macs_speedup']:.2f}x "
        f"(ratio {timing['time_over_macs']:.2f}; the paper's GPU implementation: 0.52).",
        "",
        "## Answers",
        "",
    ]
    for key, value in answers.items():
        lines.append(f"- `{key}`: {'n/a' if value is None else f'{value:.3f}'}")
    lines += ["", "![accuracy against GMACs](accuracy_vs_gmacs.png)", ""]
    lines += ["![CAMs and patches](gallery.png)", ""] if gallery else []
    md_uri = storage.join(config.output, "results.md")
    storage.write_bytes(md_uri, "\n".join(lines).encode())
    metrics = {
        "config": asdict(config),
        "holdout": holdout.to_dict(),
        "test_images": num_test,
        "full_accuracy": full_accuracy,
        "full_gmacs": full_macs / 1e9,
        "full_kind": full_kind,
        "timing": timing,
        "answers": answers,
        "curves": [asdict(c) for c in curves],
        "argv": sys.argv,
    }
    json_uri = storage.join(config.output, "metrics.json")
    storage.write_bytes(json_uri, json.dumps(metrics, indent=2).encode())
    plot_uri = storage.join(config.output, "accuracy_vs_gmacs.png")
    storage.write_bytes(plot_uri, _plot(curves, full_accuracy, full_macs))
    return [md_uri, csv_uri, json_uri, plot_uri, storage.join(config.output, "thresholds.json")]


def _plot(curves: list[Curve], full_accuracy: float, full_macs: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, protocol in zip(axes, ("budgeted", "anytime"), strict=True):
        for curve in (c for c in curves if c.protocol == protocol):
            xs = [p[1] for p in curve.points]
            ys = [100 * p[2] for p in curve.points]
            ax.plot(xs, ys, marker="o" if protocol == "anytime" else None, markersize=3, label=curve.name)
        ax.scatter([full_macs / 1e9], [100 * full_accuracy], marker="*", s=120, color="black", label="full-224 network")
        ax.set_title(f"{protocol} ({'budgeted batch classification' if protocol == 'budgeted' else 'prediction'})")
        ax.set_xlabel("GMACs per image")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy (%)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _gallery(
    config: EvaluateConfig, anchornet: AnchorNet, test_set: ImageFolderDataset | Subset, classes: list[str]
) -> list[str]:
    """CAM and chosen patches drawn over a few test images (like paper Fig. 2 and 3); with ``--gallery 0`` none, and
    the gallery.png of an earlier run is removed (the report would otherwise show another run's images)."""
    uri = storage.join(config.output, "gallery.png")
    if config.gallery < 1:
        _remove(uri)
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as mpatches
    import matplotlib.pyplot as plt

    step = max(1, len(test_set) // config.gallery)
    picks = list(range(0, len(test_set), step))[: config.gallery]
    images = to_float(torch.stack([test_set[i][0] for i in picks]))
    with torch.inference_mode():
        cam, logits = class_activation_map(anchornet, images)
    selection = select_patches(cam, anchornet.receptive_field, config.num_patches, config.iou_threshold)
    rf = anchornet.receptive_field
    cols = min(4, len(picks))
    rows = math.ceil(len(picks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for n, ax in enumerate(axes.flat[: len(picks)]):
        ax.imshow(images[n].permute(1, 2, 0).numpy())
        h, w = images.shape[-2:]
        grid_rows, grid_cols = cam.shape[-2:]
        # each cell's score drawn at its window centre, on the cell grid's extent
        half = rf.size / 2
        extent = (
            half - rf.stride / 2,
            half + (grid_cols - 0.5) * rf.stride,
            half + (grid_rows - 0.5) * rf.stride,
            half - rf.stride / 2,
        )
        ax.imshow(cam[n].numpy(), cmap="jet", alpha=0.4, extent=extent, interpolation="bilinear")
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        for j in range(config.num_patches):
            if not selection.valid[n, j]:
                continue
            x0, y0, x1, y1 = selection.boxes[n, j].tolist()
            ax.add_patch(mpatches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.5, color="white"))
            ax.text(x0 + 3, y0 + 12, str(j + 2), color="white", fontsize=9, weight="bold")
        ax.set_title(f"AnchorNet: {classes[int(logits[n].argmax())]}", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(uri, buffer.getvalue())
    return [uri]
