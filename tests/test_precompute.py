"""The precompute job (pipelines/precompute.py, jobs/precompute_patches.py): content, determinism, resume, S3."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _helpers import InFlight
from _s3 import free_port
from PIL import Image

import anchornet
from anchornet import Preprocessing, class_activation_map, crop_patches, decode_image, select_patches, storage
from anchornet.image_folder import ImageFolderIndex
from anchornet.preprocessing import to_float
from pipelines import schema
from pipelines.patch_dataset import PatchDataset
from pipelines.precompute import (
    FORWARD_BATCH,
    JobPlan,
    PrecomputeConfig,
    PrecomputeError,
    ShardError,
    ShardWriter,
    list_done_shards,
    plan_job,
    run_precompute,
)

REPO = Path(__file__).resolve().parents[1]
SHARD_SIZE = 5
#: The first shard of the test tree in the default "mixed" order (the 5 paths first by SHA-256).
PINNED_FIRST_SHARD = ["cat/cmyk.jpg", "cat/grey.png", "cat/rgb_wide.jpg", "dog/rgb_0.jpg", "dog/truncated.jpg"]
GOOD = 12
BAD = {
    "dog/empty.jpg": "empty image",
    "dog/notimage.jpg": "not an image",
    "dog/small.png": "too small",
    "dog/truncated.jpg": "truncated",
}


def _make_tree(root: Path) -> None:
    """12 good images in every mode the decoder must handle, and 4 bad files, in two classes."""
    rng = np.random.default_rng(0)

    def noise(h: int, w: int, c: int | None = 3) -> np.ndarray:
        shape = (h, w) if c is None else (h, w, c)
        return rng.integers(0, 256, shape, dtype=np.uint8)

    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.fromarray(noise(300, 400)).save(root / "cat/rgb_wide.jpg")
    Image.fromarray(noise(400, 240)).save(root / "cat/rgb_tall.jpg")
    Image.fromarray(noise(224, 224)).save(root / "cat/rgb_224.png")
    Image.fromarray(noise(250, 250, None), "L").save(root / "cat/grey.png")
    Image.fromarray(noise(260, 230, 4), "RGBA").save(root / "cat/rgba.png")
    Image.fromarray(noise(230, 260)).convert("CMYK").save(root / "cat/cmyk.jpg")
    Image.fromarray(noise(240, 240)).convert("P").save(root / "cat/palette.png")
    Image.fromarray(noise(120, 500)).save(root / "dog/narrow.jpg")
    for i in range(4):
        Image.fromarray(noise(256 + 8 * i, 256)).save(root / f"dog/rgb_{i}.jpg")
    (root / "dog/empty.jpg").write_bytes(b"")
    (root / "dog/notimage.jpg").write_bytes(b"this is not a JPEG")
    Image.fromarray(noise(60, 80)).save(root / "dog/small.png")
    data = (root / "dog/rgb_0.jpg").read_bytes()
    (root / "dog/truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "dog/notes.txt").write_text("ignored: not an image extension")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree") / "train"
    _make_tree(root)
    return root


@pytest.fixture(scope="module")
def checkpoint(cat_dog_anchornet: Path) -> Path:
    return cat_dog_anchornet


def _config(tree: Path | str, out: Path | str, ckpt: Path | str, **kwargs: object) -> PrecomputeConfig:
    defaults: dict[str, object] = {"shard_size": SHARD_SIZE, "num_cpus_per_worker": 0.5, "batch_size": 4}
    return PrecomputeConfig(input=str(tree), output=str(out), anchornet=str(ckpt), **{**defaults, **kwargs})


@pytest.fixture(scope="module")
def reference(tree: Path, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Path:
    """One complete local run that the other tests compare against."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = run_precompute(_config(tree, out, checkpoint))
    assert result.complete and result.rows == GOOD and result.errors == len(BAD)
    return out


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime_ns) of every file under ``root``."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _rows(out: Path | str) -> list[dict]:
    fs, root = storage.resolve(str(out))
    manifest = json.loads(storage.read_bytes(storage.join(str(out), "manifest.json")))
    rows = []
    for shard in manifest["shards"]:
        rows.extend(pq.read_table(f"{root}/{shard['file']}", filesystem=fs).to_pylist())
    return rows


# ----------------------------------------------------------------------------------------------------------
# no Ray: the actor's work, in process


def test_shard_content_matches_the_library(tree: Path, checkpoint: Path, tmp_path: Path) -> None:
    """Crops, glance, CAM and selection of a written shard equal a direct library computation (raw pixels)."""
    plan = plan_job(_config(tree, tmp_path / "out", checkpoint, image_encoding="raw"))
    writer = ShardWriter(plan.worker_spec())
    items = [item for item in plan.shard_items(0) if item[0] not in BAD]  # cats and dogs
    assert writer.write_shard(0, items) == (len(items), 0)
    table = pq.read_table(tmp_path / "out/shards/part-00000.parquet")
    assert table.schema.equals(schema.shard_schema(plan.worker_spec()["schema_metadata"]), check_metadata=False)
    assert table.column("image_id").to_pylist() == [rel for rel, _ in items]

    model, _ = anchornet.load_checkpoint(checkpoint)
    images = torch.stack([Preprocessing()(decode_image((tree / rel).read_bytes())) for rel, _ in items])
    with torch.inference_mode():
        cam, logits = class_activation_map(model, to_float(images))
    selection = select_patches(cam, model.receptive_field, 4, 0.3)
    crops = crop_patches(images, selection.boxes)
    k = model.receptive_field.size
    for b, row in enumerate(table.to_pylist()):
        label = items[b][1]
        assert row["label"] == label and row["class_name"] == plan.index.classes[label]
        assert row["num_patches"] == 4 == len(row["patches"])
        assert row["boxes"] == selection.boxes[b].long().tolist()
        assert row["cells"] == selection.cells[b].tolist()
        torch.testing.assert_close(torch.tensor(row["cam"]).reshape(cam.shape[1:]), cam[b])
        torch.testing.assert_close(torch.tensor(row["cam_scores"]), selection.scores[b])
        assert row["top1"] == logits[b].argmax().item()
        assert row["confidence"] == pytest.approx(logits[b].softmax(0).max().item(), rel=1e-5)
        assert row["checkpoint_id"] == plan.checkpoint_id
        for j, encoded in enumerate(row["patches"]):
            assert torch.equal(schema.decode_crop(encoded, "raw", k), crops[b, j])
        glance = schema.decode_crop(row["glance"], "raw", k)
        assert glance.shape == (3, k, k) and glance.dtype == torch.uint8


def test_rows_do_not_depend_on_the_batch_size(tree: Path, checkpoint: Path, tmp_path: Path) -> None:
    """The same images in one mini-batch, one at a time, or in fives give the same rows, bit for bit (oneDNN's
    float32 results otherwise change in the last bits with the batch shape)."""
    shipped = REPO / "checkpoints/anchornet.pt"  # Table 1's AnchorNet: its kernels showed the effect
    plan = plan_job(_config(tree, tmp_path / "out", shipped))
    writer = ShardWriter(plan.worker_spec())
    items = [item for i in range(plan.num_shards) for item in plan.shard_items(i)]
    decoded = [d for d in map(writer._load, items) if d.image is not None] * 2
    assert len(decoded) > FORWARD_BATCH, "the images must span more than one forward pass"
    whole = writer.process(decoded).to_pylist()
    for size in (1, 5):
        parts = [writer.process(decoded[i : i + size]).to_pylist() for i in range(0, len(decoded), size)]
        assert [row for part in parts for row in part] == whole


def test_rows_do_not_depend_on_the_cpus_per_actor(tree: Path, checkpoint: Path, tmp_path: Path) -> None:
    """An actor with 3 CPUs writes the rows of one with 1, bit for bit: its forward passes run side by side on one
    torch thread each (torch's own 3 threads split a pass differently: CAMs up to 2e-5 apart)."""
    shipped = REPO / "checkpoints/anchornet.pt"
    rows = {}
    for cpus in (1.0, 3.0):
        plan = plan_job(_config(tree, tmp_path / "out", shipped, num_cpus_per_worker=cpus))
        writer = ShardWriter(plan.worker_spec())
        assert torch.get_num_threads() == 1
        assert (writer.forward_pool is None) == (cpus == 1.0)
        items = [item for i in range(plan.num_shards) for item in plan.shard_items(i)]
        decoded = [d for d in map(writer._load, items) if d.image is not None] * 3
        assert len(decoded) > 2 * FORWARD_BATCH, "the images must span three forward passes"
        rows[cpus] = writer.process(decoded).to_pylist()
    assert rows[1.0] == rows[3.0]


def test_bad_checkpoint_cards_and_options_fail_in_one_line(tree: Path, tmp_path: Path) -> None:
    payload = torch.load(REPO / "checkpoints/anchornet.pt", map_location="cpu", weights_only=True)
    for preprocessing, problem in (
        ({"image_size": 224, "resize_size": 256, "interpolation": "lanczos"}, "lanczos"),
        ({"image_size": 300, "resize_size": 256}, "image_size"),
    ):
        payload["card"]["preprocessing"] = preprocessing
        path = tmp_path / "card.pt"
        torch.save(payload, path)
        with pytest.raises(PrecomputeError, match=f"bad checkpoint: {path}: .*{problem}") as err:
            plan_job(_config(tree, tmp_path / "out", path))
        assert "\n" not in str(err.value)
    # the int8 num_patches column: refused up front, not by every shard's Arrow conversion in the actors
    with pytest.raises(PrecomputeError, match=rf"--num-patches must be in \[1, {schema.MAX_PATCHES}\], got 200"):
        _config(tree, tmp_path / "out", REPO / "checkpoints/anchornet.pt", num_patches=200)
    _config(tree, tmp_path / "out", REPO / "checkpoints/anchornet.pt", num_patches=schema.MAX_PATCHES)


def test_an_output_write_error_fails_the_shard_only(tree: Path, checkpoint: Path, tmp_path: Path) -> None:
    """A shard the output will not take (here a directory where its errors file goes) is a ``ShardError``, reported
    and retried like a failed read, not an exception that stops every actor's work."""
    out = tmp_path / "out"
    plan = plan_job(_config(tree, out, checkpoint))
    writer = ShardWriter(plan.worker_spec())
    (out / schema.ERRORS_DIR / schema.errors_name(1)).mkdir(parents=True)
    with pytest.raises(ShardError, match=r"cannot write .*part-00001\.parquet: .*[Ii]s a directory") as err:
        writer.write_shard(1, plan.shard_items(1))
    assert "\n" not in str(err.value)
    assert not (out / schema.SHARDS_DIR / schema.shard_name(1)).exists()
    assert writer.write_shard(0, plan.shard_items(0))[0] > 0  # the actor goes on


def test_mixed_shards_hold_every_class(tree: Path, checkpoint: Path, tmp_path: Path) -> None:
    """ImageNet-like: 50 classes of 40 images, shards of 200. Training shuffles a window of shards at a time, so a
    shard must be a sample of the classes, not one or two of them as consecutive images of the sorted tree."""
    classes = [f"n{c:08d}" for c in range(50)]
    index = ImageFolderIndex(
        "/data", classes, [(f"{name}/{i:04d}.JPEG", c) for c, name in enumerate(classes) for i in range(40)]
    )
    real = plan_job(_config(tree, tmp_path, checkpoint))

    def plan(order: str) -> JobPlan:
        config = _config(tree, tmp_path, checkpoint, shard_size=200, shard_order=order)
        return dataclasses.replace(real, config=config, index=index)

    def classes_per_shard(order: str) -> list[int]:
        p = plan(order)
        shards = [p.shard_items(i) for i in range(p.num_shards)]
        assert sorted(item for shard in shards for item in shard) == index.items  # every image once
        return [len({label for _, label in shard}) for shard in shards]

    assert classes_per_shard("sorted") == [5] * 10
    mixed = classes_per_shard("mixed")
    assert len(mixed) == 10 and min(mixed) >= 40, mixed  # expected ~49 of 50 (1 - (1 - 1/50)^200)
    assert [plan("mixed").shard_items(i) for i in range(10)] == [plan("mixed").shard_items(i) for i in range(10)]


def test_sorted_shards_are_slices_of_the_index(tree: Path, checkpoint: Path, tmp_path: Path) -> None:
    """As outputs were cut before --shard-order: consecutive images of the index, in its order (classes from a
    checkpoint need not be alphabetical, and "a-b/" sorts before "a/"); mixed shards keep index order too."""
    items = [("b/1.png", 0), ("b/2.png", 0), ("a/1.png", 1), ("a/2.png", 1), ("a-b/1.png", 2)]
    index = ImageFolderIndex("/data", ["b", "a", "a-b"], items)
    real = plan_job(_config(tree, tmp_path, checkpoint))
    for order in ("sorted", "mixed"):
        plan = dataclasses.replace(
            real, config=_config(tree, tmp_path, checkpoint, shard_size=2, shard_order=order), index=index
        )
        shards = [plan.shard_items(i) for i in range(plan.num_shards)]
        assert all(shard == sorted(shard, key=items.index) for shard in shards)
        if order == "sorted":
            assert shards == [items[0:2], items[2:4], items[4:]]
        else:
            assert sorted(item for shard in shards for item in shard) == sorted(items)


@pytest.mark.parametrize("encoding", ["png", "jpeg", "raw"])
def test_encodings_round_trip(encoding: str) -> None:
    crops = torch.randint(0, 256, (3, 3, 95, 95), dtype=torch.uint8)
    crops[1] = 128  # flat: JPEG reproduces it almost exactly
    decoded = [schema.decode_crop(b, encoding, 95) for b in schema.encode_crops(crops, encoding, 95)]
    assert all(d.shape == (3, 95, 95) and d.dtype == torch.uint8 for d in decoded)
    if encoding != "jpeg":
        assert all(torch.equal(d, c) for d, c in zip(decoded, crops, strict=True))
    assert (decoded[1].int() - 128).abs().max() <= 2


def test_jpeg_bytes_are_pillows(tree: Path) -> None:
    """torchvision's libjpeg-turbo encoder writes the same bytes Pillow did (outputs of earlier runs stay valid)."""
    pre = Preprocessing()
    images = torch.stack([pre(decode_image(p.read_bytes())) for p in sorted(tree.glob("*/*"))[:4]])
    crops = images[:, :, 10:105, 20:115]
    for quality in (90, 95):
        expected = []
        for crop in crops:
            sink = io.BytesIO()
            Image.fromarray(crop.permute(1, 2, 0).numpy(), "RGB").save(sink, format="JPEG", quality=quality)
            expected.append(sink.getvalue())
        assert schema.encode_crops(crops, "jpeg", quality) == expected


def test_plan_is_deterministic_and_rejects_bad_input(
    tree: Path, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = plan_job(_config(tree, tmp_path, checkpoint))
    assert plan.num_shards == 4 and plan.patch_size == 95 and plan.cam_grid == (17, 17)
    assert plan.identity == plan_job(_config(tree, tmp_path, checkpoint)).identity
    shards = [plan.shard_items(i) for i in range(4)]
    assert sorted(item for shard in shards for item in shard) == plan.index.items  # every image once
    position = {item: i for i, item in enumerate(plan.index.items)}
    assert all(shard == sorted(shard, key=position.get) for shard in shards)  # rows in index order
    # "mixed": cut in the order of the paths' SHA-256, pinned here (stable across runs, machines and versions)
    assert [rel for rel, _ in shards[0]] == PINNED_FIRST_SHARD
    in_order = plan_job(_config(tree, tmp_path, checkpoint, shard_order="sorted"))
    assert [item for i in range(4) for item in in_order.shard_items(i)] == plan.index.items
    assert in_order.identity == {**plan.identity, "shard_order": "sorted"}
    with pytest.raises(PrecomputeError, match="input not found"):
        plan_job(_config(tmp_path / "missing", tmp_path, checkpoint))
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PrecomputeError, match="bad checkpoint"):
        plan_job(_config(tree, tmp_path, tmp_path / "garbage.pt"))
    with pytest.raises(PrecomputeError, match="--num-patches"):
        _config(tree, tmp_path, checkpoint, num_patches=0)
    (tmp_path / "a_file").write_text("x")
    listed = []  # an unwritable output is refused before the input is listed (minutes on S3 at ImageNet scale)
    monkeypatch.setattr("pipelines.precompute.scan_image_folder", lambda *a, **k: listed.append(a))
    with pytest.raises(PrecomputeError, match=r"cannot write to output .*a_file is not a directory"):
        plan_job(_config(tree, tmp_path / "a_file" / "out", checkpoint))
    assert listed == []


def test_a_claimed_output_with_no_shard_says_how_to_reuse_it(tree: Path, checkpoint: Path, tmp_path: Path) -> None:
    """A run stopped before its first shard (say, to fix a flag) leaves only ``_job.json``: the corrected run is
    refused, with the file to delete; once a shard is there, only a new --output is offered."""
    from pipelines.precompute import _check_or_claim_output

    out = tmp_path / "out"
    assert _check_or_claim_output(plan_job(_config(tree, out, checkpoint))) is False  # claimed
    fixed = plan_job(_config(tree, out, checkpoint, num_patches=3))
    with pytest.raises(PrecomputeError, match=r"num_patches.*holds no shard yet: delete .*_job\.json") as refused:
        _check_or_claim_output(fixed)
    assert "\n" not in str(refused.value)
    (out / schema.JOB_FILE).unlink()
    assert _check_or_claim_output(fixed) is False  # the corrected job claims it
    (out / schema.ERRORS_DIR).mkdir()
    (out / schema.ERRORS_DIR / "part-00000.parquet").write_bytes(b"")
    with pytest.raises(PrecomputeError, match="num_patches") as refused:
        _check_or_claim_output(plan_job(_config(tree, out, checkpoint)))
    assert "no shard yet" not in str(refused.value) and "use a new --output" in str(refused.value)


# ----------------------------------------------------------------------------------------------------------
# Ray: whole runs on the session's local Ray


@pytest.mark.ray
@pytest.mark.slow
def test_run_writes_every_good_image_once_and_an_errors_table(reference: Path, tree: Path, checkpoint: Path) -> None:
    assert sorted(p.name for p in (reference / "shards").iterdir()) == [f"part-0000{i}.parquet" for i in range(4)]
    rows = _rows(reference)
    good = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*.*") if p.suffix != ".txt")
    assert sorted(r["image_id"] for r in rows) == sorted(set(good) - set(BAD))
    plan = plan_job(_config(tree, reference, checkpoint))
    assert [r["image_id"] for r in rows] == [rel for i in range(4) for rel, _ in plan.shard_items(i) if rel not in BAD]
    errors = pq.read_table(reference / "errors.parquet").to_pylist()
    assert {e["image_id"]: e["reason"] for e in errors}.keys() == BAD.keys()
    for e in errors:
        assert BAD[e["image_id"]] in e["reason"] and "\n" not in e["reason"]
        assert e["path"] == str(tree / e["image_id"]) and e["label"] == 1
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["counts"] == {"images": GOOD + len(BAD), "rows": GOOD, "errors": len(BAD), "shards": 4}
    assert manifest["schema_version"] == schema.SCHEMA_VERSION
    assert manifest["classes"] == ["cat", "dog"] and manifest["patch_size"] == 95
    assert all(r["num_patches"] == 4 and len(r["cam"]) == 17 * 17 for r in rows)


@pytest.mark.ray
@pytest.mark.slow
def test_rerun_after_success_writes_nothing(reference: Path, tree: Path, checkpoint: Path) -> None:
    before = _files(reference)
    result = run_precompute(_config(tree, reference, checkpoint, workers=2))
    assert result.already_complete and result.shards_written == 0
    assert _files(reference) == before


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_run_resumes_to_identical_output(reference: Path, tree: Path, checkpoint: Path, tmp_path: Path):
    """Killed after two shards (``max_shards``), a re-run writes the other two; same files, same rows."""
    out = tmp_path / "out"
    first = run_precompute(_config(tree, out, checkpoint, max_shards=2))
    assert not first.complete and first.shards_written == 2
    assert not (out / "manifest.json").exists()
    written = _files(out / "shards")
    # what a kill mid-shard leaves behind: a temporary file and the errors file of an uncommitted shard
    (out / "shards/.part-00003.parquet.dead.tmp").write_bytes(b"partial")
    (out / "errors").mkdir(exist_ok=True)
    (out / "errors/.part-00003.parquet.dead.tmp").write_bytes(b"partial")
    (out / ".errors.parquet.dead.tmp").write_bytes(b"partial")
    second = run_precompute(_config(tree, out, checkpoint, workers=2))
    assert second.complete and second.shards_written == 2 and second.shards_skipped == 2
    assert {k: v for k, v in _files(out / "shards").items() if k in written} == written
    for folder in ("shards", "errors", "."):  # the temporaries are gone: the same files as a straight run
        assert sorted(p.name for p in (out / folder).iterdir()) == sorted(
            p.name for p in (reference / folder).iterdir()
        )
    assert _rows(out) == _rows(reference)  # deterministic: a different schedule, the same rows
    for i in range(4):
        name = f"shards/part-0000{i}.parquet"
        assert pq.read_table(out / name).equals(pq.read_table(reference / name))
    ref_manifest, manifest = (json.loads((d / "manifest.json").read_text()) for d in (reference, out))
    assert manifest["job"] == ref_manifest["job"] and manifest["counts"] == ref_manifest["counts"]


@pytest.mark.ray
@pytest.mark.slow
def test_lost_shard_is_rewritten_alone(reference: Path, tree: Path, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "shards/part-00002.parquet").unlink()
    (out / "manifest.json").unlink()
    before = _files(out / "shards")
    result = run_precompute(_config(tree, out, checkpoint))
    assert result.complete and [r["shard"] for r in result.shard_reports] == [2]
    assert {k: v for k, v in _files(out / "shards").items() if k in before} == before
    ids = [r["image_id"] for r in _rows(out)]
    assert len(ids) == len(set(ids)) == GOOD


@pytest.mark.ray
def test_a_shard_whose_errors_file_was_lost_is_redone(reference: Path, tree: Path, checkpoint: Path, tmp_path: Path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / schema.ERRORS_DIR / schema.errors_name(1)).unlink()
    (out / "manifest.json").unlink()
    assert list_done_shards(str(out)) == {0, 2, 3}
    result = run_precompute(_config(tree, out, checkpoint))
    assert result.complete and [r["shard"] for r in result.shard_reports] == [1]
    assert _rows(out) == _rows(reference)
    assert pq.read_table(out / schema.ERRORS_FILE).equals(pq.read_table(reference / schema.ERRORS_FILE))


@pytest.mark.ray
def test_compare_outputs_finds_every_changed_row(reference: Path, tmp_path: Path) -> None:
    """``benchmarks.precompute_compare``, the device check that a GPU run wrote the CPU's rows."""
    from benchmarks.precompute_compare import compare, load_rows, main

    rows = load_rows(str(reference))
    assert len(rows) == GOOD
    same = compare(rows, rows)
    assert same["rows_differing"] == 0 and same["max_abs_difference"] == {"cam": 0, "cam_scores": 0, "confidence": 0}
    assert main([str(reference), str(reference)]) == 0

    out = tmp_path / "changed"
    shutil.copytree(reference, out)
    shard = out / "shards/part-00001.parquet"
    table = pq.read_table(shard).to_pylist()
    table[0]["glance"] = table[0]["glance"][:-1] + b"x"  # another byte, as a GPU resize gave
    table[1]["cam"] = [v + 0.0625 for v in table[1]["cam"]]  # a CAM moved, but no other patch chosen
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(shard)), shard)
    changed = compare(rows, load_rows(str(out)))
    assert changed["rows_differing"] == 1 and changed["differing"]["glance"] == 1
    assert changed["max_abs_difference"]["cam"] == pytest.approx(0.0625)
    assert main([str(reference), str(out)]) == 1


@pytest.mark.ray
def test_output_of_another_job_is_refused(reference: Path, tree: Path, checkpoint: Path) -> None:
    with pytest.raises(PrecomputeError, match=r"different job .*num_patches"):
        run_precompute(_config(tree, reference, checkpoint, num_patches=3))


@pytest.mark.ray
def test_gpus_that_a_local_ray_lacks_fail_instead_of_hanging(tree: Path, checkpoint: Path, tmp_path: Path, ray_local):
    with pytest.raises(PrecomputeError, match="num-gpus-per-worker 1 but the cluster has 0 GPUs"):
        run_precompute(_config(tree, tmp_path / "out", checkpoint, num_gpus_per_worker=1))


@pytest.mark.ray
@pytest.mark.slow
def test_reader(reference: Path) -> None:
    glances = PatchDataset(str(reference), "glance")
    patches = PatchDataset(str(reference), "patch", num_patches=3)
    assert glances.classes == ["cat", "dog"] and glances.patch_size == 95
    assert len(glances) == GOOD and len(patches) == 3 * GOOD
    rows = _rows(reference)
    for i in (0, 6, GOOD - 1):
        image, label = glances[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 95, 95) and label == rows[i]["label"]
        assert torch.equal(image, schema.decode_crop(rows[i]["glance"], "jpeg", 95))
    for i in (0, 4, 3 * GOOD - 1):
        image, label = patches[i]
        assert label == rows[i // 3]["label"]
        assert torch.equal(image, schema.decode_crop(rows[i // 3]["patches"][i % 3], "jpeg", 95))
    assert patches.image_samples() == [(r["image_id"], range(3 * i, 3 * i + 3)) for i, r in enumerate(rows)]
    assert glances.image_samples() == [(r["image_id"], range(i, i + 1)) for i, r in enumerate(rows)]
    bounded = PatchDataset(str(reference), "patch", max_cached_shards=1)
    loader = torch.utils.data.DataLoader(bounded, batch_size=8, num_workers=0)
    labels = torch.cat([y for _, y in loader])
    assert labels.tolist() == [r["label"] for r in rows for _ in range(4)] and len(bounded._cache) == 1
    with pytest.raises(ValueError, match="num_patches"):
        PatchDataset(str(reference), "patch", num_patches=5)
    with pytest.raises(ValueError, match="max_cached_shards"):
        PatchDataset(str(reference), "glance", max_cached_shards=0)


@pytest.mark.ray
@pytest.mark.slow
def test_reader_opens_its_shards_concurrently(reference: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening reads a small column of every shard (patch counts; image ids for the held-out check): on S3, one
    after another, that is minutes per process at ImageNet's 1,281 shards. They overlap, and keep shard order."""
    real_read, requests = PatchDataset._read, InFlight(latency=0.2)

    def slow_read(self: PatchDataset, shard: int, columns: list[str]) -> pa.Table:
        requests.wait()
        return real_read(self, shard, columns)

    monkeypatch.setattr(PatchDataset, "_read", slow_read)
    patches = PatchDataset(str(reference), "patch", num_patches=3)
    assert requests.most == 4  # the 4 shards at once
    assert patches.image_samples() == [(r["image_id"], range(3 * i, 3 * i + 3)) for i, r in enumerate(_rows(reference))]


@pytest.mark.ray
@pytest.mark.slow
def test_reader_by_shard_windows(reference: Path) -> None:
    """``sample_shards`` is ``shard_of`` for every sample; read in the training job's window order with its cache
    bound, every sample comes once, right, and the cache never holds more than the bound."""
    from pipelines.train_data import ShardWindowSampler, shard_cache_size

    patches = PatchDataset(str(reference), "patch", num_patches=2, max_cached_shards=shard_cache_size(1))
    shards = patches.sample_shards()
    assert shards.dtype == np.int64 and shards.tolist() == [patches.shard_of(i) for i in range(len(patches))]
    manifest = json.loads((reference / "manifest.json").read_text())
    assert len(set(shards.tolist())) == sum(shard["rows"] > 0 for shard in manifest["shards"]) > 1
    rows = _rows(reference)
    order = list(ShardWindowSampler(shards, window=1, seed=0, epoch=0))
    assert sorted(order) == list(range(2 * GOOD))
    for i in order:
        _, label = patches[i]
        assert label == rows[i // 2]["label"] and len(patches._cache) <= shard_cache_size(1)


@pytest.mark.ray
@pytest.mark.slow
def test_s3_to_s3(reference: Path, tree: Path, checkpoint: Path, s3_bucket: str) -> None:
    for path in tree.rglob("*"):
        if path.is_file():
            storage.write_bytes(f"{s3_bucket}/train/{path.relative_to(tree).as_posix()}", path.read_bytes())
    storage.write_bytes(f"{s3_bucket}/runs/anchornet.pt", checkpoint.read_bytes())
    out = f"{s3_bucket}/patches/train"
    result = run_precompute(_config(f"{s3_bucket}/train", out, f"{s3_bucket}/runs/anchornet.pt", workers=2))
    assert result.complete and result.rows == GOOD and result.errors == len(BAD)
    assert _rows(out) == _rows(reference)
    assert PatchDataset(out, "patch")[5][0].equal(PatchDataset(str(reference), "patch")[5][0])
    again = run_precompute(_config(f"{s3_bucket}/train", out, f"{s3_bucket}/runs/anchornet.pt"))
    assert again.already_complete


# ----------------------------------------------------------------------------------------------------------
# the CLI as users run it


def _env() -> dict[str, str]:
    # the checkout first, whatever the editable install points at
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_cli_fails_fast_with_one_line(tree: Path, checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 64)
    (tmp_path / "a_file").write_text("x")
    ok = ["--input", str(tree), "--anchornet", str(checkpoint), "--output", str(tmp_path / "out")]
    cases = {
        "input not found": ["--input", str(tmp_path / "nope"), *ok[2:]],
        "bad checkpoint": [*ok[:2], "--anchornet", str(tmp_path / "garbage.pt"), *ok[4:]],
        "checkpoint not found": [*ok[:2], "--anchornet", str(tmp_path / "nope.pt"), *ok[4:]],
        "output": [*ok[:4], "--output", str(tmp_path / "a_file" / "out")],
    }
    procs = {
        what: subprocess.Popen(
            [sys.executable, "jobs/precompute_patches.py", *args, "--num-gpus-per-worker", "0"],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for what, args in cases.items()
    }
    module = subprocess.run(
        [sys.executable, "-m", "jobs.precompute_patches", "--help"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert module.returncode == 0 and "--num-gpus-per-worker" in module.stdout
    for what, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, err
        assert len(lines) == 1 and what in lines[0] and lines[0].startswith("precompute_patches: error:"), err
    assert not (tmp_path / "out").exists()


def _descendants(pid: int) -> set[tuple[int, str]]:
    """``(pid, start time)`` of every live descendant of ``pid`` (the start time guards against pid reuse)."""
    parent_of: dict[int, list[tuple[int, str]]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent_of.setdefault(int(fields[1]), []).append((int(stat.parent.name), fields[19]))
    found: set[tuple[int, str]] = set()
    todo = [pid]
    while todo:
        for child in parent_of.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child[0])
    return found


def _kill_if_same(pid: int, start: str) -> None:
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19] == start:
            os.kill(pid, signal.SIGKILL)
    except (OSError, IndexError):
        pass


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_end_to_end(tree: Path, checkpoint: Path, reference: Path, tmp_path: Path) -> None:
    """A real head (``ray start --head`` on free ports), the script through ``ray job submit``; then stop it."""
    ray_bin = Path(sys.executable).with_name("ray")
    ray_cmd = [str(ray_bin)] if ray_bin.exists() else [sys.executable, "-m", "ray.scripts.scripts"]
    ports = {
        name: free_port()
        for name in (
            "port",
            "dashboard-port",
            "ray-client-server-port",
            "node-manager-port",
            "object-manager-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
        )
    }
    temp_dir = Path("/tmp") / f"rayh{os.getpid()}{free_port()}"
    head = subprocess.Popen(
        [
            *ray_cmd,
            "start",
            "--head",
            "--block",
            "--num-cpus=2",
            "--num-gpus=0",
            "--disable-usage-stats",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp_dir}",
            *(f"--{name}={port}" for name, port in ports.items()),
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    started: set[tuple[int, str]] = set()
    try:
        deadline = time.monotonic() + 180
        while True:
            assert head.poll() is None, head.stdout.read().decode() if head.stdout else "ray start exited"
            try:
                urllib.request.urlopen(f"{dashboard}/api/version", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the Ray head did not come up in 180 s"
                time.sleep(1)
        out = tmp_path / "out"
        script_args = [f"--input={tree}", f"--output={out}", f"--anchornet={checkpoint}", f"--shard-size={SHARD_SIZE}"]
        script_args += ["--num-cpus-per-worker=0.5", "--workers=2", "--batch-size=4"]
        job = subprocess.run(
            [
                *ray_cmd,
                "job",
                "submit",
                f"--address={dashboard}",
                f"--working-dir={REPO}",
                "--",
                sys.executable,
                "jobs/precompute_patches.py",
                *script_args,
            ],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=240,
        )
        started = _descendants(head.pid)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "done: 12 images, 4 errors" in job.stdout
        assert _rows(out) == _rows(reference)
    finally:
        started |= _descendants(head.pid)
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        for pid, start in started:  # only what this test's head started, if still alive
            _kill_if_same(pid, start)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_large_jpegs_copies_a_tree_at_photo_size(tmp_path: Path) -> None:
    """``benchmarks.large_jpegs``: the ImageNet-like tree the throughput benchmark is also run on."""
    from benchmarks.large_jpegs import main

    source = tmp_path / "small"
    for i, name in enumerate(("cat/a.jpg", "cat/b.jpg", "dog/c.jpg")):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (40 * i, 80, 120)).save(source / name)
    out = tmp_path / "big"
    assert main(["--data", str(source), "--output", str(out), "--count", "2", "--size", "64", "48"]) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg"))
    assert written == ["cat/a.jpg", "cat/b.jpg"]  # 2 evenly over the 3 in index order: items 0 and 1
    for path in out.rglob("*.jpg"):
        with Image.open(path) as image:
            assert image.size == (64, 48) and image.format == "JPEG"
    again = tmp_path / "again"
    main(["--data", str(source), "--output", str(again), "--count", "2", "--size", "64", "48"])
    assert all((again / p).read_bytes() == (out / p).read_bytes() for p in written)  # seeded: the same bytes
    assert main(["--data", str(source), "--output", str(out)]) == 2  # never writes into an existing tree
