"""The evaluation job end to end on a tiny synthetic tree with tiny models."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from PIL import Image

from anchornet import anchornet_test, build_classifier, load_thresholds, save_checkpoint
from anchornet.preprocessing import Preprocessing
from jobs import evaluate

pytestmark = pytest.mark.slow
CLASSES = ["cls_a", "cls_b"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 6), ("val", 5)):
        for label, cls in enumerate(CLASSES):
            (root / "data" / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 120, (240, 240, 3), generator=generator, dtype=torch.uint8) + 100 * label
                Image.fromarray(pixels.numpy()).save(root / "data" / split / cls / f"{i}.png")
    paths = {"data": root / "data", "out": root / "report"}
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
    printed = capsys.readouterr().out
    assert "full-224:" in printed and "time_speedup_over_macs_speedup" in printed
    assert "# AnchorNet evaluation" in (out / "results.md").read_text()


def test_bad_inputs_fail_in_one_line(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate.main(_argv(setup, **{"--data": str(setup["data"] / "nope")})) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    wrong = setup["data"].parent / "wrong.pt"
    save_checkpoint(build_classifier("resnet18", 3), wrong, class_names=["x", "y", "z"])
    assert evaluate.main(_argv(setup, **{"--glance": str(wrong)})) == 2
    assert "classes differ" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(_argv(setup, **{"--batch-size": "0"}))
