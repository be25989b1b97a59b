"""The quickstart: train, precompute, evaluate and serve AnchorNet end to end on a small dataset, locally.

    python jobs/quickstart.py [--data ROOT] [--output quickstart-output] [--train-per-class 20
        --val-per-class 10 --epochs 2 ...]

Without ``--data`` it downloads Imagenette-160 (94 MiB, once) into ``$ANCHORNET_CACHE`` (default
``~/.cache/anchornet``). The defaults (20 + 10 images per class, 2 epochs) finish in under 15 minutes on 2 CPU
cores; ``--train-per-class 0 --val-per-class 0`` takes every image. Stages and outputs: pipelines/quickstart.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipelines.quickstart import QuickstartConfig, QuickstartError, run_quickstart
from pipelines.train import OneLineParser


def _per_class(text: str) -> int | None:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: every image), got {value}")
    return value or None


def parse_args(argv: Sequence[str] | None = None) -> QuickstartConfig:
    parser = OneLineParser(prog="quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="ImageFolder ROOT with train/ and val/ (default: Imagenette-160)")
    parser.add_argument("--output", default="quickstart-output", help="output directory (default: %(default)s)")
    parser.add_argument(
        "--cache-dir", default=None, help="download cache (default: $ANCHORNET_CACHE, ~/.cache/anchornet)"
    )
    parser.add_argument("--train-per-class", type=_per_class, default=20, help="train images per class (0: all)")
    parser.add_argument("--val-per-class", type=_per_class, default=10, help="val images per class (0: all)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of every training stage (default: 2)")
    parser.add_argument("--anchornet-epochs", type=int, default=None, help="epochs of stage I (default: --epochs)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--arch", default="efficientnet_lite0", help="glance and patch classifiers (%(default)s)")
    parser.add_argument("--no-pretrained", action="store_true", help="classifiers from scratch, not ImageNet weights")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray (default: all)")
    parser.add_argument("--loader-workers", type=int, default=1, help="DataLoader processes per training worker")
    parser.add_argument("--serve-images", type=int, default=5, help="val images classified over HTTP")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: tiny untrained models
    args = parser.parse_args(argv)
    try:
        return QuickstartConfig(
            output=args.output,
            data=args.data,
            cache_dir=args.cache_dir,
            train_per_class=args.train_per_class,
            val_per_class=args.val_per_class,
            epochs=args.epochs,
            anchornet_epochs=args.anchornet_epochs,
            batch_size=args.batch_size,
            arch=args.arch,
            weights=None if args.no_pretrained else "imagenet",
            num_cpus=args.num_cpus,
            loader_workers=args.loader_workers,
            serve_images=args.serve_images,
            seed=args.seed,
            tiny=args.tiny,
        )
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        run_quickstart(config)
    except QuickstartError as err:
        print(f"quickstart: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
