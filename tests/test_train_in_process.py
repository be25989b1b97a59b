"""``--in-process``: the training epochs in one process without Ray (a one-GPU machine where Ray is not installed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import synthetic_tree

from anchornet import load_checkpoint, save_checkpoint
from anchornet.model import anchornet_test
from jobs import train_anchornet, train_classifier

REPO = Path(__file__).resolve().parents[1]
FAST = ["--batch-size", "4", "--loader-workers", "0", "--threads", "1", "--lr", "0.05", "--seed", "3"]


def stage1_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--output", str(out), "--arch", "anchornet_test", "--epochs", "2", *FAST, *extra]


@pytest.mark.ray
def test_in_process_trains_the_epochs_of_a_ray_run(ray_local: None, tmp_path: Path) -> None:
    """Same config, seed and threads: the in-process run and the one-worker Ray Train run draw the same batches and
    end with the same weights and per-epoch metrics; the cards differ only in where they ran."""
    data = synthetic_tree(tmp_path / "data", train=6, val=2)
    argv = stage1_argv(data, tmp_path / "ray", "--holdout-size", "2", "--cpus-per-worker", "0.5")
    assert train_anchornet.main(argv) == 0
    argv = stage1_argv(data, tmp_path / "local", "--holdout-size", "2", "--in-process")
    assert train_anchornet.main(argv) == 0
    ray_model, ray_card = load_checkpoint(tmp_path / "ray" / "anchornet.pt")
    local_model, local_card = load_checkpoint(tmp_path / "local" / "anchornet.pt")
    local_state = local_model.state_dict()
    assert list(local_state) == list(ray_model.state_dict())
    for name, ray_value in ray_model.state_dict().items():
        torch.testing.assert_close(local_state[name], ray_value, rtol=1e-5, atol=1e-6, msg=name)
    keys = ("epoch", "train_samples", "lr", "train_loss", "train_acc", "val_top1")
    assert [{k: pytest.approx(h[k]) for k in keys} for h in ray_card.extra["history"]] == [
        {k: h[k] for k in keys} for h in local_card.extra["history"]
    ]
    assert local_card.extra["history"][0]["train_samples"] == 12 - 2 - 2  # 2 held out, the last batch of 2 dropped
    assert local_card.provenance["holdout"] == ray_card.provenance["holdout"]
    assert local_card.provenance["runner"] == "in-process" and "ray" not in local_card.provenance
    assert local_card.provenance["config"]["listing"] == str(tmp_path / "local" / "ray_anchornet.listing.parquet")


def test_in_process_needs_no_ray(tmp_path: Path) -> None:
    """A patch-role run on the fly from a frozen AnchorNet, in a Python where ``import ray`` fails."""
    data = synthetic_tree(tmp_path / "data", train=2, val=1)
    anchornet = tmp_path / "anchornet.pt"
    save_checkpoint(anchornet_test(2), anchornet, class_names=["cls_a", "cls_b"])
    argv = [
        "--role", "patch", "--arch", "resnet18", "--anchornet", str(anchornet), "--data", str(data),
        "--output", str(tmp_path / "out"), "--epochs", "1", "--num-patches", "2", "--in-process", *FAST,
    ]  # fmt: skip
    code = (
        "import sys; sys.modules['ray'] = None\n"  # any import of ray now raises ImportError
        "from jobs import train_classifier\n"
        f"raise SystemExit(train_classifier.main({argv!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "in this process on cpu (" in done.stdout and "[patch] epoch 1/1" in done.stdout
    assert "(resnet18, random weights: --weights imagenet fine-tunes pretrained ones" in done.stdout  # said up front
    _, card = load_checkpoint(tmp_path / "out" / "patch.pt")
    assert card.extra["role"] == "patch" and card.extra["history"][0]["train_samples"] == 4 * 2


def test_in_process_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = synthetic_tree(tmp_path / "data", train=2, val=1)
    out = tmp_path / "out"
    assert train_anchornet.main(stage1_argv(data, out, "--in-process", "--num-workers", "2")) == 2
    assert "--num-workers must be 1" in capsys.readouterr().err
    assert train_anchornet.main(stage1_argv(data, out, "--in-process", "--address", "ray://head:10001")) == 2
    assert "drop --address" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert train_anchornet.main(stage1_argv(data, out, "--in-process", "--use-gpu")) == 2
        assert "sees no CUDA device" in capsys.readouterr().err
    assert train_anchornet.main(stage1_argv(data, out, "--in-process")) == 0
    capsys.readouterr()
    assert train_anchornet.main(stage1_argv(data, out, "--in-process")) == 1  # no resume: nothing is overwritten
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not resume runs; use a new --output" in err
    assert train_anchornet.main(stage1_argv(data, out)) == 1  # nor does Ray take it over: it would retrain
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a finished run that Ray cannot resume (trained --in-process" in err
    argv = ["--role", "glance", "--arch", "resnet18", *stage1_argv(data, tmp_path / "g", "--in-process")[:4], *FAST]
    assert train_classifier.main([*argv, "--epochs", "1"]) == 0


def test_in_process_failure_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error in an epoch (CUDA out of memory, a failed read) ends the run with one line and exit 1, as a failed
    Ray run does, not a traceback."""
    from pipelines import train

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    data = synthetic_tree(tmp_path / "data", train=2, val=1)
    monkeypatch.setattr(train, "train_epoch", out_of_memory)
    assert train_anchornet.main(stage1_argv(data, tmp_path / "out", "--in-process")) == 1
    err = capsys.readouterr().err
    assert err == "error: training failed: CUDA out of memory. Tried to allocate 2.00 GiB\n"


def test_in_process_threads_and_paths_as_a_ray_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--cpus-per-worker sets the torch threads as it does for a Ray worker; the card records absolute paths (and
    --amp and --channels-last)."""
    synthetic_tree(tmp_path / "data", train=2, val=1)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        argv = stage1_argv(Path("data"), Path("out"), "--in-process", "--amp", "--channels-last")
        argv[argv.index("--threads") : argv.index("--threads") + 2] = ["--cpus-per-worker", "1"]
        assert train_anchornet.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "in this process on cpu (" in out and ", 1 thread(s): 2 epochs" in out
    assert "training anchornet (anchornet_test) on 2 classes" in out  # stage I starts from scratch: no weights said
    _, card = load_checkpoint(tmp_path / "out" / "anchornet.pt")
    config = card.provenance["config"]
    assert (config["data"], config["output"]) == (str(tmp_path / "data"), str(tmp_path / "out"))
    assert config["amp"] is True and config["channels_last"] is True
    assert card.provenance["device"].startswith("cpu (")
