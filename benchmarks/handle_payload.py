"""Cost of a Serve handle call between two replicas with the payload as torch tensors against NumPy arrays.

The early-exit app's separate layout makes one handle call per model step: a uint8 image or crop goes out, logits
(or AnchorNet's boxes, scores and crops) come back. Ray pickles a NumPy array as its buffer; a tensor's storage
goes through ``torch.save`` and ``torch.load``. ``pipelines.serve.to_wire`` therefore ships arrays. This script
deploys a caller and an echo replica (a quarter CPU each) and times, inside the caller, ``await handle.remote(x)``
with a 224 x 224 uint8 image out and 10 float32 logits back: as tensors, then as arrays (``to_wire`` /
``from_wire``), interleaved, and prints the p50 of each and their ratio.

    python -m benchmarks.handle_payload [--calls 200] [--rounds 3] [--high-throughput]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per round and payload kind")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each payload kind once per round")
    parser.add_argument("--high-throughput", action="store_true", help="Ray Serve's high-throughput mode")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from pipelines.serve import from_wire, high_throughput_env, to_wire

    if args.high_throughput:
        os.environ.update(high_throughput_env())
    import ray
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0.25})
    class Echo:
        def __call__(self, image: Any) -> Any:
            as_array = not isinstance(image, torch.Tensor)
            image = from_wire(image)  # what a model deployment does with what it gets (a copy of an array's buffer)
            logits = torch.zeros(10) + float(image.shape[0])
            return to_wire(logits) if as_array else logits

    @serve.deployment(ray_actor_options={"num_cpus": 0.25})
    class Caller:
        def __init__(self, echo: Any) -> None:
            self.echo = echo

        async def __call__(self, kind: str, calls: int) -> list[float]:
            image = torch.zeros(3, 224, 224, dtype=torch.uint8)
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                if kind == "tensor":
                    await self.echo.remote(image)
                else:
                    from_wire(await self.echo.remote(to_wire(image)))
                times.append(1e3 * (time.perf_counter() - start))
            return times[len(times) // 10 :]  # the first tenth warms up

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        handle = serve.run(Caller.bind(Echo.bind()), name="handle_payload", route_prefix=None)
        times: dict[str, list[float]] = {"tensor": [], "array": []}
        for _ in range(args.rounds):
            for kind in times:
                times[kind] += handle.remote(kind, args.calls).result()
        serve.shutdown()
    finally:
        ray.shutdown()
    p50 = {kind: statistics.median(values) for kind, values in times.items()}
    mode = "HAProxy (high-throughput mode)" if args.high_throughput else "default mode"
    print(f"handle call, replica to replica, {mode}: 224 x 224 uint8 image out, 10 float32 logits back")
    print(f"  {len(times['tensor'])} calls each, {args.rounds} interleaved rounds, ray {ray.__version__}")
    print(f"  torch tensors: p50 {p50['tensor']:.2f} ms")
    print(f"  NumPy arrays (to_wire): p50 {p50['array']:.2f} ms")
    print(f"  ratio tensors / arrays: {p50['tensor'] / p50['array']:.2f}x ({p50['tensor'] - p50['array']:.2f} ms)")


if __name__ == "__main__":
    main()
