"""Stage II: train the glance or the patch classifier (f_glance, f_patch) at K x K on Ray Train.

    python jobs/train_classifier.py --role glance|patch --arch NAME [--weights imagenet|PATH]
        --data ROOT [--patches PARQUET_DIR | --anchornet CKPT] --output OUT [--epochs N --holdout-size N ...]

``--role glance``: the augmented image resized to K. ``--role patch``: the top AnchorNet patches of the
augmented image, cropped on the fly by the frozen ``--anchornet`` (eval mode), or the precomputed crops in
``PARQUET_DIR/train`` (and ``PARQUET_DIR/val``), shuffled ``--shuffle-window`` shards at a time. Final checkpoint:
OUT/glance.pt or OUT/patch.pt.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipelines.train import OneLineParser, add_common_arguments, config_from_args, run_job
from pipelines.train_data import DEFAULT_SHUFFLE_WINDOW


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="train_classifier", description=__doc__.splitlines()[0])
    add_common_arguments(parser, epochs=30, schedule="cosine")
    parser.add_argument("--role", choices=("glance", "patch"), required=True)
    parser.add_argument("--arch", required=True, help="classifier name, e.g. efficientnet_lite0, resnet50")
    parser.add_argument(
        "--weights",
        default=None,
        help="'imagenet' (head rows of the matching ImageNet classes when the class names are WordNet ids) or a "
        "checkpoint/state dict PATH (default: random)",
    )
    parser.add_argument("--anchornet", default=None, help="stage I checkpoint (K, and patches on the fly)")
    parser.add_argument("--patches", default=None, help="precomputed patch Parquet DIR with train/ (and val/)")
    parser.add_argument(
        "--patch-size",
        type=int,
        default=None,
        help="the classifier's input side: the glance image, or each K x K patch, resized to it (default: K, the "
        "AnchorNet receptive field or the precomputed patches' side)",
    )
    parser.add_argument("--num-patches", type=int, default=4, help="patches per image for --role patch")
    parser.add_argument(
        "--shuffle-window",
        type=int,
        default=None,
        metavar="W",
        help=f"with --patches: each DataLoader process shuffles its own run of shards W at a time (default: "
        f"{DEFAULT_SHUFFLE_WINDOW}) and holds W + 1 shards' encoded patches (~18 MB per 1000-image shard at 4 "
        "patches); shards of the default --shard-order mixed each hold all classes, sorted ones one or two, where a "
        "larger W mixes more classes into each stretch of the epoch; W >= a process's shards shuffles its run whole",
    )
    args = parser.parse_args(argv)
    if args.shuffle_window is not None and not (args.role == "patch" and args.patches):
        parser.error("--shuffle-window is for --role patch --patches")
    try:
        config = config_from_args(
            args,
            stage=args.role,
            arch=args.arch,
            weights=args.weights,
            anchornet=args.anchornet,
            patches=args.patches,
            patch_size=args.patch_size,
            num_patches=args.num_patches,
            **({} if args.shuffle_window is None else {"shuffle_window": args.shuffle_window}),
        )
    except ValueError as err:
        parser.error(str(err))
    return run_job(config, args.ray_address, in_process=args.in_process)


if __name__ == "__main__":
    raise SystemExit(main())
