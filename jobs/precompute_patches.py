"""Precompute AnchorNet glances, patches and CAMs for an ImageFolder tree into sharded Parquet (local or S3).

On a cluster::

    ray job submit --working-dir . -- python jobs/precompute_patches.py \\
        --input s3://bucket/imagenet/train --output s3://bucket/patches/train \\
        --anchornet s3://bucket/runs/anchornet.pt --num-gpus-per-worker 1

Locally (an embedded Ray starts when neither --address nor RAY_ADDRESS is given)::

    python jobs/precompute_patches.py --input DIR --output DIR --anchornet anchornet.pt

Re-running with the same arguments resumes an interrupted job, or does nothing when it is complete.
See docs/precompute.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipelines.precompute import MAX_ASPECT_RATIO, PrecomputeConfig, PrecomputeError, ShardsFailedError, run_precompute


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="precompute_patches",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = parser.add_argument_group("data")
    io.add_argument("--input", required=True, help="ImageFolder root <input>/<class>/<image>, local or s3://")
    io.add_argument("--output", required=True, help="output directory, local or s3://")
    io.add_argument("--anchornet", required=True, metavar="CKPT", help="AnchorNet checkpoint, local or s3://")
    io.add_argument(
        "--classes", choices=("tree", "checkpoint"), default="tree", help="class list: sorted directories or the card's"
    )
    out = parser.add_argument_group("output")
    out.add_argument("--num-patches", type=int, default=4, help="patches per image (T - 1)")
    out.add_argument("--iou-threshold", type=float, default=0.3, help="NMS threshold of the patch selection")
    out.add_argument("--shard-size", type=int, default=1000, help="images per Parquet shard")
    out.add_argument(
        "--shard-order",
        choices=("mixed", "sorted"),
        default="mixed",
        help="mixed: images spread over the shards by a hash of their paths, every shard a sample of all classes; "
        "sorted: consecutive images of the sorted tree (outputs written before this flag existed)",
    )
    out.add_argument("--image-encoding", choices=("png", "jpeg", "raw"), default="jpeg", help="glance/crop encoding")
    out.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality when --image-encoding jpeg")
    out.add_argument("--min-size", type=int, default=None, help="smallest accepted image side (default: K)")
    out.add_argument(
        "--max-aspect-ratio",
        type=float,
        default=MAX_ASPECT_RATIO,
        help="longer side / shorter side beyond which an image goes to the errors table (0: no limit)",
    )
    res = parser.add_argument_group("resources")
    res.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local Ray)")
    res.add_argument("--workers", type=int, default=1, help="actors in the pool")
    res.add_argument(
        "--num-cpus-per-worker",
        type=float,
        default=1.0,
        help="CPUs per actor (its decode threads and forward passes side by side)",
    )
    res.add_argument("--num-gpus-per-worker", type=float, default=0.0, help="GPUs per actor (0 on CPU machines)")
    res.add_argument("--batch-size", type=int, default=64, help="images per mini-batch (AnchorNet: 16 per pass)")
    res.add_argument("--max-shards", type=int, default=None, help="write at most this many shards in this run")
    res.add_argument(
        "--shard-retries",
        type=int,
        default=1,
        help="rounds in which the run retries its failed shards (10 s apart) before it reports them",
    )
    res.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> PrecomputeConfig:
    return PrecomputeConfig(
        input=args.input,
        output=args.output,
        anchornet=args.anchornet,
        num_patches=args.num_patches,
        iou_threshold=args.iou_threshold,
        shard_size=args.shard_size,
        shard_order=args.shard_order,
        image_encoding=args.image_encoding,
        jpeg_quality=args.jpeg_quality,
        min_size=args.min_size,
        max_aspect_ratio=args.max_aspect_ratio or None,  # 0: no limit
        classes_from=args.classes,
        workers=args.workers,
        num_cpus_per_worker=args.num_cpus_per_worker,
        num_gpus_per_worker=args.num_gpus_per_worker,
        batch_size=args.batch_size,
        address=args.address,
        max_shards=args.max_shards,
        shard_retries=args.shard_retries,
        verbose=not args.quiet,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run_precompute(build_config(args))
    except ShardsFailedError as err:  # the other shards are written: a re-run redoes these
        print(f"precompute_patches: error: {err}", file=sys.stderr)
        return 1
    except PrecomputeError as err:
        print(f"precompute_patches: error: {err}", file=sys.stderr)
        return 2
    return 0 if result.complete or args.max_shards is not None else 1


if __name__ == "__main__":
    sys.exit(main())
