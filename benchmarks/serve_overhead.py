"""Serve's own overhead at p50: one client over HTTP against the same work done in-process, image by image.

Deploys the early-exit app (one replica per deployment, one torch thread each) on an embedded local Ray and
sends each image once, sequentially, recording its latency and exit step. After Serve has shut down, it
repeats in one process exactly what the deployments computed for that image, with the same functions
(``decode_image`` + preprocessing, ``classify_images`` for the glance, ``propose_patches`` once when the glance
was not confident, ``classify_images`` for each patch up to the same exit step), one torch thread. Prints
the p50 of the HTTP latency, of decoding and of model compute, and

    overhead = p50 over images of (HTTP latency - in-process decode - in-process model compute)
    ratio    = overhead / p50 of model compute

which is Serve's share: the HTTP proxy, the handle calls between deployments, ``@serve.batch`` waits and
(de)serialisation. To locate it, it also times ``GET /healthz`` (HTTP proxy and ingress, no model: the floor of
any request) and, in the separate layout, one direct handle call to the Glance deployment per image (from the
driver: no HTTP, no ingress) against the glance's forward pass in process. ``--colocate`` measures the layout
where the models run inside the ingress replica; ``--high-throughput`` Ray Serve's high-throughput mode
(HAProxy in place of the Python HTTP proxy, direct gRPC between replicas: ``pipelines.serve.high_throughput_env``).
A one-client run keeps the machine otherwise idle, so the two sides see the same cores. The client is the
standard library's ``http.client`` on one keep-alive connection: its own CPU time lands in the measured latency
on a small machine, and ``requests`` spent ~1.2 ms more per request than it does on 2 cores (docs/serving.md;
``--client requests`` measures that way).

    python -m benchmarks.serve_overhead --data ../shared/data/imagenette/val --anchornet A.pt --glance G.pt \\
        --patch P.pt --thresholds thresholds.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._machine import cpu_name
from benchmarks._runtime import add_runtime_argument, check_runtime
from benchmarks.serve_load import IMAGENETTE_INDICES, budget_problem, checkpoints, load_images

MODELS = ("glance", "anchornet", "patch")  # their Server-Timing entries


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="ImageFolder (class folders) of test images")
    parser.add_argument("--limit", type=int, default=100, help="images taken evenly over the folder")
    parser.add_argument("--anchornet", default=None, help="AnchorNet checkpoint (default: untrained)")
    parser.add_argument("--glance", default=None, help="glance checkpoint (default: ImageNet Lite0 at K)")
    parser.add_argument("--patch", default=None, help="patch checkpoint (default: ImageNet Lite0 at K)")
    parser.add_argument("--thresholds", default=None, help="saved thresholds JSON; else --rho for every step")
    parser.add_argument("--budget", default=None, help="budget of --thresholds to use")
    parser.add_argument("--rho", type=float, default=0.6, help="threshold of every step without --thresholds")
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=5.0,
        help="@serve.batch wait of the model deployments (and of the colocated ingress)",
    )
    parser.add_argument("--colocate", action="store_true", help="the models inside the ingress replica")
    add_runtime_argument(parser, "what runs the models, in the replicas and in process")
    parser.add_argument(
        "--high-throughput", action="store_true", help="Ray Serve's high-throughput mode (HAProxy ingress)"
    )
    parser.add_argument(
        "--num-gpus", type=float, default=0.0, help="GPUs per deployment (e.g. 0.25); the in-process pass uses CUDA too"
    )
    parser.add_argument("--port", type=int, default=8124)
    parser.add_argument(
        "--client", choices=("http.client", "requests"), default="http.client", help="the HTTP client library"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def _deployment(batch_wait_ms: float, num_gpus: float = 0.0, runtime: str = "torch") -> dict[str, Any]:
    return {
        "num_cpus": 0.25,
        "num_gpus": num_gpus,
        "torch_threads": 1,
        "runtime": runtime,
        "batch_wait_timeout_s": batch_wait_ms / 1e3,
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
    }


class _Client:
    """One keep-alive HTTP/1.1 connection; ``request`` returns the body and the ``Server-Timing`` header."""

    def __init__(self, port: int, library: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        if library == "requests":
            import requests

            self.session = requests.Session()
        else:
            import http.client

            self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.library = library

    def request(
        self, method: str, path: str, body: bytes | None = None, params: dict[str, str] | None = None
    ) -> tuple[bytes, str]:
        from urllib.parse import urlencode

        path = f"{path}?{urlencode(params)}" if params else path
        headers = {"Content-Type": "image/jpeg"} if body is not None else {}
        if self.library == "requests":
            response = self.session.request(method, self.base + path, data=body, headers=headers, timeout=120)
            status, content = response.status_code, response.content
            timing = response.headers.get("Server-Timing", "")
        else:
            self.connection.request(method, path, body=body, headers=headers)
            reply = self.connection.getresponse()
            status, content = reply.status, reply.read()
            timing = reply.getheader("Server-Timing", "")
        if status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {content[:200]!r}")
        return content, timing


def serve_latencies(
    args: argparse.Namespace, paths: dict[str, str], images: list[tuple[bytes, int]], params: dict[str, str]
) -> list[dict[str, Any]]:
    """One sequential request per image: ``{"ms", "exit_step", "server_ms", "correct", "timing"}`` (``timing``: the
    replica's ``Server-Timing``, milliseconds by name); then, per image, one
    direct call to the Glance deployment's handle from the driver (``"glance_handle_ms"``)."""
    import ray
    from ray import serve

    from anchornet import Preprocessing, decode_image, load_checkpoint
    from pipelines.serve import build_app, enable_high_throughput, from_wire, to_wire
    from pipelines.serve_http import parse_server_timing

    preprocessing = Preprocessing.from_dict(load_checkpoint(paths["anchornet"])[1].preprocessing or {})
    deployment = _deployment(args.batch_wait_ms, args.num_gpus, args.runtime)
    app = build_app(
        {
            "anchornet": paths["anchornet"],
            "glance": paths["glance"],
            "patch": paths["patch"],
            "thresholds": args.thresholds,
            "deployments": {name: deployment for name in ("ingress", "glance", "anchornet", "patch")},
            "colocate": args.colocate,
        }
    )
    if args.high_throughput:  # before ray.init: Serve's processes read it when they start
        try:
            enable_high_throughput(draining_period_s=0)
        except RuntimeError as err:
            raise SystemExit(f"serve_overhead: {err}") from None
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port, "request_timeout_s": 60})
        serve.run(app, name="overhead", route_prefix="/", blocking=False)
        client = _Client(args.port, args.client)
        for data, _ in images[:10]:  # warm up every code path
            client.request("POST", "/classify", data, params)
        records = []
        for data, label in images:
            start = time.perf_counter()
            content, timing = client.request("POST", "/classify", data, params)
            elapsed = time.perf_counter() - start
            body = json.loads(content)
            records.append(
                {
                    "ms": 1e3 * elapsed,
                    "exit_step": body["exit_step"],
                    "server_ms": body["latency_ms"],
                    "timing": parse_server_timing(timing),
                    "correct": body["prediction"]["index"] == label,
                }
            )
        for record in records:  # the floor: HTTP proxy + ingress, no model, no image
            start = time.perf_counter()
            client.request("GET", "/healthz")
            record["healthz_ms"] = 1e3 * (time.perf_counter() - start)
        if not args.colocate:
            glance = serve.get_deployment_handle("Glance", app_name="overhead")
            for record, (data, _) in zip(records, images, strict=True):  # one hop, no HTTP, no ingress
                image = preprocessing(decode_image(data))
                start = time.perf_counter()
                from_wire(glance.remote(to_wire(image)).result())  # as the ingress calls it
                record["glance_handle_ms"] = 1e3 * (time.perf_counter() - start)
        return records
    finally:
        serve.shutdown()
        ray.shutdown()


def inprocess_times(
    paths: dict[str, str],
    images: list[tuple[bytes, int]],
    exit_steps: list[int],
    num_patches: int,
    use_gpu: bool = False,
    runtime: str = "torch",
) -> list[dict[str, float]]:
    """Decode and model time of each image, doing what the deployments did for it: ``{"decode_ms", "model_ms",
    "glance_ms"}`` (the glance's forward pass alone)."""
    import torch

    from anchornet import Preprocessing, decode_image, load_checkpoint
    from pipelines.serve import classify_images, load_anchornet_on_replica, load_on_replica, propose_patches

    torch.set_num_threads(1)
    anchornet = load_anchornet_on_replica(paths["anchornet"], use_gpu, runtime)  # as the replicas load them
    card = load_checkpoint(paths["anchornet"])[1]
    glance, glance_card = load_on_replica(paths["glance"], use_gpu, runtime)
    patch, patch_card = load_on_replica(paths["patch"], use_gpu, runtime)
    preprocessing = Preprocessing.from_dict(card.preprocessing or {})  # as the ingress does

    def run(data: bytes, exit_step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        image = preprocessing(decode_image(data, min_size=anchornet.receptive_field.size))
        t1 = time.perf_counter()
        classify_images(glance, glance_card.input_size, image[None])
        t_glance = time.perf_counter()
        if exit_step > 1:
            crops = propose_patches(anchornet, image[None], num_patches, 0.3)[0]["crops"]
            for j in range(exit_step - 1):
                classify_images(patch, patch_card.input_size, crops[j : j + 1])
        t2 = time.perf_counter()
        return {"decode_ms": 1e3 * (t1 - t0), "model_ms": 1e3 * (t2 - t1), "glance_ms": 1e3 * (t_glance - t1)}

    for (data, _), step in list(zip(images, exit_steps, strict=True))[:10]:  # warm up
        run(data, step)
    return [run(data, step) for (data, _), step in zip(images, exit_steps, strict=True)]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_runtime("serve_overhead", args.runtime)
    if args.runtime == "onnxruntime" and args.num_gpus > 0:
        raise SystemExit("serve_overhead: --runtime onnxruntime runs on the CPU; drop --num-gpus")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if problem := budget_problem(args.budget, args.thresholds):
        raise SystemExit(f"serve_overhead: {problem}")
    import torch

    images, classes = load_images(args.data, args.limit)
    if args.budget:
        params = {"budget": args.budget}
    elif args.thresholds:
        params = {}  # the thresholds file's default budget
    else:
        params = {"thresholds": ",".join([str(args.rho)] * 4)}
    with tempfile.TemporaryDirectory() as tmp:
        given = {"anchornet": args.anchornet, "glance": args.glance, "patch": args.patch}
        paths = checkpoints(given, classes, Path(tmp), IMAGENETTE_INDICES)
        served = serve_latencies(args, paths, images, params)
        steps = [r["exit_step"] for r in served]
        local = inprocess_times(paths, images, steps, num_patches=4, use_gpu=args.num_gpus > 0, runtime=args.runtime)
    http = [r["ms"] for r in served]
    decode = [r["decode_ms"] for r in local]
    model = [r["model_ms"] for r in local]
    overhead = [h - d - m for h, d, m in zip(http, decode, model, strict=True)]
    p50 = statistics.median
    results = {
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs",
        "layout": "colocated" if args.colocate else "separate",
        "high_throughput": args.high_throughput,
        "runtime": args.runtime,
        "torch": torch.__version__,
        "images": len(images),
        "request": params,
        "batch_wait_ms": args.batch_wait_ms,
        "client": args.client,
        "num_gpus": args.num_gpus,
        "device": torch.cuda.get_device_name() if args.num_gpus > 0 else "cpu",
        "accuracy": sum(r["correct"] for r in served) / len(served),
        "exit_steps": {s: steps.count(s) for s in sorted(set(steps))},
        "http_p50_ms": p50(http),
        "server_p50_ms": p50(r["server_ms"] for r in served),
        "decode_p50_ms": p50(decode),
        "model_p50_ms": p50(model),
        "overhead_p50_ms": p50(overhead),
    }
    results["overhead_ratio"] = results["overhead_p50_ms"] / results["model_p50_ms"]
    if not args.colocate:
        results["glance_handle_p50_ms"] = p50(r["glance_handle_ms"] for r in served)
    results["glance_inprocess_p50_ms"] = p50(r["glance_ms"] for r in local)
    # Colocated, the replica timed its own forward passes: the same request on both sides. Since the batched cascade
    # (session 14) those are the model passes alone: its resizes, NMS and crops fall in the "overhead" here, while the
    # in-process replay above counts them as model compute.
    if args.colocate:
        timings = [r["timing"] for r in served]
        replica_model = [sum(t.get(m, 0.0) for m in MODELS) for t in timings]
        same = [h - t["decode"] - m for h, t, m in zip(http, timings, replica_model, strict=True)]
        results["replica_decode_p50_ms"] = p50(t["decode"] for t in timings)
        results["replica_model_p50_ms"] = p50(replica_model)
        results["same_request_overhead_p50_ms"] = p50(same)
        results["same_request_ratio"] = results["same_request_overhead_p50_ms"] / results["replica_model_p50_ms"]
        results["glance_replica_p50_ms"] = p50(t["glance"] for t in timings)
    print(json.dumps(results))
    print(
        f"HTTP p50 {results['http_p50_ms']:.1f} ms = decode {results['decode_p50_ms']:.1f} + models "
        f"{results['model_p50_ms']:.1f} + Serve overhead {results['overhead_p50_ms']:.1f} ms (p50 of per-image "
        f"differences): overhead / model compute = {results['overhead_ratio']:.2f} (target < 0.25)"
    )
    if args.colocate:
        print(
            f"same request, timed by the replica (Server-Timing): HTTP p50 {results['http_p50_ms']:.1f} ms = decode "
            f"{results['replica_decode_p50_ms']:.1f} + forward passes {results['replica_model_p50_ms']:.1f} + Serve "
            f"overhead {results['same_request_overhead_p50_ms']:.1f} ms: overhead / model compute = "
            f"{results['same_request_ratio']:.2f} (target < 0.25); the glance's forward pass: p50 "
            f"{results['glance_replica_p50_ms']:.1f} ms in the replica, {results['glance_inprocess_p50_ms']:.1f} ms "
            f"in process"
        )
    floor = results["healthz_p50_ms"] = p50(r["healthz_ms"] for r in served)
    mode = "HAProxy (high-throughput mode)" if args.high_throughput else "Serve's HTTP proxy"
    # The floor of any request, no image, no model: overhead / model compute cannot go below this ratio
    results["healthz_ratio"] = floor / results["model_p50_ms"]
    print(
        f"layout {results['layout']}, {mode}, client {args.client}; GET /healthz (proxy + ingress, no model): "
        f"p50 {floor:.1f} ms, alone {results['healthz_ratio']:.2f} of the model compute (the ratio's floor)"
    )
    if not args.colocate:
        print(
            f"one handle call to the Glance deployment (from the driver, no HTTP): p50 "
            f"{results['glance_handle_p50_ms']:.1f} ms against {results['glance_inprocess_p50_ms']:.1f} ms for the "
            f"same forward pass in process"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
