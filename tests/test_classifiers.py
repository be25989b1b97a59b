"""Downstream classifiers: registry, weights from files, S3 and (mocked-offline / local) downloads."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from anchornet import storage
from anchornet.classifiers import (
    _REGISTRY,
    Classifier,
    ClassifierEntry,
    WeightsUnavailableError,
    build_classifier,
    classifier_names,
    download_state_dict,
    is_classifier_name,
)

pytestmark = pytest.mark.model


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_lite0"])
def test_built_with_num_classes(name: str) -> None:
    model = build_classifier(name, 7).eval()
    assert isinstance(model, Classifier) and model.config == {"name": name, "num_classes": 7}
    with torch.no_grad():
        assert model(torch.rand(2, 3, 95, 95)).shape == (2, 7)


def test_registry_lists_the_paper_networks_and_accepts_any_torchvision_model() -> None:
    assert {"resnet18", "resnet34", "resnet50", "densenet121", "densenet201", "efficientnet_lite0"} <= set(
        classifier_names()
    )
    assert build_classifier("shufflenet_v2_x0_5", 3).config["name"] == "shufflenet_v2_x0_5"
    with pytest.raises(ValueError, match="unknown classifier 'resnet9000'"):
        build_classifier("resnet9000", 3)


def test_names_are_checked_by_build_classifiers_rule_without_building() -> None:
    registered = classifier_names()
    assert is_classifier_name("efficientnet_lite0") and is_classifier_name("resnet101")
    assert not is_classifier_name("resnet9000") and not is_classifier_name("fasterrcnn_resnet50_fpn")
    assert classifier_names() == registered  # nothing built or registered


def test_weights_that_are_not_a_torch_file_fail_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b"x" * 16)
    for path, needle in [
        (tmp_path / "model.safetensors", r"is not a PyTorch state dict or checkpoint \(UnpicklingError\)"),
        (tmp_path, "cannot read .*is a directory"),
    ]:
        with pytest.raises(ValueError, match=needle) as info:
            build_classifier("resnet18", 3, weights=str(path))
        assert str(path) in str(info.value) and len(str(info.value).splitlines()) == 1
    with pytest.raises(FileNotFoundError):
        build_classifier("resnet18", 3, weights=str(tmp_path / "missing.pt"))


def test_weights_from_a_local_state_dict(tmp_path: Path) -> None:
    source = build_classifier("resnet18", 5)
    torch.save(source.net.state_dict(), tmp_path / "plain.pth")
    torch.save(source.state_dict(), tmp_path / "wrapped.pth")
    for file in ("plain.pth", "wrapped.pth"):
        loaded = build_classifier("resnet18", 5, weights=str(tmp_path / file))
        assert torch.equal(loaded.net.fc.weight, source.net.fc.weight)


@pytest.mark.slow
def test_weights_from_s3(s3_bucket: str) -> None:
    import io

    source = build_classifier("resnet18", 4)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    uri = storage.join(s3_bucket, "weights", "r18.pth")
    storage.write_bytes(uri, buffer.getvalue())
    assert torch.equal(build_classifier("resnet18", 4, weights=uri).net.fc.bias, source.net.fc.bias)


def test_imagenet_weights_with_a_head_for_a_class_subset() -> None:
    full = build_classifier("efficientnet_lite0", 1000, weights="imagenet")
    sub = build_classifier("efficientnet_lite0", 3, weights="imagenet", head_from=[0, 217, 482])
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(sub.eval()(x), full.eval()(x)[:, [0, 217, 482]])
    with pytest.raises(ValueError, match="head_from"):
        build_classifier("efficientnet_lite0", 3, weights="imagenet", head_from=[0, 1])


def _tiny_net(num_classes: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, num_classes))


def _tiny_imagenet_weights() -> dict[str, torch.Tensor]:
    return _tiny_net(1000).state_dict()  # the same "ImageNet" weights after the same torch.manual_seed


@pytest.fixture
def tiny_imagenet(monkeypatch: pytest.MonkeyPatch) -> str:
    """A registered architecture whose "ImageNet" weights are made up here: head_from without a download."""
    monkeypatch.setitem(_REGISTRY, "tiny_imagenet", ClassifierEntry(_tiny_net, _tiny_imagenet_weights))
    return "tiny_imagenet"


def test_head_from_on_imagenet_itself_keeps_or_reorders_the_head(tiny_imagenet: str) -> None:
    torch.manual_seed(0)
    full = build_classifier(tiny_imagenet, 1000, weights="imagenet").eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        expected = full(x)
        torch.manual_seed(0)
        same = build_classifier(tiny_imagenet, 1000, weights="imagenet", head_from=range(1000)).eval()
        assert torch.equal(same.net[2].weight, full.net[2].weight)
        torch.testing.assert_close(same(x), expected)
        order = torch.randperm(1000).tolist()
        torch.manual_seed(0)
        reordered = build_classifier(tiny_imagenet, 1000, weights="imagenet", head_from=order).eval()
        torch.testing.assert_close(reordered(x), expected[:, order])
    for bad in (list(range(999)), [*range(999), 1000]):
        with pytest.raises(ValueError, match=r"head_from needs 1000 class indices in \[0, 1000\)"):
            build_classifier(tiny_imagenet, 1000, weights="imagenet", head_from=bad)


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def www(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A directory served on 127.0.0.1 and its base URL; torch.hub's cache under tmp_path/hub."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    serve_dir = tmp_path / "www"
    serve_dir.mkdir()
    handler = lambda *a, **k: _Handler(*a, directory=str(serve_dir), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield serve_dir, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _hub_files(tmp_path: Path) -> list[str]:
    checkpoints = tmp_path / "hub" / "hub" / "checkpoints"
    return sorted(p.name for p in checkpoints.iterdir()) if checkpoints.is_dir() else []


def _weights_file(directory: Path, stem: str, state: dict[str, torch.Tensor]) -> tuple[str, bytes]:
    """Save ``state`` as ``STEM-<sha256 prefix>.pth`` (torchvision's naming) in ``directory``; name and bytes."""
    torch.save(state, directory / "tmp.pth")
    data = (directory / "tmp.pth").read_bytes()
    (directory / "tmp.pth").unlink()
    name = f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    (directory / name).write_bytes(data)
    return name, data


def test_download_from_a_local_server(www: tuple[Path, str], tmp_path: Path) -> None:
    serve_dir, base = www
    state = {"w": torch.arange(4.0)}
    name, _ = _weights_file(serve_dir, "tiny", state)
    assert torch.equal(download_state_dict(f"{base}/{name}", "tiny weights")["w"], state["w"])
    assert _hub_files(tmp_path) == [name]


def test_truncated_download_is_refused_and_not_cached(www: tuple[Path, str], tmp_path: Path) -> None:
    serve_dir, base = www
    name, data = _weights_file(serve_dir, "tiny", {"w": torch.arange(1000.0)})
    (serve_dir / name).write_bytes(data[: len(data) // 2])  # the connection dropped half way
    with pytest.raises(WeightsUnavailableError, match=r"could not download tiny weights .*invalid hash value") as info:
        download_state_dict(f"{base}/{name}", "tiny weights")
    assert "\n" not in str(info.value) and _hub_files(tmp_path) == []
    # No hash in the name: the file that does not load is deleted, not left to fail every later run.
    (serve_dir / "nohash.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsUnavailableError, match=r"cannot load it .*the download was deleted") as info:
        download_state_dict(f"{base}/nohash.pth", "tiny weights")
    assert "\n" not in str(info.value) and _hub_files(tmp_path) == []


def test_a_corrupt_cached_file_is_fetched_again(www: tuple[Path, str], tmp_path: Path) -> None:
    serve_dir, base = www
    state = {"w": torch.arange(1000.0)}
    name, data = _weights_file(serve_dir, "tiny", state)
    cached = tmp_path / "hub" / "hub" / "checkpoints" / name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(data[: len(data) // 2])  # left by an earlier download that was not checked
    assert torch.equal(download_state_dict(f"{base}/{name}", "tiny weights")["w"], state["w"])
    assert cached.read_bytes() == data
    # Offline, a corrupt cached file is removed, so the next run online downloads it again.
    cached.write_bytes(b"\x80\x02garbage")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    with pytest.raises(WeightsUnavailableError, match="could not download") as info:
        download_state_dict(f"http://127.0.0.1:{port}/{name}", "tiny weights")
    assert "\n" not in str(info.value) and not cached.exists()


def test_offline_download_fails_in_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    with pytest.raises(WeightsUnavailableError, match=r"could not download .* pass weights=PATH") as info:
        download_state_dict(f"http://127.0.0.1:{port}/resnet18-f37072fd.pth", "torchvision weights")
    assert "\n" not in str(info.value)
    assert info.value.reason.startswith("could not download") and "weights=" not in info.value.reason


def test_torchvision_imagenet_weights_go_through_the_download(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def fake_download(url: str, what: str) -> dict[str, torch.Tensor]:
        seen.append(url)
        raise WeightsUnavailableError(f"could not download {what} from {url} (offline)")

    monkeypatch.setattr("anchornet.classifiers.download_state_dict", fake_download)
    with pytest.raises(WeightsUnavailableError, match="offline"):
        build_classifier("resnet18", 10, weights="imagenet")
    assert seen == ["https://download.pytorch.org/models/resnet18-f37072fd.pth"]


def test_imagenet_indices_of_wordnet_ids() -> None:
    from anchornet.classifiers import imagenet_indices

    assert imagenet_indices(["n01440764", "n02102040", "n03888257"]) == [0, 217, 701]
    with pytest.raises(ValueError, match="'cat' is not an ImageNet-1k WordNet id"):
        imagenet_indices(["n01440764", "cat"])


def test_class_labels_read_imagenet_descriptions_offline() -> None:
    from anchornet import class_labels

    assert class_labels(["n01440764", "n03417042", "cat"]) == ["tench, Tinca tinca", "garbage truck, dustcart", "cat"]
