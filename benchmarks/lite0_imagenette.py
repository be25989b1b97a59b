"""Top-1 and throughput of the packaged EfficientNet-Lite0 ImageNet weights on an ImageNet-subset ImageFolder.

The folder names must be ImageNet wnids (``val/n01440764/*.JPEG``), as in imagenette. Images are fed as they are
(no resize or crop: imagenette is stored at 224 x 224), normalised with ``LITE0_MEAN`` / ``LITE0_STD``.
Prints top-1 over the 1000 ImageNet classes, top-1 with the prediction restricted to the folder's classes,
images/s (JPEG decoding included) and the conditions.

    python -m benchmarks.lite0_imagenette --data ../shared/data/imagenette/val --threads 2
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from timm.data import ImageNetInfo
from torch.utils.data import DataLoader, Subset
from torchvision import datasets
from torchvision.transforms import v2

from anchornet.pretrained import LITE0_MEAN, LITE0_STD, LITE0_TIMM_NAME, create_efficientnet_lite0
from benchmarks._machine import cpu_name


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="ImageFolder whose class folders are ImageNet wnids")
    parser.add_argument("--limit", type=int, default=None, help="N images evenly spaced over the sorted folder")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: decode in the main process)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    transform = v2.Compose(
        [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=LITE0_MEAN, std=LITE0_STD)]
    )
    dataset = datasets.ImageFolder(args.data, transform=transform)  # PIL loader, greyscale converted to RGB
    wnids = ImageNetInfo().label_names()
    unknown = [wnid for wnid in dataset.classes if wnid not in wnids]
    if unknown:
        raise SystemExit(f"class folders are not ImageNet-1k wnids: {unknown[:5]}")
    imagenet_index = torch.tensor([wnids.index(wnid) for wnid in dataset.classes])
    subset = dataset
    if args.limit is not None and args.limit < len(dataset):
        subset = Subset(dataset, torch.linspace(0, len(dataset) - 1, args.limit).long().tolist())
    loader = DataLoader(subset, batch_size=args.batch_size, num_workers=args.workers)

    model = create_efficientnet_lite0(pretrained=True).eval()
    correct_full = correct_restricted = seen = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for images, targets in loader:
            logits = model(images)
            correct_full += (logits.argmax(1) == imagenet_index[targets]).sum().item()
            correct_restricted += (logits[:, imagenet_index].argmax(1) == targets).sum().item()
            seen += len(targets)
    seconds = time.perf_counter() - start
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    print(f"EfficientNet-Lite0 ImageNet-1k (timm {LITE0_TIMM_NAME}) on {args.data}: {seen} images")
    print(f"top-1, 1000 ImageNet classes:       {100 * correct_full / seen:6.2f} %")
    print(f"top-1, restricted to {len(dataset.classes):>4} classes:  {100 * correct_restricted / seen:6.2f} %")
    print(f"throughput: {seen / seconds:.1f} images/s ({seconds:.1f} s, JPEG decoding included)")
    print(
        f"conditions: torch {torch.__version__}, timm {timm.__version__}, {cpu_name()},"
        f" threads {args.threads}, batch {args.batch_size}, workers {args.workers}, float32, 224 x 224 as stored,"
        f" {os.cpu_count()} CPUs with 1-min load average {load:.1f} at the end"
    )


if __name__ == "__main__":
    main()
