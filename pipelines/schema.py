"""The on-disk layout of a precomputed patch dataset: Parquet schemas, file names and the crop encodings.

An output directory (local or ``s3://``) holds::

    _job.json                  the job's identity (input index hash, checkpoint id, options), written first
    shards/part-00000.parquet  one file per shard of ``shard_size`` images, rows in index order (SHARD_SCHEMA)
    errors/part-00000.parquet  the images of that shard that could not be used (ERRORS_SCHEMA), possibly empty
    errors.parquet             every error of the job, shard after shard (index order within a shard)
    manifest.json              counts, schema version, arguments, checkpoint id; written last

A shard counts as done when its ``shards/part-NNNNN.parquet`` exists: it is written after its errors file,
through a temporary name and a rename locally, and as a single object upload on S3, so it is never partial.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, encode_jpeg

__all__ = [
    "ERRORS_SCHEMA",
    "MAX_PATCHES",
    "SCHEMA_VERSION",
    "Encoding",
    "decode_crop",
    "encode_crops",
    "errors_name",
    "shard_name",
    "shard_schema",
]

#: Bumped whenever a column changes meaning or type; readers refuse newer versions.
SCHEMA_VERSION = 1

Encoding = Literal["png", "jpeg", "raw"]

JOB_FILE = "_job.json"
MANIFEST_FILE = "manifest.json"
ERRORS_FILE = "errors.parquet"
SHARDS_DIR = "shards"
ERRORS_DIR = "errors"
#: The most patches a row can hold: ``num_patches`` is an int8 column.
MAX_PATCHES = 127


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``part-00042.parquet`` (five digits, more past 99999)."""
    return f"part-{index:05d}.parquet"


def errors_name(index: int) -> str:
    return shard_name(index)


def _field(name: str, kind: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, kind, nullable=nullable, metadata={"doc": doc})


def shard_schema(metadata: dict[str, str] | None = None) -> pa.Schema:
    """Schema of the ``shards/*.parquet`` files. ``metadata`` (encoding, K, grid, ...) goes in the footer."""
    fields = [
        _field("image_id", pa.string(), "path relative to the input root, '<class>/<file>'"),
        _field("label", pa.int32(), "index of the image's class in the manifest's 'classes'"),
        _field("class_name", pa.string(), "the image's class (its directory name)"),
        _field("glance", pa.binary(), "the 224 x 224 image resized to K x K (antialiased bilinear), encoded"),
        _field("patches", pa.list_(pa.binary()), "the selected K x K crops of the 224 image, best first, encoded"),
        _field("num_patches", pa.int8(), "number of patches (fewer than asked when NMS left fewer cells)"),
        _field("boxes", pa.list_(pa.list_(pa.int16(), 4)), "half-open (x0, y0, x1, y1) windows in the 224 image"),
        _field("cells", pa.list_(pa.int16()), "flat CAM cell index row * cols + col of each patch"),
        _field("cam_scores", pa.list_(pa.float32()), "CAM score of each patch's cell"),
        _field("cam", pa.list_(pa.float32()), "the full CAM grid (Eq. 2, top-1 class), row-major rows x cols"),
        _field("top1", pa.int32(), "AnchorNet's top-1 class, an index into the manifest's 'anchornet_classes'"),
        _field("confidence", pa.float32(), "AnchorNet's softmax probability of its top-1 class"),
        _field("checkpoint_id", pa.string(), "sha256 of the AnchorNet checkpoint file"),
    ]
    return pa.schema(fields, metadata={**(metadata or {}), "schema_version": str(SCHEMA_VERSION)})


ERRORS_SCHEMA = pa.schema(
    [
        _field("image_id", pa.string(), "path relative to the input root"),
        _field("path", pa.string(), "the file's full path or s3:// URI"),
        _field("label", pa.int32(), "index of the image's class"),
        _field("reason", pa.string(), "why the image was left out, one line"),
    ],
    metadata={"schema_version": str(SCHEMA_VERSION)},
)


def encode_crops(crops: torch.Tensor, encoding: Encoding, jpeg_quality: int = 95) -> list[bytes]:
    """uint8 ``(N, 3, K, K)`` crops to ``N`` byte strings.

    ``jpeg``: baseline JPEG at ``jpeg_quality``, 4:2:0 chroma subsampling (libjpeg-turbo through
    ``torchvision.io.encode_jpeg``: the same bytes as Pillow, without its per-image array copies); ``png``:
    lossless, zlib level 6 (Pillow); ``raw``: the ``(3, K, K)`` uint8 array in C order. Encodes on the CPU
    (CUDA crops are copied over first).
    """
    if crops.dtype != torch.uint8 or crops.dim() != 4 or crops.shape[1] != 3:
        raise ValueError(f"expected uint8 (N, 3, K, K) crops, got {crops.dtype} {tuple(crops.shape)}")
    crops = crops.cpu()  # any memory layout: the encoders take (3, K, K) views and write C-order bytes
    if encoding == "jpeg":
        return [e.numpy().tobytes() for e in encode_jpeg(list(crops), quality=jpeg_quality)] if len(crops) else []
    array = crops.numpy()
    if encoding == "raw":
        return [array[i].tobytes() for i in range(array.shape[0])]
    if encoding != "png":
        raise ValueError(f"unknown encoding {encoding!r}: use png, jpeg or raw")
    encoded = []
    for hwc in array.transpose(0, 2, 3, 1):
        sink = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(hwc), "RGB").save(sink, format="PNG", compress_level=6)
        encoded.append(sink.getvalue())
    return encoded


def decode_crop(data: bytes, encoding: Encoding, size: int) -> torch.Tensor:
    """One encoded crop back to a uint8 ``(3, size, size)`` tensor."""
    if encoding == "raw":
        return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).reshape(3, size, size).copy())
    if encoding in ("png", "jpeg"):
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    raise ValueError(f"unknown encoding {encoding!r}: use png, jpeg or raw")


def table_bytes(table: pa.Table) -> bytes:
    """``table`` as one Parquet file in memory (small tables only: errors)."""
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()
