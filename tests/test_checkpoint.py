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


def test_a_greyscale_anchornet_round_trips(tmp_path: Path) -> None:
    """The card's MACs are counted on the model's own number of input channels."""
    grey = anchornet_test(4, in_channels=1, mean=(0.5,), std=(0.25,)).eval()
    card = save_checkpoint(grey, tmp_path / "grey.pt")
    assert card.macs == count_macs(grey, (1, 224, 224)) > 0
    loaded, _ = load_checkpoint(tmp_path / "grey.pt")
    x = torch.rand(1, 1, 224, 224)
    torch.testing.assert_close(loaded(x), grey(x))


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


def _tamper(tmp_path: Path, name: str, source: Path, change: Callable[[dict], dict]) -> Path:
    """A copy of the checkpoint ``source`` as ``name``, its payload passed through ``change``."""
    path = tmp_path / name
    torch.save(change(torch.load(source, weights_only=True)), path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3-class AnchorNet and a 3-class classifier checkpoint, both with class names (shared: read only)."""
    directory = tmp_path_factory.mktemp("checkpoints")
    paths = {"anchornet": directory / "anchornet.pt", "classifier": directory / "classifier.pt"}
    save_checkpoint(anchornet_test(3), paths["anchornet"], class_names=["a", "b", "c"])
    save_checkpoint(build_classifier("resnet18", 3), paths["classifier"], input_size=32, class_names=["a", "b", "c"])
    return paths


def _card(change: Callable[[dict], dict]) -> Callable[[dict], dict]:
    return lambda payload: {**payload, "card": change(dict(payload["card"]))}


@pytest.mark.parametrize(
    ("kind", "change", "needle"),
    [
        ("anchornet", _card(lambda c: {**c, "class_names": ["a", "b"]}), "names 2 classes for a model with 3 outputs"),
        ("classifier", _card(lambda c: {**c, "class_names": ["a", "b"]}), "names 2 classes for a model with 3 outputs"),
        ("classifier", _card(lambda c: {**c, "class_names": "abc"}), "class_names is not a list of strings"),
        ("anchornet", _card(lambda c: {**c, "kind": "classifier"}), "card says kind 'classifier' but .* anchornet"),
        ("classifier", _card(lambda c: {**c, "kind": "anchornet"}), "card says kind 'anchornet' but .* classifier"),
        ("anchornet", _card(lambda c: {**c, "arch": {**c["arch"], "num_classes": 4}}), "arch on the card differs"),
        ("anchornet", _card(lambda c: {k: v for k, v in c.items() if k != "macs"}), "card has no 'macs'"),
        ("anchornet", _card(lambda c: {**c, "input_size": "224"}), "card input_size '224' is not a count"),
        ("anchornet", _card(lambda c: {**c, "provenance": None}), "card provenance is a NoneType"),
        ("anchornet", lambda p: {k: v for k, v in p.items() if k != "card"}, "malformed checkpoint: it has no 'card'"),
        ("anchornet", lambda p: {k: v for k, v in p.items() if k != "state_dict"}, "it has no 'state_dict'"),
        ("anchornet", lambda p: {**p, "arch": ["num_classes", 3]}, "'arch' is a list"),
        ("anchornet", lambda p: {**p, "version": "1"}, "version '1' is not an integer"),
        (
            "anchornet",
            lambda p: {**p, "arch": {**p["arch"], "colour": "red"}},
            "anchornet arch on its card does not build .*TypeError: .*'colour'",
        ),
        (
            "anchornet",
            lambda p: {**p, "arch": {**p["arch"], "num_classes": 0}},
            "does not build .*ValueError: num_classes must be at least 1",
        ),
        (
            "classifier",
            lambda p: {**p, "arch": {"name": "resnet18"}},
            r"classifier arch on its card does not build .*holds name and num_classes, got \['name'\]",
        ),
        (
            "classifier",
            lambda p: {**p, "arch": {"name": "resnet9000", "num_classes": 3}},
            "does not build .*unknown classifier 'resnet9000'",
        ),
    ],
)
def test_malformed_or_inconsistent_checkpoints_fail_in_one_line(
    tmp_path: Path, checkpoints: dict[str, Path], kind: str, change: Callable[[dict], dict], needle: str
) -> None:
    path = _tamper(tmp_path, "tampered.pt", checkpoints[kind], change)
    with pytest.raises(CheckpointError, match=needle) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_mismatched_weights_are_reported_in_one_line(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    path = _tamper(
        tmp_path, "w.pt", checkpoints["classifier"], lambda p: {**p, "arch": {**p["arch"], "num_classes": 4}}
    )
    with pytest.raises(CheckpointError, match=r"do not match .*size mismatch for net\.fc\.weight") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_cards_without_optional_fields_load(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    optional = ("class_names", "preprocessing", "provenance")
    bare = _card(lambda c: {k: v for k, v in c.items() if k not in optional})
    path = _tamper(tmp_path, "bare.pt", checkpoints["anchornet"], bare)
    _, card = load_checkpoint(path)
    assert card.class_names is None and card.preprocessing == {} and card.provenance == {} and card.extra == {}


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
