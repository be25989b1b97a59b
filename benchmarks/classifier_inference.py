"""A downstream classifier's forward pass on the CPU as Serve runs it against the eager model, side by side.

Serve's replicas load classifiers through ``anchornet.prepare_classifier_for_inference``: batch norms folded into
the convolutions (found by running one image: timm's attribute-held pairs too) and channels-last weights, fed
channels-last images. This times that model against the checkpoint's eager NCHW model on the same random images,
per input size and batch size, interleaved (eager, prepared, eager, ...) so both see the same machine, and prints
milliseconds per image, the speed-up and the largest logit difference.

    python -m benchmarks.classifier_inference --checkpoint checkpoints/glance.pt --sizes 95,224
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from benchmarks._machine import cpu_name


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="classifier checkpoint (default: ImageNet Lite0)")
    parser.add_argument("--sizes", default="95,224", help="input sizes, comma-separated")
    parser.add_argument("--batch-sizes", default="1,2,4,8", help="batch sizes, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (Serve's replicas use 1)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per setting")
    parser.add_argument("--passes", type=int, default=20, help="forward passes per round and model")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def load_model(checkpoint: str | None) -> nn.Module:
    from anchornet import build_classifier, load_checkpoint

    if checkpoint is None:
        return build_classifier("efficientnet_lite0", 1000, weights="imagenet").eval()
    model, _ = load_checkpoint(checkpoint)
    return model.eval()


def seconds_per_pass(model: Callable[[torch.Tensor], object], images: torch.Tensor, passes: int) -> float:
    """Median seconds of ``passes`` calls ``model(images)`` (after two warm-up calls)."""
    model(images), model(images)
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        model(images)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    from anchornet import prepare_classifier_for_inference

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint)
    sizes = [int(s) for s in args.sizes.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    conditions = {"machine": cpu_name(), "torch": torch.__version__, "threads": args.threads}
    print(f"conditions: {json.dumps(conditions)}")
    results = []
    for size in sizes:
        prepared = prepare_classifier_for_inference(model, size)
        for batch in batch_sizes:
            images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(size + batch))
            nhwc = images.contiguous(memory_format=torch.channels_last)
            eager_s, prepared_s = [], []
            with torch.inference_mode():
                difference = (prepared(nhwc) - model(images)).abs().max().item()
                for _ in range(args.rounds):
                    eager_s.append(seconds_per_pass(model, images, args.passes))
                    prepared_s.append(seconds_per_pass(prepared, nhwc, args.passes))
            eager_ms = statistics.median(eager_s) * 1e3 / batch
            prepared_ms = statistics.median(prepared_s) * 1e3 / batch
            row = {
                "size": size,
                "batch": batch,
                "eager_ms_per_image": round(eager_ms, 3),
                "prepared_ms_per_image": round(prepared_ms, 3),
                "speedup": round(eager_ms / prepared_ms, 3),
                "max_logit_difference": difference,
            }
            results.append(row)
            print(
                f"{size:4d} x {size:<4d} batch {batch:3d}   eager {eager_ms:7.2f} ms/image   "
                f"prepared {prepared_ms:7.2f} ms/image   {eager_ms / prepared_ms:5.2f}x   "
                f"max |logit difference| {difference:.1e}",
                flush=True,
            )
    if args.json is not None:
        args.json.write_text(json.dumps({"conditions": conditions, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
