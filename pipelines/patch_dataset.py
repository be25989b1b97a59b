"""Stage-II reader: a precomputed patch dataset (``jobs/precompute_patches.py``) as a torch ``Dataset``.

Memory: ``__init__`` reads ``manifest.json`` only (and, for ``role="patch"``, the one-byte ``num_patches``
column of every shard). Pixels are read lazily, one shard at a time and only the column the role needs
(``glance`` or ``patches``), and kept *encoded* (JPEG by default, about 4 KiB per crop at K = 95); each sample
is decoded in ``__getitem__``. With the default ``max_cached_shards=None`` the cache grows up to the encoded
size of that column over the whole dataset (imagenette train, ~9.5 k images: ~40 MB of glances,
~160 MB of patches). For larger datasets pass ``max_cached_shards`` (an LRU bound, about
``shard_size x 4 KiB x patches`` each) and visit samples shard by shard (``shard_of`` / ``sample_shards`` tell
the shard of a sample; ``pipelines.train_data.ShardWindowBatchSampler`` gives each loader process a run of
shards, a few at a time, as the training job does), or stream the shards with Ray Data
(``ray.data.read_parquet(uri + "/shards")``).

Each ``DataLoader`` worker process builds its own cache and its own filesystem client (S3 clients are not
shared across a fork).
"""

from __future__ import annotations

import bisect
import json
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from anchornet import storage
from pipelines import schema

__all__ = ["PatchDataset", "read_manifest"]


def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of a finished precompute output; ``FileNotFoundError`` when the job has not finished."""
    try:
        manifest = json.loads(storage.read_bytes(storage.join(uri, schema.MANIFEST_FILE)))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no {schema.MANIFEST_FILE} under {uri}: the precompute job has not finished") from err
    if manifest.get("schema_version", 0) > schema.SCHEMA_VERSION:
        raise ValueError(f"{uri} has schema version {manifest['schema_version']}; this reader reads <= 1")
    return manifest


#: Shards whose small columns (patch counts, image ids) are read at once when a dataset opens.
METADATA_READ_THREADS = 16


class PatchDataset(Dataset):
    """Glances or patches of a precomputed output, as ``(uint8 (3, K, K) tensor, label)`` pairs.

    Args:
        uri: the job's output directory, local or ``s3://``.
        role: ``"glance"``, one sample per image (the 224 image resized to K), or ``"patch"``, up to
            ``num_patches`` samples per image, best first, each labelled with its image's label.
        num_patches: patches per image for ``role="patch"`` (default: all that were computed). An image
            whose NMS left fewer patches contributes fewer samples (never duplicates).
        max_cached_shards: keep at most this many shards' encoded column in memory (LRU); None: no bound.

    Samples are ordered as the images are (shard by shard, index order); for ``"patch"``, the patches of
    one image are consecutive, best first.
    """

    def __init__(
        self,
        uri: str,
        role: Literal["glance", "patch"],
        num_patches: int | None = None,
        *,
        max_cached_shards: int | None = None,
    ) -> None:
        if role not in ("glance", "patch"):
            raise ValueError(f"role must be 'glance' or 'patch', got {role!r}")
        if max_cached_shards is not None and max_cached_shards < 1:
            raise ValueError(f"max_cached_shards must be at least 1 (or None: no bound), got {max_cached_shards}")
        self.uri = str(uri)
        self.role = role
        manifest = read_manifest(self.uri)
        self.manifest = manifest
        self.classes: list[str] = list(manifest["classes"])
        self.patch_size: int = int(manifest["patch_size"])
        self.encoding: schema.Encoding = manifest["image_encoding"]
        computed = int(manifest["num_patches"])
        if num_patches is None:
            num_patches = computed
        if role == "patch" and not 1 <= num_patches <= computed:
            raise ValueError(f"num_patches must be in [1, {computed}] for {self.uri}, got {num_patches}")
        self.num_patches = num_patches
        self.max_cached_shards = max_cached_shards
        self._files = [entry["file"] for entry in manifest["shards"]]
        self._fs_pid: tuple[pafs.FileSystem, str, int] | None = None
        self._cache: OrderedDict[int, pa.Array] = OrderedDict()
        self._labels: list[np.ndarray | None] = [None] * len(self._files)
        if role == "glance":
            counts = [int(entry["rows"]) for entry in manifest["shards"]]
            self._patch_offsets: list[np.ndarray] | None = None
        else:
            self._patch_offsets = [self._offsets(counts) for counts in self._every_shards("num_patches")]
            counts = [int(offsets[-1]) for offsets in self._patch_offsets]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()

    # -- storage -----------------------------------------------------------------------------------------

    def _fs(self) -> tuple[pafs.FileSystem, str]:
        if self._fs_pid is None or self._fs_pid[2] != os.getpid():
            fs, root = storage.resolve(self.uri)
            self._fs_pid = (fs, root, os.getpid())
            self._cache.clear()
        return self._fs_pid[0], self._fs_pid[1]

    def _read(self, shard: int, columns: list[str]) -> pa.Table:
        fs, root = self._fs()
        return pq.read_table(f"{root}/{self._files[shard]}", columns=columns, filesystem=fs)

    def _every_shards(self, column: str) -> list[pa.ChunkedArray]:
        """``column`` of every shard, in shard order, read on a thread pool: each read is a few requests' round
        trips, and on S3 one shard after another would take minutes per process at ImageNet's 1,281 shards (at
        20 ms a request: about 4 min for each of the two columns opened at start)."""
        self._fs()  # once, before the threads share it
        with ThreadPoolExecutor(max_workers=max(1, min(METADATA_READ_THREADS, len(self._files)))) as pool:
            return list(pool.map(lambda shard: self._read(shard, [column]).column(column), range(len(self._files))))

    def _offsets(self, counts: pa.ChunkedArray) -> np.ndarray:
        per_image = np.minimum(counts.to_numpy().astype(np.int64), self.num_patches)
        return np.concatenate([[0], np.cumsum(per_image)])

    def _shard_data(self, shard: int) -> pa.Array:
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        column = "glance" if self.role == "glance" else "patches"
        table = self._read(shard, [column, "label"])
        data = table.column(column).combine_chunks()
        self._labels[shard] = table.column("label").to_numpy()
        self._cache[shard] = data
        if self.max_cached_shards is not None:
            while len(self._cache) > self.max_cached_shards:
                self._cache.popitem(last=False)
        return data

    # -- Dataset -----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._starts[-1]

    def shard_of(self, i: int) -> int:
        """The shard holding sample ``i`` (for shard-grouped sampling with a bounded cache)."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        return bisect.bisect_right(self._starts, i) - 1

    def sample_shards(self) -> np.ndarray:
        """The shard of every sample, in the dataset's order (``int64``, ``len(self)``): ``shard_of`` for all
        samples at once, without reading any shard (``pipelines.train_data.ShardWindowBatchSampler`` groups by it)."""
        return np.repeat(np.arange(len(self._files), dtype=np.int64), np.diff(self._starts))

    def image_samples(self) -> list[tuple[str, range]]:
        """``(image_id, samples)`` of every image, in the dataset's order: the positions of its glance (one) or of
        its patches (``role="patch"``; none when it has none). Reads each shard's ``image_id`` column."""
        out: list[tuple[str, range]] = []
        for shard, column in enumerate(self._every_shards("image_id")):
            ids = column.to_pylist()
            start = self._starts[shard]
            if self._patch_offsets is None:
                out += [(image_id, range(start + k, start + k + 1)) for k, image_id in enumerate(ids)]
            else:
                offsets = self._patch_offsets[shard].tolist()
                out += [(image_id, range(start + offsets[k], start + offsets[k + 1])) for k, image_id in enumerate(ids)]
        return out

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = int(i)  # a numpy index from a Subset's array
        if i < 0:
            i += len(self)
        shard = self.shard_of(i)
        local = i - self._starts[shard]
        data = self._shard_data(shard)
        labels = self._labels[shard]
        assert labels is not None
        if self._patch_offsets is None:
            row, encoded = local, data[local].as_py()
        else:
            offsets = self._patch_offsets[shard]
            row = int(np.searchsorted(offsets, local, side="right")) - 1
            encoded = data[row].values[local - int(offsets[row])].as_py()
        return schema.decode_crop(encoded, self.encoding, self.patch_size), int(labels[row])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fs_pid"] = None
        state["_cache"] = OrderedDict()
        state["_labels"] = [None] * len(self._files)
        return state
