"""Training images/s of the Ray Train path (one worker) against a plain single-process PyTorch loop.

Both train the same model on the same images with the same batch, loader processes and torch threads, with
the same per-epoch code (``pipelines.train.build_task`` / ``train_epoch`` / ``train_data.epoch_loader``); the
Ray path adds the TorchTrainer worker, ``prepare_model``/``prepare_data_loader`` and a checkpoint report per
epoch. Prints steady-state images/s (epochs after the first, training only), the end-to-end wall time
(the worker group's start-up and the checkpoints included; ``ray.init`` itself, before both, is not) and their
ratios, with the conditions.

    python -m benchmarks.train_overhead --data ../shared/data/imagenette --limit 1024 --epochs 3 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence

import torch
from torch import nn

from benchmarks._machine import cpu_name
from pipelines import train_data
from pipelines.train import TrainConfig, build_task, evaluate, make_optimizer, run_training, train_epoch

NICENESS = "RAY_worker_niceness"  # Ray's own (lower-case) variable name


def plain_loop(config: TrainConfig) -> tuple[list[float], float]:
    """Per-epoch training images/s and the total wall time of a plain single-process loop."""
    started = time.perf_counter()
    torch.set_num_threads(config.threads or 1)
    torch.manual_seed(config.seed)
    task = build_task(config)
    model = task.model
    optimizer, scheduler = make_optimizer(config, model)
    criterion = nn.CrossEntropyLoss()
    validation = train_data.val_loader(
        task.val_set, batch_size=config.batch_size, rank=0, world_size=1, num_workers=config.loader_workers
    )
    rates = []
    for epoch in range(config.epochs):
        loader = train_data.epoch_loader(
            task.train_set,
            batch_size=config.batch_size,
            epoch=epoch,
            seed=config.seed,
            rank=0,
            world_size=1,
            num_workers=config.loader_workers,
        )
        t0 = time.perf_counter()
        _, _, seen = train_epoch(task, model, loader, optimizer, criterion)
        rates.append(seen / (time.perf_counter() - t0))
        scheduler.step()
        evaluate(task, model, validation)
    return rates, time.perf_counter() - started


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="ROOT with train/ and val/")
    parser.add_argument("--arch", choices=("anchornet", "anchornet_test"), default="anchornet")
    parser.add_argument("--limit", type=int, default=1024, help="images per split, evenly spaced")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (both paths)")
    parser.add_argument("--loader-workers", type=int, default=1, help="DataLoader processes (both paths)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved plain/Ray rounds; the best is kept")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import ray

    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault(NICENESS, "0")  # Ray nices its workers to 15; the plain loop runs at 0
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    steady = slice(1, None) if args.epochs > 1 else slice(None)
    plain_runs: list[tuple[list[float], float]] = []
    ray_runs: list[tuple[list[float], float]] = []
    try:
        for _ in range(args.rounds):  # interleaved, best of N: robust to other load on a shared machine
            with tempfile.TemporaryDirectory() as out:
                config = TrainConfig(
                    data=args.data,
                    output=out,
                    arch=args.arch,
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    limit=args.limit,
                    threads=args.threads,
                    loader_workers=args.loader_workers,
                    cpus_per_worker=float(os.cpu_count() or 1),
                    resize_size=224,
                    max_failures=0,
                )
                plain_runs.append(plain_loop(config))
                outcome = run_training(config, verbose=False)
                ray_runs.append(([h["train_images_per_s"] for h in outcome.history], outcome.seconds))
                images = outcome.history[0]["train_samples"] * args.epochs
    finally:
        ray.shutdown()
    plain_ips = max(statistics.median(rates[steady]) for rates, _ in plain_runs)
    ray_ips = max(statistics.median(rates[steady]) for rates, _ in ray_runs)
    ratio = ray_ips / plain_ips
    print(
        f"conditions: {cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end; "
        f"torch {torch.__version__} ({args.threads} threads), ray {ray.__version__}, python "
        f"{platform.python_version()}; {args.arch}, {args.limit} train images at 224, batch {args.batch_size}, "
        f"{args.loader_workers} loader process(es), {args.epochs} epochs x {args.rounds} interleaved rounds, "
        f"Ray worker niceness {os.environ.get(NICENESS)}"
    )
    for name, runs in (("plain loop  ", plain_runs), ("ray train x1", ray_runs)):
        rounds = "; ".join(", ".join(f"{r:.1f}" for r in rates) for rates, _ in runs)
        print(
            f"{name}: {max(statistics.median(r[steady]) for r, _ in runs):7.1f} img/s steady, best round "
            f"(per epoch: {rounds})"
        )
    print(f"steady-state overhead: {100 * (1 - ratio):+.1f} % (ratio ray/plain {ratio:.3f}; target > 0.90)")
    plain_wall, ray_wall = min(w for _, w in plain_runs), min(w for _, w in ray_runs)
    print(
        f"end to end   : plain {plain_wall:.0f} s, ray {ray_wall:.0f} s for {images} training images "
        f"(+ val each epoch); ratio {plain_wall / ray_wall:.3f} "
        "(worker start-up and checkpoints included, ray.init not)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
