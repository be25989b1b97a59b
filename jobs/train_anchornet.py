"""Stage I: train AnchorNet from scratch with cross-entropy on an ImageFolder ROOT (train/ and val/), on Ray Train.

    python jobs/train_anchornet.py --data ROOT --output OUT [--epochs N --batch-size B --lr LR
        --num-workers W --use-gpu --seed S --image-size 224 --holdout-size N ...]

Writes Ray Train checkpoints under OUT/ray_anchornet (re-run the same command to resume) and the final
self-describing checkpoint to OUT/anchornet.pt. ``--holdout-size N`` leaves N train/ images out for
jobs/evaluate.py's thresholds (give stage II the same). See docs/training.md.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipelines.train import OneLineParser, add_common_arguments, config_from_args, run_job


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="train_anchornet", description=__doc__.splitlines()[0])
    add_common_arguments(parser, epochs=100, schedule="step")
    parser.add_argument("--arch", choices=("anchornet", "anchornet_test"), default="anchornet", help="Table 1 or tiny")
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args, stage="anchornet", arch=args.arch)
    except ValueError as err:
        parser.error(str(err))
    return run_job(config, args.ray_address, in_process=args.in_process)


if __name__ == "__main__":
    raise SystemExit(main())
