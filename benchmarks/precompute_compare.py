"""Compare two precompute outputs row by row: the check that a GPU run wrote the CPU's rows.

The job's rows must not depend on where they were computed. Run the same input, checkpoint and options once
with ``--num-gpus-per-worker 0`` and once with GPUs, then::

    python -m benchmarks.precompute_compare OUT_CPU OUT_GPU

It matches rows by ``image_id`` and counts, per column, the rows whose values differ exactly (boxes, CAM cells,
crop and glance bytes, AnchorNet's top-1, the number of patches), and prints the largest differences of the
float columns (the CAM grid, the patches' CAM scores, the confidence). Exit status 0 when no row differs
exactly, 1 otherwise. Either output may be local or ``s3://``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

#: columns compared exactly, and the float columns whose largest absolute difference is reported
EXACT = ("num_patches", "boxes", "cells", "patches", "glance", "top1", "label")
FLOAT = ("cam", "cam_scores", "confidence")


def load_rows(output: str) -> dict[str, dict[str, Any]]:
    """``image_id`` -> row, over every shard the output's manifest lists."""
    import pyarrow.parquet as pq

    from anchornet import storage
    from pipelines.schema import MANIFEST_FILE

    manifest = json.loads(storage.read_bytes(storage.join(output, MANIFEST_FILE)))
    fs, root = storage.resolve(output)
    rows: dict[str, dict[str, Any]] = {}
    for shard in manifest["shards"]:
        for row in pq.read_table(f"{root}/{shard['file']}", filesystem=fs).to_pylist():
            rows[row["image_id"]] = row
    return rows


def _max_abs_difference(a: Any, b: Any) -> float:
    a = a if isinstance(a, list) else [a]
    b = b if isinstance(b, list) else [b]
    if len(a) != len(b):
        return float("inf")
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def compare(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Rows of both, image ids in one only, rows differing per exact column, largest float differences."""
    common = sorted(set(a) & set(b))
    differing = {column: sum(a[i][column] != b[i][column] for i in common) for column in EXACT}
    largest = {
        column: max((_max_abs_difference(a[i][column], b[i][column]) for i in common), default=0.0) for column in FLOAT
    }
    return {
        "rows": [len(a), len(b)],
        "only_in_first": len(set(a) - set(b)),
        "only_in_second": len(set(b) - set(a)),
        "rows_differing": sum(any(a[i][c] != b[i][c] for c in EXACT) for i in common),
        "differing": differing,
        "max_abs_difference": largest,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", help="a precompute output (local or s3://)")
    parser.add_argument("second", help="another output of the same job")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = compare(load_rows(args.first), load_rows(args.second))
    print(json.dumps(result))
    same = result["rows_differing"] == 0 and result["only_in_first"] == result["only_in_second"] == 0
    print(
        f"{result['rows'][0]} and {result['rows'][1]} rows; {result['rows_differing']} differ "
        f"({', '.join(f'{c} {n}' for c, n in result['differing'].items() if n) or 'none'}); largest differences: "
        + ", ".join(f"{c} {v:.3g}" for c, v in result["max_abs_difference"].items())
        + ("" if same else "  -> NOT the same rows")
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
