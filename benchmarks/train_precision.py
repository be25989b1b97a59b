"""Training images/s in float32 against ``--amp`` (bfloat16 autocast), model step alone, on one device.

With ``--channels-last`` each model is also timed as ``--channels-last`` places it (``training_model``).

Both run ``pipelines.train.train_epoch`` (the loop of every training epoch) with ``amp`` off and on, on the same
synthetic uint8 batches already on the device (no decoding or loading: the forward, loss, backward and SGD step
of the model alone), with the same model, initial weights, optimizer and batch. Models: stage I's AnchorNet at
224, stage II's EfficientNet-Lite0 at K = 95, and ResNet-50 at 224 as a larger classifier. Prints images/s of
each precision and the ratio, with the conditions.

    python -m benchmarks.train_precision --device cuda --steps 40
    python -m benchmarks.train_precision --device cpu --steps 3 --models anchornet
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Sequence

import torch
from torch import nn

from benchmarks._machine import cpu_name
from pipelines.train import Task, TrainConfig, build_model, make_optimizer, train_epoch, training_model

# name -> (stage, arch, input side, batch)
MODELS = {
    "anchornet": ("anchornet", "anchornet", 224, 128),
    "efficientnet_lite0": ("glance", "efficientnet_lite0", 95, 256),
    "resnet50": ("glance", "resnet50", 224, 128),
}
NUM_CLASSES = 10


def images_per_s(
    name: str,
    device: torch.device,
    *,
    amp: bool,
    steps: int,
    warmup: int,
    batch: int | None,
    channels_last: bool = False,
) -> float:
    """Training images/s of ``MODELS[name]`` over ``steps`` steps after ``warmup`` steps."""
    stage, arch, size, default_batch = MODELS[name]
    batch = batch or default_batch
    config = TrainConfig(
        data="-", output="-", stage=stage, arch=arch, batch_size=batch, amp=amp, channels_last=channels_last
    )
    torch.manual_seed(0)
    classes = [str(i) for i in range(NUM_CLASSES)]
    task = Task(config, classes, build_model(config, NUM_CLASSES), None, None, size)  # type: ignore[arg-type]
    model = training_model(task, device)  # as the training jobs place it
    optimizer, _ = make_optimizer(config, model)
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator).to(device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator).to(device)
    train_epoch(task, model, [(images, labels)] * warmup, optimizer, criterion, amp=amp)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    _, _, seen = train_epoch(task, model, [(images, labels)] * steps, optimizer, criterion, amp=amp)  # syncs per step
    return seen / (time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train_precision", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per model and precision")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None, help="default: each model's (see MODELS)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU")
    parser.add_argument("--channels-last", action="store_true", help="also time the models in channels-last layout")
    args = parser.parse_args(argv)
    names = [name for name in args.models.split(",") if name]
    unknown = [name for name in names if name not in MODELS]
    if unknown or args.steps < 1 or args.warmup < 1:
        parser.error(f"unknown models {unknown}" if unknown else "--steps and --warmup must be at least 1")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"conditions: {what}, torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} thread(s), "
        f"{args.steps} timed steps after {args.warmup}, synthetic batches on the device"
    )
    layouts = (False, True) if args.channels_last else (False,)
    for name in names:
        _, _, size, batch = MODELS[name]
        for layout in layouts:
            rates = [
                images_per_s(
                    name, device, amp=amp, steps=args.steps, warmup=args.warmup, batch=args.batch_size,
                    channels_last=layout,
                )
                for amp in (False, True)
            ]  # fmt: skip
            print(
                f"{name:>18} at {size}, batch {args.batch_size or batch}{', channels-last' if layout else ''}: "
                f"float32 {rates[0]:9.1f} images/s  --amp {rates[1]:9.1f} images/s  ratio {rates[1] / rates[0]:.2f}x",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
