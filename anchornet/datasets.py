"""Getting a small real dataset: Imagenette (imagenette2-160) from its authors, and reproducible subsets.

``download_imagenette`` fetches the public archive that fast.ai publishes (10 easy ImageNet classes, shorter
side 160 px, 94 MiB) into a cache directory, verifies it, extracts it safely and returns the ImageFolder root
(``ROOT/train/<wnid>/<image>``, ``ROOT/val/<wnid>/<image>``). ``subset_image_folder`` makes a small,
deterministic per-class subset of such a tree out of symlinks. Standard library only; no network in tests.

Verification. The authors publish no SHA-256, and none is invented here: the archive's MD5 as recorded by
torchvision (``torchvision.datasets.Imagenette``) checks the first download, whose SHA-256 is then recorded
beside the archive (``<archive>.sha256``) once it has extracted, and checked on every later use. Pass
``sha256=`` to pin it instead. A download shorter than its ``Content-Length`` is refused, and an archive that
does not extract is deleted, so a broken transfer never stays in the cache.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath
from typing import IO

from anchornet.image_folder import IMAGE_EXTENSIONS

__all__ = [
    "IMAGENETTE_160_MD5",
    "IMAGENETTE_160_URL",
    "ChecksumError",
    "DatasetError",
    "DatasetUnavailableError",
    "UnsafeArchiveError",
    "default_cache_dir",
    "download_imagenette",
    "subset_image_folder",
]

IMAGENETTE_160_URL = "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz"
IMAGENETTE_160_MD5 = "e793b78cc4c9e9a4ccc0c1155377a412"  # torchvision.datasets.Imagenette._ARCHIVES["160px"]
CACHE_ENV = "ANCHORNET_CACHE"
DATA_HINT = "pass --data DIR with an ImageFolder tree (DIR/train/<class>/<image>, DIR/val/<class>/<image>)"
_CHUNK = 1 << 20


class DatasetError(RuntimeError):
    """A dataset could not be provided; the message is one line for the user."""


class DatasetUnavailableError(DatasetError):
    """The download failed (offline, blocked, HTTP error); the message says how to pass ``--data``."""


class ChecksumError(DatasetError):
    """The downloaded or cached archive is not the expected one."""


class UnsafeArchiveError(DatasetError):
    """The archive holds a member that would land outside the extraction directory, a link or a device."""


def default_cache_dir() -> Path:
    """``$ANCHORNET_CACHE``, else ``~/.cache/anchornet``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "anchornet").expanduser()


def download_imagenette(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    url: str = IMAGENETTE_160_URL,
    sha256: str | None = None,
    md5: str | None = None,
    progress: bool = True,
    timeout: float = 30.0,
) -> Path:
    """Download, verify and extract the archive at ``url`` into ``cache_dir``; the tree's root (with train/, val/).

    Idempotent: a tree already extracted from an archive with the expected SHA-256 is returned at once; an
    archive already in the cache is verified and extracted without downloading. ``sha256=None`` trusts the
    first download that passes ``md5`` (by default the published MD5 of ``IMAGENETTE_160_URL``; nothing for
    another URL) and extracts, records its SHA-256 in ``<archive>.sha256`` and holds every later use to it. A
    short download (fewer bytes than its ``Content-Length``) leaves no file; an archive that fails to extract
    is deleted (with an unpinned record of it), so the next run downloads it again.

    Raises ``DatasetUnavailableError`` when the download fails, ``ChecksumError`` and ``UnsafeArchiveError``;
    every message is one line.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = Path(urllib.parse.urlparse(url).path).name or "dataset.tgz"
    stem = name.removesuffix(".tgz").removesuffix(".tar.gz").removesuffix(".tar")
    archive, tree, marker = cache / name, cache / stem, cache / f"{stem}.extracted.json"
    record = cache / f"{name}.sha256"
    if md5 is None and url == IMAGENETTE_160_URL:
        md5 = IMAGENETTE_160_MD5
    expected = (sha256 or (record.read_text().strip() if record.is_file() else "")).lower() or None

    if marker.is_file() and _is_image_folder_root(tree):
        done = json.loads(marker.read_text())
        if expected is None or done.get("sha256") == expected:
            return tree

    cache.mkdir(parents=True, exist_ok=True)
    digest = None
    if archive.is_file():
        digests = _hash_file(archive)
        if _verified(digests, expected, md5):
            digest = digests["sha256"]
        else:
            archive.unlink()  # a stale or corrupted download: fetch it again
    if digest is None:
        digests = _download(url, archive, progress=progress, timeout=timeout)
        problem = _mismatch(digests, expected, md5)
        if problem:
            archive.unlink()
            hint = f"; delete {record} to accept a new archive" if sha256 is None and expected else ""
            raise ChecksumError(f"{url}: {problem}; the download was deleted{hint}")
        digest = digests["sha256"]
    try:
        _extract(archive, tree)
    except DatasetError as err:  # kept, the same bytes would fail on every run: fetch them again next time
        archive.unlink(missing_ok=True)
        if sha256 is None:
            record.unlink(missing_ok=True)  # it trusted an archive that does not extract (a truncated first download)
        raise type(err)(f"{err}; the archive was deleted") from err
    if expected is None:  # trust on first use, but only an archive that extracted
        record.write_text(digest + "\n")
    marker.write_text(json.dumps({"url": url, "sha256": digest, "root": str(tree)}) + "\n")
    return tree


def _verified(digests: dict[str, str], sha256: str | None, md5: str | None) -> bool:
    return not _mismatch(digests, sha256, md5)


def _mismatch(digests: dict[str, str], sha256: str | None, md5: str | None) -> str | None:
    if sha256 is not None and digests["sha256"] != sha256:
        return f"SHA-256 {digests['sha256']} != expected {sha256}"
    if sha256 is None and md5 is not None and digests["md5"] != md5.lower():
        return f"MD5 {digests['md5']} != published {md5}"
    return None


def _hash_file(path: Path) -> dict[str, str]:
    sha, md = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            md.update(chunk)
    return {"sha256": sha.hexdigest(), "md5": md.hexdigest()}


def _download(url: str, archive: Path, *, progress: bool, timeout: float) -> dict[str, str]:
    """Stream ``url`` to a temporary file beside ``archive`` while hashing it; rename it into place."""
    sha, md = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with tempfile.NamedTemporaryFile(dir=archive.parent, prefix=f".{archive.name}.", delete=False) as f:
        part = Path(f.name)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                length = _content_length(response.headers.get("Content-Length"))
                report, received = _Progress(archive.name, length or 0, sys.stderr), 0
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    sha.update(chunk)
                    md.update(chunk)
                    received += len(chunk)
                    if progress:
                        report.update(len(chunk))
                if progress:
                    report.close()
                if length is not None and received != length:
                    raise DatasetUnavailableError(
                        f"cannot download {url} (the connection closed after {received} of {length} bytes); "
                        f"try again, or {DATA_HINT}"
                    )
        except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as err:
            part.unlink()
            reason = f"HTTP {err.code}" if isinstance(err, urllib.error.HTTPError) else getattr(err, "reason", err)
            raise DatasetUnavailableError(f"cannot download {url} ({_one_line(reason)}); offline? {DATA_HINT}") from err
        except BaseException:
            part.unlink()
            raise
    os.replace(part, archive)
    return {"sha256": sha.hexdigest(), "md5": md.hexdigest()}


def _content_length(value: str | None) -> int | None:
    """The ``Content-Length`` header as a byte count; ``None`` when absent or not a number."""
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class _Progress:
    """``[download] NAME 12.0/94.4 MiB (13%) 6.1 MiB/s``: rewritten in place on a terminal, else a line per 10%."""

    def __init__(self, name: str, total: int, stream: IO[str]) -> None:
        self.name, self.total, self.stream = name, total, stream
        self.done, self.started, self.last = 0, time.monotonic(), -1.0
        self.tty = stream.isatty()

    def update(self, n: int) -> None:
        self.done += n
        if self.tty:
            tick, every = time.monotonic() - self.started, 0.5
        else:  # tenths of the total, or 10 MiB steps when the server sends no length
            tick, every = (10 * self.done // self.total if self.total else self.done // (10 * 2**20)), 1
        if tick - self.last >= every:
            self.last = tick
            self._write()

    def close(self) -> None:
        if self.tty or not self.total:
            self._write(final=True)

    def _write(self, final: bool = False) -> None:
        mib = self.done / 2**20
        rate = mib / max(time.monotonic() - self.started, 1e-6)
        of = f"/{self.total / 2**20:.1f} MiB ({100 * self.done // self.total}%)" if self.total else " MiB"
        start, end = ("\r", "\n" if final else "") if self.tty else ("", "\n")
        self.stream.write(f"{start}[download] {self.name} {mib:.1f}{of} {rate:.1f} MiB/s{end}")
        self.stream.flush()


def _extract(archive: Path, tree: Path) -> None:
    """Extract into ``tree``: regular files and directories only, no absolute names or ``..``, through tarfile's
    ``data`` filter as well. Links are refused outright (an image dataset has none): the filter alone can be
    walked out of with chains of symlinks on Pythons without the CVE-2025-4517 fix (3.11.7, say)."""
    if not hasattr(tarfile, "data_filter"):  # Python < 3.10.12 / 3.11.4
        raise DatasetError(f"extracting {archive.name} safely needs Python >= 3.10.12 (tarfile filters)")
    staging = Path(tempfile.mkdtemp(dir=archive.parent, prefix=f".{tree.name}.extracting-"))
    try:
        try:
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():  # stricter than the filter, which makes absolute names relative
                    if member.name.startswith(("/", "\\")) or ".." in PurePosixPath(member.name).parts:
                        raise tarfile.FilterError(f"{member.name!r} points outside the archive")
                    if not (member.isreg() or member.isdir()):
                        what = "a symlink" if member.issym() else "a hard link" if member.islnk() else "a device"
                        raise tarfile.FilterError(f"{member.name!r} is {what}; only files and directories are allowed")
                tar.extractall(staging, filter="data")
        except tarfile.FilterError as err:
            raise UnsafeArchiveError(f"{archive.name}: refused unsafe member ({_one_line(err)})") from err
        except (tarfile.TarError, EOFError, OSError) as err:
            raise DatasetError(f"{archive.name}: cannot extract ({_one_line(err)})") from err
        root = _find_root(staging)
        if root is None:
            raise DatasetError(f"{archive.name} holds no train/ and val/ directories")
        if tree.exists():
            shutil.rmtree(tree)
        os.replace(root, tree)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _find_root(directory: Path) -> Path | None:
    """The directory with train/ and val/: ``directory`` itself or its single top-level folder."""
    if _is_image_folder_root(directory):
        return directory
    children = [p for p in directory.iterdir() if p.is_dir()]
    return children[0] if len(children) == 1 and _is_image_folder_root(children[0]) else None


def _is_image_folder_root(path: Path) -> bool:
    return (path / "train").is_dir() and (path / "val").is_dir()


def _one_line(value: object) -> str:
    return " ".join(str(value).split())


# ---------------------------------------------------------------------------------------------------------------
# Subsets.

SUBSET_MANIFEST = "subset.json"


def subset_image_folder(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    per_class_train: int | None,
    per_class_val: int | None,
    seed: int = 0,
    *,
    copy: bool = False,
) -> Path:
    """A deterministic subset of the ImageFolder root ``src`` (train/ and val/) at ``dst``; returns ``dst``.

    Takes ``per_class_train`` / ``per_class_val`` images of every class (all of them for ``None`` or when a
    class has fewer), drawn with ``seed``, as symlinks to the originals (``copy=True``, or where symlinks are
    not allowed: copies). ``dst/subset.json`` records the request: the same request again returns at once, a
    different one rebuilds ``dst``. A non-empty ``dst`` without that record is never touched.
    """
    src_root, dst_root = Path(src).expanduser().resolve(), Path(dst).expanduser()
    if not _is_image_folder_root(src_root):
        raise DatasetError(f"{src} is not an ImageFolder root with train/ and val/; {DATA_HINT}")
    for name, n in (("per_class_train", per_class_train), ("per_class_val", per_class_val)):
        if n is not None and n < 1:
            raise ValueError(f"{name} must be at least 1 (or None for all), got {n}")
    request = {
        "src": str(src_root),
        "per_class": {"train": per_class_train, "val": per_class_val},
        "seed": seed,
        "copy": copy,
    }
    manifest = dst_root / SUBSET_MANIFEST
    if manifest.is_file():
        if json.loads(manifest.read_text()).get("request") == request:
            return dst_root
        shutil.rmtree(dst_root)
    elif dst_root.exists() and any(dst_root.iterdir()):
        raise DatasetError(f"{dst} exists and was not made by subset_image_folder: choose another directory")

    dst_root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dst_root.parent, prefix=f".{dst_root.name}.subset-"))
    counts: dict[str, dict[str, int]] = {}
    try:
        for split, n in request["per_class"].items():
            counts[split] = {}
            classes = sorted(p.name for p in (src_root / split).iterdir() if p.is_dir())
            for cls in classes:
                files = sorted(
                    p.name for p in (src_root / split / cls).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
                )
                if n is not None and n < len(files):
                    files = random.Random(f"{seed}/{split}/{cls}").sample(files, n)
                (staging / split / cls).mkdir(parents=True)
                for file in sorted(files):
                    _place(src_root / split / cls / file, staging / split / cls / file, copy)
                counts[split][cls] = len(files)
        (staging / SUBSET_MANIFEST).write_text(json.dumps({"request": request, "counts": counts}, indent=1) + "\n")
        if dst_root.exists():
            dst_root.rmdir()  # empty, checked above
        os.replace(staging, dst_root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dst_root


def _place(source: Path, target: Path, copy: bool) -> None:
    if not copy:
        try:
            target.symlink_to(source)
            return
        except OSError:
            pass  # no symlinks here (Windows without the privilege, some file systems): copy instead
    shutil.copy2(source, target)
