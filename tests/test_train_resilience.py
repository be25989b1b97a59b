"""The training jobs on a real cluster's troubles, without Ray: bad files, a tree changed under a resumed run, a
lowered --epochs, CPU defaults that fit a node, local paths on several nodes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import torch
from _helpers import synthetic_tree
from PIL import Image

from anchornet import ImageDecodeError, Preprocessing
from anchornet.image_folder import scan_image_folder
from jobs import train_anchornet
from pipelines import train, train_data
from pipelines.cluster import local_paths_warning
from pipelines.train import TrainConfig, default_cpus_per_worker


def _snapshot(out: Path, config: TrainConfig, epoch: int | None) -> None:
    """What Ray Train 2.60 leaves in OUT once a checkpoint is reported (only what ``_preflight`` reads)."""
    path = out / config.run_name / "checkpoint_manager_snapshot.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    latest = None if epoch is None else {"version": 0, "checkpoint_dir_name": "c", "metrics": {"epoch": epoch}}
    path.write_text(json.dumps({"ray_version": "2.60.0", "latest_checkpoint_result": latest}))


# ----------------------------------------------------------------------------------------------------------
# a file that does not decode


def test_an_undecodable_training_image_is_replaced_by_the_next_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It is read every epoch: failing the worker would fail every restart of the run at the same place."""
    data = synthetic_tree(tmp_path / "data", train=3)
    (data / "train/cls_a/1.png").write_bytes(b"not a PNG")
    data.joinpath("train/cls_b/0.png").write_bytes(data.joinpath("train/cls_b/1.png").read_bytes()[:60])  # truncated
    index = scan_image_folder(data / "train")
    images = train_data.image_dataset(index, Preprocessing(image_size=32, resize_size=32))
    assert isinstance(images, train_data.TrainingImages)
    ids = [rel for rel, _ in index.items]
    bad, truncated = ids.index("cls_a/1.png"), ids.index("cls_b/0.png")
    image, label = images[bad]
    next_image, next_label = images[bad + 1]
    assert torch.equal(image, next_image) and label == next_label == 0
    assert torch.equal(images[truncated][0], images[truncated + 1][0])
    images[bad]  # warned once per file
    assert len(list(images)) == len(images) == 6  # iteration ends: no wrap-around past the end
    with pytest.raises(IndexError):
        images[6]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("warning: skipping ") for line in err), err
    assert "cls_a/1.png" in err[0] and "(the next image of the index takes its place)" in err[0]
    assert "cls_b/0.png" in err[1]

    # A tree where nothing decodes is not a bad file: it fails, naming where.
    for path in (data / "train").rglob("*.png"):
        path.write_bytes(b"junk")
    broken = train_data.image_dataset(scan_image_folder(data / "train"), Preprocessing())
    with pytest.raises(ImageDecodeError, match=r"6 consecutive images from .*cls_a/0\.png on cannot be decoded"):
        broken[0]


def test_an_undecodable_val_image_counts_in_no_accuracy(tmp_path: Path) -> None:
    """Validation replaces it too (no crash on every restart) but labels it SKIPPED_LABEL, so the val top-1 stays
    exact over the images that decode instead of counting the next image twice."""
    data = synthetic_tree(tmp_path / "data", val=3)
    (data / "val/cls_a/1.png").write_bytes(b"junk")
    images = train_data.val_image_dataset(scan_image_folder(data / "val"), Preprocessing(image_size=32, resize_size=32))
    labels = [images[i][1] for i in range(len(images))]
    assert labels == [0, train_data.SKIPPED_LABEL, 0, 1, 1, 1]

    class AlwaysFirst(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([[1.0, 0.0]]).expand(len(x), 2)

    task = SimpleNamespace(inputs=lambda x, y: (x.float(), y))
    batch = (torch.stack([images[i][0] for i in range(len(images))]), torch.tensor(labels))
    assert train.evaluate(task, AlwaysFirst(), [batch]) == (2, 5)  # 2 of the 5 decodable images are class 0


def test_many_bad_files_in_a_row_stop_at_the_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    limit = train_data.MAX_CONSECUTIVE_UNDECODABLE
    data = synthetic_tree(tmp_path / "data", train=limit + 2, classes=("c",))
    index = scan_image_folder(data / "train")
    for rel, _ in index.items[:limit]:
        (data / "train" / rel).write_bytes(b"junk")
    images = train_data.image_dataset(index, Preprocessing(image_size=32, resize_size=32))
    with pytest.raises(ImageDecodeError, match=f"^{limit} consecutive images"):
        images[0]
    assert images[1][0].shape == (3, 32, 32)  # 15 bad, then a good one
    capsys.readouterr()


# ----------------------------------------------------------------------------------------------------------
# resuming: a changed train/, a lowered --epochs


def test_resume_after_train_changed_is_refused_when_images_are_held_out(
    tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """The held-out draw depends on every file of train/: one more file swaps most of the held-out images, and the
    resumed run would train on images its thresholds are later fitted on."""
    data = synthetic_tree(tmp_path / "data", train=10)
    out = tmp_path / "out"
    config = TrainConfig(data=str(data), output=str(out), arch="anchornet_test", batch_size=8, holdout_size=4)
    record = train._preflight(config)[1]
    manifest = json.loads((out / f"{config.run_name}.json").read_text())
    assert manifest["holdout"] == record and record["images"] == 4
    _snapshot(out, config, epoch=0)
    assert train._preflight(config)[1] == record  # the same tree resumes

    Image.new("RGB", (32, 32)).save(data / "train/cls_a/new.png")
    with pytest.raises(train.TrainError, match=r"held out other images of train/ \(4 images, sha256 .*\): train/"):
        train._preflight(config)
    args = ["--data", str(data), "--output", str(out), "--arch", "anchornet_test", "--batch-size", "8"]
    assert train_anchornet.main([*args, "--holdout-size", "4"]) == 1
    err = capsys.readouterr().err.strip()
    assert "restore train/ as it was, or use a new --output" in err and len(err.splitlines()) == 1

    # Without held-out images, or before the first checkpoint, a changed tree is simply the run's data.
    no_holdout = TrainConfig(**{**config.to_dict(), "output": str(tmp_path / "out2"), "holdout_size": 0})
    train._preflight(no_holdout)
    _snapshot(tmp_path / "out2", no_holdout, epoch=0)
    (data / "train/cls_a/new.png").unlink()
    train._preflight(no_holdout)
    fresh = TrainConfig(**{**config.to_dict(), "output": str(tmp_path / "out3")})
    train._preflight(fresh)
    Image.new("RGB", (32, 32)).save(data / "train/cls_b/new.png")
    assert train._preflight(fresh)[1]["sha256"] != record["sha256"]  # no checkpoint: starts afresh


def test_fewer_epochs_than_trained_is_refused_before_ray(
    tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused by the driver: in the workers the refusal would be retried --max-failures times (forever with -1)."""
    data = synthetic_tree(tmp_path / "data")
    out = tmp_path / "out"
    config = TrainConfig(data=str(data), output=str(out), arch="anchornet_test", batch_size=8, epochs=5)
    train._preflight(config)
    _snapshot(out, config, epoch=3)  # 4 epochs trained
    train._preflight(TrainConfig(**{**config.to_dict(), "epochs": 4}))  # finishes at once: the final checkpoint
    with pytest.raises(train.FlagError, match=r"has trained 4 epochs already: --epochs 3 cannot undo that"):
        train._preflight(TrainConfig(**{**config.to_dict(), "epochs": 3}))
    args = ["--data", str(data), "--output", str(out), "--arch", "anchornet_test", "--batch-size", "8"]
    assert train_anchornet.main([*args, "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--epochs 2 cannot undo that (raise it, or use a new --output)" in err and len(err.splitlines()) == 1
    for unknown in ("{}", "not json"):  # the workers check it again once they load the checkpoint
        (out / config.run_name / "checkpoint_manager_snapshot.json").write_text(unknown)
        train._preflight(TrainConfig(**{**config.to_dict(), "epochs": 1}))


# ----------------------------------------------------------------------------------------------------------
# the cluster


def _node(cpus: float, alive: bool = True) -> dict:
    return {"Alive": alive, "Resources": {"CPU": cpus}}


def test_default_cpus_per_worker_fits_on_one_node() -> None:
    """A worker's bundle must fit on one node: two 4-CPU nodes give one worker 4 CPUs, not 8 (it would wait
    forever)."""
    two = [_node(4), _node(4)]
    assert default_cpus_per_worker(two, 1, use_gpu=False) == 4
    assert default_cpus_per_worker(two, 2, use_gpu=False) == 4
    assert default_cpus_per_worker(two, 3, use_gpu=False) == 2
    assert default_cpus_per_worker([_node(2)], 4, use_gpu=False) == 0.5  # fractions when CPUs are scarce
    assert default_cpus_per_worker([_node(0), _node(16), _node(16, alive=False)], 1, use_gpu=False) == 16
    assert default_cpus_per_worker([_node(0)], 2, use_gpu=False) == 0.5  # no CPU yet (autoscaling): fits anywhere
    assert default_cpus_per_worker(two, 1, use_gpu=True) == 1


def test_local_paths_on_several_nodes_are_warned_of() -> None:
    one, two = [_node(2)], [_node(2), _node(2)]
    paths = {"data": "/data/imagenet", "output": "s3://b/runs", "weights": None}
    assert local_paths_warning(one, paths, "x") is None
    assert local_paths_warning([*one, _node(2, alive=False)], paths, "x") is None
    assert local_paths_warning(two, {"data": "s3://b/in", "output": "s3://b/out"}, "x") is None
    said = local_paths_warning(two, paths, "the workers do not find them")
    assert said == (
        "the Ray cluster has 2 nodes and --data /data/imagenet is a local path: it must be shared storage (NFS, EFS, "
        "FSx) mounted at the same path on every node, else the workers do not find them"
    )


# ----------------------------------------------------------------------------------------------------------
# the tree is listed once, by the driver


def test_workers_read_the_drivers_listing_instead_of_listing_the_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On S3 ImageNet's listing is ~1,300 requests one after another, in every worker and on every restart; and
    a tree changed under a running job would give the workers other held-out images than the driver's."""
    data = synthetic_tree(tmp_path / "data", train=5)
    config = TrainConfig(
        data=str(data), output=str(tmp_path / "out"), arch="anchornet_test", batch_size=4, holdout_size=2
    )
    given: list[TrainConfig] = []
    monkeypatch.setattr(train, "_fit", lambda config, *args: given.append(config))
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # no Ray started: _fit is where it would be used
    train.run_training(config, verbose=False)
    (worker_config,) = given
    assert worker_config.listing == train.listing_uri(config) and Path(worker_config.listing).exists()
    listed = train_data.scan_splits(str(data), holdout_size=2)

    def no_listing(*args: object, **kwargs: object) -> None:
        raise AssertionError("a worker listed the tree")

    monkeypatch.setattr(train_data, "scan_image_folder", no_listing)
    (data / "train/cls_a/0.png").unlink()  # the tree changes under the running job: the workers keep the listing
    task = train.build_task(worker_config)
    assert [rel for rel, _ in task.train_set.index.items] == [rel for rel, _ in listed.train.items]
    assert [rel for rel, _ in task.val_set.index.items] == [rel for rel, _ in listed.val.items]
    with pytest.raises(ValueError, match="listed with other classes"):
        train_data.scan_splits(str(data), classes=["x", "y"], listing=worker_config.listing)
