"""Small helpers shared by several test modules: tiny image trees, read orders, concurrency probes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

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
