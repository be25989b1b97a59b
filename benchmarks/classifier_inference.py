"""A model's forward pass on the CPU as Serve runs it against the eager model, side by side.

Serve's replicas load classifiers through ``anchornet.prepare_classifier_for_inference``: batch norms folded into
the convolutions (found by running one image: timm's attribute-held pairs too) and channels-last weights, fed
channels-last images. This times that model against the checkpoint's eager NCHW model on the same random images,
per input size and batch size, interleaved (eager, prepared, eager, ...) so both see the same machine, and prints
milliseconds per image, the speed-up and the largest output difference. ``--runtime onnxruntime`` adds a third
column: the prepared model run by ONNX Runtime (``pipelines.onnx_runtime``, Serve's ``runtime: onnxruntime``).
An AnchorNet checkpoint is timed as its deployment runs it: ``prepare_for_inference``, CAM and logits.

    python -m benchmarks.classifier_inference --checkpoint checkpoints/glance.pt --sizes 95,224 --runtime onnxruntime
    python -m benchmarks.classifier_inference --checkpoint checkpoints/anchornet.pt --sizes 224 --runtime onnxruntime
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
from benchmarks._runtime import add_runtime_argument, check_runtime


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="classifier checkpoint (default: ImageNet Lite0)")
    parser.add_argument("--sizes", default="95,224", help="input sizes, comma-separated")
    parser.add_argument("--batch-sizes", default="1,2,4,8", help="batch sizes, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (Serve's replicas use 1)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per setting")
    parser.add_argument("--passes", type=int, default=20, help="forward passes per round and model")
    add_runtime_argument(
        parser, "onnxruntime: also time the prepared model run by ONNX Runtime (pip install 'anchornet[onnx]')"
    )
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


def _largest_difference(got: object, want: object) -> float:
    """The largest absolute difference between two outputs: tensors, or tuples of them (AnchorNet's CAM, logits)."""
    if isinstance(got, torch.Tensor):
        return (got.float() - want.float()).abs().max().item()  # type: ignore[union-attr]
    return max(_largest_difference(g, w) for g, w in zip(got, want, strict=True))  # type: ignore[call-overload]


def versions(model: nn.Module, size: int, runtime: str) -> dict[str, nn.Module]:
    """The versions of ``model`` to time at ``size``: eager, prepared (and onnxruntime). An AnchorNet becomes its
    CAM and logits (``CamAndLogits``), prepared with ``prepare_for_inference``."""
    from anchornet import AnchorNet, prepare_classifier_for_inference, prepare_for_inference

    if isinstance(model, AnchorNet):
        from pipelines.onnx_runtime import CamAndLogits

        eager, prepared = CamAndLogits(model), CamAndLogits(prepare_for_inference(model))
    else:
        eager, prepared = model, prepare_classifier_for_inference(model, size)
    models = {"eager": eager, "prepared": prepared}
    if runtime == "onnxruntime":
        from pipelines.onnx_runtime import OnnxRuntimeModel

        example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        models["onnxruntime"] = OnnxRuntimeModel(prepared, example)
    return models


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_runtime("classifier_inference", args.runtime)
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint)
    sizes = [int(s) for s in args.sizes.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    conditions = {"machine": cpu_name(), "torch": torch.__version__, "threads": args.threads, "runtime": args.runtime}
    print(f"conditions: {json.dumps(conditions)}")
    results = []
    for size in sizes:
        models = versions(model, size, args.runtime)
        for batch in batch_sizes:
            images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(size + batch))
            nhwc = images.contiguous(memory_format=torch.channels_last)
            inputs = {name: images if name == "eager" else nhwc for name in models}
            seconds: dict[str, list[float]] = {name: [] for name in models}
            with torch.inference_mode():
                reference = models["eager"](images)
                others = [name for name in models if name != "eager"]
                differences = {name: _largest_difference(models[name](inputs[name]), reference) for name in others}
                for _ in range(args.rounds):
                    for name, m in models.items():
                        seconds[name].append(seconds_per_pass(m, inputs[name], args.passes))
            ms = {name: statistics.median(s) * 1e3 / batch for name, s in seconds.items()}
            row = {
                "size": size,
                "batch": batch,
                "eager_ms_per_image": round(ms["eager"], 3),
                "prepared_ms_per_image": round(ms["prepared"], 3),
                "speedup": round(ms["eager"] / ms["prepared"], 3),
                "max_logit_difference": differences["prepared"],
            }
            line = (
                f"{size:4d} x {size:<4d} batch {batch:3d}   eager {ms['eager']:7.2f} ms/image   "
                f"prepared {ms['prepared']:7.2f} ms/image   {ms['eager'] / ms['prepared']:5.2f}x"
            )
            if "onnxruntime" in ms:
                row["onnxruntime_ms_per_image"] = round(ms["onnxruntime"], 3)
                row["onnxruntime_speedup"] = round(ms["eager"] / ms["onnxruntime"], 3)
                row["onnxruntime_over_prepared"] = round(ms["prepared"] / ms["onnxruntime"], 3)
                row["onnxruntime_max_difference"] = differences["onnxruntime"]
                line += (
                    f"   onnxruntime {ms['onnxruntime']:7.2f} ms/image   {row['onnxruntime_speedup']:5.2f}x "
                    f"({row['onnxruntime_over_prepared']:.2f}x prepared)"
                )
            results.append(row)
            print(f"{line}   max |output difference| {max(differences.values()):.1e}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"conditions": conditions, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
