"""The precompute job under failure: input reads that fail (for a while or for good), files missing on an actor's node,
long thin images, a read-only output of a finished job, outputs written before ``--max-aspect-ratio``, clusters."""

from __future__ import annotations

import errno
import json
import re
import shutil
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from _helpers import InFlight
from PIL import Image

from anchornet import storage
from jobs.precompute_patches import build_config, main, parse_args
from pipelines import precompute, schema
from pipelines.precompute import (
    DISAPPEARED,
    READ_RETRY_DELAYS,
    PrecomputeConfig,
    PrecomputeError,
    ShardError,
    ShardsFailedError,
    ShardWriter,
    plan_job,
    run_precompute,
    shared_storage_warning,
)

SHARD_SIZE = 2


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 good images in two classes (3 shards of 2) and one long thin image of 96 x 2000 (20.8:1), the last."""
    root = tmp_path_factory.mktemp("robust") / "train"
    rng = np.random.default_rng(0)
    for i, name in enumerate(("cat/a.jpg", "cat/b.jpg", "cat/c.jpg", "dog/d.jpg", "dog/e.jpg", "dog/f.jpg")):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (240 + 8 * i, 256, 3), dtype=np.uint8)).save(root / name)
    Image.fromarray(rng.integers(0, 256, (2000, 96, 3), dtype=np.uint8)).save(root / "dog/z_thin.png")
    return root


@pytest.fixture(scope="module")
def checkpoint(cat_dog_anchornet: Path) -> Path:
    return cat_dog_anchornet


def _config(tree: Path, out: Path, ckpt: Path, **kwargs: Any) -> PrecomputeConfig:
    # These tests place failures by shard: consecutive images of the sorted tree (test_precompute tests "mixed").
    defaults: dict[str, Any] = {
        "shard_size": SHARD_SIZE,
        "shard_order": "sorted",
        "num_cpus_per_worker": 0.5,
        "batch_size": 2,
    }
    return PrecomputeConfig(input=str(tree), output=str(out), anchornet=str(ckpt), **{**defaults, **kwargs})


class FlakyFileSystem:
    """The input filesystem, with ``open_input_stream`` raising ``fail(path, attempt)`` when that is not None."""

    def __init__(self, fs: Any, fail: Callable[[str, int], OSError | None]) -> None:
        self.fs, self.fail, self.opens = fs, fail, Counter[str]()

    def open_input_stream(self, path: str) -> Any:
        self.opens[path] += 1
        error = self.fail(path, self.opens[path])
        if error is not None:
            raise error
        return self.fs.open_input_stream(path)


def _writer(
    tree: Path, out: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch, fail: Callable[[str, int], OSError | None]
) -> tuple[precompute.JobPlan, ShardWriter, FlakyFileSystem]:
    plan = plan_job(_config(tree, out, ckpt))
    writer = ShardWriter(plan.worker_spec())
    flaky = FlakyFileSystem(writer.in_fs, fail)
    monkeypatch.setattr(writer, "in_fs", flaky)
    monkeypatch.setattr(precompute, "READ_RETRY_DELAYS", (0.0, 0.0))
    return plan, writer, flaky


def _errors(out: Path, shard: int) -> dict[str, str]:
    table = pq.read_table(out / schema.ERRORS_DIR / schema.errors_name(shard)).to_pylist()
    return {row["image_id"]: row["reason"] for row in table}


def _nothing_committed(out: Path, shard: int) -> bool:
    names = {p.name for p in out.rglob("*") if p.is_file()}
    return (
        schema.shard_name(shard) not in names
        and schema.errors_name(shard) not in names
        and not any(name.endswith(".tmp") for name in names)
    )


# ----------------------------------------------------------------------------------------------------------
# reading: transient and permanent errors (no Ray: the actor's work in process)


def test_retry_budget_is_small() -> None:
    assert len(READ_RETRY_DELAYS) + 1 == 3 and sum(READ_RETRY_DELAYS) < 1.0


def test_a_read_that_fails_twice_is_retried_and_the_image_kept(tree, checkpoint, tmp_path, monkeypatch) -> None:
    eio = OSError(errno.EIO, "Input/output error")
    plan, writer, flaky = _writer(tree, tmp_path, checkpoint, monkeypatch, lambda p, n: eio if n <= 2 else None)
    assert writer.write_shard(0, plan.shard_items(0)) == (SHARD_SIZE, 0)
    assert set(flaky.opens.values()) == {3}


def test_a_read_that_keeps_failing_fails_the_shard(tree, checkpoint, tmp_path, monkeypatch) -> None:
    """After three tries the shard is not committed (no errors row that would drop a good image for good)."""
    failing = "cat/b.jpg"

    def fail(path: str, attempt: int) -> OSError | None:
        return (
            OSError("When reading information for key 'b.jpg': AWS Error NETWORK_CONNECTION")
            if failing in path
            else None
        )

    plan, writer, flaky = _writer(tree, tmp_path, checkpoint, monkeypatch, fail)
    with pytest.raises(ShardError, match=r"cannot read .*cat/b\.jpg \(3 tries\): .*NETWORK_CONNECTION"):
        writer.write_shard(0, plan.shard_items(0))
    assert _nothing_committed(tmp_path, 0)
    assert max(flaky.opens.values()) == 3
    report = writer({"shard": [0], "items": [json.dumps(plan.shard_items(0))]})  # the actor's report to the driver
    assert report["rows"] == [0] and "cat/b.jpg (3 tries)" in report["failed"][0] and "\n" not in report["failed"][0]
    assert _nothing_committed(tmp_path, 0)


def test_every_s3_error_but_a_missing_key_is_retried(tree, checkpoint, tmp_path, monkeypatch) -> None:
    denied = PermissionError(errno.EACCES, "AWS Error ACCESS_DENIED during GetObject operation")
    plan, writer, flaky = _writer(tree, tmp_path, checkpoint, monkeypatch, lambda p, n: denied)
    monkeypatch.setattr(writer, "remote_input", True)
    with pytest.raises(ShardError, match="3 tries"):
        writer.write_shard(0, plan.shard_items(0))
    missing = OSError("AWS Error NO_SUCH_KEY: NoSuchKey")
    monkeypatch.setattr(flaky, "fail", lambda p, n: missing if "cat/b.jpg" in p else None)
    assert writer.write_shard(0, plan.shard_items(0)) == (1, 1)
    assert _errors(tmp_path, 0) == {"cat/b.jpg": DISAPPEARED}


def test_permanent_local_errors_go_to_the_errors_table_at_once(tree, checkpoint, tmp_path, monkeypatch) -> None:
    """Locally, permission denied and a directory where a file was listed fail the same way on every run."""
    copy = tmp_path / "train"
    shutil.copytree(tree, copy)
    (copy / "cat/a.jpg").unlink()
    (copy / "cat/a.jpg").mkdir()  # after the listing: the index below still says it is a file
    plan = plan_job(_config(tree, tmp_path / "out", checkpoint))
    spec = {**plan.worker_spec(), "input": str(copy)}
    writer = ShardWriter(spec)
    denied = PermissionError(errno.EACCES, "Permission denied")
    flaky = FlakyFileSystem(writer.in_fs, lambda p, n: denied if p.endswith("cat/b.jpg") else None)
    monkeypatch.setattr(writer, "in_fs", flaky)
    assert writer.write_shard(0, plan.shard_items(0)) == (0, 2)
    reasons = _errors(tmp_path / "out", 0)
    assert reasons["cat/a.jpg"].startswith("unreadable: ") and "directory" in reasons["cat/a.jpg"]
    assert reasons["cat/b.jpg"] == "unreadable: [Errno 13] Permission denied"
    assert set(flaky.opens.values()) == {1}  # not retried


def test_remote_reads_are_in_flight_together_and_change_no_row(tree, checkpoint, tmp_path, monkeypatch) -> None:
    """On S3 an actor's reads run on their own pool, a mini-batch and the next one at once (with the reads inside
    the 2 decode threads, a 1-CPU GPU actor had 2 GETs in flight); the rows are those of the local path."""
    gets = InFlight(latency=0.1)

    def slow(path: str, attempt: int) -> None:
        gets.wait()
        return None

    items = [item for i in range(3) for item in plan_job(_config(tree, tmp_path / "x", checkpoint)).shard_items(i)]
    local = ShardWriter(plan_job(_config(tree, tmp_path / "local", checkpoint, batch_size=3)).worker_spec())
    assert local.read_pool is None
    assert local.write_shard(0, items) == (6, 0)
    _, writer, _ = _writer(tree, tmp_path / "remote", checkpoint, monkeypatch, slow)
    writer.spec = {**writer.spec, "batch_size": 3}
    monkeypatch.setattr(writer, "read_pool", ThreadPoolExecutor(precompute.REMOTE_READ_THREADS))
    assert writer.write_shard(0, items) == (6, 0)
    assert gets.most == 6  # this mini-batch's 3 reads and the next one's
    shard = schema.shard_name(0)
    remote_rows = pq.read_table(tmp_path / "remote" / schema.SHARDS_DIR / shard)
    assert remote_rows.equals(pq.read_table(tmp_path / "local" / schema.SHARDS_DIR / shard))


def test_failed_shards_are_retried_in_the_same_run(tree, checkpoint, tmp_path, monkeypatch) -> None:
    """A shard that failed (a read that kept failing for half a second: S3 throttling) is run again after a pause,
    alone, `--shard-retries` times; the job then completes without a re-run. The actors' work runs in process."""
    rounds: list[list[int]] = []
    pauses: list[float] = []

    def run_shards(plan: precompute.JobPlan, pending: list[int], writer: Any = None) -> list[dict[str, Any]]:
        rounds.append(list(pending))
        reports = []
        for shard in pending:
            if shard == 1 and len(rounds) <= 2:  # fails in the first run and in the first retry
                reports.append({"shard": shard, "failed": "cannot read s3://b/cat/c.jpg (3 tries): SlowDown"})
                continue
            rows, errors = ShardWriter(plan.worker_spec()).write_shard(shard, plan.shard_items(shard))
            reports.append({"shard": shard, "rows": rows, "errors": errors, "images": rows + errors, "failed": ""})
        return reports

    monkeypatch.setattr(precompute, "_run_shards", run_shards)
    monkeypatch.setattr(precompute.time, "sleep", pauses.append)
    result = run_precompute(_config(tree, tmp_path / "out", checkpoint, shard_retries=2, verbose=False))
    assert result.complete and rounds == [[0, 1, 2, 3], [1], [1]] and pauses == [precompute.SHARD_RETRY_PAUSE_S] * 2
    assert (tmp_path / "out" / schema.MANIFEST_FILE).exists()

    rounds.clear()
    with pytest.raises(ShardsFailedError, match=r"1 of 4 shards failed .*shard 1: cannot read .*SlowDown"):
        run_precompute(_config(tree, tmp_path / "out2", checkpoint, shard_retries=0, verbose=False))
    assert rounds == [[0, 1, 2, 3]]
    with pytest.raises(PrecomputeError, match="--shard-retries must be at least 0, got -1"):
        _config(tree, tmp_path / "out3", checkpoint, shard_retries=-1)


# ----------------------------------------------------------------------------------------------------------
# files missing on the actor's node


def test_a_shard_whose_every_image_is_missing_fails(tree, checkpoint, tmp_path) -> None:
    """What a local --input on a multi-node cluster looks like from a worker node: nothing there. One missing
    image (deleted after the listing) is an errors row as before."""
    plan = plan_job(_config(tree, tmp_path / "out", checkpoint))
    writer = ShardWriter({**plan.worker_spec(), "input": str(tmp_path / "elsewhere")})
    with pytest.raises(ShardError, match=r"all 2 images of shard 1 are missing on .*cat/c\.jpg.*shared storage"):
        writer.write_shard(1, plan.shard_items(1))
    assert _nothing_committed(tmp_path / "out", 1)
    copy = tmp_path / "partial"
    shutil.copytree(tree, copy)
    (copy / "cat/c.jpg").unlink()
    writer = ShardWriter({**plan.worker_spec(), "input": str(copy)})
    assert writer.write_shard(1, plan.shard_items(1)) == (1, 1)
    assert _errors(tmp_path / "out", 1) == {"cat/c.jpg": DISAPPEARED}


def test_shared_storage_warning_on_clusters_of_several_nodes() -> None:
    one, dead = {"Alive": True, "NodeID": "a"}, {"Alive": False, "NodeID": "b"}
    two = [one, {"Alive": True, "NodeID": "c"}]
    assert shared_storage_warning([one], "/data/in", "/data/out") is None
    assert shared_storage_warning([one, dead], "/data/in", "/data/out") is None  # dead nodes do not count
    assert shared_storage_warning(two, "s3://b/in", "s3://b/out") is None
    both = shared_storage_warning(two, "/data/in", "/data/out")
    assert both is not None and "\n" not in both
    assert both.startswith("the Ray cluster has 2 nodes and --input /data/in and --output /data/out are local paths")
    assert "mounted at the same path on every node" in both
    only_output = shared_storage_warning(two, "s3://b/in", "/data/out")
    assert only_output is not None and "--output /data/out is a local path" in only_output
    assert "--input" not in only_output


# ----------------------------------------------------------------------------------------------------------
# long thin images


def test_long_thin_images_go_to_the_errors_table(tree, checkpoint, tmp_path) -> None:
    plan = plan_job(_config(tree, tmp_path / "out", checkpoint))
    assert plan.identity["max_aspect_ratio"] == 20.0 and plan.worker_spec()["max_aspect_ratio"] == 20.0
    shard, items = plan.num_shards - 1, plan.shard_items(plan.num_shards - 1)
    assert items == [("dog/z_thin.png", 1)]
    assert ShardWriter(plan.worker_spec()).write_shard(shard, items) == (0, 1)
    assert _errors(tmp_path / "out", shard) == {
        "dog/z_thin.png": "image of 96 x 2000 pixels is too elongated: its longer side may be at most 20 times its "
        "shorter side"
    }
    unlimited = plan_job(_config(tree, tmp_path / "out2", checkpoint, max_aspect_ratio=None))
    assert unlimited.identity["max_aspect_ratio"] is None
    assert ShardWriter(unlimited.worker_spec()).write_shard(shard, items) == (1, 0)


def test_max_aspect_ratio_flag(tree, checkpoint, tmp_path) -> None:
    base = ["--input", str(tree), "--output", str(tmp_path), "--anchornet", str(checkpoint)]
    assert build_config(parse_args(base)).max_aspect_ratio == 20.0
    assert build_config(parse_args([*base, "--max-aspect-ratio", "0"])).max_aspect_ratio is None
    assert build_config(parse_args([*base, "--max-aspect-ratio", "50"])).max_aspect_ratio == 50.0
    with pytest.raises(PrecomputeError, match="--max-aspect-ratio must be at least 1"):
        build_config(parse_args([*base, "--max-aspect-ratio", "0.5"]))


def _fake_output(out: Path, identity: dict[str, Any], *, complete: bool) -> None:
    """What a run leaves: ``_job.json``, and ``manifest.json`` (its ``job`` only: all this check reads) when done."""
    out.mkdir(parents=True)
    (out / schema.JOB_FILE).write_text(json.dumps(identity))
    if complete:
        (out / schema.MANIFEST_FILE).write_text(json.dumps({"job": identity}))


#: Outputs written before a key of the job's identity existed: the key, the value they were written with, the
#: flag that resumes them and what the refusal says.
LEGACY = {
    "max_aspect_ratio": (None, ["--max-aspect-ratio", "0"], "--max-aspect-ratio existed (no limit)"),
    "shard_order": ("sorted", ["--shard-order", "sorted"], "--shard-order existed (sorted shards)"),
}


@pytest.mark.parametrize("complete", [False, True])
@pytest.mark.parametrize("missing", [("shard_order",), ("max_aspect_ratio", "shard_order")])  # in order of age
def test_output_written_before_a_flag_resumes_with_its_old_value(tree, checkpoint, tmp_path, complete, missing) -> None:
    """Such an output had no aspect limit and / or sorted shards: resumed (or confirmed) with ``--max-aspect-ratio
    0`` / ``--shard-order sorted``, refused with that hint under the new defaults."""
    out = tmp_path / "old"
    old_values = {key: LEGACY[key][0] for key in missing}
    legacy = plan_job(_config(tree, out, checkpoint, **old_values)).identity
    for key in missing:
        del legacy[key]
    _fake_output(out, legacy, complete=complete)
    before = sorted(p.name for p in out.iterdir())
    defaults = {"max_aspect_ratio": precompute.MAX_ASPECT_RATIO, "shard_order": "mixed"}
    flags = " ".join(" ".join(LEGACY[key][1]) for key in missing)
    said = " and ".join(LEGACY[key][2] for key in missing)
    hint = f"differs in: {', '.join(missing)}); it was written before {said}: add {flags}, or use a new --output"
    with pytest.raises(PrecomputeError, match=re.escape(hint)) as err:
        run_precompute(_config(tree, out, checkpoint, **defaults))
    assert "\n" not in str(err.value)
    if complete:
        assert run_precompute(_config(tree, out, checkpoint, **old_values)).already_complete
    else:
        assert not precompute._check_or_claim_output(plan_job(_config(tree, out, checkpoint, **old_values)))
    args = ["--input", str(tree), "--output", str(out), "--anchornet", str(checkpoint)]
    resumed = build_config(parse_args([*args, *(flag for key in missing for flag in LEGACY[key][1])]))
    assert {key: getattr(resumed, key) for key in missing} == old_values  # the hint's flags give the old values
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / schema.JOB_FILE).read_text()) == legacy  # untouched
    if "max_aspect_ratio" in missing:
        with pytest.raises(PrecomputeError, match=r"\(no limit\).*: add --max-aspect-ratio 0"):
            run_precompute(_config(tree, out, checkpoint, max_aspect_ratio=30))


# ----------------------------------------------------------------------------------------------------------
# a finished job's re-run writes nothing


def test_rerun_of_a_finished_job_on_a_read_only_output_writes_nothing(tree, checkpoint, tmp_path, monkeypatch) -> None:
    """No writability probe when the manifest is there (an S3 probe object is a write); a new or unfinished job
    on the same read-only output still fails fast."""
    out = tmp_path / "out"
    _fake_output(out, plan_job(_config(tree, out, checkpoint)).identity, complete=True)
    writes: list[str] = []

    def refuse(uri: Any, *args: Any) -> None:
        writes.append(str(uri))
        raise PermissionError(errno.EROFS, "Read-only file system")

    real_access = precompute.os.access
    monkeypatch.setattr(storage, "write_bytes", refuse)
    monkeypatch.setattr(storage, "makedirs", refuse)
    monkeypatch.setattr(
        precompute.os, "access", lambda p, mode: False if mode & precompute.os.W_OK else real_access(p, mode)
    )
    out.chmod(0o555)  # read-only for a non-root user; os.access above makes it so for root too
    try:
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        result = run_precompute(_config(tree, out, checkpoint, workers=3))
        assert result.already_complete and result.shards_written == 0
        assert writes == [] and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    finally:
        out.chmod(0o755)
    (out / schema.MANIFEST_FILE).unlink()  # an unfinished job now
    out.chmod(0o555)
    try:
        with pytest.raises(PrecomputeError, match=r"cannot write to output .* is not writable"):
            run_precompute(_config(tree, out, checkpoint))
    finally:
        out.chmod(0o755)


@pytest.mark.slow
def test_on_s3_a_finished_rerun_writes_no_probe_and_a_missing_key_is_an_errors_row(
    tree: Path, checkpoint: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a real S3 server: the re-run of a finished job writes nothing (no ``.probe-*`` object either); a key
    deleted after the listing is an errors row, not a read retried and failed (pyarrow's missing-key error)."""
    for rel in ("cat/a.jpg", "cat/b.jpg"):
        storage.write_bytes(f"{s3_bucket}/train/{rel}", (tree / rel).read_bytes())
    config = PrecomputeConfig(
        input=f"{s3_bucket}/train", output=f"{s3_bucket}/out", anchornet=str(checkpoint), shard_size=2, verbose=False
    )
    plan = plan_job(config)
    storage.write_bytes(f"{s3_bucket}/out/{schema.JOB_FILE}", json.dumps(plan.identity).encode())
    storage.write_bytes(f"{s3_bucket}/out/{schema.MANIFEST_FILE}", json.dumps({"job": plan.identity}).encode())
    writes: list[str] = []
    real_write = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data: (writes.append(str(uri)), real_write(uri, data)))
    assert run_precompute(config).already_complete and writes == []

    fs, root = storage.resolve(f"{s3_bucket}/train/cat/b.jpg")
    fs.delete_file(root)
    assert ShardWriter(plan.worker_spec()).write_shard(0, plan.shard_items(0)) == (1, 1)
    errors = pq.read_table(
        storage.join(config.output, schema.ERRORS_DIR, schema.errors_name(0)).removeprefix("s3://"), filesystem=fs
    ).to_pylist()
    assert [(e["image_id"], e["reason"]) for e in errors] == [("cat/b.jpg", DISAPPEARED)]


# ----------------------------------------------------------------------------------------------------------
# through Ray and the CLI: a failed shard is reported, not committed, and redone by the re-run


@pytest.mark.ray
@pytest.mark.slow
def test_failed_shard_is_reported_and_redone_on_rerun(
    tree: Path,
    checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    ray_local: None,
) -> None:
    """Shard 1's files vanish once the driver has listed them (as on a worker node that lacks a local --input):
    the CLI exits 1 with one line, the other shards are written, no manifest; the re-run writes shard 1 alone."""
    monkeypatch.setattr(precompute, "SHARD_RETRY_PAUSE_S", 0.0)  # its retry round fails too: the files are gone
    data = tmp_path / "train"
    shutil.copytree(tree, data)
    (data / "dog/z_thin.png").unlink()  # 6 images, 3 shards
    hidden = tmp_path / "hidden"
    real_plan_job = precompute.plan_job

    def plan_then_hide(config: PrecomputeConfig) -> precompute.JobPlan:
        plan = real_plan_job(config)
        for rel, _ in plan.shard_items(1):
            (hidden / rel).parent.mkdir(parents=True, exist_ok=True)
            (data / rel).rename(hidden / rel)
        return plan

    monkeypatch.setattr(precompute, "plan_job", plan_then_hide)
    out = tmp_path / "out"
    args = ["--input", str(data), "--output", str(out), "--anchornet", str(checkpoint), "--shard-size", "2"]
    args += ["--num-cpus-per-worker", "0.5", "--batch-size", "2", "--workers", "2", "--quiet"]
    assert main(args) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("precompute_patches:")]
    assert len(err) == 1
    assert "error: 1 of 3 shards failed and were not written (shard 1: all 2 images of shard 1 are missing" in err[0]
    assert "re-run to redo the failed ones" in err[0]
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["part-00000.parquet", "part-00002.parquet"]
    assert not (out / schema.MANIFEST_FILE).exists() and not (out / "errors/part-00001.parquet").exists()

    monkeypatch.setattr(precompute, "plan_job", real_plan_job)
    for path in hidden.rglob("*.jpg"):
        path.rename(data / path.relative_to(hidden))
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    result = run_precompute(_config(data, out, checkpoint, verbose=False, shard_order="mixed"))  # the CLI default
    assert result.complete and [r["shard"] for r in result.shard_reports] == [1] and result.rows == 6
    assert {
        k: v for k, v in ((p.name, p.stat().st_mtime_ns) for p in (out / "shards").iterdir()) if k in before
    } == before
