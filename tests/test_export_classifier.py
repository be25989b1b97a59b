"""jobs/export_classifier.py: an ImageNet classifier restricted to a checkpoint's classes, written as a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anchornet import anchornet_test, build_classifier, count_macs, load_checkpoint, save_checkpoint
from anchornet.preprocessing import Preprocessing
from jobs import export_classifier

pytestmark = pytest.mark.model

WNIDS = ["n01440764", "n03000684", "n03888257"]  # ImageNet indices 0, 491, 701


def test_export_keeps_the_imagenet_rows_of_the_classes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "anchornet.pt"
    save_checkpoint(anchornet_test(3), source, class_names=WNIDS, preprocessing=Preprocessing(image_size=160))
    out = tmp_path / "full.pt"
    argv = ["--arch", "efficientnet_lite0", "--classes-from", str(source), "--output", str(out)]
    assert export_classifier.main([*argv, "--input-size", "160"]) == 0
    assert "3 classes" in capsys.readouterr().out
    model, card = load_checkpoint(out)
    assert card.kind == "classifier" and card.class_names == WNIDS and card.input_size == 160
    assert card.preprocessing["image_size"] == 160 and card.provenance["weights"] == "imagenet"
    assert card.macs == count_macs(model, 160)
    imagenet = build_classifier("efficientnet_lite0", 1000, weights="imagenet").eval()
    images = torch.rand(2, 3, 160, 160)
    with torch.inference_mode():
        torch.testing.assert_close(model.eval()(images), imagenet(images)[:, [0, 491, 701]])


def test_bad_inputs_fail_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "anchornet.pt"
    save_checkpoint(anchornet_test(2), source, class_names=["cat", "dog"])
    out = str(tmp_path / "full.pt")
    for argv, message in (
        (["--classes-from", str(source)], "'cat' is not an ImageNet-1k WordNet id"),
        (["--classes-from", str(tmp_path / "missing.pt")], "missing.pt"),
    ):
        assert export_classifier.main(["--arch", "efficientnet_lite0", *argv, "--output", out]) == 2
        err = capsys.readouterr().err
        assert err.startswith("export_classifier: error:") and message in err and len(err.splitlines()) == 1
    assert not Path(out).exists()
    argv = ["--arch", "efficientnet_lite0", "--classes-from", str(source), "--output", str(tmp_path)]  # a directory
    save_checkpoint(anchornet_test(2), source, class_names=WNIDS[:2])
    assert export_classifier.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"export_classifier: error: cannot write {tmp_path}") and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:
        export_classifier.main(["--arch", "nope", "--classes-from", str(source), "--output", out])
    assert exit_info.value.code == 2


def test_unavailable_weights_name_no_library_argument(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Offline, the library's hint says ``weights=PATH``: the job has no such flag, so it words its own advice."""
    from anchornet.classifiers import WeightsUnavailableError

    source = tmp_path / "anchornet.pt"
    save_checkpoint(anchornet_test(3), source, class_names=WNIDS)
    argv = ["--arch", "efficientnet_lite0", "--classes-from", str(source), "--output", str(tmp_path / "full.pt")]
    for error, advice in (
        (WeightsUnavailableError("could not download weights from http://x/w.pth (refused)"), "network access"),
        (WeightsUnavailableError("no ImageNet weights are known for 'x'", hint=None), None),
    ):

        def unavailable(*args: object, error: Exception = error, **kwargs: object) -> None:
            raise error

        monkeypatch.setattr(export_classifier, "build_classifier", unavailable)
        assert export_classifier.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"export_classifier: error: --arch efficientnet_lite0: {error.reason}")
        assert "weights=PATH" not in err and len(err.splitlines()) == 1
        assert (advice in err) if advice else err.strip().endswith(error.reason)
    assert not (tmp_path / "full.pt").exists()
