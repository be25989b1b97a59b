"""ONNX Runtime as the serving runtime (pipelines/onnx_runtime.py): the same outputs as the PyTorch model, any batch
size (and, for AnchorNet, any image size), a one-line error when it cannot be used."""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from anchornet import anchornet_test, build_classifier, prepare_classifier_for_inference, prepare_for_inference
from tests._helpers import tiny_serving_checkpoints

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return prepare_classifier_for_inference(build_classifier("mobilenet_v3_small", 7).eval(), 95)


@pytest.fixture(scope="module")
def small() -> torch.nn.Module:
    """A small classifier that exports in a fraction of a second, for the tests of the cache and the checks."""
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(8, 7)).eval()


class Shifted(torch.nn.Module):
    """``model``'s outputs + 0.5: what a wrong export would give."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images) + 0.5


def test_a_classifier_gives_the_same_logits_at_any_batch_size(classifier: torch.nn.Module) -> None:
    from pipelines.onnx_runtime import OnnxRuntimeModel

    model = OnnxRuntimeModel(classifier, torch.rand(2, 3, 95, 95))
    for batch in (1, 3, 8):
        images = torch.rand(batch, 3, 95, 95).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            expected = classifier(images)
        got = model(images)
        assert got.shape == (batch, 7) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    batch, *rest = model.session.get_inputs()[0].shape
    assert isinstance(batch, str) and rest == [3, 95, 95]  # a dynamic batch; the image size stays fixed


def test_anchornet_cam_and_logits_at_any_image_size() -> None:
    """AnchorNet's CAM (Eq. 2) and logits come out of ONNX Runtime as from PyTorch, at the size it was exported at
    and at others (fully convolutional: the grid follows the image), and its receptive field is read through."""
    from pipelines.onnx_runtime import CamAndLogits, OnnxRuntimeModel

    torch.manual_seed(0)
    cam_model = CamAndLogits(prepare_for_inference(anchornet_test(5)))
    model = OnnxRuntimeModel(cam_model, torch.rand(2, 3, 224, 224), dynamic_dims=(0, 2, 3))
    assert model.receptive_field == cam_model.receptive_field
    for shape in ((1, 3, 224, 224), (3, 3, 256, 200), (1, 3, 95, 95)):
        images = torch.rand(shape)
        with torch.inference_mode():
            cam, logits = cam_model(images)
        got_cam, got_logits = model(images)
        torch.testing.assert_close(got_cam, cam, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-4)


def test_an_export_that_differs_is_refused(small: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.onnx_runtime as runtime

    other = Shifted(small)
    export = runtime.export_onnx
    monkeypatch.setattr(runtime, "export_onnx", lambda model, example, dims: export(other, example, dims))
    message = r"ONNX Runtime's output 0 \(largest difference 0\.5\) of this .* differs from PyTorch's"
    with pytest.raises(ValueError, match=message) as err:
        runtime.OnnxRuntimeModel(small, torch.rand(2, 3, 95, 95), cache=False)
    assert "\n" not in str(err.value)


def test_a_batch_of_one_example_is_refused(classifier: torch.nn.Module) -> None:
    from pipelines.onnx_runtime import OnnxRuntimeModel

    with pytest.raises(ValueError, match="at least 2"):
        OnnxRuntimeModel(classifier, torch.rand(1, 3, 95, 95))


def test_missing_packages_are_named_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pipelines.onnx_runtime import require_onnxruntime
    from pipelines.serve import build_app, build_baseline_app

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "onnxscript" else find_spec(name))
    with pytest.raises(RuntimeError, match=r"needs onnxscript: pip install 'anchornet\[onnx\]'") as err:
        require_onnxruntime()
    assert "\n" not in str(err.value)
    paths = tiny_serving_checkpoints(tmp_path, ["a", "b"])
    runtime = {"runtime": "onnxruntime"}
    with pytest.raises(RuntimeError, match="onnxscript"):
        build_app({**paths, "deployments": {"patch": runtime}})
    with pytest.raises(RuntimeError, match="onnxscript"):
        build_baseline_app({"classifier": paths["glance"], "deployment": runtime})


def test_runtime_is_a_checked_deployment_setting(tmp_path: Path) -> None:
    """``runtime`` is per deployment, onnxruntime only on the CPU; /info's models say what runs each (colocated:
    the ingress's runtime); ``jobs/serve.py --runtime`` sets every deployment."""
    from jobs.serve import parse_args, serve_args
    from pipelines.serve import DeploymentArgs, ServeArgs, serving_spec

    assert DeploymentArgs().runtime == "torch"
    with pytest.raises(ValidationError, match="runs on the CPU"):
        DeploymentArgs(runtime="onnxruntime", num_gpus=1)
    with pytest.raises(ValidationError):
        DeploymentArgs(runtime="tensorrt")
    paths = tiny_serving_checkpoints(tmp_path, ["a", "b"])
    args = ServeArgs(**paths, num_patches=2, deployments={"glance": {"runtime": "onnxruntime"}})
    runtimes = {role: info["runtime"] for role, info in serving_spec(args).models.items()}
    assert runtimes == {"anchornet": "torch", "glance": "onnxruntime", "patch": "torch"}
    colocated = args.model_copy(update={"colocate": True})
    assert {info["runtime"] for info in serving_spec(colocated).models.values()} == {"torch"}
    cli = serve_args(parse_args(["--anchornet", "a", "--glance", "g", "--patch", "p", "--runtime", "onnxruntime"]))
    d = cli.deployments
    assert {o.runtime for o in (d.ingress, d.glance, d.anchornet, d.patch, d.fallback)} == {"onnxruntime"}


def test_replicas_load_their_models_on_onnx_runtime(tmp_path: Path) -> None:
    """``load_on_replica`` / ``load_anchornet_on_replica`` with ``runtime="onnxruntime"``: through the serving
    functions, the logits and the chosen patches of the PyTorch runtime."""
    from pipelines.onnx_runtime import OnnxRuntimeModel
    from pipelines.serve import classify_images, load_anchornet_on_replica, load_on_replica, propose_patches

    paths = tiny_serving_checkpoints(tmp_path, ["a", "b", "c"])
    images = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    onnx, card = load_on_replica(paths["glance"], use_gpu=False, runtime="onnxruntime")
    plain, _ = load_on_replica(paths["glance"], use_gpu=False)
    assert isinstance(onnx, OnnxRuntimeModel) and card.input_size == 95
    got = torch.stack(classify_images(onnx, 95, images))
    torch.testing.assert_close(got, torch.stack(classify_images(plain, 95, images)), rtol=1e-4, atol=1e-5)
    onnx_cam = load_anchornet_on_replica(paths["anchornet"], use_gpu=False, runtime="onnxruntime")
    plain_cam = load_anchornet_on_replica(paths["anchornet"], use_gpu=False)
    for got, want in zip(
        propose_patches(onnx_cam, images, 3, 0.3), propose_patches(plain_cam, images, 3, 0.3), strict=True
    ):
        assert torch.equal(got["boxes"], want["boxes"]) and torch.equal(got["crops"], want["crops"])
        torch.testing.assert_close(got["scores"], want["scores"], rtol=1e-4, atol=1e-4)


def test_threads_follow_torch() -> None:
    from pipelines.onnx_runtime import OnnxRuntimeModel

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()).eval()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OnnxRuntimeModel(model, torch.rand(2, 3, 8, 8))
        assert one.session.get_session_options().intra_op_num_threads == 1
        two = OnnxRuntimeModel(model, torch.rand(2, 3, 8, 8), threads=2)
        assert two.session.get_session_options().intra_op_num_threads == 2
    finally:
        torch.set_num_threads(threads)


def test_an_export_is_cached_and_used_by_the_next_model(
    small: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second model of the same weights loads the cached export (no export: it would raise here), with the same
    outputs; other weights get their own entry; ``cache=False`` writes nothing."""
    import pipelines.onnx_runtime as runtime

    example = torch.rand(2, 3, 95, 95)
    first = runtime.OnnxRuntimeModel(small, example, cache_dir=tmp_path)
    entries = list(tmp_path.glob("*.onnx"))
    assert [p.name for p in entries] == [f"{runtime.export_key(small, example, (0,))}.onnx"]

    def no_export(*_: object) -> bytes:
        raise AssertionError("exported again despite the cache")

    with monkeypatch.context() as patched:
        patched.setattr(runtime, "export_onnx", no_export)
        second = runtime.OnnxRuntimeModel(small, torch.rand(2, 3, 95, 95), cache_dir=tmp_path)
    images = torch.rand(3, 3, 95, 95)
    torch.testing.assert_close(second(images), first(images), rtol=0, atol=0)
    other = copy.deepcopy(small)
    with torch.no_grad():
        other[-1].bias[0] += 1e-3  # one weight changed
    assert runtime.export_key(other, example, (0,)) != runtime.export_key(small, example, (0,))
    assert runtime.export_key(small, example, (0, 2, 3)) != runtime.export_key(small, example, (0,))
    runtime.OnnxRuntimeModel(small, example, cache=False, cache_dir=tmp_path / "off")
    assert not (tmp_path / "off").exists()


@pytest.mark.parametrize("entry", ["garbage", "another model"])
def test_a_bad_cache_entry_is_exported_again(
    small: torch.nn.Module, tmp_path: Path, entry: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A truncated file, or another model's export under this model's key, fails the check: the model is exported
    again, the entry replaced, and the outputs are the model's."""
    from pipelines.onnx_runtime import OnnxRuntimeModel, export_key, export_onnx

    example = torch.rand(2, 3, 95, 95)
    path = tmp_path / f"{export_key(small, example, (0,))}.onnx"

    bad = b"not an onnx model" if entry == "garbage" else export_onnx(Shifted(small), example)
    path.write_bytes(bad)
    with caplog.at_level("WARNING", logger="pipelines.onnx_runtime"):
        model = OnnxRuntimeModel(small, example, cache_dir=tmp_path)
    assert "exporting again" in caplog.text
    assert path.read_bytes() != bad
    images = torch.rand(2, 3, 95, 95)
    with torch.inference_mode():
        torch.testing.assert_close(model(images), small(images), rtol=1e-4, atol=1e-5)


def test_a_cache_that_cannot_be_written_is_skipped(small: torch.nn.Module, tmp_path: Path) -> None:
    from pipelines.onnx_runtime import OnnxRuntimeModel

    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory would be")
    with pytest.warns(RuntimeWarning, match="could not cache the exported model"):
        model = OnnxRuntimeModel(small, torch.rand(2, 3, 95, 95), cache_dir=blocker / "onnx")
    assert model(torch.rand(1, 3, 95, 95)).shape == (1, 7)


def test_the_default_cache_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pipelines.onnx_runtime import default_cache_dir

    monkeypatch.setenv("ANCHORNET_ONNX_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("ANCHORNET_ONNX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "anchornet" / "onnx"


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_colocated_models_load_on_the_ingress_runtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runtime: str
) -> None:
    """``ColocatedModels.load`` hands its runtime to every loader (the fallback's too); a model deployment that sets
    another runtime than the ingress's is refused in one line when colocated, since it would be ignored."""
    import pipelines.serve as serve_module
    from pipelines.serve import ColocatedModels, build_app

    paths = tiny_serving_checkpoints(tmp_path, ["a", "b"])
    seen: list[tuple[str, str]] = []
    load, load_anchornet = serve_module.load_on_replica, serve_module.load_anchornet_on_replica

    def recording(real: Callable[..., Any]) -> Callable[..., Any]:
        def loader(checkpoint: str, use_gpu: bool, runtime: str = "torch") -> Any:
            seen.append((Path(checkpoint).stem, runtime))
            return real(checkpoint, use_gpu)  # torch: the point is what was asked for

        return loader

    monkeypatch.setattr(serve_module, "load_on_replica", recording(load))
    monkeypatch.setattr(serve_module, "load_anchornet_on_replica", recording(load_anchornet))
    models = ColocatedModels(
        paths["anchornet"], paths["glance"], paths["patch"], 2, 0.3, fallback=paths["glance"], runtime=runtime
    )
    cascade = models.load()
    assert cascade.engine.has_fallback and cascade.engine.num_patches == 2
    assert sorted(seen) == sorted(
        [("anchornet", runtime), ("glance", runtime), ("patch", runtime), ("glance", runtime)]
    )
    args = {**paths, "num_patches": 2, "colocate": True, "deployments": {"patch": {"runtime": "onnxruntime"}}}
    message = r"colocated, the ingress's runtime \(torch\) runs every model: .* not on patch"
    with pytest.raises(ValueError, match=message):
        build_app(args)


def test_a_copy_opens_its_own_session(small: torch.nn.Module) -> None:
    """deepcopy and pickle (Ray ships models that way) give a working model: the ONNX bytes travel, the session is
    opened again; dunder lookups are not forwarded to the source model."""
    import pickle

    from pipelines.onnx_runtime import OnnxRuntimeModel

    model = OnnxRuntimeModel(small, torch.rand(2, 3, 95, 95), cache=False)
    images = torch.rand(3, 3, 95, 95)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert copied.session is not model.session
        torch.testing.assert_close(copied(images), model(images), rtol=0, atol=0)
    with pytest.raises(AttributeError):
        model.__missing_dunder__  # noqa: B018


def test_a_model_off_the_cpu_is_refused_in_one_line(small: torch.nn.Module) -> None:
    from pipelines.onnx_runtime import OnnxRuntimeModel

    with pytest.raises(ValueError, match=r"runs models on the CPU here; this one is on \['cpu', 'meta'\]"):
        OnnxRuntimeModel(copy.deepcopy(small).to("meta"), torch.rand(2, 3, 95, 95))


def test_no_cache_directory_means_no_cache(small: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a home directory (``Path.home()`` raises), the model is exported and served, with a warning."""
    import pipelines.onnx_runtime as runtime

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("ANCHORNET_ONNX_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(runtime.Path, "home", staticmethod(no_home))
    with pytest.warns(RuntimeWarning, match="not using the ONNX export cache: Could not determine home directory"):
        model = runtime.OnnxRuntimeModel(small, torch.rand(2, 3, 95, 95))
    assert model(torch.rand(1, 3, 95, 95)).shape == (1, 7)


def test_the_builders_bind_each_deployment_to_its_runtime(tmp_path: Path) -> None:
    """Separate layout: each model deployment gets its own runtime; the baseline's FullClassifier gets its own."""
    from pipelines.serve import build_app, build_baseline_app

    paths = tiny_serving_checkpoints(tmp_path, ["a", "b"])
    on_ort = {"runtime": "onnxruntime"}
    args = {**paths, "num_patches": 2, "deployments": {"anchornet": on_ort, "patch": on_ort}}
    ingress = build_app(args)._bound_deployment.init_kwargs
    bound = {role: ingress[role]._bound_deployment.init_kwargs["runtime"] for role in ("glance", "anchornet", "patch")}
    assert bound == {"glance": "torch", "anchornet": "onnxruntime", "patch": "onnxruntime"}
    colocated = build_app({**paths, "colocate": True, "deployments": {"ingress": on_ort}})
    assert colocated._bound_deployment.init_kwargs["colocated"].runtime == "onnxruntime"
    baseline = build_baseline_app({"classifier": paths["glance"], "deployment": on_ort})
    assert baseline._bound_deployment.init_kwargs["runtime"] == "onnxruntime"


def test_the_cache_is_pruned_least_recently_used_first(
    small: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond ``$ANCHORNET_ONNX_CACHE_MAX_BYTES`` the oldest exports go first; a cache hit makes an entry recent, and
    the entry just written stays."""
    import os

    from pipelines.onnx_runtime import OnnxRuntimeModel, export_key, prune_cache

    for age, name in enumerate(["c", "b", "a"]):  # a oldest
        (tmp_path / f"{name}.onnx").write_bytes(b"x" * 100)
        os.utime(tmp_path / f"{name}.onnx", (1000 + age * 10, 1000 + age * 10))
    assert prune_cache(tmp_path, max_bytes=250) == [tmp_path / "c.onnx"]
    assert prune_cache(tmp_path, max_bytes=0, keep=tmp_path / "a.onnx") == [tmp_path / "b.onnx"]
    example = torch.rand(2, 3, 95, 95)
    model = OnnxRuntimeModel(small, example, cache_dir=tmp_path)  # written, then the cache pruned: "a" stays
    entry = tmp_path / f"{export_key(small, example, (0,))}.onnx"
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == sorted(["a.onnx", entry.name])
    os.utime(entry, (0, 0))
    OnnxRuntimeModel(small, example, cache_dir=tmp_path)  # a hit: the entry is recent again
    assert entry.stat().st_mtime > 1000
    monkeypatch.setenv("ANCHORNET_ONNX_CACHE_MAX_BYTES", str(entry.stat().st_size))
    assert prune_cache(tmp_path, keep=entry) == [tmp_path / "a.onnx"]
    assert model(torch.rand(1, 3, 95, 95)).shape == (1, 7)
