"""``pipelines.cluster``: what the jobs check about the Ray cluster before they join it."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from _helpers import synthetic_tree
from _s3 import free_port

from anchornet import anchornet_test, save_checkpoint
from jobs import precompute_patches, train_anchornet
from pipelines.cluster import unreachable_address


def test_an_address_no_one_listens_on_is_named_in_one_line() -> None:
    port = free_port()  # bound, then closed: nothing listens there now
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}", f"[::1]:{port}"):
        start = time.monotonic()
        problem = unreachable_address(address, timeout=2.0)
        assert problem is not None and address in problem and "\n" not in problem, problem
        assert time.monotonic() - start < 5
    assert "no port number" in str(unreachable_address("headnode:http"))


def test_a_listening_port_and_what_only_ray_resolves_pass() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert unreachable_address(f"127.0.0.1:{port}") is None
        assert unreachable_address(f"ray://localhost:{port}") is None
    for address in (None, "", "auto", "local", "anyscale://my-cluster", "headnode"):
        assert unreachable_address(address) is None


@pytest.mark.parametrize("job", ["precompute", "train"])
def test_jobs_refuse_an_unreachable_cluster_at_once(
    job: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ray.init`` would retry for minutes without a word; the jobs say so in one line before calling it."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # the session's local Ray would be used instead
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init was reached"))
    address = f"127.0.0.1:{free_port()}"
    data = synthetic_tree(tmp_path / "data", train=2, val=1)
    if job == "precompute":
        checkpoint = tmp_path / "anchornet.pt"
        save_checkpoint(anchornet_test(2), checkpoint, class_names=["cls_a", "cls_b"])
        argv = ["--input", str(data / "train"), "--output", str(tmp_path / "out"), "--anchornet", str(checkpoint)]
        assert precompute_patches.main([*argv, "--address", address]) == 2
    else:
        argv = ["--data", str(data), "--output", str(tmp_path / "out"), "--arch", "anchornet_test", "--epochs", "1"]
        assert train_anchornet.main([*argv, "--address", address]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot reach the Ray cluster at {address}" in err, err
