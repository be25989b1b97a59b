"""Local and s3:// storage behind one interface (S3 against a real local server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from anchornet import storage


def test_local_roundtrip_is_atomic_and_creates_parents(tmp_path: Path) -> None:
    uri = tmp_path / "a" / "b" / "c.bin"
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"one")
    storage.write_bytes(uri, b"two")
    assert storage.read_bytes(uri) == b"two"
    assert sorted(p.name for p in uri.parent.iterdir()) == ["c.bin"], "no temporary file left behind"


def test_missing_file_says_which(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.bin"):
        storage.read_bytes(tmp_path / "nope.bin")


def test_join_keeps_the_scheme() -> None:
    assert storage.join("s3://bucket/runs/", "x", "y.pt") == "s3://bucket/runs/x/y.pt"
    assert storage.join("/tmp/runs", "y.pt") == "/tmp/runs/y.pt"
    assert storage.is_remote("s3://b/k") and not storage.is_remote("/b/k")


def test_a_file_uri_is_the_same_place_as_its_path(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}"
    assert storage.join(uri, "a", "b.bin") == str(tmp_path / "a" / "b.bin")
    storage.write_bytes(storage.join(uri, "a", "b.bin"), b"x")
    assert storage.read_bytes(tmp_path / "a" / "b.bin") == b"x"
    assert storage.exists(storage.join(uri, "a", "b.bin"))
    assert storage.resolve(storage.join(uri, "a"))[1] == storage.resolve(tmp_path / "a")[1]


def test_unknown_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        storage.resolve("gs://bucket/key")


@pytest.mark.slow
def test_s3_roundtrip(s3_bucket: str) -> None:
    uri = storage.join(s3_bucket, "dir", "blob.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"\x00payload")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"\x00payload"
    with pytest.raises(FileNotFoundError, match=r"missing\.bin"):
        storage.read_bytes(storage.join(s3_bucket, "missing.bin"))


def test_one_s3_client_per_process_and_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new client per read opened a new connection per image; the same process and environment share one."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    first = storage.s3_filesystem()
    assert storage.s3_filesystem() is first and storage.resolve("s3://b/k")[0] is first
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "another-key")  # other credentials: another client
    other = storage.s3_filesystem()
    assert other is not first and _endpoint(other) == _endpoint(first) == "127.0.0.1:9"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:10")
    assert _endpoint(storage.s3_filesystem()) == "127.0.0.1:10"
    parent = storage.s3_filesystem()
    monkeypatch.setattr(storage.os, "getpid", lambda: -1)  # a forked child: its own client
    child = storage.s3_filesystem()
    assert child is not parent and storage.s3_filesystem() is child


def _endpoint(fs: object) -> str:
    return fs.__reduce__()[1][0]["endpoint_override"]  # type: ignore[attr-defined]  # pyarrow keeps it there only
