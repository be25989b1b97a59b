"""The ``--runtime`` option of the benchmarks that run the served models (torch, or ONNX Runtime on the CPU)."""

from __future__ import annotations

import argparse


def add_runtime_argument(parser: argparse.ArgumentParser, help: str) -> None:
    from pipelines.onnx_runtime import RUNTIMES

    parser.add_argument("--runtime", choices=RUNTIMES, default="torch", help=help)


def check_runtime(prog: str, runtime: str) -> None:
    """Exit with one line, before any work, when ``runtime`` is onnxruntime and its packages are missing."""
    if runtime != "onnxruntime":
        return
    from pipelines.onnx_runtime import require_onnxruntime

    try:
        require_onnxruntime()
    except RuntimeError as err:
        raise SystemExit(f"{prog}: {err}") from None
