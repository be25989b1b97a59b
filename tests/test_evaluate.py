"""The evaluation job end to end on a tiny synthetic tree with tiny models."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from anchornet import anchornet_test, build_classifier, count_macs, load_thresholds, save_checkpoint
from anchornet.checkpoint import ModelCard
from anchornet.image_folder import holdout_digest, holdout_indices, scan_image_folder
from anchornet.preprocessing import Preprocessing
from jobs import evaluate
from pipelines.evaluate import EvaluateConfig, evaluation_indices, resolve_holdout

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow
CLASSES = ["cls_a", "cls_b"]


def _tree(root: Path, classes: list[str], counts: tuple[int, int] = (6, 5)) -> Path:
    generator = torch.Generator().manual_seed(0)
    for split, count in zip(("train", "val"), counts, strict=True):
        for label, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 120, (240, 240, 3), generator=generator, dtype=torch.uint8) + 100 * label
                Image.fromarray(pixels.numpy()).save(root / split / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    paths = {"data": _tree(root / "data", CLASSES), "out": root / "report"}
    save_checkpoint(anchornet_test(2).eval(), root / "anchornet.pt", class_names=CLASSES, preprocessing=Preprocessing())
    for role, size in (("glance", 95), ("patch", 95), ("full", 224)):
        model = build_classifier("mobilenet_v3_small", 2).eval()
        save_checkpoint(model, root / f"{role}.pt", input_size=size, class_names=CLASSES)
    paths.update({name: root / f"{name}.pt" for name in ("anchornet", "glance", "patch", "full")})
    return paths


def _argv(p: dict[str, Path], **overrides: str) -> list[str]:
    args = {
        "--data": str(p["data"]),
        "--anchornet": str(p["anchornet"]),
        "--glance": str(p["glance"]),
        "--patch": str(p["patch"]),
        "--full": str(p["full"]),
        "--output": str(p["out"]),
        "--batch-size": "4",
        "--holdout-size": "8",
        "--timing-batch": "4",
        "--timing-repeats": "1",
        "--gallery": "4",
        **overrides,
    }
    return [item for pair in args.items() for item in pair]


def test_report_end_to_end(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate.main(_argv(setup)) == 0
    out = setup["out"]
    for name in (
        "results.md",
        "results.csv",
        "metrics.json",
        "thresholds.json",
        "accuracy_vs_gmacs.png",
        "gallery.png",
    ):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "results.csv").open()))
    curves = {(r["curve"], r["protocol"]) for r in rows}
    for name in (
        "AnchorNet patches + glance",
        "random patches + glance",
        "AnchorNet patches only",
        "random patches only",
    ):
        assert (name, "anytime") in curves and (name, "budgeted") in curves
    anytime = [r for r in rows if r["curve"] == "AnchorNet patches + glance" and r["protocol"] == "anytime"]
    assert [r["point"] for r in anytime] == ["t=1", "t=2", "t=3", "t=4", "t=5"]
    gmacs = [float(r["gmacs"]) for r in anytime]
    assert gmacs == sorted(gmacs) and gmacs[1] > gmacs[0]
    assert all(0.0 <= float(r["top1"]) <= 1.0 for r in rows)
    budgets = load_thresholds(out / "thresholds.json")
    assert len(budgets) == 39 and all(len(b.thresholds) == 4 for b in budgets.values())
    assert {(b.num_patches, b.fallback) for b in budgets.values()} == {(4, False)}  # the cascade, for Serve's check
    captured = capsys.readouterr()
    printed = captured.out
    assert "full-224:" in printed and "time_speedup_over_macs_speedup" in printed
    assert "# AnchorNet evaluation" in (out / "results.md").read_text()
    # The cards record no held-out images: the models were trained on all of train/, and the report says so.
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "trained on all of train/" in warnings[0] and "--holdout-size" in warnings[0]
    holdout = json.loads((out / "metrics.json").read_text())["holdout"]
    assert holdout["disjoint_from_training"] is False and holdout["warning"] and holdout["images"] == 8
    assert (holdout["split"], holdout["size"], holdout["seed"], holdout["from_cards"]) == ("train", 8, 0, False)
    assert "**Warning:**" in (out / "results.md").read_text()


def test_fallback_adds_a_curve_and_saves_its_budgets(setup: dict[str, Path], tmp_path: Path) -> None:
    """--fallback: the cascade ending with the full network is one more curve, and thresholds.json holds its
    budgets (one threshold more: the last patch step's), ready for jobs/serve.py --fallback."""
    paths = {**setup, "out": tmp_path / "report_fallback"}
    assert evaluate.main([*_argv(paths, **{"--num-patches": "2"}), "--gallery", "0", "--fallback"]) == 0
    rows = list(csv.DictReader((paths["out"] / "results.csv").open()))
    fallback = [r for r in rows if r["curve"] == "AnchorNet patches + glance + full fallback"]
    anytime = [r for r in fallback if r["protocol"] == "anytime"]
    assert [r["point"] for r in anytime] == ["t=1", "t=2", "t=3", "t=4"]
    full = next(r for r in rows if r["curve"] == "full-224 network")
    plain = [r for r in rows if r["curve"] == "AnchorNet patches + glance" and r["protocol"] == "anytime"]
    # the last step is the full network alone, after everything else ran
    assert anytime[-1]["top1"] == full["top1"]
    assert float(anytime[-1]["gmacs"]) == pytest.approx(float(plain[-1]["gmacs"]) + float(full["gmacs"]), abs=2e-4)
    assert [r["top1"] for r in anytime[:3]] == [r["top1"] for r in plain]
    assert len([r for r in fallback if r["protocol"] == "budgeted"]) == 39
    budgets = load_thresholds(paths["out"] / "thresholds.json")
    assert all(len(b.thresholds) == 3 for b in budgets.values())
    assert {(b.num_patches, b.fallback) for b in budgets.values()} == {(2, True)}
    metrics = json.loads((paths["out"] / "metrics.json").read_text())
    assert metrics["config"]["fallback"] is True
    # timed at the cheapest budget at least as accurate as the full network, when one is (else none is named)
    budgeted = [r for r in fallback if r["protocol"] == "budgeted"]
    as_accurate = [r for r in budgeted if float(r["top1"]) >= float(full["top1"])]
    no_lower = metrics["answers"]["fraction_of_full_macs_at_no_lower_accuracy"]
    if as_accurate:
        cheapest = min(as_accurate, key=lambda r: float(r["gmacs"]))
        assert metrics["timing"]["budget"] == cheapest["point"]
        assert no_lower == pytest.approx(float(cheapest["gmacs"]) / float(full["gmacs"]), abs=1e-3)
    else:
        assert no_lower is None
    assert "full fallback" in (paths["out"] / "results.md").read_text()


def test_the_downstream_networks_run_at_their_cards_input_size(setup: dict[str, Path], tmp_path: Path) -> None:
    """Glance and patch trained at --patch-size 64 are evaluated (and costed) at 64, as Serve runs them."""
    paths = dict(setup)
    for role in ("glance", "patch"):
        paths[role] = tmp_path / f"{role}64.pt"
        model = build_classifier("mobilenet_v3_small", 2).eval()
        save_checkpoint(model, paths[role], input_size=64, class_names=CLASSES)
    paths["out"] = tmp_path / "report64"
    assert evaluate.main([*_argv(paths), "--gallery", "0"]) == 0
    rows = list(csv.DictReader((paths["out"] / "results.csv").open()))
    glance_only = next(r for r in rows if r["curve"] == "AnchorNet patches + glance" and r["point"] == "t=1")
    assert float(glance_only["gmacs"]) == pytest.approx(count_macs(model, 64) / 1e9, rel=1e-3)


def test_gallery_is_linked_only_when_written(setup: dict[str, Path], tmp_path: Path) -> None:
    """--gallery 0 writes no gallery.png, links none in results.md and removes an earlier run's."""
    out = tmp_path / "report"
    out.mkdir()
    (out / "gallery.png").write_bytes(b"an earlier run's gallery")
    assert evaluate.main(_argv({**setup, "out": out}, **{"--gallery": "0", "--num-patches": "1"})) == 0
    assert not (out / "gallery.png").exists() and "gallery.png" not in (out / "results.md").read_text()
    assert evaluate.main(_argv({**setup, "out": out}, **{"--gallery": "2", "--num-patches": "1"})) == 0
    assert (out / "gallery.png").stat().st_size > 0 and "](gallery.png)" in (out / "results.md").read_text()


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a failed run printed on stderr (after its warnings), checked to be the only one."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith("[evaluate] warning")]
    assert len(errors) == 1 and errors[0].startswith("evaluate: error: ") and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("flag", ["--glance", "--patch", "--full"])
def test_an_anchornet_checkpoint_is_refused_as_a_classifier(
    setup: dict[str, Path], tmp_path: Path, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    assert evaluate.main(_argv({**setup, "out": out}, **{flag: str(setup["anchornet"])})) == 2
    expected = f"{flag} {setup['anchornet']} is an anchornet checkpoint, not a classifier"
    assert _one_error(capsys) == f"evaluate: error: {expected}"
    assert not (out / "thresholds.json").exists()
    assert evaluate.main(_argv({**setup, "out": out}, **{"--anchornet": str(setup["glance"])})) == 2
    assert "is a classifier checkpoint, not an AnchorNet one" in _one_error(capsys)


def test_a_fallback_at_another_size_than_the_images_is_refused(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--fallback runs --full on the 224 px image: a 95 px classifier would run and cost what Serve refuses."""
    out = tmp_path / "report"
    argv = [*_argv({**setup, "out": out}, **{"--full": str(setup["glance"])}), "--fallback"]
    assert evaluate.main(argv) == 2
    error = _one_error(capsys)
    assert "--fallback: the --full classifier works at 95 px but the images are preprocessed to 224 px" in error
    assert not (out / "thresholds.json").exists()


def test_an_unwritable_output_fails_before_any_model_runs(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipelines.evaluate

    plain = tmp_path / "plain"
    plain.write_text("a file, not a directory")
    loaded = []
    monkeypatch.setattr(pipelines.evaluate, "load_checkpoint", lambda path: loaded.append(path))
    for output in (plain, plain / "sub"):
        assert evaluate.main(_argv({**setup, "out": output})) == 2
        assert _one_error(capsys).startswith(f"evaluate: error: --output {output} cannot be written: ")
    assert loaded == [] and plain.read_text() == "a file, not a directory"


def test_data_in_an_unreachable_bucket_fails_in_one_line(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The test session's AWS variables point at 127.0.0.1 (no S3 server there unless a test started one): an
    OSError of the S3 client (or a missing bucket), reported in one line, not a traceback."""
    assert evaluate.main(_argv({**setup, "out": tmp_path / "report"}, **{"--data": "s3://no-such-bucket/x"})) == 2
    assert "no-such-bucket" in _one_error(capsys)


def test_bad_inputs_fail_in_one_line(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate.main(_argv(setup, **{"--data": str(setup["data"] / "nope")})) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    wrong = setup["data"].parent / "wrong.pt"
    save_checkpoint(build_classifier("resnet18", 3), wrong, input_size=95, class_names=["x", "y", "z"])
    assert evaluate.main(_argv(setup, **{"--glance": str(wrong)})) == 2
    assert "classes differ" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(_argv(setup, **{"--batch-size": "0"}))
    with pytest.raises(SystemExit):
        evaluate.main(_argv(setup, **{"--threads": "0"}))  # a flag error, not torch's RuntimeError
    assert "--threads must be at least 1" in capsys.readouterr().err
    smaller = setup["data"].parent / "patch64.pt"
    save_checkpoint(build_classifier("mobilenet_v3_small", 2).eval(), smaller, input_size=64, class_names=CLASSES)
    assert evaluate.main(_argv(setup, **{"--patch": str(smaller)})) == 2  # the engine runs both at one side
    err = capsys.readouterr().err
    assert "--glance runs at 95 px and --patch at 64 px" in err and err.strip().count("\n") == 0


def _card(holdout: dict | None) -> ModelCard:
    return ModelCard(kind="classifier", arch={}, input_size=95, macs=0, provenance={"holdout": holdout})


def test_holdout_comes_from_the_cards_and_overlaps_are_named(setup: dict[str, Path]) -> None:
    index = scan_image_folder(setup["data"] / "train")
    ids = [index.items[i][0] for i in holdout_indices(index, 6, 2)]
    record = {"split": "train", "size": 6, "seed": 2, "images": 6, "sha256": holdout_digest(ids)}
    config = EvaluateConfig(data=str(setup["data"]), anchornet="a", glance="g", patch="p", output="o", full="f")
    cards = {flag: _card(record) for flag in ("--anchornet", "--glance", "--patch")}

    holdout, _ = resolve_holdout(config, cards, CLASSES)  # no flags: the cards' held-out images, unbiased
    assert (holdout.size, holdout.seed, holdout.from_cards, holdout.warning) == (6, 2, True, None)
    assert holdout.indices == holdout_indices(index, 6, 2) and holdout.to_dict()["disjoint_from_training"]
    fewer, _ = resolve_holdout(EvaluateConfig(**{**config.__dict__, "holdout_size": 3}), cards, CLASSES)
    assert fewer.disjoint and len(fewer.indices) == 3  # a subset of the held-out images is still unseen
    assert not fewer.from_cards and not fewer.to_dict()["from_cards"]  # not the images the cards record
    same = EvaluateConfig(**{**config.__dict__, "holdout_split": "train/", "holdout_size": 6, "holdout_seed": 2})
    assert resolve_holdout(same, cards, CLASSES)[0].from_cards  # the cards' values, given as flags

    other, _ = resolve_holdout(EvaluateConfig(**{**config.__dict__, "holdout_seed": 0}), cards, CLASSES)
    assert not other.disjoint and [o.split(" ")[0] for o in other.overlaps] == ["--anchornet", "--glance", "--patch"]
    stage1_all = {**cards, "--anchornet": _card(None)}
    mixed, _ = resolve_holdout(config, stage1_all, CLASSES)
    assert mixed.overlaps == ["--anchornet trained on all of train/"] and "biased high" in mixed.warning
    for spelling in ("train/", "./train"):  # the same split, however it is written
        spelled, _ = resolve_holdout(
            EvaluateConfig(**{**config.__dict__, "holdout_split": spelling}), stage1_all, CLASSES
        )
        assert spelled.overlaps == mixed.overlaps
    elsewhere = {**cards, "--patch": _card({**record, "sha256": holdout_digest(["cls_a/other.png"])})}
    assert resolve_holdout(config, elsewhere, CLASSES)[0].overlaps == ["--patch held out other images (another tree?)"]


def test_holdout_from_the_test_split_is_left_out_of_the_test(setup: dict[str, Path]) -> None:
    index = scan_image_folder(setup["data"] / "val")  # 10 images
    config = EvaluateConfig(
        data=str(setup["data"]), anchornet="a", glance="g", patch="p", output="o", full="f", holdout_split="val/",
        holdout_size=4, holdout_seed=1,
    )  # fmt: skip
    all_train = {flag: _card(None) for flag in ("--anchornet", "--glance", "--patch")}
    holdout, holdout_index = resolve_holdout(config, all_train, CLASSES)
    # Models trained on all of train/ never saw val: the fit is unbiased, and the test is the other 6 images.
    assert holdout.from_test_split and holdout.disjoint and holdout.warning is None
    assert holdout.indices == holdout_indices(index, 4, 1) and holdout_index.items == index.items
    reused, reused_index = resolve_holdout(config, all_train, CLASSES, test_index=index)  # no second listing
    assert reused_index is index and reused.indices == holdout.indices
    assert holdout.to_dict()["from_test_split"] is True
    rest = evaluation_indices(len(index), holdout)
    assert sorted(rest + holdout.indices) == list(range(10)) and not set(rest) & set(holdout.indices)
    assert evaluation_indices(len(index), holdout, limit=2) == [rest[0], rest[3]]  # spread, not the first class
    from_train, _ = resolve_holdout(EvaluateConfig(**{**config.__dict__, "holdout_split": "train"}), all_train, CLASSES)
    assert not from_train.from_test_split and evaluation_indices(10, from_train) == list(range(10))
    assert evaluation_indices(10, from_train, limit=5) == [0, 2, 4, 6, 8]
    assert evaluation_indices(10, from_train, limit=50) == list(range(10))
    with pytest.raises(ValueError, match=r"^--holdout-size 10 leaves no test images"):
        resolve_holdout(EvaluateConfig(**{**config.__dict__, "holdout_size": 10}), all_train, CLASSES)


def test_holdout_flags_and_the_cards_record_are_told_apart(setup: dict[str, Path]) -> None:
    """The cards record 1000 held-out train images: --holdout-split val alone takes that size (the error says so,
    not "--holdout-size 1000"), and the held-out images are not the cards' (from_cards is false)."""
    record = {"split": "train", "size": 1000, "seed": 0, "images": 1000, "sha256": "x"}
    cards = {flag: _card(record) for flag in ("--anchornet", "--glance", "--patch")}
    config = EvaluateConfig(
        data=str(setup["data"]), anchornet="a", glance="g", patch="p", output="o", full="f", holdout_split="val"
    )
    with pytest.raises(ValueError) as info:
        resolve_holdout(config, cards, CLASSES)
    message = str(info.value)
    assert "the held-out size the cards record (1000 of train/; no --holdout-size given)" in message
    assert not message.startswith("--holdout-size") and "pass a smaller --holdout-size" in message
    nothing = {flag: _card(None) for flag in cards}
    with pytest.raises(ValueError, match=r"^the default --holdout-size 1000 leaves no test images"):
        resolve_holdout(config, nothing, CLASSES)
    val = EvaluateConfig(**{**config.__dict__, "holdout_size": 4})
    holdout, _ = resolve_holdout(val, cards, CLASSES)  # the cards' seed, but neither their split nor their size
    assert (holdout.split, holdout.size, holdout.seed, holdout.from_cards) == ("val", 4, 0, False)


def test_report_with_thresholds_fitted_on_part_of_the_test_split(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    argv = _argv(setup, **{"--output": str(out), "--holdout-split": "val", "--holdout-size": "4", "--gallery": "0"})
    assert evaluate.main(argv) == 0
    assert "warning" not in capsys.readouterr().err  # the models were not trained on val
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_images"] == 6 and metrics["holdout"]["from_test_split"] is True
    assert metrics["holdout"]["disjoint_from_training"] is True and metrics["holdout"]["images"] == 4
    assert "(6 images, the held-out ones left out)" in (out / "results.md").read_text()
    assert len(load_thresholds(out / "thresholds.json")) == 39


def _run_job(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "jobs/evaluate.py", *argv],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_job_errors_are_one_line(setup: dict[str, Path], tmp_path: Path) -> None:
    done = _run_job("--data", str(setup["data"]), "--output", str(tmp_path / "out"))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "the following arguments are required" in done.stderr and "(see --help)" in done.stderr

    # Offline, --full-arch cannot get its ImageNet weights: the hint names this job's flag (--full CKPT).
    wordnet = ["n01440764", "n02102040"]
    data = _tree(tmp_path / "data", wordnet, counts=(2, 1))
    save_checkpoint(anchornet_test(2).eval(), tmp_path / "anchornet.pt", class_names=wordnet)
    for role in ("glance", "patch"):
        model = build_classifier("resnet18", 2).eval()
        save_checkpoint(model, tmp_path / f"{role}.pt", input_size=95, class_names=wordnet)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{closed.getsockname()[1]}"
    offline = {key: proxy for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
    offline.update(no_proxy="", NO_PROXY="", TORCH_HOME=str(tmp_path / "torch"))  # an empty weights cache
    argv = [f"--{role}={tmp_path / role}.pt" for role in ("anchornet", "glance", "patch")]
    done = _run_job(
        "--data", str(data), *argv, "--full-arch", "resnet18", "--output", str(tmp_path / "out"), env=offline
    )
    err = [line for line in done.stderr.strip().splitlines() if "[evaluate] warning" not in line]
    assert done.returncode == 2 and len(err) == 1, done.stderr
    assert err[0].startswith("evaluate: error: --full-arch resnet18: could not download") and "--full CKPT" in err[0]
    assert "weights=PATH" not in done.stderr and "Traceback" not in done.stderr


def test_loader_workers_change_nothing_but_speed(setup: dict[str, Path], tmp_path: Path) -> None:
    reports = {}
    for workers in ("0", "2"):
        paths = {**setup, "out": tmp_path / f"report{workers}"}
        assert evaluate.main([*_argv(paths), "--gallery", "0", "--loader-workers", workers]) == 0
        reports[workers] = (paths["out"] / "results.csv").read_text()
    assert reports["0"] == reports["2"]


def test_an_undecodable_test_image_is_named_in_one_line(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    (data / "val/cls_b/3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    paths = {**setup, "data": data, "out": tmp_path / "report"}
    assert evaluate.main([*_argv(paths), "--gallery", "0"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith("[evaluate] warning")]
    assert len(errors) == 1 and errors[0].startswith("evaluate: error: "), err
    assert str(data / "val/cls_b/3.png") in errors[0] and "Traceback" not in err
