"""Serve the early-exit classifier over HTTP on an embedded local Ray, until Ctrl-C.

    python jobs/serve.py --anchornet CKPT --glance CKPT --patch CKPT [--fallback CKPT] [--thresholds JSON] \
        [--port PORT] [--colocate] [--high-throughput] [--request-timeout S]

Prints the URL; then ``curl -H 'Content-Type: image/jpeg' --data-binary @img.jpg URL/classify``. On a cluster,
deploy ``serve_config.yaml`` with ``serve deploy`` instead (docs/serving.md).
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import ValidationError

if TYPE_CHECKING:
    from pipelines.serve import ServeArgs


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from pipelines.onnx_runtime import RUNTIMES

    parser = argparse.ArgumentParser(prog="serve", description=__doc__.splitlines()[0])
    parser.add_argument("--anchornet", required=True, help="AnchorNet checkpoint")
    parser.add_argument("--glance", required=True, help="f_glance checkpoint")
    parser.add_argument("--patch", required=True, help="f_patch checkpoint")
    parser.add_argument(
        "--fallback",
        default=None,
        metavar="CKPT",
        help="a full-size classifier checkpoint (e.g. the full-224 Lite0) run on the whole image as one more, last "
        "step for the images still unsure after their patches; --thresholds must then be fitted with it "
        "(jobs/evaluate.py --fallback)",
    )
    parser.add_argument("--thresholds", default=None, help="saved thresholds JSON (named budgets)")
    parser.add_argument("--default-budget", default=None, help="budget of requests that name none")
    parser.add_argument(
        "--num-patches", type=int, default=4, help="patches per image: T - 1 steps (T - 2 with --fallback)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray (default: all)")
    parser.add_argument("--replica-cpus", type=float, default=0.25, help="CPUs reserved per replica")
    parser.add_argument(
        "--max-replicas", type=int, default=2, help="autoscaling limit of each deployment, the ingress included"
    )
    parser.add_argument(
        "--request-timeout",
        type=_seconds,
        default=30.0,
        help="seconds before Serve's proxy answers 408 (serve_config.yaml's http_options.request_timeout_s); "
        "stopping replicas get 5 s more to finish their requests",
    )
    parser.add_argument(
        "--colocate",
        action="store_true",
        help="run the models inside the ingress replica: one deployment, no handle calls (lowest latency on CPU)",
    )
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="torch",
        help="what runs the models: torch, or ONNX Runtime on the CPU (pip install 'anchornet[onnx]'; the same "
        "function, 1.6-3x faster on one thread; the first replica on a node exports its models, ~5 s each, and "
        "caches them in $ANCHORNET_ONNX_CACHE, else ~/.cache/anchornet/onnx)",
    )
    parser.add_argument(
        "--high-throughput",
        action="store_true",
        help="Ray Serve's high-throughput mode: HAProxy takes the port in place of Serve's Python proxy and "
        "forwards to the ingress replicas (ports 30000-31000); HAProxy also opens ports 8404 (stats) and 9101 "
        "(metrics) on every interface",
    )
    return parser.parse_args(argv)


def serve_args(args: argparse.Namespace) -> ServeArgs:
    from pipelines.serve import ServeArgs

    def deployment(target: int) -> dict[str, object]:
        autoscaling = {"min_replicas": 1, "max_replicas": args.max_replicas, "target_ongoing_requests": target}
        return {
            "num_cpus": args.replica_cpus,
            "graceful_shutdown_timeout_s": args.request_timeout + 5,
            "autoscaling_config": autoscaling,
            "runtime": args.runtime,
        }

    return ServeArgs(
        anchornet=args.anchornet,
        glance=args.glance,
        patch=args.patch,
        fallback=args.fallback,
        thresholds=args.thresholds,
        default_budget=args.default_budget,
        num_patches=args.num_patches,
        colocate=args.colocate,
        deployments={
            "ingress": {**deployment(16), "max_ongoing_requests": 64},
            "glance": deployment(8),
            "anchornet": deployment(8),
            "patch": deployment(8),
            "fallback": deployment(8),
        },
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = serve_args(args)
    except ValidationError as err:
        print(f"serve: invalid arguments: {err}")
        return 2
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, loopback-only cluster of this process
    import ray
    from ray import serve

    from pipelines.serve import build_app, enable_high_throughput

    if args.high_throughput:  # before ray.init: Serve's processes read it when they start
        try:
            enable_high_throughput(draining_period_s=1)  # no outside load balancer to wait for
        except RuntimeError as err:
            print(f"serve: {err}")
            return 1

    try:
        app = build_app(config)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"serve: {err}")
        return 1
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port, "request_timeout_s": args.request_timeout})
        serve.run(app, name="anchornet", route_prefix="/", blocking=False)
        url = f"http://{args.host}:{args.port}"
        print(f"AnchorNet serving at {url}  (POST {url}/classify, GET {url}/info, docs {url}/docs); Ctrl-C stops")
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
