"""The quickstart job: flags, the offline message (no network: a closed port on 127.0.0.1), and (slow) the whole
pipeline end to end with tiny models on a synthetic tree."""

from __future__ import annotations

import functools
import json
import socket
from pathlib import Path

import pytest

from anchornet.datasets import download_imagenette
from jobs import quickstart
from pipelines import quickstart as pipeline

CLASSES = ("circles", "squares", "stripes")  # not WordNet ids: random heads, the glance as the full baseline


def synthetic_tree(root: Path, per_class: int = 4, size: int = 112) -> Path:
    """ROOT/{train,val}/<class>/<i>.jpg: a class-coloured pattern on noise, so there is something to learn."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
                pixels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4, c] = 230
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg", quality=90)
    return root


def test_flags() -> None:
    config = quickstart.parse_args([])
    assert config == pipeline.QuickstartConfig()
    assert (config.output, config.train_per_class, config.val_per_class, config.epochs) == (
        "quickstart-output", 20, 10, 2,
    )  # fmt: skip
    config = quickstart.parse_args(
        ["--data", "d", "--train-per-class", "0", "--val-per-class", "3", "--epochs", "1", "--no-pretrained"]
    )
    assert (config.data, config.train_per_class, config.val_per_class, config.weights) == ("d", None, 3, None)
    assert quickstart.parse_args(["--tiny"]).tiny


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--epochs", "0"], "epochs must be at least 1"),
        (["--train-per-class", "-1"], "must be >= 0"),
        (["--output", "s3://bucket/x"], "runs locally"),
    ],
)
def test_bad_flags_are_one_line(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        quickstart.parse_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and needle in err and err.count("\n") == 1, err


def test_help_hides_test_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        quickstart.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--data" in out and "--train-per-class" in out and "--tiny" not in out


def test_offline_says_in_one_line_how_to_pass_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    offline = functools.partial(download_imagenette, url=f"http://127.0.0.1:{port}/imagenette2-160.tgz", timeout=5)
    monkeypatch.setattr(pipeline, "download_imagenette", offline)
    code = quickstart.main(["--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("quickstart: error: cannot download") and "--data DIR" in err


def test_output_belonging_to_something_else_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mine.txt").write_text("keep")
    data = synthetic_tree(tmp_path / "data", per_class=1)
    assert quickstart.main(["--data", str(data), "--output", str(tmp_path)]) == 1
    assert "not a quickstart output" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_bad_data_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "flat" / "a").mkdir(parents=True)
    assert quickstart.main(["--data", str(tmp_path / "flat"), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train/ and val/" in err


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)  # about a minute on 2 idle cores; minutes when they are busy
def test_end_to_end_tiny(tmp_path: Path, ray_local: None, capsys: pytest.CaptureFixture[str]) -> None:
    data = synthetic_tree(tmp_path / "data", per_class=4)
    out = tmp_path / "out"
    argv = [
        "--data", str(data), "--output", str(out), "--tiny", "--train-per-class", "3", "--val-per-class", "2",
        "--epochs", "1", "--batch-size", "8", "--loader-workers", "0", "--serve-images", "3",
    ]  # fmt: skip
    assert quickstart.main(argv) == 0
    printed = capsys.readouterr().out
    for k in range(1, 8):
        assert f"[quickstart] stage {k}/7:" in printed
    assert "AnchorNet quickstart: done" in printed and "over HTTP:" in printed

    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"] == list(CLASSES)
    assert [a["truth"] for a in summary["http"]] == list(CLASSES)
    assert all(a["prediction"]["name"] in CLASSES and a["exit_step"] >= 1 for a in summary["http"])
    assert summary["report"]["test_images"] == 3 * 2
    # a fifth of train/ held out of all three trainings (the patch role by the precomputed patches' image ids),
    # and the report fitted its thresholds on exactly those images
    holdout = summary["report"]["holdout"]
    assert (holdout["images"], holdout["from_cards"], holdout["disjoint_from_training"]) == (1, True, True)
    for name in ("anchornet/anchornet.pt", "classifiers/glance.pt", "classifiers/patch.pt"):
        assert (out / name).is_file(), name
    for name in ("results.md", "accuracy_vs_gmacs.png", "thresholds.json", "gallery.png"):
        assert (out / "report" / name).is_file(), name
    assert list((out / "patches" / "train").glob("**/*.parquet"))
    assert len(list((out / "data" / "train").rglob("*.jpg"))) == 3 * 3
