"""The self-describing checkpoint format: round trips, cards, S3, refusing foreign files."""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from anchornet import AnchorNet, anchornet_test, count_macs, fold_batchnorm, fold_normalize, storage
from anchornet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from anchornet.classifiers import build_classifier
from anchornet.preprocessing import Preprocessing

pytestmark = pytest.mark.model

CLASSES = [f"class{i}" for i in range(10)]


def test_anchornet_round_trip(tmp_path: Path) -> None:
    model = anchornet_test(10).eval()
    path = tmp_path / "anchornet.pt"
    card = save_checkpoint(
        model, path, class_names=CLASSES, preprocessing=Preprocessing.as_is(), provenance={"epochs": 3}, top1=0.5
    )
    loaded, loaded_card = load_checkpoint(path)
    assert isinstance(loaded, AnchorNet) and not loaded.training
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert loaded_card == card
    assert loaded_card.class_names == CLASSES
    assert loaded_card.macs == count_macs(model, 224)
    assert loaded_card.provenance["epochs"] == 3 and "torch" in loaded_card.provenance
    assert loaded_card.extra == {"top1": 0.5}
    assert Preprocessing.from_dict(loaded_card.preprocessing) == Preprocessing.as_is()
    x = torch.rand(1, 3, 224, 224)
    torch.testing.assert_close(loaded(x), model(x))
    data = path.read_bytes()
    path.unlink()  # given the bytes, the file is not read again
    from_bytes, bytes_card = load_checkpoint(path, data)
    assert bytes_card == card and torch.equal(from_bytes.classifier.weight, model.classifier.weight)


def test_classifier_round_trip_with_thresholds(tmp_path: Path) -> None:
    model = build_classifier("resnet18", 10).eval()
    path = tmp_path / "patch.pt"
    save_checkpoint(model, path, input_size=95, class_names=CLASSES, thresholds=[0.9, float("inf")])
    loaded, card = load_checkpoint(path)
    assert card.kind == "classifier" and card.arch == {"name": "resnet18", "num_classes": 10}
    assert card.macs == count_macs(model, 95)
    assert card.extra["thresholds"] == [0.9, float("inf")]
    x = torch.rand(2, 3, 95, 95)
    torch.testing.assert_close(loaded(x), model(x))


def test_card_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 class names"):
        save_checkpoint(anchornet_test(10), tmp_path / "a.pt", class_names=["a", "b", "c"])
    with pytest.raises(TypeError, match=r"card\.when is a object"):
        save_checkpoint(anchornet_test(10), tmp_path / "a.pt", when=object())
    with pytest.raises(TypeError, match="AnchorNet or Classifier"):
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "a.pt")


def test_classifiers_need_an_input_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="input_size is required for a classifier"):
        save_checkpoint(build_classifier("resnet18", 3), tmp_path / "c.pt", class_names=["x", "y", "z"])
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("fold", [fold_batchnorm, fold_normalize])
def test_models_that_load_checkpoint_cannot_rebuild_are_refused(
    tmp_path: Path, fold: Callable[[AnchorNet], AnchorNet]
) -> None:
    folded = fold(anchornet_test(10).eval())
    with pytest.raises(ValueError, match="save it before fold_batchnorm"):
        save_checkpoint(folded, tmp_path / "folded.pt")
    assert not (tmp_path / "folded.pt").exists()
    model = anchornet_test(10)
    model.classifier = torch.nn.Linear(16, 4)  # config still says 10 classes
    with pytest.raises(ValueError, match=r"reshaped \['classifier\.bias', 'classifier\.weight'\]"):
        save_checkpoint(model, tmp_path / "reshaped.pt")


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    torch.save(AnchorNet(10).state_dict(), tmp_path / "plain.pt")
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Path("/")))
    for name in ("junk.pt", "plain.pt", "evil.pt"):
        with pytest.raises(CheckpointError, match="is not an AnchorNet checkpoint"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_unreadable_files_are_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory, or a read error such as S3's access denied: a ``CheckpointError`` naming the path."""
    with pytest.raises(CheckpointError, match=f"cannot read {tmp_path}: .*is a directory"):
        load_checkpoint(tmp_path)

    def denied(uri: object) -> bytes:
        raise OSError("AWS Error ACCESS_DENIED during GetObject operation:\nAccess Denied")

    monkeypatch.setattr(storage, "read_bytes", denied)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint("s3://bucket/anchornet.pt")
    assert (
        str(info.value) == "cannot read s3://bucket/anchornet.pt: AWS Error ACCESS_DENIED during GetObject operation:"
    )


def test_newer_version_and_mismatched_weights_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    save_checkpoint(anchornet_test(10), path)
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "version": 99}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(tmp_path / "new.pt")
    torch.save({**payload, "arch": {**payload["arch"], "num_classes": 3}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(tmp_path / "bad.pt")


@pytest.mark.slow
def test_s3_round_trip(s3_bucket: str) -> None:
    model = anchornet_test(10).eval()
    uri = storage.join(s3_bucket, "runs", "anchornet.pt")
    save_checkpoint(model, uri, class_names=CLASSES)
    loaded, card = load_checkpoint(uri)
    assert card.class_names == CLASSES
    buffer = io.BytesIO(storage.read_bytes(uri))
    assert torch.load(buffer, weights_only=True)["format"] == "anchornet-checkpoint"
    x = torch.rand(1, 3, 224, 224)
    torch.testing.assert_close(loaded(x), model(x))
