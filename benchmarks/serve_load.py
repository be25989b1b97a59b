"""Bounded HTTP load test of the early-exit Serve app against a one-deployment full-224 classifier, on 127.0.0.1.

The early-exit app runs in each ``--layouts`` entry: ``separate`` (one deployment per model) and
``colocated`` (the models inside the ingress replica). For each app in turn: deploy it on an embedded local
Ray, send ``--clients`` concurrent clients for ``--duration`` seconds, then idle ``--cooldown`` seconds, polling
the replica counts every second so that the autoscaling up under load and back down after shows. Prints
throughput, p50/p99 latency, errors (non-200 or failed requests), top-1 accuracy on the folder labels, mean MACs
per image and the replica timeline. ``--high-throughput`` runs both apps in Ray Serve's high-throughput mode
(``pipelines.serve.high_throughput_env``). ``--fallback`` gives the early-exit app a fallback step, the baseline's
own full-224 classifier (``--full``) on the whole image for the images still unsure after their patches (named
"early_exit+fallback" in the results); ``--thresholds`` must then be fitted with it (jobs/evaluate.py --fallback).

    python -m benchmarks.serve_load --data ../shared/data/imagenette/val --clients 8 --duration 45

Without checkpoints it uses the packaged offline ImageNet EfficientNet-Lite0 weights restricted to the folder's
classes (``--head-from``) for the glance, patch and full classifiers, and an untrained AnchorNet: the point is
the serving cost, not the accuracy of an untuned pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._runtime import add_runtime_argument, check_runtime

IMAGENETTE_INDICES = "0,217,482,491,497,566,569,571,574,701"


BASELINE = "full224"  # the one-deployment full-224 classifier's name in the results


def app_name(colocated: bool, fallback: bool) -> str:
    """The early-exit app's name in the results: ``early_exit``, ``early_exit_colocated``, ``+fallback`` added."""
    return "early_exit" + ("_colocated" if colocated else "") + ("+fallback" if fallback else "")


def default_thresholds(rho: float, num_patches: int, fallback: bool) -> str:
    """``--rho`` for every threshold a request sends without ``--thresholds``: one per step but the last, so one
    more with the fallback step (the last patch step has one too)."""
    return ",".join([str(rho)] * (num_patches + int(fallback)))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="ImageFolder (class folders) of test images")
    parser.add_argument("--limit", type=int, default=200, help="images taken evenly over the folder")
    parser.add_argument("--anchornet", default=None, help="AnchorNet checkpoint (default: untrained)")
    parser.add_argument("--glance", default=None, help="glance checkpoint (default: ImageNet Lite0 at K)")
    parser.add_argument("--patch", default=None, help="patch checkpoint (default: ImageNet Lite0 at K)")
    parser.add_argument("--full", default=None, help="full-224 baseline checkpoint (default: ImageNet Lite0)")
    parser.add_argument(
        "--fallback",
        action="store_true",
        help="the early-exit app ends with a fallback step: the --full classifier on the whole image for images "
        "still unsure after their patches (--thresholds fitted with it: jobs/evaluate.py --fallback)",
    )
    parser.add_argument(
        "--num-patches", type=int, default=4, help="patches per image of the early-exit app (default 4, as Serve's)"
    )
    parser.add_argument("--head-from", default=IMAGENETTE_INDICES, help="ImageNet indices of the folder classes")
    parser.add_argument("--thresholds", default=None, help="saved thresholds JSON; else --rho for every step")
    parser.add_argument("--budget", default=None, help="budget of --thresholds to use")
    parser.add_argument("--rho", type=float, default=0.6, help="threshold of every step without --thresholds")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=45.0, help="seconds of load per app")
    parser.add_argument("--cooldown", type=float, default=25.0, help="seconds of idle after the load, per app")
    parser.add_argument("--replica-cpus", type=float, default=0.25)
    parser.add_argument("--min-replicas", type=int, default=1, help="= --max-replicas: fixed replicas, no scaling")
    parser.add_argument("--max-replicas", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1)
    add_runtime_argument(parser, "what runs the models, both apps")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="@serve.batch wait of every model, both apps")
    parser.add_argument(
        "--layouts", default="separate,colocated", help="early-exit layouts to load, comma-separated, in order"
    )
    parser.add_argument(
        "--high-throughput", action="store_true", help="Ray Serve's high-throughput mode (HAProxy ingress), both apps"
    )
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def budget_problem(budget: str | None, thresholds: str | None) -> str | None:
    """Why ``--budget`` would make every request a 400, or None: a budget neither built in nor in ``--thresholds``."""
    from anchornet import load_thresholds
    from pipelines.serve import BUILTIN_BUDGETS

    if budget is None or budget in BUILTIN_BUDGETS:
        return None
    if thresholds is None:
        return f"--budget {budget} needs --thresholds (the file that names it); built in: {', '.join(BUILTIN_BUDGETS)}"
    known = [*load_thresholds(thresholds), *BUILTIN_BUDGETS]
    return None if budget in known else f"--budget {budget} is not in {thresholds}: {', '.join(known)}"


def load_images(root: Path, limit: int) -> tuple[list[tuple[bytes, int]], list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir()) if f.is_file()]
    step = max(1, len(files) // limit)
    return [(f.read_bytes(), label) for f, label in files[::step][:limit]], classes


def checkpoints(given: dict[str, str | None], classes: list[str], root: Path, head_from: str) -> dict[str, str]:
    """``given`` (role -> checkpoint or None) with every None replaced by a default written under ``root``: an
    untrained AnchorNet, or the ImageNet Lite0 restricted to ``head_from`` (comma-separated ImageNet indices)."""
    from anchornet import AnchorNet, Preprocessing, build_classifier, save_checkpoint

    paths = dict(given)
    indices = [int(i) for i in head_from.split(",")]
    as_is = Preprocessing.as_is(224)
    if "anchornet" in paths and paths["anchornet"] is None:
        paths["anchornet"] = str(root / "anchornet.pt")
        save_checkpoint(
            AnchorNet(num_classes=len(classes)),
            paths["anchornet"],
            input_size=224,
            class_names=classes,
            preprocessing=as_is,
            provenance={"note": "untrained"},
        )
    lite0 = None
    for role, size in (("glance", 95), ("patch", 95), ("full", 224)):
        if role in paths and paths[role] is None:
            lite0 = lite0 or build_classifier("efficientnet_lite0", len(classes), "imagenet", head_from=indices)
            paths[role] = str(root / f"{role}.pt")
            save_checkpoint(lite0, paths[role], input_size=size, class_names=classes, preprocessing=as_is)
    return paths


def _deployment(args: argparse.Namespace, target: int, max_ongoing: int = 32) -> dict[str, Any]:
    return {
        "num_cpus": args.replica_cpus,
        "max_ongoing_requests": max_ongoing,
        "torch_threads": args.torch_threads,
        "runtime": args.runtime,
        "batch_wait_timeout_s": args.batch_wait_ms / 1e3,
        "autoscaling_config": {
            "min_replicas": args.min_replicas,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": target,
            "metrics_interval_s": 1.0,
            "look_back_period_s": 4.0,
            "upscale_delay_s": 2.0,
            "downscale_delay_s": 8.0,
        },
    }


class ReplicaPoller(threading.Thread):
    """Running replicas of every deployment of ``app``, once a second: ``[(t, {name: count})]``."""

    def __init__(self, app: str, start: float) -> None:
        super().__init__(daemon=True)
        self.app, self.start_time, self.samples = app, start, []
        self.done = threading.Event()

    def run(self) -> None:
        from ray import serve

        while not self.done.wait(1.0):
            try:
                status = serve.status().applications[self.app]
            except Exception:  # a missed sample is fine
                continue
            counts = {name: d.replica_states.get("RUNNING", 0) for name, d in status.deployments.items()}
            self.samples.append((round(time.perf_counter() - self.start_time, 1), counts))


def _load(url: str, images: list[tuple[bytes, int]], clients: int, duration: float, params: dict[str, str]) -> dict:
    import requests

    results: list[tuple[float, int, dict | None, int]] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + duration

    def client(offset: int) -> None:
        session = requests.Session()
        i = offset
        while time.perf_counter() < deadline:
            data, label = images[i % len(images)]
            i += clients
            start = time.perf_counter()
            try:
                response = session.post(
                    url, data=data, params=params, timeout=60, headers={"Content-Type": "image/jpeg"}
                )
                status, body = response.status_code, response.json() if response.ok else None
            except Exception:  # counted as an error
                status, body = -1, None
            with lock:
                results.append((time.perf_counter() - start, status, body, label))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - begin
    ok = [(lat, body, label) for lat, status, body, label in results if status == 200]
    latencies = sorted(lat for lat, _, _ in ok)
    summary: dict[str, Any] = {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "throughput_rps": len(ok) / elapsed,
        "p50_ms": 1e3 * statistics.median(latencies) if latencies else None,
        "p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None,
        "server_p50_ms": statistics.median(b["latency_ms"] for _, b, _ in ok) if ok else None,
        "accuracy": sum(b["prediction"]["index"] == label for _, b, label in ok) / len(ok) if ok else None,
        "mean_gmacs": statistics.fmean(b["gmacs"] for _, b, _ in ok) if ok else None,
    }
    steps = [b["exit_step"] for _, b, _ in ok]
    summary["exit_steps"] = {s: steps.count(s) for s in sorted(set(steps))}
    return summary


def _run_phase(name: str, app: Any, args: argparse.Namespace, images: list, params: dict[str, str]) -> dict:
    import requests
    from ray import serve

    serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)
    url = f"http://127.0.0.1:{args.port}/{name}/classify"
    for data, _ in images[:8]:  # warm up every code path once
        requests.post(url, data=data, params=params, headers={"Content-Type": "image/jpeg"}, timeout=120)
    single = _load(url, images, 1, min(10.0, args.duration / 3), params)
    poller = ReplicaPoller(name, time.perf_counter())
    poller.start()
    loaded = _load(url, images, args.clients, args.duration, params)
    time.sleep(args.cooldown)
    poller.done.set()
    poller.join()
    serve.delete(name)
    return {"one_client": single, "loaded": loaded, "replicas": poller.samples}


def _timeline(samples: list[tuple[float, dict[str, int]]], every: int = 5) -> str:
    lines = []
    for t, counts in samples[::every]:
        lines.append(f"    t={t:5.1f}s  " + "  ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_runtime("serve_load", args.runtime)
    unknown = set(args.layouts.split(",")) - {"separate", "colocated"}
    if unknown:
        raise SystemExit(f"serve_load: unknown --layouts {sorted(unknown)}: use separate and/or colocated")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if problem := budget_problem(args.budget, args.thresholds):
        raise SystemExit(f"serve_load: {problem}")
    import ray
    import torch
    from ray import serve

    from pipelines.serve import build_app, build_baseline_app, enable_high_throughput

    images, classes = load_images(args.data, args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        given = {"anchornet": args.anchornet, "glance": args.glance, "patch": args.patch, "full": args.full}
        paths = checkpoints(given, classes, Path(tmp), args.head_from)
        if args.budget:
            params = {"budget": args.budget}
        elif args.thresholds:
            params = {}  # the file's default budget, as the app picks it
        else:
            params = {"thresholds": default_thresholds(args.rho, args.num_patches, args.fallback)}
        if args.high_throughput:  # before ray.init: Serve's processes read it when they start
            try:
                enable_high_throughput(draining_period_s=0)
            except RuntimeError as err:
                raise SystemExit(f"serve_load: {err}") from None
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": args.port, "request_timeout_s": 60})
            results = {}
            for layout in args.layouts.split(","):
                colocated = layout == "colocated"
                early = build_app(
                    {
                        "anchornet": paths["anchornet"],
                        "glance": paths["glance"],
                        "patch": paths["patch"],
                        "fallback": paths["full"] if args.fallback else None,
                        "thresholds": args.thresholds,
                        "num_patches": args.num_patches,
                        "colocate": colocated,
                        "deployments": {
                            "ingress": _deployment(args, 4, 64) if colocated else _deployment(args, 8, 64),
                            "glance": _deployment(args, 4),
                            "anchornet": _deployment(args, 4),
                            "patch": _deployment(args, 4),
                            "fallback": _deployment(args, 4),
                        },
                    }
                )
                name = app_name(colocated, args.fallback)
                results[name] = _run_phase(name.replace("_", "").replace("+", ""), early, args, images, params)
            baseline = build_baseline_app({"classifier": paths["full"], "deployment": _deployment(args, 4)})
            results[BASELINE] = _run_phase(BASELINE, baseline, args, images, {})
        finally:
            serve.shutdown()
            ray.shutdown()
    conditions = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "ray": ray.__version__,
        "torch": torch.__version__,
        "clients": args.clients,
        "duration_s": args.duration,
        "images": len(images),
        "replica_cpus": args.replica_cpus,
        "min_replicas": args.min_replicas,
        "max_replicas": args.max_replicas,
        "torch_threads": args.torch_threads,
        "runtime": args.runtime,
        "batch_wait_ms": args.batch_wait_ms,
        "high_throughput": args.high_throughput,
        "fallback": args.fallback,
        "num_patches": args.num_patches,
        "request": params,
    }
    print(f"conditions: {json.dumps(conditions)}")
    for name, result in results.items():
        for phase in ("one_client", "loaded"):
            r = result[phase]
            print(
                f"{name:29s} {phase:10s} {r['throughput_rps']:6.1f} req/s  p50 {r['p50_ms'] or 0:7.1f} ms  "
                f"p99 {r['p99_ms'] or 0:7.1f} ms  server p50 {r['server_p50_ms'] or 0:6.1f} ms  "
                f"errors {r['errors']}/{r['requests']}  top-1 {r['accuracy'] or 0:.3f}  "
                f"GMACs {r['mean_gmacs'] or 0:.3f}  exits {r['exit_steps']}"
            )
        peak = {}
        for _, counts in result["replicas"]:
            for k, v in counts.items():
                peak[k] = max(peak.get(k, 0), v)
        print(f"  replicas (peak {peak}; last {result['replicas'][-1][1] if result['replicas'] else {}}):")
        print(_timeline(result["replicas"]))
    print(_ratios(results))
    if args.json:
        args.json.write_text(json.dumps({"conditions": conditions, "results": results}, indent=1, default=str))
    return 0


def _ratios(results: dict[str, dict[str, Any]]) -> str:
    """Loaded throughput of each early-exit layout over the full-224 baseline's, with both accuracies."""
    base = results.get(BASELINE, {}).get("loaded")
    if not base or not base["throughput_rps"]:
        return "ratio: no full-224 baseline in this run"
    lines = []
    for name, result in results.items():
        if name == BASELINE:
            continue
        r = result["loaded"]
        lines.append(
            f"ratio {name} / {BASELINE}, loaded: {r['throughput_rps'] / base['throughput_rps']:.2f}x req/s "
            f"(top-1 {r['accuracy'] or 0:.3f} against {base['accuracy'] or 0:.3f})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
