"""Small helpers shared by several test modules: tiny image trees, read orders, concurrency probes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def synthetic_tree(root: Path, train: int = 6, val: int = 2, classes: tuple[str, ...] = ("cls_a", "cls_b")) -> Path:
    """ROOT/{train,val}/<class>/<i>.png: tiny random images (no real data needed)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", train), ("val", val)):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 255, (32, 32, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / split / name / f"{i}.png")
    return root


def tiny_serving_checkpoints(root: Path, classes: list[str]) -> dict[str, str]:
    """Untrained checkpoints the Serve app loads: the tiny AnchorNet at 224 and MobileNetV3-small glance and patch
    classifiers at 95, for ``classes``; returns ``{"anchornet": path, "glance": path, "patch": path}``."""
    from anchornet import Preprocessing, anchornet_test, build_classifier, save_checkpoint

    torch.manual_seed(0)
    paths = {name: str(root / f"{name}.pt") for name in ("anchornet", "glance", "patch")}
    anchornet = anchornet_test(len(classes))
    save_checkpoint(anchornet, paths["anchornet"], input_size=224, class_names=classes, preprocessing=Preprocessing())
    for name in ("glance", "patch"):
        model = build_classifier("mobilenet_v3_small", len(classes))
        save_checkpoint(model, paths[name], input_size=95, class_names=classes)
    return paths


def tiny_fallback_checkpoint(root: Path, classes: list[str], input_size: int = 224, name: str = "fallback") -> str:
    """An untrained MobileNetV3-small classifier at ``input_size`` for ``classes``, saved as ``root/<name>.pt``: the
    Serve app's optional fallback step (a full-size classifier on the whole image); returns its path."""
    from anchornet import build_classifier, save_checkpoint

    torch.manual_seed(1)
    path = str(root / f"{name}.pt")
    save_checkpoint(
        build_classifier("mobilenet_v3_small", len(classes)), path, input_size=input_size, class_names=classes
    )
    return path


@contextmanager
def serve_app_on_free_port(app_args: Any) -> Iterator[str]:
    """``pipelines.serve.build_app(app_args)`` running on a free 127.0.0.1 port (Serve on the test session's Ray);
    yields its URL and shuts Serve down after."""
    from _s3 import free_port
    from ray import serve

    from pipelines.serve import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    serve.run(build_app(app_args), name="anchornet", route_prefix="/", blocking=False)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def max_live_shards(shards_in_order: list[int]) -> int:
    """The most shards "open" at once in a read order: begun (a sample read) and not yet finished (samples still
    to come). A reader that caches these loads every shard once."""
    last = {shard: i for i, shard in enumerate(shards_in_order)}
    live: set[int] = set()
    most = 0
    for i, shard in enumerate(shards_in_order):
        live.add(shard)
        most = max(most, len(live))
        if last[shard] == i:
            live.discard(shard)
    return most


class InFlight:
    """Counts calls of ``wait`` running at once (each takes ``latency`` seconds, a request's): ``most`` is the most."""

    def __init__(self, latency: float) -> None:
        self.latency, self.now, self.most = latency, 0, 0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(self.latency)
        with self._lock:
            self.now -= 1


def asgi_request(
    app: Callable[..., Any],
    path: str = "/classify",
    *,
    method: str = "POST",
    body: bytes = b"",
    content_type: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request straight into an ASGI ``app`` (no server, no httpx): status, headers and body of the answer."""
    headers = []
    if content_type is not None:
        headers = [(b"content-type", content_type.encode("latin-1")), (b"content-length", str(len(body)).encode())]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    messages: list[dict[str, Any]] = []
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:  # the body was read: the client then waits, as a real one does
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in messages if m["type"] == "http.response.start")
    answer = {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]}
    return start["status"], answer, b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
