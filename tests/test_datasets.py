"""anchornet.datasets: the Imagenette download against a local HTTP server on 127.0.0.1, and subsets."""

from __future__ import annotations

import hashlib
import http.server
import io
import shutil
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from _helpers import synthetic_tree

from anchornet.datasets import (
    IMAGENETTE_160_MD5,
    IMAGENETTE_160_URL,
    ChecksumError,
    DatasetError,
    DatasetUnavailableError,
    UnsafeArchiveError,
    default_cache_dir,
    download_imagenette,
    subset_image_folder,
)
from anchornet.image_folder import holdout_indices, scan_image_folder
from pipelines.train_data import scan_splits

CLASSES = ("n01440764", "n02102040")


def _tgz(members: dict[str, bytes], top: str = "imagenette2-160") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _tree(train: int = 3, val: int = 2) -> dict[str, bytes]:
    files = {}
    for cls in CLASSES:
        for split, n in (("train", train), ("val", val)):
            for i in range(n):
                files[f"{split}/{cls}/{cls}_{i}.JPEG"] = f"{split}{cls}{i}".encode()
    files["noisy_imagenette.csv"] = b"path,label\n"
    return files


class _Server:
    """Serves ``files`` (name -> bytes) on 127.0.0.1 from a thread and counts the requests.

    ``cut[name] = n`` sends only the first n bytes and closes the connection (announcing the full length unless
    ``name`` is in ``no_length``, which sends no ``Content-Length``): a transfer broken half way.
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.requests = files, 0
        self.cut: dict[str, int] = {}
        self.no_length: set[str] = set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                name = self.path.lstrip("/")
                data = server.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                if name not in server.no_length:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: server.cut.get(name, len(data))])
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Server]:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    s = _Server({"imagenette2-160.tgz": _tgz(_tree())})
    yield s
    s.close()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_verify_extract(server: _Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = server.files["imagenette2-160.tgz"]
    root = download_imagenette(tmp_path, url=server.url("imagenette2-160.tgz"), sha256=_sha256(data))
    assert root == tmp_path / "imagenette2-160"
    assert (root / "train" / CLASSES[0] / f"{CLASSES[0]}_0.JPEG").read_bytes() == f"train{CLASSES[0]}0".encode()
    index = scan_image_folder(root / "val")
    assert index.classes == list(CLASSES) and len(index) == 4
    assert (tmp_path / "imagenette2-160.tgz").read_bytes() == data  # kept: a deleted tree is re-extracted offline
    assert "[download] imagenette2-160.tgz" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_rerun_skips_the_download(server: _Server, tmp_path: Path) -> None:
    url = server.url("imagenette2-160.tgz")
    first = download_imagenette(tmp_path, url=url, progress=False)
    assert server.requests == 1
    assert download_imagenette(tmp_path, url=url, progress=False) == first
    assert server.requests == 1
    # The tree deleted: re-extracted from the verified archive in the cache, still no request.
    shutil.rmtree(first)
    assert download_imagenette(tmp_path, url=url, progress=False) == first
    assert (first / "val").is_dir() and server.requests == 1


def test_bad_checksum_is_refused(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(ChecksumError, match="SHA-256") as err:
        download_imagenette(tmp_path, url=server.url("imagenette2-160.tgz"), sha256="0" * 64, progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "imagenette2-160").exists() and not (tmp_path / "imagenette2-160.tgz").exists()
    with pytest.raises(ChecksumError, match="MD5"):
        download_imagenette(tmp_path, url=server.url("imagenette2-160.tgz"), md5="0" * 32, progress=False)


def test_first_download_recorded_then_verified(server: _Server, tmp_path: Path) -> None:
    url = server.url("imagenette2-160.tgz")
    data = server.files["imagenette2-160.tgz"]
    download_imagenette(tmp_path, url=url, progress=False)  # sha256=None: trust on first use, recorded
    assert (tmp_path / "imagenette2-160.tgz.sha256").read_text().strip() == _sha256(data)
    # Upstream (or a man in the middle) now serves other bytes: a fresh fetch is refused against the record.
    server.files["imagenette2-160.tgz"] = _tgz(_tree(train=4))
    (tmp_path / "imagenette2-160.extracted.json").unlink()
    (tmp_path / "imagenette2-160.tgz").write_bytes(b"corrupted")
    with pytest.raises(ChecksumError, match=r"delete .*imagenette2-160\.tgz\.sha256"):
        download_imagenette(tmp_path, url=url, progress=False)


def test_offline_is_one_line_naming_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DatasetUnavailableError) as err:
        download_imagenette(tmp_path, url=f"http://127.0.0.1:{port}/imagenette2-160.tgz", timeout=5)
    message = str(err.value)
    assert "\n" not in message and "--data DIR" in message and "refused" in message.lower()
    assert not list(tmp_path.iterdir())  # no partial download left


def test_short_download_leaves_nothing(server: _Server, tmp_path: Path) -> None:
    url, data = server.url("imagenette2-160.tgz"), server.files["imagenette2-160.tgz"]
    server.cut["imagenette2-160.tgz"] = half = len(data) // 2
    with pytest.raises(DatasetUnavailableError, match=rf"after {half} of {len(data)} bytes.*--data DIR") as err:
        download_imagenette(tmp_path, url=url, progress=False)
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())  # no archive, no temporary file, no .sha256 record
    server.cut.clear()  # the network recovers: the next run downloads and records the right archive
    assert (download_imagenette(tmp_path, url=url, progress=False) / "val").is_dir()
    assert (tmp_path / "imagenette2-160.tgz.sha256").read_text().strip() == _sha256(data)


def test_archive_that_does_not_extract_is_not_trusted(server: _Server, tmp_path: Path) -> None:
    """No Content-Length to check, no pinned hash: a truncated first download must not jam the cache."""
    url, data = server.url("imagenette2-160.tgz"), server.files["imagenette2-160.tgz"]
    server.no_length.add("imagenette2-160.tgz")
    server.cut["imagenette2-160.tgz"] = len(data) // 2
    with pytest.raises(DatasetError, match=r"cannot extract .*the archive was deleted") as err:
        download_imagenette(tmp_path, url=url, progress=False)
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())  # no archive and no .sha256 record of it
    server.cut.clear()
    assert (download_imagenette(tmp_path, url=url, progress=False) / "val").is_dir()
    assert (tmp_path / "imagenette2-160.tgz.sha256").read_text().strip() == _sha256(data)
    assert server.requests == 2


def test_cache_jammed_by_a_recorded_broken_archive_recovers(server: _Server, tmp_path: Path) -> None:
    """A cache left by an earlier version: a truncated archive with its SHA-256 recorded as trusted."""
    url, data = server.url("imagenette2-160.tgz"), server.files["imagenette2-160.tgz"]
    broken = data[: len(data) // 2]
    (tmp_path / "imagenette2-160.tgz").write_bytes(broken)
    (tmp_path / "imagenette2-160.tgz.sha256").write_text(_sha256(broken) + "\n")
    with pytest.raises(DatasetError, match=r"cannot extract .*the archive was deleted"):
        download_imagenette(tmp_path, url=url, progress=False)
    assert not list(tmp_path.iterdir()) and server.requests == 0
    assert (download_imagenette(tmp_path, url=url, progress=False) / "val").is_dir()
    assert (tmp_path / "imagenette2-160.tgz.sha256").read_text().strip() == _sha256(data)


def test_http_error_is_unavailable(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError, match=r"HTTP 404.*--data DIR"):
        download_imagenette(tmp_path, url=server.url("missing.tgz"), progress=False)


@pytest.mark.parametrize(
    "evil",
    [
        "imagenette2-160/../../escaped.txt",  # path traversal
        "/tmp/anchornet-absolute.txt",  # absolute path
    ],
)
def test_unsafe_archive_is_refused(server: _Server, tmp_path: Path, evil: str) -> None:
    data = _tgz({**{f"imagenette2-160/{k}": v for k, v in _tree().items()}, evil: b"gotcha"}, top="")
    server.files["evil.tgz"] = data
    cache = tmp_path / "cache"
    with pytest.raises(UnsafeArchiveError, match="refused unsafe member"):
        download_imagenette(cache, url=server.url("evil.tgz"), sha256=_sha256(data), progress=False)
    assert not (tmp_path / "escaped.txt").exists() and not (cache / "evil").exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_symlink_out_of_the_archive_is_refused(server: _Server, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        link = tarfile.TarInfo("imagenette2-160/train/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    server.files["link.tgz"] = buffer.getvalue()
    with pytest.raises(UnsafeArchiveError):
        download_imagenette(tmp_path, url=server.url("link.tgz"), progress=False)


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    "links",
    [
        # A symlink to a directory inside the tree, then a file written through it (CVE-2025-4517 chains these).
        [_link("imagenette2-160/train/up", ".."), ("imagenette2-160/train/up/escaped.txt", b"gotcha")],
        # Chained symlinks, each one resolving inside the destination on its own.
        [
            _link("imagenette2-160/a", "train"),
            _link("imagenette2-160/a/b", "../val"),
            _link("imagenette2-160/c", "a/b"),
        ],
        # A hard link to a file of the archive.
        [
            _link(
                "imagenette2-160/train/copy.JPEG",
                f"imagenette2-160/train/{CLASSES[0]}/{CLASSES[0]}_0.JPEG",
                tarfile.LNKTYPE,
            )
        ],
    ],
    ids=["symlink-then-file", "symlink-chain", "hard-link"],
)
def test_links_in_the_archive_are_refused(
    server: _Server, tmp_path: Path, links: list[tarfile.TarInfo | tuple[str, bytes]]
) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in _tree().items():
            info = tarfile.TarInfo(f"imagenette2-160/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for item in links:
            if isinstance(item, tarfile.TarInfo):
                tar.addfile(item)
            else:
                info = tarfile.TarInfo(item[0])
                info.size = len(item[1])
                tar.addfile(info, io.BytesIO(item[1]))
    server.files["links.tgz"] = data = buffer.getvalue()
    cache = tmp_path / "cache"
    with pytest.raises(
        UnsafeArchiveError, match=r"refused unsafe member \('imagenette2-160/.*' is a (symlink|hard link);"
    ) as err:
        download_imagenette(cache, url=server.url("links.tgz"), sha256=_sha256(data), progress=False)
    assert "\n" not in str(err.value)
    assert not (cache / "links").exists() and not (tmp_path / "escaped.txt").exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # nothing extracted, even to staging


def test_archive_without_splits(server: _Server, tmp_path: Path) -> None:
    server.files["flat.tgz"] = _tgz({"a/x.JPEG": b"x"}, top="flat")
    with pytest.raises(DatasetError, match="no train/ and val/"):
        download_imagenette(tmp_path, url=server.url("flat.tgz"), progress=False)


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ANCHORNET_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("ANCHORNET_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "anchornet"
    assert IMAGENETTE_160_URL == "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz"
    # The MD5 is the one torchvision publishes for the same archive (not made up here).
    from torchvision.datasets import Imagenette

    archives = getattr(Imagenette, "_ARCHIVES", None)
    if archives is None:
        pytest.skip("torchvision no longer exposes Imagenette._ARCHIVES")
    assert archives["160px"] == (IMAGENETTE_160_URL, IMAGENETTE_160_MD5)


# ---------------------------------------------------------------------------------------------------------------
# Subsets.


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for name, data in _tree(train=6, val=4).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "train" / CLASSES[0] / "notes.txt").write_text("not an image")
    return root


def test_subset_is_deterministic_symlinks(tree: Path, tmp_path: Path) -> None:
    a = subset_image_folder(tree, tmp_path / "a", 2, 1, seed=0)
    b = subset_image_folder(tree, tmp_path / "b", 2, 1, seed=0)
    files_a = sorted(str(p.relative_to(a)) for p in a.rglob("*.JPEG"))
    assert files_a == sorted(str(p.relative_to(b)) for p in b.rglob("*.JPEG"))
    assert len(files_a) == 2 * 2 + 2 * 1
    assert all((a / f).is_symlink() for f in files_a)
    index = scan_image_folder(a / "train")  # what the jobs read: the symlinks are followed
    assert index.classes == list(CLASSES) and len(index) == 4
    c = subset_image_folder(tree, tmp_path / "c", 2, 1, seed=1)
    assert sorted(str(p.relative_to(c)) for p in c.rglob("*.JPEG")) != files_a


def test_subset_all_copy_and_rebuild(tree: Path, tmp_path: Path) -> None:
    dst = subset_image_folder(tree, tmp_path / "s", None, 100, copy=True)
    assert len(list(dst.rglob("*.JPEG"))) == 2 * 6 + 2 * 4
    assert not any(p.is_symlink() for p in dst.rglob("*.JPEG"))
    stamp = (dst / "subset.json").stat().st_mtime_ns
    assert subset_image_folder(tree, dst, None, 100, copy=True) == dst
    assert (dst / "subset.json").stat().st_mtime_ns == stamp  # same request: untouched
    subset_image_folder(tree, dst, 1, 1)  # another request: rebuilt
    assert len(list(dst.rglob("*.JPEG"))) == 4


def test_subset_refuses_foreign_dirs_and_bad_input(tree: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not made by subset_image_folder"):
        subset_image_folder(tree, foreign, 1, 1)
    assert (foreign / "keep.txt").read_text() == "mine"
    with pytest.raises(DatasetError, match="--data DIR"):
        subset_image_folder(tree / "train", tmp_path / "x", 1, 1)
    with pytest.raises(ValueError, match="per_class_train"):
        subset_image_folder(tree, tmp_path / "x", 0, 1)


# ---------------------------------------------------------------------------------------------------------------
# Held-out images (pipelines.train_data.scan_splits).


def test_held_out_images_must_leave_every_class_an_image(tmp_path: Path) -> None:
    root = synthetic_tree(tmp_path / "data", train=5, val=1)  # 2 classes x 5 train images
    index = scan_image_folder(root / "train")
    cls_b = [i for i, (_, label) in enumerate(index.items) if label == 1]
    assert set(cls_b) <= set(holdout_indices(index, 6, 2))  # the draw takes every image of cls_b
    with pytest.raises(ValueError) as info:
        scan_splits(str(root), holdout_size=6, holdout_seed=2)
    message = str(info.value)
    assert message.startswith("--holdout-size 6 with --holdout-seed 2 holds out every train/ image of class cls_b")
    assert "\n" not in message
    splits = scan_splits(str(root), holdout_size=2, holdout_seed=2)
    assert {label for _, label in splits.train.items} == {0, 1} and len(splits.holdout) == 2
