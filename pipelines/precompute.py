"""Precompute AnchorNet's glance, patches and CAM for every image of an ImageFolder tree into Parquet shards.

The job, end to end (layout and schema in ``pipelines.schema``):

1. The driver indexes the tree (sorted: ``anchornet.image_folder.scan_image_folder``), loads the checkpoint
   once to validate it and hashes its bytes (the checkpoint id), and cuts the index into shards of
   ``shard_size`` images (``JobPlan.shard_items``): with ``shard_order="mixed"`` (default) the images ordered by
   the SHA-256 of their relative paths, so that every shard holds a sample of all classes (training shuffles a
   window of shards at a time); with ``"sorted"`` consecutive images of the index. Shard ``i`` is written to
   ``shards/part-{i:05d}.parquet``, its rows in index order. Same tree and options, same shards, same names.
2. It writes ``_job.json`` (which doubles as the writability probe) and skips every shard whose file is
   already there: a shard file only appears once complete, so a re-run after a kill finishes the rest.
3. A Ray Dataset of the pending shards (one row each: index and image list) flows through an actor pool
   (``map_batches(ShardWriter, compute=ActorPoolStrategy(size=workers), batch_size=1)``). Each actor loads
   the model once, then for each shard reads, decodes and preprocesses images on a thread pool (the next
   mini-batch is decoded while the current one runs through the model), runs CAM, patch selection and
   cropping from ``anchornet``, encodes the crops and streams row groups to a local temporary file, then
   commits the shard (errors file first, then the shard by rename or one S3 upload).
4. Once every shard exists, the driver gathers the errors into ``errors.parquet`` and writes
   ``manifest.json`` last. With a manifest for the same job already present, it writes nothing at all.

Memory: the driver holds the index (paths and labels), the actors one mini-batch of images each; the
shard being written lives in a local temporary file, not in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torchvision.transforms.v2 import functional as TF

from anchornet import (
    AnchorNet,
    CheckpointError,
    ImageDecodeError,
    Preprocessing,
    class_activation_map,
    crop_patches,
    decode_image,
    load_checkpoint,
    prepare_for_inference,
    select_patches,
    storage,
)
from anchornet.image_folder import ImageFolderIndex, scan_image_folder
from anchornet.preprocessing import DEFAULT_MAX_ASPECT_RATIO, to_float
from pipelines import schema
from pipelines.cluster import local_paths_warning, unreachable_address
from pipelines.schema import Encoding

__all__ = [
    "PrecomputeConfig",
    "PrecomputeError",
    "PrecomputeResult",
    "ShardError",
    "ShardWriter",
    "ShardsFailedError",
    "run_precompute",
    "shared_storage_warning",
]

FORMAT = "anchornet-patches"

#: Images per AnchorNet forward pass inside an actor, whatever ``--batch-size``. A float32 result can change in its
#: last bits with the batch it was computed in (oneDNN picks kernels per shape: batches of 1, 5, 7 and 13 gave CAMs
#: up to 5e-7 away from the same images in a batch of 16), so every pass sees exactly this many images, the last
#: one of a mini-batch zero-padded: the rows do not depend on ``--batch-size``, on where errors fall or on
#: resumption. On one CPU thread 16 was also faster than 64 (3.1-3.5 against 4.0-5.0 ms per image).
FORWARD_BATCH = 16

#: Default ``--max-aspect-ratio``, serving's limit: an OOM kill on a long thin image would fail its shard on every run.
MAX_ASPECT_RATIO = DEFAULT_MAX_ASPECT_RATIO

#: Pauses between the tries of an input read that failed with an error that may pass (an S3 read pyarrow gave up
#: on, an NFS I/O error): 3 tries in 0.5 s. A read still failing fails its shard instead of dropping the image.
READ_RETRY_DELAYS = (0.1, 0.4)

#: Reads in flight per actor on an ``s3://`` input, beside its decode threads: an S3 GET waits tens of milliseconds
#: for its first byte, and with the reads inside the decode threads (2 for a 1-CPU GPU actor) an actor could not
#: read more than ~70-100 images/s, whatever its GPU. Local reads stay in the decode threads.
REMOTE_READ_THREADS = 24  # under the 25 connections of Arrow's S3 client (uploads share them)

#: Pause before a run retries the shards that failed (``--shard-retries`` rounds): a read that kept failing for
#: half a second (S3 throttling, a network blip) often passes a little later, and a lasting failure fails a shard at
#: its first image, so a retry round costs little.
SHARD_RETRY_PAUSE_S = 10.0

#: The reason of an image that the input listing had but the actor did not find.
DISAPPEARED = "file disappeared after the input was indexed"

#: Identity keys added after outputs were written, with the value those outputs were written with.
_LEGACY_IDENTITY: dict[str, Any] = {"max_aspect_ratio": None, "shard_order": "sorted"}
#: For each such key: what the refusal says of those outputs, and the flag that resumes them.
_LEGACY_FLAGS = {
    "max_aspect_ratio": ("--max-aspect-ratio existed (no limit)", "--max-aspect-ratio 0"),
    "shard_order": ("--shard-order existed (sorted shards)", "--shard-order sorted"),
}

#: ``--shard-order``: how the sorted index is cut into shards (``JobPlan.shard_items``).
ShardOrder = Literal["mixed", "sorted"]


class PrecomputeError(RuntimeError):
    """A problem with the job's inputs or output that the user must fix; the message is one line."""


class ShardError(RuntimeError):
    """A shard that must not be committed (an input read that kept failing, every image missing); one line."""


class ShardsFailedError(PrecomputeError):
    """Shards that failed and were not written; the others were. A re-run redoes the failed ones."""

    def __init__(self, message: str, result: PrecomputeResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class PrecomputeConfig:
    """Everything the job needs; validated on construction.

    Only the fields that change the output's content (``JobPlan.identity``) must stay the same between a
    run and its resumption; resources (workers, CPUs, GPUs, batch size, address) may change: AnchorNet always
    runs on ``FORWARD_BATCH`` images at a time, so ``batch_size`` (images decoded, cropped and encoded together)
    does not change a row.
    """

    input: str
    output: str
    anchornet: str
    num_patches: int = 4
    iou_threshold: float = 0.3
    shard_size: int = 1000
    shard_order: ShardOrder = "mixed"
    image_encoding: Encoding = "jpeg"
    jpeg_quality: int = 95
    min_size: int | None = None
    max_aspect_ratio: float | None = MAX_ASPECT_RATIO
    classes_from: Literal["tree", "checkpoint"] = "tree"
    workers: int = 1
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0
    batch_size: int = 64
    address: str | None = None
    max_shards: int | None = None
    shard_retries: int = 1
    verbose: bool = True

    def __post_init__(self) -> None:
        checks = [
            (
                1 <= self.num_patches <= schema.MAX_PATCHES,
                f"--num-patches must be in [1, {schema.MAX_PATCHES}], got {self.num_patches}",
            ),
            (0.0 <= self.iou_threshold <= 1.0, f"--iou-threshold must be in [0, 1], got {self.iou_threshold}"),
            (self.shard_size >= 1, f"--shard-size must be at least 1, got {self.shard_size}"),
            (self.shard_order in ("mixed", "sorted"), f"unknown --shard-order {self.shard_order!r}"),
            (self.image_encoding in ("png", "jpeg", "raw"), f"unknown --image-encoding {self.image_encoding!r}"),
            (1 <= self.jpeg_quality <= 100, f"--jpeg-quality must be in [1, 100], got {self.jpeg_quality}"),
            (self.min_size is None or self.min_size >= 1, f"--min-size must be positive, got {self.min_size}"),
            (
                self.max_aspect_ratio is None or self.max_aspect_ratio >= 1,
                f"--max-aspect-ratio must be at least 1 (0: no limit), got {self.max_aspect_ratio}",
            ),
            (self.classes_from in ("tree", "checkpoint"), f"unknown --classes {self.classes_from!r}"),
            (self.workers >= 1, f"--workers must be at least 1, got {self.workers}"),
            (self.num_cpus_per_worker > 0, f"--num-cpus-per-worker must be positive, got {self.num_cpus_per_worker}"),
            (self.num_gpus_per_worker >= 0, f"--num-gpus-per-worker must be >= 0, got {self.num_gpus_per_worker}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.max_shards is None or self.max_shards >= 1, f"--max-shards must be positive, got {self.max_shards}"),
            (self.shard_retries >= 0, f"--shard-retries must be at least 0, got {self.shard_retries}"),
        ]
        for ok, message in checks:
            if not ok:
                raise PrecomputeError(message)


@dataclass(frozen=True)
class JobPlan:
    """What the driver worked out before any Ray work: the index, the model facts and the shard cut."""

    config: PrecomputeConfig
    index: ImageFolderIndex
    checkpoint_id: str
    anchornet_classes: list[str] | None
    preprocessing: Preprocessing
    patch_size: int
    cam_grid: tuple[int, int]
    min_size: int

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self.index.items) / self.config.shard_size)

    @cached_property
    def _shard_sequence(self) -> list[int]:
        """Index positions in the order they are cut into shards: by SHA-256 of the relative path ("mixed"), or as
        the index is ("sorted")."""
        positions = range(len(self.index.items))
        if self.config.shard_order == "sorted":
            return list(positions)
        return sorted(positions, key=lambda i: hashlib.sha256(self.index.items[i][0].encode()).digest())

    def shard_items(self, shard: int) -> list[tuple[str, int]]:
        """The images of ``shard`` in index order: ``shard_size`` consecutive images of the shard order.

        "mixed" orders by a hash of each path, stable across runs, machines and library versions, so every shard
        is a uniform sample of the tree: one 1000-image ImageNet shard holds images of about 630 classes, where
        "sorted" puts one or two classes in each (and a training window of 16 shards would mix only ~16-32).
        """
        size = self.config.shard_size
        return [self.index.items[i] for i in sorted(self._shard_sequence[shard * size : (shard + 1) * size])]

    @property
    def identity(self) -> dict[str, Any]:
        """The fields that fix the output's content; a resumed or repeated run must match them exactly."""
        c = self.config
        listing = "\n".join(f"{rel}\t{label}" for rel, label in self.index.items).encode()
        return {
            "format": FORMAT,
            "schema_version": schema.SCHEMA_VERSION,
            "index_sha256": hashlib.sha256(listing).hexdigest(),
            "num_images": len(self.index.items),
            "classes": self.index.classes,
            "checkpoint_id": self.checkpoint_id,
            "preprocessing": self.preprocessing.to_dict(),
            "patch_size": self.patch_size,
            "cam_grid": list(self.cam_grid),
            "num_patches": c.num_patches,
            "iou_threshold": c.iou_threshold,
            "min_size": self.min_size,
            "max_aspect_ratio": c.max_aspect_ratio,
            "shard_size": c.shard_size,
            "shard_order": c.shard_order,
            "num_shards": self.num_shards,
            "image_encoding": c.image_encoding,
            "jpeg_quality": c.jpeg_quality if c.image_encoding == "jpeg" else None,
        }

    def worker_spec(self) -> dict[str, Any]:
        """Plain values for the actors (no index: they get their images with each shard)."""
        c = self.config
        return {
            "input": c.input,
            "output": c.output,
            "anchornet": c.anchornet,
            "checkpoint_id": self.checkpoint_id,
            "preprocessing": self.preprocessing.to_dict(),
            "num_patches": c.num_patches,
            "iou_threshold": c.iou_threshold,
            "min_size": self.min_size,
            "max_aspect_ratio": c.max_aspect_ratio,
            "image_encoding": c.image_encoding,
            "jpeg_quality": c.jpeg_quality,
            "batch_size": c.batch_size,
            "num_cpus": c.num_cpus_per_worker,
            "num_gpus": c.num_gpus_per_worker,
            "classes": self.index.classes,
            "schema_metadata": {
                "image_encoding": c.image_encoding,
                "jpeg_quality": str(c.jpeg_quality),
                "patch_size": str(self.patch_size),
                "cam_grid": json.dumps(list(self.cam_grid)),
                "checkpoint_id": self.checkpoint_id,
            },
        }


@dataclass
class PrecomputeResult:
    """What a run did. ``complete`` is false when ``max_shards`` stopped it early (or shards failed: then
    ``run_precompute`` raises ``ShardsFailedError`` with this result, ``failed_shards`` mapping shard to reason)."""

    output: str
    complete: bool
    num_shards: int
    shards_written: int
    shards_skipped: int
    rows: int | None = None
    errors: int | None = None
    already_complete: bool = False
    seconds: float = 0.0
    shard_reports: list[dict[str, Any]] = field(default_factory=list)
    failed_shards: dict[int, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# driver side


def plan_job(config: PrecomputeConfig) -> JobPlan:
    """Index the input and validate the checkpoint; ``PrecomputeError`` (one line) for user mistakes."""
    try:
        data = storage.read_bytes(config.anchornet)
        model, card = load_checkpoint(config.anchornet, data)  # the model of the bytes hashed below
    except FileNotFoundError as err:
        raise PrecomputeError(f"checkpoint not found: {config.anchornet}") from err
    except CheckpointError as err:
        raise PrecomputeError(f"bad checkpoint: {err}") from err
    except (OSError, ValueError) as err:
        raise PrecomputeError(f"cannot read checkpoint {config.anchornet}: {_one_line(err)}") from err
    if not isinstance(model, AnchorNet):
        raise PrecomputeError(f"bad checkpoint: {config.anchornet} holds a {card.kind} model, not AnchorNet")
    if not _has_manifest(config.output):  # a finished job's re-run writes nothing, not even a probe
        _probe_output(config.output)  # before listing the input, which takes minutes for ImageNet on S3
    classes = None
    if config.classes_from == "checkpoint":
        if not card.class_names:
            raise PrecomputeError(f"--classes checkpoint: {config.anchornet} has no class names on its card")
        classes = card.class_names
    try:
        index = scan_image_folder(config.input, classes=classes)
    except FileNotFoundError as err:
        raise PrecomputeError(f"input not found: {config.input}") from err
    except (OSError, ValueError) as err:
        raise PrecomputeError(f"bad input {config.input}: {_one_line(err)}") from err
    rf = model.receptive_field
    try:
        preprocessing = Preprocessing.from_dict(card.preprocessing) if card.preprocessing else Preprocessing()
        grid = rf.grid(preprocessing.image_size, preprocessing.image_size)
    except (ValueError, TypeError, KeyError) as err:
        raise PrecomputeError(f"bad checkpoint: {config.anchornet}: {_one_line(err)}") from err
    return JobPlan(
        config=config,
        index=index,
        checkpoint_id=hashlib.sha256(data).hexdigest(),
        anchornet_classes=card.class_names,
        preprocessing=preprocessing,
        patch_size=rf.size,
        cam_grid=grid,
        min_size=config.min_size or rf.size,
    )


def _has_manifest(out: str) -> bool:
    """Whether ``out`` holds a ``manifest.json`` (read only; errors say no, and the probe then reports them)."""
    try:
        return storage.exists(storage.join(out, schema.MANIFEST_FILE))
    except (OSError, ValueError):
        return False


def _probe_output(out: str) -> None:
    """``PrecomputeError`` now when ``out`` clearly cannot be written; creates nothing that stays.

    Locally: the nearest existing ancestor must be a writable directory. On S3: a probe object is written and
    deleted. (``_check_or_claim_output`` writes ``_job.json`` later, once the input is indexed.)"""
    try:
        if storage.is_remote(out):
            probe = storage.join(out, f".probe-{uuid.uuid4().hex}")
            storage.write_bytes(probe, b"")
            fs, path = storage.resolve(probe)
            fs.delete_file(path)
            return
        path = Path(storage.resolve(out)[1])
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"{existing} is not writable")
    except (OSError, ValueError) as err:
        raise PrecomputeError(f"cannot write to output {out}: {_one_line(err)}") from err


def _is_missing(err: OSError) -> bool:
    """A missing file or S3 key (pyarrow reports some of the latter as plain ``OSError``)."""
    text = str(err)
    return isinstance(err, FileNotFoundError) or "NoSuchKey" in text or "NOT_FOUND" in text.upper()


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _read_json(uri: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        return None


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _check_or_claim_output(plan: JobPlan) -> bool:
    """True when ``manifest.json`` already records this very job. Else makes sure ``_job.json`` says so."""
    out = plan.config.output
    identity = plan.identity
    try:
        manifest = _read_json(storage.join(out, schema.MANIFEST_FILE))
        job = _read_json(storage.join(out, schema.JOB_FILE))
    except (OSError, ValueError) as err:
        raise PrecomputeError(f"cannot access output {out}: {_one_line(err)}") from err
    for name, recorded in ((schema.MANIFEST_FILE, manifest and manifest.get("job")), (schema.JOB_FILE, job)):
        if recorded is None:
            continue
        legacy = {k: v for k, v in _LEGACY_IDENTITY.items() if k not in recorded}  # written before the key existed
        recorded = {**legacy, **recorded}
        if recorded != identity:
            differences = _differences(recorded, identity)
            hint = "use a new --output"
            older = [_LEGACY_FLAGS[k] for k in differences if k in legacy]
            if older:
                before, flags = " and ".join(o[0] for o in older), " ".join(o[1] for o in older)
                hint = f"it was written before {before}: add {flags}, or {hint}"
            elif manifest is None and not _holds_shard_files(out):  # e.g. stopped at once to fix a flag
                claim = storage.join(out, schema.JOB_FILE)
                hint = f"it holds no shard yet: delete {claim} to run this job there, or {hint}"
            keys = ", ".join(differences)
            raise PrecomputeError(f"output {out} holds a different job ({name} differs in: {keys}); {hint}")
    if manifest is not None:
        return True
    if job is None:
        try:
            storage.makedirs(out)
            storage.write_bytes(storage.join(out, schema.JOB_FILE), _json_bytes(identity))
        except (OSError, ValueError) as err:
            raise PrecomputeError(f"cannot write to output {out}: {_one_line(err)}") from err
    return False


def _holds_shard_files(out: str) -> bool:
    """Whether ``<out>/shards`` or ``<out>/errors`` holds any file, finished or not (errors say yes)."""
    try:
        for folder in (schema.SHARDS_DIR, schema.ERRORS_DIR):
            fs, path = storage.resolve(storage.join(out, folder))
            if fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
                return True
    except (OSError, ValueError):
        return True
    return False


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()


_SHARD_RE = re.compile(r"^part-(\d{5,})\.parquet$")


def list_done_shards(output: str) -> set[int]:
    """Indices of the shards whose file is under ``<output>/shards`` and whose errors file is under
    ``<output>/errors`` (both complete when present: the errors file is written first, the shard moved in last).
    A shard whose errors file was lost since is done again."""

    def present(folder: str) -> set[int]:
        fs, path = storage.resolve(storage.join(output, folder))
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
        return {
            int(match.group(1))
            for entry in entries
            if entry.type == pafs.FileType.File and (match := _SHARD_RE.match(entry.base_name))
        }

    return present(schema.SHARDS_DIR) & present(schema.ERRORS_DIR)


def _log(config: PrecomputeConfig, message: str) -> None:
    if config.verbose:
        print(f"[precompute] {message}", flush=True)


def _warn(message: str) -> None:
    """One line on stderr, even with ``--quiet``."""
    print(f"[precompute] warning: {message}", file=sys.stderr, flush=True)


def shared_storage_warning(nodes: Sequence[Mapping[str, Any]], input: str, output: str) -> str | None:
    """The warning for local ``--input``/``--output`` paths on a cluster of more than one alive node (``nodes`` as
    ``ray.nodes()`` lists them), else ``None``. The driver lists the input on its node and every actor opens the
    paths on its own: unless they are the same shared storage everywhere, images go missing and shards land on the
    workers' disks."""
    return local_paths_warning(
        nodes, {"input": input, "output": output}, "images are missing on other nodes and shards land on their disks"
    )


def run_precompute(config: PrecomputeConfig) -> PrecomputeResult:
    """Run (or resume, or confirm) the job described by ``config``; see the module docstring."""
    start = time.monotonic()
    plan = plan_job(config)
    already = _check_or_claim_output(plan)
    n = plan.num_shards
    _log(
        config,
        f"{len(plan.index.items)} images, {len(plan.index.classes)} classes, {n} shards of {config.shard_size}; "
        f"checkpoint {plan.checkpoint_id[:12]}, K = {plan.patch_size}, grid {plan.cam_grid[0]} x {plan.cam_grid[1]}",
    )
    if already:
        _log(config, f"{config.output} already holds this job's manifest: nothing to do")
        return PrecomputeResult(config.output, True, n, 0, n, already_complete=True)
    done = {i for i in list_done_shards(config.output) if i < n}
    pending = [i for i in range(n) if i not in done]
    if config.max_shards is not None:
        pending = pending[: config.max_shards]
    _log(config, f"{len(done)} shards already written, {len(pending)} to do now")
    reports = _run_shards(plan, pending) if pending else []
    for attempt in range(1, config.shard_retries + 1):
        again = [r["shard"] for r in reports if r.get("failed")]
        if not again:
            break
        _log(
            config,
            f"{len(again)} shards failed; retrying them in {SHARD_RETRY_PAUSE_S:g} s "
            f"(round {attempt} of {config.shard_retries})",
        )
        time.sleep(SHARD_RETRY_PAUSE_S)
        retried = {r["shard"]: r for r in _run_shards(plan, again)}
        reports = [retried.get(r["shard"], r) for r in reports]
    failed = {r["shard"]: r["failed"] for r in reports if r.get("failed")}
    written = [r for r in reports if not r.get("failed")]
    result = PrecomputeResult(
        config.output, False, n, len(written), len(done), shard_reports=written, failed_shards=failed
    )
    missing = sorted(set(range(n)) - list_done_shards(config.output))
    if failed:
        first = min(failed)
        result.seconds = time.monotonic() - start
        raise ShardsFailedError(
            f"{len(failed)} of {len(pending)} shards failed and were not written (shard {first}: {failed[first]}); "
            f"the {len(written)} others were: re-run to redo the failed ones",
            result,
        )
    if missing:
        _log(config, f"incomplete: {len(missing)} of {n} shards missing (first: {missing[0]}); re-run to continue")
    else:
        result.rows, result.errors = _finalize(plan)
        result.complete = True
        _log(config, f"done: {result.rows} images, {result.errors} errors, manifest written")
    result.seconds = time.monotonic() - start
    return result


def _ray_init(config: PrecomputeConfig) -> tuple[Callable[[], None], bool]:
    """Attach to the given cluster (``--address``, else ``RAY_ADDRESS``) or start an embedded local Ray.

    Returns the function that undoes it and whether the cluster is a single local node that cannot scale.
    """
    import ray

    if ray.is_initialized():
        return (lambda: None), len(ray.nodes()) == 1 and not config.address and not os.environ.get("RAY_ADDRESS")
    address = config.address or os.environ.get("RAY_ADDRESS") or "local"
    if problem := unreachable_address(address):
        raise PrecomputeError(problem)
    kwargs: dict[str, Any] = {"address": address}
    if address == "local":
        kwargs["include_dashboard"] = False
    ray.init(**kwargs)
    return ray.shutdown, address == "local"


def _run_shards(plan: JobPlan, pending: Sequence[int], writer: type[ShardWriter] | None = None) -> list[dict[str, Any]]:
    """Process ``pending`` shards on an actor pool of ``writer`` (``ShardWriter``); one report per shard."""
    import ray

    config = plan.config
    shutdown, embedded = _ray_init(config)
    try:
        warning = shared_storage_warning(ray.nodes(), config.input, config.output)
        if warning:
            _warn(warning)
        resources = ray.cluster_resources()
        for kind, asked in (("GPU", config.num_gpus_per_worker), ("CPU", config.num_cpus_per_worker)):
            have = resources.get(kind, 0)
            if asked > have:
                message = f"--num-{kind.lower()}s-per-worker {asked:g} but the cluster has {have:g} {kind}s now"
                if embedded:  # nothing can scale up: Ray would wait forever without a word
                    hint = "use --num-gpus-per-worker 0 on a CPU machine" if kind == "GPU" else "ask for fewer"
                    raise PrecomputeError(f"{message}; {hint}")
                _log(config, f"warning: {message}; waiting for the autoscaler")
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        rows = [{"shard": i, "items": json.dumps(plan.shard_items(i))} for i in pending]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        ds = ds.map_batches(
            writer or ShardWriter,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(config.workers, len(rows))),
            num_cpus=config.num_cpus_per_worker,
            num_gpus=config.num_gpus_per_worker,
            fn_constructor_kwargs={"spec": plan.worker_spec()},
            udf_modifying_row_count=False,
        )
        reports: list[dict[str, Any]] = []
        start, images = time.monotonic(), 0
        for row in ds.iter_rows():
            report = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
            reports.append(report)
            if report["failed"]:
                _warn(f"shard {report['shard']} failed, not written: {report['failed']}")
                continue
            images += report["images"]
            elapsed = time.monotonic() - start
            rate = images / elapsed if elapsed > 0 else 0.0
            left = len(pending) - len(reports)
            eta = left * config.shard_size / rate if rate > 0 else float("nan")
            _log(
                config,
                f"shard {report['shard']} written ({report['rows']} rows, {report['errors']} errors); "
                f"{len(reports)}/{len(pending)} this run, {rate:.1f} images/s, ETA {eta:.0f} s",
            )
        return reports
    finally:
        shutdown()


def _finalize(plan: JobPlan) -> tuple[int, int]:
    """Gather the per-shard counts and errors; write ``errors.parquet`` then ``manifest.json`` (last)."""
    config = plan.config
    out = config.output
    n = plan.num_shards
    fs, root = storage.resolve(out)

    def shard_info(i: int) -> tuple[int, pa.Table]:
        meta = pq.read_metadata(f"{root}/{schema.SHARDS_DIR}/{schema.shard_name(i)}", filesystem=fs)
        errors = pq.read_table(f"{root}/{schema.ERRORS_DIR}/{schema.errors_name(i)}", filesystem=fs)
        return meta.num_rows, errors

    with ThreadPoolExecutor(16) as pool:
        infos = list(pool.map(shard_info, range(n)))
    errors = pa.concat_tables([e.cast(schema.ERRORS_SCHEMA) for _, e in infos], promote_options="none")
    rows = sum(r for r, _ in infos)
    if rows + errors.num_rows != len(plan.index.items):
        raise RuntimeError(f"{rows} rows and {errors.num_rows} errors for {len(plan.index.items)} images in {out}")
    storage.write_bytes(storage.join(out, schema.ERRORS_FILE), schema.table_bytes(errors))
    args = {k: v for k, v in asdict(config).items() if k != "verbose"}
    manifest = {
        "format": FORMAT,
        "schema_version": schema.SCHEMA_VERSION,
        "job": plan.identity,
        "args": args,
        "checkpoint_id": plan.checkpoint_id,
        "classes": plan.index.classes,
        "anchornet_classes": plan.anchornet_classes,
        "patch_size": plan.patch_size,
        "cam_grid": list(plan.cam_grid),
        "num_patches": config.num_patches,
        "image_encoding": config.image_encoding,
        "jpeg_quality": config.jpeg_quality if config.image_encoding == "jpeg" else None,
        "counts": {"images": len(plan.index.items), "rows": rows, "errors": errors.num_rows, "shards": n},
        "shards": [
            {"file": f"{schema.SHARDS_DIR}/{schema.shard_name(i)}", "rows": r, "errors": e.num_rows}
            for i, (r, e) in enumerate(infos)
        ],
        "errors_file": schema.ERRORS_FILE,
    }
    if not storage.is_remote(out):  # what killed runs left: shard, errors-file and table temporaries
        for folder in (Path(root), Path(root, schema.SHARDS_DIR), Path(root, schema.ERRORS_DIR)):
            for stale in folder.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
    storage.write_bytes(storage.join(out, schema.MANIFEST_FILE), _json_bytes(manifest))
    return rows, errors.num_rows


# ---------------------------------------------------------------------------------------------------------
# actor side


@dataclass
class _Decoded:
    image_id: str
    label: int
    image: torch.Tensor | None = None
    reason: str | None = None


def batch_invariant_cam(
    model: AnchorNet, images: torch.Tensor, pool: ThreadPoolExecutor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``class_activation_map`` of uint8 ``images`` run ``FORWARD_BATCH`` at a time (the last pass zero-padded), so
    that each image's CAM and logits are the same bits in any batch. Returns ``(cam, logits)`` for the images.

    On the CPU, run it with one torch thread: oneDNN splits a pass differently over 3, 5 or 6 threads than over 1
    (CAMs up to 2e-5 apart). ``pool`` runs the passes side by side instead, each on one thread of its own, so the
    bits do not depend on how many there are."""

    def one_pass(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(chunk)
        if n < FORWARD_BATCH:
            padding = chunk.new_zeros((FORWARD_BATCH - n, *chunk.shape[1:]))
            chunk = torch.cat([chunk, padding]).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():  # thread-local: a pool thread needs its own
            cam, logits = class_activation_map(model, to_float(chunk))  # to float after NHWC: a quarter of the bytes
        return cam[:n], logits[:n]

    chunks = [images[start : start + FORWARD_BATCH] for start in range(0, len(images), FORWARD_BATCH)]
    passes = list(pool.map(one_pass, chunks)) if pool is not None and len(chunks) > 1 else map(one_pass, chunks)
    cams, logits = zip(*passes, strict=True)
    return torch.cat(cams), torch.cat(logits)


class ShardWriter:
    """Ray Data callable class: one actor, one model; each call writes the shards of its batch."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        threads = max(1, int(spec["num_cpus"]))
        torch.set_num_threads(1)  # the rows' bits depend on torch's thread count: the CPUs run passes side by side
        data = storage.read_bytes(spec["anchornet"])
        if hashlib.sha256(data).hexdigest() != spec["checkpoint_id"]:
            raise RuntimeError(f"{spec['anchornet']} changed while the job was running (sha256 differs)")
        model, _ = load_checkpoint(spec["anchornet"], data)  # the bytes just hashed, not a second read
        use_cuda = spec["num_gpus"] > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_cuda else "cpu")
        # batch norms and the input normalisation folded, NHWC activations (oneDNN / cuDNN's fast path), and on
        # CUDA exact float32 (TF32 changed which patches were chosen): the rows do not depend on the device
        self.model: AnchorNet = prepare_for_inference(model, self.device)
        self.preprocessing = Preprocessing.from_dict(spec["preprocessing"])
        self.in_fs, self.in_root = storage.resolve(spec["input"])
        self.remote_input = storage.is_remote(spec["input"])
        self.out_fs, self.out_root = storage.resolve(spec["output"])
        self.remote_output = storage.is_remote(spec["output"])
        self.pool = ThreadPoolExecutor(max(2, threads), thread_name_prefix="decode")
        self.forward_pool = (
            ThreadPoolExecutor(threads, thread_name_prefix="forward") if threads > 1 and not use_cuda else None
        )
        self.read_pool = (
            ThreadPoolExecutor(REMOTE_READ_THREADS, thread_name_prefix="read") if self.remote_input else None
        )
        self.schema = schema.shard_schema(spec["schema_metadata"])

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        """One report per shard; ``failed`` is the one-line reason of a shard not written (``ShardError``), else
        empty. Other exceptions (bugs) propagate and stop the job."""
        keys = ("shard", "rows", "errors", "images", "started", "finished", "failed")
        out: dict[str, list[Any]] = {key: [] for key in keys}
        for shard, items_json in zip(batch["shard"], batch["items"], strict=True):
            started = time.time()
            items = [(str(rel), int(label)) for rel, label in json.loads(str(items_json))]
            try:
                rows, errors = self.write_shard(int(shard), items)
                failed = ""
            except ShardError as err:
                rows, errors, failed = 0, 0, _one_line(err)
            values = (int(shard), rows, errors, len(items), started, time.time(), failed)
            for key, value in zip(keys, values, strict=True):
                out[key].append(value)
        return out

    # -- reading -----------------------------------------------------------------------------------------

    def _load(self, item: tuple[str, int], fetched: Future[bytes | _Decoded] | None = None) -> _Decoded:
        """Read (or take ``fetched``, a read on the read pool), decode and preprocess one image; a bad image comes
        back with its reason. ``ShardError`` when the read kept failing with an error that may pass: the image is
        not bad, the shard must be redone."""
        rel, label = item
        data = self._fetch(item) if fetched is None else fetched.result()
        if isinstance(data, _Decoded):
            return data
        try:
            image = decode_image(data, min_size=self.spec["min_size"], max_aspect_ratio=self.spec["max_aspect_ratio"])
        except ImageDecodeError as err:
            return _Decoded(rel, label, reason=_one_line(err))
        return _Decoded(rel, label, image=self.preprocessing(image, channels_last=True))

    def _fetch(self, item: tuple[str, int]) -> bytes | _Decoded:
        """The bytes of one image, or its errors row when it is gone or unreadable for good (``_load``)."""
        rel, label = item
        path = f"{self.in_root}/{rel}"
        try:
            return self._read(path)
        except FileNotFoundError:
            return _Decoded(rel, label, reason=DISAPPEARED)
        except OSError as err:
            if self._is_permanent(path, err):
                return _Decoded(rel, label, reason=f"unreadable: {_one_line(err)}")
            uri = storage.join(self.spec["input"], *rel.split("/"))
            raise ShardError(f"cannot read {uri} ({len(READ_RETRY_DELAYS) + 1} tries): {_one_line(err)}") from err

    def _read(self, path: str) -> bytes:
        """The bytes of input file ``path``, tried again after ``READ_RETRY_DELAYS`` unless the error is permanent.
        ``FileNotFoundError`` for a missing file (also S3's missing keys), else the last try's ``OSError``."""
        for delay in (*READ_RETRY_DELAYS, None):
            try:
                with self.in_fs.open_input_stream(path) as stream:
                    return stream.read()
            except OSError as err:
                if _is_missing(err):
                    raise FileNotFoundError(str(err)) from err
                if delay is None or self._is_permanent(path, err):
                    raise
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _is_permanent(self, path: str, err: OSError) -> bool:
        """Whether a failed read fails again on every run: on a local filesystem, permission denied or a directory
        where a file was listed. Anything else (I/O errors, every S3 error but a missing key) may pass."""
        if self.remote_input:
            return False
        return isinstance(err, (PermissionError, IsADirectoryError, NotADirectoryError)) or os.path.isdir(path)

    def decoded_batches(self, items: Sequence[tuple[str, int]]) -> Iterator[list[_Decoded]]:
        """Mini-batches of decoded images, the next one decoding on the pool while the caller works (on S3, its
        reads all in flight at once on the read pool)."""
        size = self.spec["batch_size"]
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        ahead: list[Future[_Decoded]] | None = None
        for k in range(len(chunks)):
            current = ahead if ahead is not None else self._submit(chunks[k])
            ahead = self._submit(chunks[k + 1]) if k + 1 < len(chunks) else None
            yield [f.result() for f in current]

    def _submit(self, chunk: Sequence[tuple[str, int]]) -> list[Future[_Decoded]]:
        if self.read_pool is None:
            return [self.pool.submit(self._load, item) for item in chunk]
        reads = [self.read_pool.submit(self._fetch, item) for item in chunk]
        return [self.pool.submit(self._load, item, read) for item, read in zip(chunk, reads, strict=True)]

    # -- the model ---------------------------------------------------------------------------------------

    def process(self, decoded: Sequence[_Decoded]) -> pa.Table:
        """AnchorNet on a mini-batch of good images: one Arrow table in ``SHARD_SCHEMA``."""
        spec = self.spec
        k = self.model.receptive_field.size
        # NHWC uint8 from the decoder's HWC pixels without a transposition: channels-last convolutions, crops,
        # the glance resize and the JPEG encoder all read that layout fastest; the float copy keeps it
        images_cpu = torch.stack([d.image.permute(1, 2, 0) for d in decoded]).permute(0, 3, 1, 2)
        images = images_cpu.to(self.device)
        with torch.inference_mode():
            cam, logits = batch_invariant_cam(
                self.model, images.contiguous(memory_format=torch.channels_last), self.forward_pool
            )
            selection = select_patches(cam, self.model.receptive_field, spec["num_patches"], spec["iou_threshold"])
            crops = crop_patches(images, selection.boxes, size=k)
            # on the CPU whatever the model's device: the GPU's antialiased resize rounds differently, and the rows
            # must not depend on where they were computed
            glance = TF.resize(images_cpu, [k, k], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
            confidence, top1 = logits.float().softmax(dim=1).max(dim=1)
        counts = selection.valid.sum(dim=1).tolist()
        encoding, quality = spec["image_encoding"], spec["jpeg_quality"]
        flat_crops = schema.encode_crops(crops[selection.valid], encoding, quality)
        glances = schema.encode_crops(glance, encoding, quality)
        boxes = selection.boxes.cpu()
        cells, scores = selection.cells.cpu(), selection.scores.cpu().float()
        patches, box_lists, cell_lists, score_lists, offset = [], [], [], [], 0
        for b, count in enumerate(counts):
            patches.append(flat_crops[offset : offset + count])
            offset += count
            box_lists.append(boxes[b, :count].long().tolist())
            cell_lists.append(cells[b, :count].tolist())
            score_lists.append(scores[b, :count].tolist())
        classes = spec["classes"]
        columns = {
            "image_id": [d.image_id for d in decoded],
            "label": [d.label for d in decoded],
            "class_name": [classes[d.label] for d in decoded],
            "glance": glances,
            "patches": patches,
            "num_patches": counts,
            "boxes": box_lists,
            "cells": cell_lists,
            "cam_scores": score_lists,
            "cam": cam.float().reshape(len(decoded), -1).cpu().numpy().tolist(),
            "top1": top1.cpu().tolist(),
            "confidence": confidence.cpu().tolist(),
            "checkpoint_id": [spec["checkpoint_id"]] * len(decoded),
        }
        return pa.Table.from_pydict(columns, schema=self.schema)

    # -- writing -----------------------------------------------------------------------------------------

    def write_shard(self, shard: int, items: Sequence[tuple[str, int]]) -> tuple[int, int]:
        """Write ``shards/part-{shard}.parquet`` (and its errors file first); returns (rows, errors).

        ``ShardError`` when the output cannot be written (a full disk, an S3 PUT refused): like a read that kept
        failing, the shard is reported, tried again (``shard_retries``) and left for a re-run, while the other
        actors go on."""
        try:
            return self._write_shard(shard, items)
        except OSError as err:  # reads never get here: _fetch turns their errors into rows or ShardError
            uri = storage.join(self.spec["output"], schema.SHARDS_DIR, schema.shard_name(shard))
            raise ShardError(f"cannot write {uri}: {_one_line(err)}") from err

    def _write_shard(self, shard: int, items: Sequence[tuple[str, int]]) -> tuple[int, int]:
        name = schema.shard_name(shard)
        final = f"{self.out_root}/{schema.SHARDS_DIR}/{name}"
        if self.remote_output:
            tmp_dir = tempfile.mkdtemp(prefix="anchornet-shard-")
            tmp = os.path.join(tmp_dir, name)
        else:
            tmp_dir = None
            Path(final).parent.mkdir(parents=True, exist_ok=True)
            tmp = str(Path(final).with_name(f".{name}.{uuid.uuid4().hex}.tmp"))
        errors: list[_Decoded] = []
        rows = 0
        try:
            with pq.ParquetWriter(tmp, self.schema, compression="zstd") as writer:
                for decoded in self.decoded_batches(items):
                    good = [d for d in decoded if d.image is not None]
                    errors.extend(d for d in decoded if d.image is None)
                    if good:
                        writer.write_table(self.process(good))
                        rows += len(good)
            if items and len(errors) == len(items) and all(e.reason == DISAPPEARED for e in errors):
                # the typical symptom of a local --input on a cluster: the files are on the driver's node only
                raise ShardError(
                    f"all {len(items)} images of shard {shard} are missing on {socket.gethostname()} "
                    f"(first: {storage.join(self.spec['input'], *items[0][0].split('/'))}); a local --input must be "
                    "shared storage mounted at the same path on every node"
                )
            error_table = pa.Table.from_pydict(
                {
                    "image_id": [e.image_id for e in errors],
                    "path": [storage.join(self.spec["input"], *e.image_id.split("/")) for e in errors],
                    "label": [e.label for e in errors],
                    "reason": [e.reason for e in errors],
                },
                schema=schema.ERRORS_SCHEMA,
            )
            storage.write_bytes(
                storage.join(self.spec["output"], schema.ERRORS_DIR, schema.errors_name(shard)),
                schema.table_bytes(error_table),
            )
            if self.remote_output:
                pafs.copy_files(
                    tmp, final, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.out_fs
                )
            else:
                os.replace(tmp, final)
        finally:
            if tmp_dir is not None:
                shutil.rmtree(tmp_dir, ignore_errors=True)
            elif os.path.exists(tmp):
                os.unlink(tmp)
        return rows, len(errors)
