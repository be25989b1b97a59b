"""Throughput of the precompute job against decode + resize alone, on the same Ray actors and cores.

In one run on an ImageFolder tree (``--limit`` images evenly spaced over its sorted index, linked into a
temporary tree):

(a) decode + resize only: the job's own actor pool and reading code (``ShardWriter.decoded_batches``:
    read, decode to RGB, resize + centre crop to 224), nothing else;
(b) the full job (``run_precompute``): the same, plus AnchorNet, CAM, patch selection, crops, encoding and
    the Parquet writes;

(c) AnchorNet's CAM alone in this process, on the CPU (one torch thread, a mini-batch of the job's batch size): the
    eager model against the model as the job runs it (``anchornet.prepare_for_inference``: batch norms and the
    normalisation folded, channels-last; ``pipelines.precompute.batch_invariant_cam``: 16 images per pass);
(d) the rest of a mini-batch's work in this process (one thread): preprocessing the decoded images, the batch for
    the model, crops, glance and JPEG encoding, as the job does it (the decoder's (H, W, 3) pixels kept, stacked
    to NHWC, crops by one slice per window) against the path it replaced (a (3, 224, 224) copy per image, an NCHW
    batch converted to NHWC for the model, crops by one gather);

then prints images/s of (a) and (b) (over the span from the first shard's start to the last shard's end, so actor
start-up is left out; wall time including start-up beside it), the ratio (b)/(a), the peak resident memory
of the driver and its Ray processes, the crop encodings measured on the job's own patches, and (on the CPU) the
ceiling of the ratio that (c) and (d) leave: one actor's decode time per image against that plus (c) and (d).

    python -m benchmarks.precompute_throughput --data ../shared/data/imagenette/val --limit 1000

The AnchorNet is the full Table 1 architecture (0.06 GMACs at 224) with random weights unless
``--anchornet`` names a checkpoint: the cost does not depend on the weights.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torchvision.transforms.v2.functional as TF

import anchornet
from anchornet import AnchorNet, Preprocessing, crop_patches, decode_image
from anchornet.image_folder import scan_image_folder
from anchornet.patches import _gather_windows
from anchornet.preprocessing import to_float
from benchmarks._machine import cpu_name
from pipelines import schema
from pipelines.precompute import (
    PrecomputeConfig,
    ShardWriter,
    _run_shards,
    batch_invariant_cam,
    plan_job,
    run_precompute,
)


class DecodeOnly(ShardWriter):
    """The job's actor with everything after decode + resize taken out."""

    def write_shard(self, shard: int, items: Sequence[tuple[str, int]]) -> tuple[int, int]:
        good = bad = 0
        for decoded in self.decoded_batches(items):
            good += sum(d.image is not None for d in decoded)
            bad += sum(d.image is None for d in decoded)
        return good, bad


class PeakMemory:
    """Peak of the summed resident memory of this process and all its descendants (Linux /proc), sampled."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak_total = 0
        self.peak_single = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _tree_rss() -> list[int]:
        parent_of: dict[int, list[int]] = {}
        rss: dict[int, int] = {}
        page = os.sysconf("SC_PAGE_SIZE")
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                parent_of.setdefault(int(fields[1]), []).append(int(proc.name))
                rss[int(proc.name)] = int((proc / "statm").read_text().split()[1]) * page
            except (OSError, ValueError, IndexError):
                continue
        found, todo = [os.getpid()], [os.getpid()]
        while todo:
            for child in parent_of.get(todo.pop(), []):
                found.append(child)
                todo.append(child)
        return [rss.get(pid, 0) for pid in found]

    def _run(self) -> None:
        while not self._stop.is_set():
            sizes = self._tree_rss()
            self.peak_total = max(self.peak_total, sum(sizes))
            self.peak_single = max(self.peak_single, max(sizes, default=0))
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _rate(reports: list[dict[str, Any]]) -> tuple[int, float]:
    images = sum(r["images"] for r in reports)
    span = max(r["finished"] for r in reports) - min(r["started"] for r in reports)
    return images, images / span


def _per_actor_rate(reports: list[dict[str, Any]]) -> float:
    """Median over shards of one actor's images/s while it wrote that shard."""
    return float(np.median([r["images"] / max(r["finished"] - r["started"], 1e-9) for r in reports]))


def _subset_tree(data: Path, limit: int | None, root: Path) -> int:
    index = scan_image_folder(data)
    items = index.items
    if limit is not None and limit < len(items):
        items = [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]
    for rel, _ in items:
        link = root / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to((data / rel).resolve())
        (data / rel).read_bytes()  # warm the page cache so (a) and (b) read from the same place
    return len(items)


def compare_encodings(tree: Path, output: Path, max_images: int, quality: Sequence[int]) -> list[str]:
    """Bytes, encode and decode time per crop, on the job's own selected patches (one thread)."""
    rows = []
    for path in sorted((output / schema.SHARDS_DIR).glob("part-*.parquet")):
        rows += pq.read_table(path, columns=["image_id", "boxes"]).to_pylist()
        if len(rows) >= max_images:
            break
    rows = rows[:max_images]
    manifest = json.loads((output / schema.MANIFEST_FILE).read_text())
    pre = Preprocessing.from_dict(manifest["job"]["preprocessing"])  # the pixels the job cut its boxes from
    images = [pre(decode_image((tree / r["image_id"]).read_bytes())) for r in rows]
    # one image at a time: an image can have fewer patches than asked (NMS), so the box lists are uneven
    crops = torch.cat(
        [
            crop_patches(i[None], torch.tensor([r["boxes"]], dtype=torch.float32))[0]
            for i, r in zip(images, rows, strict=True)
        ]
    )
    size = crops.shape[-1]
    lines = [f"crop encodings on {len(crops)} patches ({size} x {size}) of {len(rows)} images, 1 thread:"]
    variants: list[tuple[str, schema.Encoding, int]] = [("raw uint8", "raw", 0), ("PNG (zlib 6)", "png", 0)]
    variants += [(f"JPEG q={q}", "jpeg", q) for q in quality]
    for name, encoding, q in variants:
        start = time.perf_counter()
        encoded = schema.encode_crops(crops, encoding, q)
        encode_ms = (time.perf_counter() - start) / len(crops) * 1e3
        start = time.perf_counter()
        decoded = torch.stack([schema.decode_crop(b, encoding, size) for b in encoded])
        decode_ms = (time.perf_counter() - start) / len(crops) * 1e3
        error = (decoded.float() - crops.float()).abs()
        sink = io.BytesIO()
        pq.write_table(pa.table({"crop": pa.array(encoded, pa.binary())}), sink, compression="zstd")
        lines.append(
            f"  {name:<13} {np.mean([len(b) for b in encoded]) / 1024:6.1f} KiB/crop "
            f"(in Parquet+zstd {len(sink.getvalue()) / len(crops) / 1024:5.1f}), "
            f"encode {encode_ms:6.3f} ms, decode {decode_ms:6.3f} ms, "
            f"mean |error| {error.mean():.2f}, max {error.max():.0f} (of 255)"
        )
    return lines


def forward_speed(checkpoint: str, batch_size: int, repeats: int = 5) -> tuple[float, float]:
    """ms/image of AnchorNet's CAM on a mini-batch: the eager model on NCHW floats, then as the job runs it
    (``prepare_for_inference``, uint8 made channels-last, ``FORWARD_BATCH`` images per pass), best of N."""
    model, _ = anchornet.load_checkpoint(checkpoint)
    prepared = anchornet.prepare_for_inference(model)
    images = torch.randint(
        0, 256, (batch_size, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    nhwc = images.contiguous(memory_format=torch.channels_last)
    variants = (
        lambda: anchornet.class_activation_map(model, to_float(images)),
        lambda: batch_invariant_cam(prepared, nhwc),
    )
    with torch.inference_mode():
        return _best_of(variants, batch_size, repeats)


def _best_of(variants: Sequence[Callable[[], object]], batch_size: int, repeats: int) -> tuple[float, float]:
    """Best ms/image of two variants on one torch thread, run interleaved so that load changes hit both alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = [float("inf"), float("inf")]
    try:
        for _ in range(repeats):
            for i, run in enumerate(variants):
                start = time.perf_counter()
                run()
                best[i] = min(best[i], 1e3 * (time.perf_counter() - start) / batch_size)
    finally:
        torch.set_num_threads(threads)
    return best[0], best[1]


def layout_speed(batch_size: int, repeats: int = 5) -> tuple[float, float]:
    """ms/image of part (d): the job's per-batch work besides the forward pass, the replaced NCHW path first."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (batch_size, 224, 224, 3), dtype=torch.uint8, generator=generator).numpy()
    images = [PIL.Image.fromarray(p) for p in pixels]
    preprocessing = Preprocessing.as_is(224)
    field = anchornet.ReceptiveField(size=95, stride=8)
    selection = anchornet.random_patches(field, (224, 224), batch_size, 4, generator=generator)
    safe = selection.boxes.long()

    def rest(batch: torch.Tensor, crops: torch.Tensor) -> None:
        glance = TF.resize(batch, [95, 95], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        schema.encode_crops(crops[selection.valid], "jpeg", 95)
        schema.encode_crops(glance, "jpeg", 95)

    def nchw() -> None:
        batch = torch.stack([preprocessing(image) for image in images])
        batch.contiguous(memory_format=torch.channels_last)  # the model's input
        rest(batch, _gather_windows(batch, safe, selection.valid, 95).contiguous())

    def nhwc() -> None:
        decoded = [preprocessing(image, channels_last=True) for image in images]
        batch = torch.stack([d.permute(1, 2, 0) for d in decoded]).permute(0, 3, 1, 2)
        batch.contiguous(memory_format=torch.channels_last)  # a no-op now
        rest(batch, crop_patches(batch, selection.boxes, size=95))

    return _best_of((nchw, nhwc), batch_size, repeats)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="ImageFolder tree <data>/<class>/<image>")
    parser.add_argument("--limit", type=int, default=None, help="N images evenly spaced over the sorted index")
    parser.add_argument("--anchornet", default=None, help="checkpoint (default: random Table 1 AnchorNet)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--num-cpus-per-worker", type=float, default=1.0)
    parser.add_argument(
        "--num-gpus-per-worker", type=float, default=0.0, help="GPUs per actor (fractions share one GPU); 0: CPU only"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--image-encoding", choices=("png", "jpeg", "raw"), default="jpeg")
    parser.add_argument("--jpeg-quality", type=int, default=95)
    parser.add_argument("--encoding-images", type=int, default=200, help="images for the encoding comparison")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    num_gpus = torch.cuda.device_count() if args.num_gpus_per_worker > 0 else 0
    if args.num_gpus_per_worker > 0 and num_gpus == 0:
        raise SystemExit("precompute_throughput: --num-gpus-per-worker > 0 but torch sees no CUDA device")
    import ray

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="precompute-bench-") as tmp:
        tmp_path = Path(tmp)
        tree = tmp_path / "tree"
        num_images = _subset_tree(args.data, args.limit, tree)
        checkpoint = args.anchornet
        if checkpoint is None:
            classes = scan_image_folder(tree).classes
            checkpoint = str(tmp_path / "anchornet.pt")
            anchornet.save_checkpoint(AnchorNet(num_classes=len(classes)), checkpoint, class_names=classes)
        config = PrecomputeConfig(
            input=str(tree),
            output=str(tmp_path / "out"),
            anchornet=checkpoint,
            shard_size=args.shard_size,
            image_encoding=args.image_encoding,
            jpeg_quality=args.jpeg_quality,
            workers=args.workers,
            num_cpus_per_worker=args.num_cpus_per_worker,
            num_gpus_per_worker=args.num_gpus_per_worker,
            batch_size=args.batch_size,
            verbose=False,
        )
        num_cpus = args.workers * args.num_cpus_per_worker
        ray.init(
            address="local",
            num_cpus=max(1, round(num_cpus)),
            num_gpus=num_gpus,
            include_dashboard=False,
            log_to_driver=False,
        )
        try:
            plan = plan_job(config)
            with PeakMemory() as mem_decode:
                start = time.monotonic()
                decode_reports = _run_shards(plan, range(plan.num_shards), writer=DecodeOnly)
                decode_wall = time.monotonic() - start
            with PeakMemory() as mem_full:
                start = time.monotonic()
                result = run_precompute(config)
                full_wall = time.monotonic() - start
        finally:
            ray.shutdown()
        _, decode_rate = _rate(decode_reports)
        _, full_rate = _rate(result.shard_reports)
        encodings = compare_encodings(tree, tmp_path / "out", args.encoding_images, (90, 95))
        eager_ms, folded_ms = forward_speed(checkpoint, args.batch_size)
        nchw_ms, nhwc_ms = layout_speed(args.batch_size)
        size_mb = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*.parquet")) / 1e6

    threads = max(1, int(args.num_cpus_per_worker))
    print("precompute throughput")
    print(f"  data: {args.data} ({num_images} images: {result.rows} rows, {result.errors} errors)")
    print(
        f"  machine: {cpu_name()}, {os.cpu_count()} logical CPUs, load average before/after "
        f"{load_before[0]:.1f}/{os.getloadavg()[0]:.1f}"
    )
    print(
        f"  Ray: local, {num_cpus:g} CPUs, {num_gpus} GPUs; {args.workers} actors x {args.num_cpus_per_worker:g} CPU "
        f"x {args.num_gpus_per_worker:g} GPU{f' ({torch.cuda.get_device_name(0)})' if num_gpus else ''} "
        f"({threads} torch thread, >= 2 decode threads each), batch {args.batch_size}, shards of {args.shard_size}, "
        f"encoding {args.image_encoding}{f' q={args.jpeg_quality}' if args.image_encoding == 'jpeg' else ''}"
    )
    print(
        f"  versions: python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}, "
        f"pyarrow {pa.__version__}, pillow {PIL.__version__}"
    )
    print(f"  (a) decode + resize only: {decode_rate:7.1f} images/s  (wall incl. start-up {decode_wall:.1f} s)")
    print(f"  (b) full job:             {full_rate:7.1f} images/s  (wall incl. start-up {full_wall:.1f} s)")
    print(f"  ratio (b)/(a): {full_rate / decode_rate:.0%}  (target >= 60 %)")
    print(
        f"  one actor, median over shards: (a) {_per_actor_rate(decode_reports):.1f} images/s, "
        f"(b) {_per_actor_rate(result.shard_reports):.1f} images/s"
    )
    print(
        f"  (c) AnchorNet forward on the CPU, 1 thread, batch {args.batch_size}: eager {eager_ms:.2f} ms/image, "
        f"as the job runs it (folded, channels-last, 16 per pass) {folded_ms:.2f} ms/image: {eager_ms / folded_ms:.2f}x"
    )
    print(
        f"  (d) the rest of a batch (preprocess, stack, crops, glance, JPEG), 1 thread: NCHW with crops by one "
        f"gather {nchw_ms:.2f} ms/image, as the job does it (NHWC, crops by slices) {nhwc_ms:.2f} ms/image: "
        f"{nchw_ms / nhwc_ms:.2f}x"
    )
    if num_gpus == 0:
        # Each actor's core either decodes or does the rest; even if nothing but the forward pass (c) cost anything,
        # (b)/(a) could not exceed decode / (decode + forward) per image and actor
        decode_ms = 1e3 / _per_actor_rate(decode_reports)
        print(
            f"  ceiling of (b)/(a) on these cores: decode {decode_ms:.2f} ms/image and actor, with the forward pass "
            f"(c) alone {decode_ms / (decode_ms + folded_ms):.0%}, with (d) too "
            f"{decode_ms / (decode_ms + folded_ms + nhwc_ms):.0%}; 60 % needs everything after decoding within "
            f"{decode_ms * 2 / 3:.2f} ms/image"
        )
    print(
        f"  peak RSS, driver + Ray processes: (a) {mem_decode.peak_total / 2**20:.0f} MiB, "
        f"(b) {mem_full.peak_total / 2**20:.0f} MiB; largest single process (b) {mem_full.peak_single / 2**20:.0f} MiB"
    )
    print(f"  output: {size_mb:.1f} MB of Parquet for {result.rows} images")
    for line in encodings:
        print(line)


if __name__ == "__main__":
    main()
