"""An ImageNet-like copy of an ImageFolder of small JPEGs, for ``benchmarks.precompute_throughput``.

Imagenette is stored at 224 x 224 (~9 KiB per JPEG), so it decodes several times faster than ImageNet's photos
(~500 x 375, ~110 KiB), and the precompute benchmark's ratio (full job against decode only) depends on that
cost. This takes ``--count`` images evenly over ``--data``, upscales each to ``--size`` (bicubic), adds Gaussian
noise (``--noise``, so that the files carry a photo's entropy rather than an upscale's smoothness) and saves it as
JPEG (``--quality``) under the same ``class/file`` path. Deterministic (noise seeded by ``--seed``).

    python -m benchmarks.large_jpegs --data ../shared/data/imagenette/val --output /tmp/big --count 3000
    python -m benchmarks.precompute_throughput --data /tmp/big --limit 3000 --anchornet checkpoints/anchornet.pt
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from anchornet.image_folder import scan_image_folder


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="ImageFolder (class folders) to copy from")
    parser.add_argument("--output", type=Path, required=True, help="new ImageFolder (must not exist)")
    parser.add_argument("--count", type=int, default=3000, help="images taken evenly over --data")
    parser.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    parser.add_argument("--noise", type=float, default=7.0, help="Gaussian noise sigma, in 0..255 levels")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.output.exists():
        print(f"large_jpegs: error: {args.output} exists; give a new directory", file=sys.stderr)
        return 2
    items = scan_image_folder(str(args.data)).items
    if not items or args.count < 1:
        print(f"large_jpegs: error: no images to take from {args.data} (--count {args.count})", file=sys.stderr)
        return 2
    step = len(items) / min(args.count, len(items))
    rng = np.random.default_rng(args.seed)
    chosen = [items[int(i * step)][0] for i in range(min(args.count, len(items)))]
    total = 0
    for rel in chosen:
        with Image.open(args.data / rel) as source:
            image = source.convert("RGB").resize(tuple(args.size), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, args.noise, (args.size[1], args.size[0], 3))
        target = args.output / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(target, quality=args.quality)
        total += target.stat().st_size
    width, height = args.size
    mean_kib = total / len(chosen) / 1024
    print(f"wrote {len(chosen)} JPEGs of {width} x {height} to {args.output}, {mean_kib:.1f} KiB each on average")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
