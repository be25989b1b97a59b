"""Write an ImageNet-pretrained classifier, restricted to a model's classes, as a self-describing checkpoint.

    python jobs/export_classifier.py --arch efficientnet_lite0 --classes-from CKPT --output full224.pt \
        [--input-size 224]

The head keeps the ImageNet rows of the classes of ``--classes-from`` (any checkpoint of this project whose class
names are ImageNet WordNet ids, e.g. the glance classifier): no training. It is the full-224 network of
``jobs/evaluate.py --full-arch``, as a file for ``jobs/serve.py --fallback`` and ``jobs/evaluate.py --full``
(local or ``s3://``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import torch

from anchornet.checkpoint import load_checkpoint, save_checkpoint
from anchornet.classifiers import WeightsUnavailableError, build_classifier, classifier_names, imagenet_indices
from pipelines.train import OneLineParser


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="export_classifier", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", required=True, choices=classifier_names(), metavar="NAME", help="e.g. efficientnet_lite0"
    )
    parser.add_argument(
        "--classes-from", required=True, help="checkpoint whose class names (ImageNet WordNet ids) to keep"
    )
    parser.add_argument("--output", required=True, help="checkpoint to write (local or s3://)")
    parser.add_argument("--input-size", type=int, default=224, help="side the network classifies at (default 224)")
    args = parser.parse_args(argv)
    if args.input_size < 1:
        parser.error("--input-size must be at least 1")
    try:
        _, card = load_checkpoint(args.classes_from)
        if not card.class_names:
            raise ValueError(f"--classes-from {args.classes_from}: the checkpoint names no classes")
        indices = imagenet_indices(card.class_names)
        model = build_classifier(args.arch, len(indices), weights="imagenet", head_from=indices).eval()
        written = save_checkpoint(
            model,
            args.output,
            input_size=args.input_size,
            class_names=list(card.class_names),
            preprocessing=card.preprocessing or None,
            provenance={
                "weights": "imagenet",
                "head": "ImageNet rows of the classes",
                "classes_from": args.classes_from,
            },
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"export_classifier: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the output: a directory, no permission, an unreachable S3 bucket
        print(f"export_classifier: error: cannot write {args.output}: {err}", file=sys.stderr)
        return 1
    except WeightsUnavailableError as err:  # offline: its hint names a library argument (weights=PATH), not a flag
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        advice = f"; run this once with network access (torch.hub caches the weights in {cache})"
        advice = "" if str(err) == err.reason else advice  # no hint: there are no weights to fetch
        print(f"export_classifier: error: --arch {args.arch}: {err.reason}{advice}", file=sys.stderr)
        return 2
    except ImportError as err:  # --arch efficientnet_lite0 without the `pretrained` extra
        print(f"export_classifier: error: --arch {args.arch}: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {args.arch}, {len(indices)} classes, {written.gmacs:.4f} GMACs at {args.input_size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
