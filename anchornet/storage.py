"""Local paths and ``s3://`` URIs behind one small interface, through ``pyarrow.fs``.

S3 credentials come from the standard AWS chain (environment, shared profile, instance role); nothing is
configured in code. ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) points at an S3-compatible server
such as MinIO or SeaweedFS, and ``AWS_REGION``/``AWS_DEFAULT_REGION`` sets the region. Without it the AWS SDK takes
the region from the profile or the EC2 instance's metadata: set it when a bucket lives in another region than the
nodes (pyarrow does not look a bucket's region up by itself; ``pyarrow.fs.resolve_s3_region(bucket)`` tells it).
"""

from __future__ import annotations

import atexit
import os
import posixpath
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

__all__ = [
    "exists",
    "is_remote",
    "join",
    "makedirs",
    "read_bytes",
    "resolve",
    "s3_filesystem",
    "write_bytes",
]


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """Whether ``uri`` names an object in S3 (``s3://bucket/key``)."""
    return str(uri).startswith("s3://")


#: The environment an S3 client is configured from (directly, or by the AWS SDK's credential chain): a process
#: whose environment changes gets a new client.
_S3_ENVIRONMENT = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)
_s3_clients: dict[tuple[str | None, ...], pafs.S3FileSystem] = {}
_s3_clients_pid: int | None = None
# Dropped at exit before pyarrow finalizes S3 (atexit runs last-registered first): clients still alive then can
# hang the interpreter's exit with some credential providers (apache/arrow#50188).
atexit.register(_s3_clients.clear)


def s3_filesystem() -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem on the default credential chain, honouring ``AWS_ENDPOINT_URL``.

    One per process and configuration (``_S3_ENVIRONMENT``), made on first use: each is an AWS SDK client with its
    own connection pool and credential lookup, and a new one for every read (``read_bytes`` of each training or
    evaluation image) opened a new connection per image, a TLS handshake each on AWS. A forked process (a
    DataLoader worker) makes its own rather than share its parent's sockets.
    """
    global _s3_clients_pid
    if _s3_clients_pid != os.getpid():
        _s3_clients.clear()
        _s3_clients_pid = os.getpid()
    key = tuple(os.environ.get(name) for name in _S3_ENVIRONMENT)
    client = _s3_clients.get(key)
    if client is None:
        client = _s3_clients[key] = _new_s3_filesystem()
    return client


def _new_s3_filesystem() -> pafs.S3FileSystem:
    kwargs: dict[str, object] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding ``uri`` and the path inside it (``bucket/key`` for S3, absolute for local)."""
    text = str(uri)
    if is_remote(text):
        return s3_filesystem(), text.removeprefix("s3://").rstrip("/")
    if "://" in text and not text.startswith("file://"):
        raise ValueError(f"unsupported URI scheme in {text!r}: use a local path or s3://bucket/key")
    return pafs.LocalFileSystem(), str(Path(text.removeprefix("file://")).expanduser().resolve())


def join(uri: str | os.PathLike[str], *parts: str) -> str:
    """``uri`` joined with ``parts``, keeping an ``s3://`` prefix; a ``file://`` URI becomes a plain path."""
    text = str(uri)
    if is_remote(text):
        return posixpath.join(text.rstrip("/"), *parts)
    return str(Path(text.removeprefix("file://"), *parts))


def exists(uri: str | os.PathLike[str]) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str | os.PathLike[str]) -> None:
    """Create a directory (a no-op on S3, where prefixes need no creation)."""
    fs, path = resolve(uri)
    if not is_remote(uri):
        fs.create_dir(path, recursive=True)


def read_bytes(uri: str | os.PathLike[str]) -> bytes:
    """The whole object or file at ``uri``; ``FileNotFoundError`` with the URI when it does not exist."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no such file: {uri}") from err
    except OSError as err:
        if "NoSuchKey" in str(err) or "does not exist" in str(err) or "NOT_FOUND" in str(err).upper():
            raise FileNotFoundError(f"no such file: {uri}") from err
        raise


def write_bytes(uri: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``uri``; local writes go through a temporary file and a rename, so they are atomic."""
    fs, path = resolve(uri)
    if is_remote(uri):
        with fs.open_output_stream(path) as stream:
            stream.write(data)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
