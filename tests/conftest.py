from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _s3 import S3Server, free_port, s3_env, start_s3_server

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
IMAGENETTE = SHARED_DATA / "imagenette"

# Fixed for the whole session before any Ray process starts, so every Ray worker, job and subprocess
# inherits it: no token auth for local test clusters, quiet logs, and the AWS chain pointed at the local S3
# server (started on this port only by the tests that ask for it).
_S3_PORT = free_port()
_ONNX_CACHE = tempfile.mkdtemp(prefix="anchornet-onnx-cache-")
atexit.register(shutil.rmtree, _ONNX_CACHE, ignore_errors=True)
os.environ.update(
    {
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
        "RAY_memory_monitor_refresh_ms": "0",
        "ANCHORNET_ONNX_CACHE": _ONNX_CACHE,  # ONNX Runtime exports of this session's models, not the user's cache
        **s3_env(f"http://127.0.0.1:{_S3_PORT}"),
    }
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def serve_replica_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``@serve.batch`` reads of its replica (to warn about batches over max_ongoing_requests), for batching
    tested outside a Serve replica."""
    from types import SimpleNamespace

    from ray import serve

    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=16))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)


@pytest.fixture(scope="session")
def imagenette() -> Path:
    """The real imagenette tree beside the checkout (../shared/data/imagenette); skip when absent."""
    if not (IMAGENETTE / "val").is_dir():
        pytest.skip(f"real images not found at {IMAGENETTE}")
    return IMAGENETTE


@pytest.fixture(scope="session")
def cat_dog_anchornet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded tiny AnchorNet checkpoint (``anchornet_test``) for the classes cat and dog: the precompute tests'."""
    from anchornet import anchornet_test, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cat_dog_ckpt") / "anchornet.pt"
    save_checkpoint(anchornet_test(num_classes=2), path, class_names=["cat", "dog"])
    return path


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (SeaweedFS) on 127.0.0.1 for the whole session; the AWS variables point at it."""
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"), port=_S3_PORT)
    yield server
    server.stop()


TEST_BUCKET = "anchornet-tests"


@pytest.fixture
def s3_bucket(s3_server: S3Server, request: pytest.FixtureRequest) -> str:
    """A fresh, empty ``s3://`` prefix for one test (in one shared bucket: SeaweedFS gives every bucket its
    own volumes, so a bucket per test would exhaust the server's volume slots)."""
    if not s3_server.test_bucket_ready:
        s3_server.create_bucket(TEST_BUCKET)
        s3_server.test_bucket_ready = True
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    return f"s3://{TEST_BUCKET}/{name}"


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray for the whole session: 2 logical CPUs, no GPU, no dashboard (tests use fractional CPUs)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            num_gpus=0,
            include_dashboard=False,
            object_store_memory=512 * 1024**2,
            log_to_driver=False,
        )
    yield
    ray.shutdown()


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a training run gets past its checks to Ray (``_fit``): bad inputs must be refused before."""
    from pipelines import train

    def reached(*args: object, **kwargs: object) -> None:
        raise AssertionError("the checks let a bad run through to Ray")

    monkeypatch.setattr(train, "_fit", reached)
