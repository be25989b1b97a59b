"""The quickstart job: flags, the offline message (no network: a closed port on 127.0.0.1), and (slow) the whole
pipeline end to end with tiny models on a synthetic tree."""

from __future__ import annotations

import functools
import json
import socket
from pathlib import Path

import pytest
from _helpers import synthetic_tree as png_tree

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


def test_a_run_that_failed_in_stage_1_does_not_block_the_corrected_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Offline without --data, then a wrong --data: each leaves only its record, which the next (corrected) run
    replaces. Once stage 1 has written the data subset, a run with other settings is refused again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    offline = functools.partial(download_imagenette, url=f"http://127.0.0.1:{port}/imagenette2-160.tgz", timeout=5)
    monkeypatch.setattr(pipeline, "download_imagenette", offline)
    out = tmp_path / "out"
    assert quickstart.main(["--output", str(out), "--cache-dir", str(tmp_path / "cache")]) == 1
    assert "cannot download" in capsys.readouterr().err
    (tmp_path / "flat" / "a").mkdir(parents=True)
    assert quickstart.main(["--data", str(tmp_path / "flat"), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "train/ and val/" in err and "other settings" not in err
    assert [p.name for p in out.iterdir()] == ["quickstart.json"]

    data = synthetic_tree(tmp_path / "data", per_class=1)
    corrected = pipeline.QuickstartConfig(output=str(out), data=str(data))
    pipeline._claim_output(corrected)  # what run_quickstart does first, then stage 1
    assert json.loads((out / "quickstart.json").read_text())["data"] == str(data)
    subset = pipeline._prepare_data(corrected)
    with pytest.raises(pipeline.QuickstartError, match="holds a quickstart with other settings"):
        pipeline._claim_output(pipeline.QuickstartConfig(output=str(out), data=str(data), seed=1))
    assert (subset / "subset.json").is_file() and json.loads((out / "quickstart.json").read_text())["seed"] == 0


@pytest.mark.parametrize("below", ["", "sub"])
def test_output_under_a_file_is_one_line(tmp_path: Path, below: str, capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "plain"
    plain.write_text("keep")
    output = plain / below if below else plain
    data = synthetic_tree(tmp_path / "data", per_class=1)
    assert quickstart.main(["--data", str(data), "--output", str(output)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("quickstart: error: ") and f"--output {output}" in err and err.count("\n") == 1, err
    assert "Traceback" not in err and plain.read_text() == "keep"


def test_the_held_out_draw_leaves_every_class_a_training_image(tmp_path: Path) -> None:
    """The training jobs refuse held-out images that take a class's every image (pipelines.train_data): the
    quickstart draws fewer then, none when even one would (one image per class)."""
    from anchornet.image_folder import holdout_indices, scan_image_folder
    from pipelines.train_data import scan_splits

    classes = tuple(f"c{k}" for k in range(10))
    default = png_tree(tmp_path / "default", train=20, val=1, classes=classes)  # the default subset's shape
    assert pipeline._holdout_size(default, 40, seed=0) == 40
    one_each = png_tree(tmp_path / "one", train=1, val=1, classes=classes)  # --train-per-class 1
    assert pipeline._holdout_size(one_each, 2, seed=0) == 0
    two_each = png_tree(tmp_path / "two", train=2, val=1, classes=classes[:5])
    index = scan_image_folder(two_each / "train")
    # a seed whose draw of 2 takes both images of a class: the quickstart holds out 1 image, which leaves it one
    seed = next(s for s in range(100) if len({index.items[i][1] for i in holdout_indices(index, 2, s)}) == 1)
    with pytest.raises(ValueError, match="holds out every train/ image"):
        scan_splits(str(two_each), holdout_size=2, holdout_seed=seed)
    assert pipeline._holdout_size(two_each, 2, seed) == 1
    scan_splits(str(two_each), holdout_size=1, holdout_seed=seed)


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
