"""ImageFolder trees (``<root>/<class>/<image>``), local or ``s3://``: a sorted index and a torch Dataset."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pyarrow.fs as pafs
import torch
from torch.utils.data import Dataset

from anchornet import storage
from anchornet.preprocessing import ImageDecodeError, Preprocessing, decode_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "ImageFolderIndex",
    "evenly_spaced",
    "holdout_digest",
    "holdout_indices",
    "scan_image_folder",
]

T = TypeVar("T")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


@dataclass(frozen=True)
class ImageFolderIndex:
    """Every image of a tree in a fixed order: classes sorted by name, files sorted within a class.

    ``items[i] = (relative_path, label)`` with ``relative_path = "<class>/<file>"`` (the image id).
    """

    root: str
    classes: list[str]
    items: list[tuple[str, int]]

    def __len__(self) -> int:
        return len(self.items)

    def uri(self, index: int) -> str:
        return storage.join(self.root, *self.items[index][0].split("/"))


def scan_image_folder(
    root: str | os.PathLike[str],
    classes: Sequence[str] | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> ImageFolderIndex:
    """Index ``<root>/<class>/<image>``; files with other extensions are ignored, case-insensitively.

    ``classes`` fixes the class list (a checkpoint's, say): a class directory not in it is an error, and a
    listed class without a directory simply has no images. Raises ``FileNotFoundError`` for a missing root
    and ``ValueError`` for a tree with no class directories or no images.
    """
    fs, path = storage.resolve(root)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound and not (storage.is_remote(root) and _has_children(fs, path)):
        raise FileNotFoundError(f"input not found: {root}")
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    try:
        paths = [entry.path for entry in entries]
    except UnicodeDecodeError as err:  # pyarrow decodes each name as UTF-8 when asked for it
        where = "" if storage.is_remote(root) else f" ({_first_undecodable(path)})"
        raise ValueError(f"a name under {root} is not valid UTF-8{where}: rename it") from err
    suffixes = tuple(e.lower() for e in extensions)
    found: dict[str, list[str]] = {}
    for entry, entry_path in zip(entries, paths, strict=True):
        rel = entry_path[len(path) :].lstrip("/")
        parts = rel.split("/")
        if entry.type == pafs.FileType.Directory and len(parts) == 1:
            found.setdefault(parts[0], [])
        elif entry.type == pafs.FileType.File and len(parts) == 2 and parts[1].lower().endswith(suffixes):
            found.setdefault(parts[0], []).append(parts[1])
    found = {name: files for name, files in found.items() if not name.startswith(".")}
    if not found:
        raise ValueError(f"no class directories under {root}: expected <root>/<class>/<image>")
    if classes is None:
        classes = sorted(found)
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"class directories not in the given class list under {root}: {', '.join(unknown[:5])}")
        classes = list(classes)
    label = {name: i for i, name in enumerate(classes)}
    items = [(f"{name}/{file}", label[name]) for name in sorted(found) for file in sorted(found[name])]
    items.sort(key=lambda item: (item[1], item[0]))
    if not items:
        raise ValueError(f"no images under {root} (extensions: {', '.join(extensions)})")
    return ImageFolderIndex(root=str(root), classes=list(classes), items=items)


def evenly_spaced(items: Sequence[T], count: int) -> list[T]:
    """``count`` of ``items`` evenly spaced over them, in order (all of them when there are fewer): item
    ``floor(i * n / count)`` for ``i < count``. An index is sorted by class, so its first ``count`` would be one
    or two classes."""
    n = len(items)
    count = min(count, n)
    return [items[i * n // count] for i in range(count)]


def holdout_indices(index: ImageFolderIndex, size: int, seed: int) -> list[int]:
    """The held-out images of ``index`` (MSDNet's budgeted protocol): ``size`` of them drawn without replacement
    with ``seed``, as sorted positions in ``index``; all of them when ``size >= len(index)``, none for 0.

    A function of the image count and ``seed`` only (a seeded CPU ``torch.randperm``, the same in every process
    and on every machine with the same torch), so the training jobs (which leave these images out) and
    ``jobs/evaluate.py`` (which fits the thresholds on them) pick the same images of the same tree. A smaller
    ``size`` with the same seed picks a subset of a larger one's images.
    """
    if size < 0:
        raise ValueError(f"holdout size must be >= 0, got {size}")
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(len(index), generator=generator)[: min(size, len(index))].tolist())


def holdout_digest(image_ids: Iterable[str]) -> str:
    """sha256 of the sorted image ids (``"<class>/<file>"``): names a held-out set in a checkpoint card."""
    return hashlib.sha256("\n".join(sorted(image_ids)).encode()).hexdigest()


def _first_undecodable(path: str) -> str:
    """The first path under local ``path`` whose name is not UTF-8, as Python shows it (undecodable bytes escaped)."""
    for folder, dirs, files in os.walk(os.fsencode(path)):
        for name in sorted(dirs + files):
            try:
                name.decode("utf-8")
            except UnicodeDecodeError:
                return os.path.join(folder, name).decode("utf-8", "backslashreplace")
    return "name not found"


def _has_children(fs: pafs.FileSystem, path: str) -> bool:
    try:
        return bool(fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True)))
    except OSError:
        return False


class ImageFolderDataset(Dataset):
    """Decoded, preprocessed images of an ``ImageFolderIndex``: ``(uint8 (3, S, S), label)`` pairs.

    ``transform`` (if given) runs on the decoded RGB PIL image instead of ``preprocessing``, for training
    augmentation; it must return a ``(3, S, S)`` tensor.

    The paths and labels are read from two flat arrays, not from ``index.items``: DataLoader processes fork from
    the one that built the dataset, and reading a list of Python tuples writes their reference counts, which
    copies every page of it into each process (1.28 M ImageNet paths: 2 MB -> 179 MB private memory per loader
    process over an epoch). A ``bytes`` blob and two numpy arrays stay shared.
    """

    def __init__(
        self,
        index: ImageFolderIndex,
        preprocessing: Preprocessing | None = None,
        transform: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        self.index = index
        self.transform = transform or preprocessing or Preprocessing()
        encoded = [rel.encode() for rel, _ in index.items]
        self._paths = b"".join(encoded)
        self._offsets = np.cumsum([0, *map(len, encoded)], dtype=np.int64)
        self._labels = np.fromiter((label for _, label in index.items), dtype=np.int64, count=len(index.items))

    def __len__(self) -> int:
        return len(self._labels)

    def _position(self, i: int) -> int:
        """``i`` as a position in ``[0, len)`` (negative counts from the end); ``IndexError`` past either end, which
        also ends iteration over the dataset."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        return i % len(self)

    def _uri_of(self, i: int) -> tuple[str, int]:
        """The URI and label of image ``i``."""
        i = self._position(i)
        rel = self._paths[self._offsets[i] : self._offsets[i + 1]].decode()
        return storage.join(self.index.root, *rel.split("/")), int(self._labels[i])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Raises ``ImageDecodeError`` naming the file when it does not decode."""
        uri, label = self._uri_of(i)
        try:
            image = decode_image(storage.read_bytes(uri))
        except ImageDecodeError as err:
            raise ImageDecodeError(f"{uri}: {err}") from err
        return self.transform(image), label
