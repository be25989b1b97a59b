"""The Serve app's optional fallback step: a full-size classifier on the whole image as the last step, T =
num_patches + 2, for the images still unsure after their patches (or out of patches). Its spec, MACs and checks
without Ray; the loop with fake models; then the app over HTTP in both layouts on the shared local Ray."""

from __future__ import annotations

import asyncio
import io
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from _helpers import serve_app_on_free_port, tiny_fallback_checkpoint, tiny_serving_checkpoints
from PIL import Image

from anchornet import (
    ExitThresholds,
    Preprocessing,
    cumulative_step_macs,
    decode_image,
    load_checkpoint,
    save_thresholds,
)
from pipelines.serve_http import ApiError, resolve_thresholds

requests = pytest.importorskip("requests")

REPO = Path(__file__).resolve().parents[1]
CLASSES = [f"class{i}" for i in range(10)]
NUM_PATCHES = 3
T = NUM_PATCHES + 2  # with the fallback step


def _photo(seed: int, size: tuple[int, int] = (256, 240)) -> bytes:
    """A smooth random JPEG (a few blobs of colour and some noise), like the other Serve tests'."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(3, 8, 8, generator=g)
    big = torch.nn.functional.interpolate(small[None], size=size[::-1], mode="bilinear")[0]
    noise = torch.rand(3, *size[::-1], generator=g) * 0.2
    pixels = ((big * 0.8 + noise).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiny serving checkpoints, a fallback for their classes, and thresholds files fitted with the fallback
    step (``NUM_PATCHES + 1`` thresholds) and without it (``NUM_PATCHES``)."""
    root = tmp_path_factory.mktemp("fallback")
    paths = tiny_serving_checkpoints(root, CLASSES)
    paths["fallback"] = tiny_fallback_checkpoint(root, CLASSES)
    paths["thresholds"] = str(root / "thresholds.json")
    save_thresholds({"q=0.50": [0.5, 0.4, 0.3, 0.2], "strict": [math.inf] * (NUM_PATCHES + 1)}, paths["thresholds"])
    paths["old_thresholds"] = str(root / "old_thresholds.json")
    save_thresholds({"q=0.50": [0.5, 0.4, 0.3]}, paths["old_thresholds"])
    return paths


def _args(checkpoints: dict[str, str], layout: str = "colocated", **changes: Any) -> dict[str, Any]:
    """``build_app`` args with the fallback step, every replica on a tenth of a CPU."""
    tiny = {"num_cpus": 0.1, "max_ongoing_requests": 16, "max_batch_size": 4, "autoscaling_config": {"max_replicas": 1}}
    args = {
        "anchornet": checkpoints["anchornet"],
        "glance": checkpoints["glance"],
        "patch": checkpoints["patch"],
        "fallback": checkpoints["fallback"],
        "thresholds": checkpoints["thresholds"],
        "default_budget": "q=0.50",
        "num_patches": NUM_PATCHES,
        "colocate": layout == "colocated",
        "deployments": {name: tiny for name in ("ingress", "glance", "anchornet", "patch", "fallback")},
    }
    return {**args, **changes}


def _macs(checkpoints: dict[str, str]) -> dict[str, int]:
    """Each model's MACs from its own card (AnchorNet's at 224, the preprocessed size)."""
    return {
        role: int(load_checkpoint(checkpoints[role])[1].macs) for role in ("anchornet", "glance", "patch", "fallback")
    }


# ---------------------------------------------------------------------------------------------------------------
# The spec and the checks (no Ray)


def test_the_spec_counts_the_fallback_step_and_its_cost(checkpoints: dict[str, str]) -> None:
    from pipelines.serve import ServeArgs, serving_spec

    macs = _macs(checkpoints)
    spec = serving_spec(ServeArgs.model_validate(_args(checkpoints)))
    assert spec.has_fallback and spec.num_steps == T and spec.fallback_macs == macs["fallback"]
    assert spec.step_macs == cumulative_step_macs(
        macs["anchornet"], macs["glance"], macs["patch"], T, fallback_macs=macs["fallback"]
    )
    assert spec.step_macs[-1] == macs["glance"] + macs["anchornet"] + NUM_PATCHES * macs["patch"] + macs["fallback"]
    fallback = {"arch": "mobilenet_v3_small", "input_size": 224, "macs": macs["fallback"], "runtime": "torch"}
    assert spec.models["fallback"] == fallback
    plain = serving_spec(ServeArgs.model_validate(_args(checkpoints, fallback=None)))
    assert not plain.has_fallback and plain.num_steps == NUM_PATCHES + 1 and "fallback" not in plain.models
    assert spec.step_macs[:-1] == plain.step_macs  # the steps before it cost what they did


def test_a_fallback_of_other_classes_kind_or_size_is_refused(checkpoints: dict[str, str], tmp_path: Path) -> None:
    from pipelines.serve import ServeArgs, build_app, serving_spec

    reordered = tiny_fallback_checkpoint(tmp_path, CLASSES[::-1], name="reordered")
    fewer = tiny_fallback_checkpoint(tmp_path, CLASSES[:4], name="fewer")
    for fallback, expected in (
        (reordered, "other names or another order"),
        (fewer, "4 classes against 10"),
        (checkpoints["anchornet"], "not a classifier"),
        (tiny_fallback_checkpoint(tmp_path, CLASSES, input_size=160, name="small"), "export it with --input-size"),
    ):
        with pytest.raises(ValueError, match=expected) as err:
            serving_spec(ServeArgs.model_validate(_args(checkpoints, fallback=fallback)))
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="glance's classes"):
        build_app(_args(checkpoints, fallback=reordered))


def test_thresholds_of_the_other_cascade_are_refused_with_a_hint(checkpoints: dict[str, str]) -> None:
    """Thresholds fitted without the fallback step are one short: refused at build time with a one-line error that
    says how to fit them; the other way round too."""
    from pipelines.serve import build_app, load_budgets

    with pytest.raises(ValueError, match="needs 4 thresholds") as err:
        build_app(_args(checkpoints, thresholds=checkpoints["old_thresholds"]))
    assert "refit with jobs/evaluate.py --fallback" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="with the fallback step"):
        build_app(_args(checkpoints, fallback=None))  # the fallback cascade's file without the fallback
    with pytest.raises(ValueError, match=r"refit with jobs/evaluate\.py --fallback"):
        load_budgets({"budgets": {"mine": [0.5] * NUM_PATCHES}}, T, fallback=True)
    with pytest.raises(ValueError) as err:  # neither cascade's count: no hint
        load_budgets({"budgets": {"mine": [0.5] * 2}}, T, fallback=True)
    assert "fallback" not in str(err.value)
    budgets, _ = load_budgets({"thresholds_path": checkpoints["thresholds"]}, T, fallback=True)
    assert len(budgets["q=0.50"]["thresholds"]) == len(budgets["all-steps"]["thresholds"]) == NUM_PATCHES + 1


def test_a_file_fitted_for_another_cascade_is_refused_even_with_the_right_count(
    checkpoints: dict[str, str], tmp_path: Path
) -> None:
    """A file that records its cascade (``jobs/evaluate.py`` writes it) is refused for another one in one line,
    even where the count fits: NUM_PATCHES patches + fallback and NUM_PATCHES + 1 patches without both have
    NUM_PATCHES + 1 thresholds. The recorded cascade stays out of ``/info``'s budgets."""
    from pipelines.serve import load_budgets

    path = str(tmp_path / "recorded.json")
    save_thresholds({"q=0.50": [0.5, 0.4, 0.3, 0.2]}, path, num_patches=NUM_PATCHES, fallback=True)
    budgets, _ = load_budgets({"thresholds_path": path}, T, fallback=True)
    assert set(budgets["q=0.50"]) == {"thresholds"}
    with pytest.raises(ValueError) as err:  # the same count of thresholds, another cascade
        load_budgets({"thresholds_path": path}, NUM_PATCHES + 2, fallback=False)
    message = str(err.value)
    assert f"fitted for num_patches={NUM_PATCHES} with the fallback step" in message and "\n" not in message
    assert f"runs num_patches={NUM_PATCHES + 1} without the fallback step: serve with its --fallback" in message
    unrecorded, _ = load_budgets({"thresholds_path": checkpoints["thresholds"]}, NUM_PATCHES + 2, fallback=False)
    assert "q=0.50" in unrecorded  # a file without the record: checked by count only, as before


def test_a_request_with_the_old_number_of_thresholds_gets_the_hint(checkpoints: dict[str, str]) -> None:
    from pipelines.serve import ServeArgs, serving_spec

    spec = serving_spec(ServeArgs.model_validate(_args(checkpoints)))
    budgets = {"q": ExitThresholds.from_confidences([0.5] * (NUM_PATCHES + 1))}
    for asked in ({"thresholds": "0.5,0.5,0.5"}, {"log_odds": "1,1,1"}):
        with pytest.raises(ApiError) as err:
            resolve_thresholds(budgets, "q", NUM_PATCHES + 1, **asked, hint=spec.thresholds_hint)
        assert (err.value.status, err.value.code) == (400, "bad_thresholds")
        assert "expected 4 thresholds" in err.value.message and "jobs/evaluate.py --fallback" in err.value.message
    _, rho = resolve_thresholds(budgets, "q", NUM_PATCHES + 1, thresholds="1,1,1,1", hint=spec.thresholds_hint)
    assert rho.log_odds == (math.inf,) * (NUM_PATCHES + 1)


def test_build_app_adds_the_fallback_to_either_layout(checkpoints: dict[str, str]) -> None:
    from pipelines.serve import build_app

    separate = build_app(_args(checkpoints, layout="separate"))._bound_deployment
    fallback = separate.init_kwargs["fallback"]._bound_deployment
    assert fallback.name == "Fallback" and fallback.init_args == (checkpoints["fallback"],)
    assert fallback.ray_actor_options["num_cpus"] == 0.1
    colocated = build_app(_args(checkpoints))._bound_deployment.init_kwargs["colocated"]
    assert colocated.fallback == checkpoints["fallback"]
    plain = build_app(_args(checkpoints, layout="separate", fallback=None, thresholds=checkpoints["old_thresholds"]))
    assert "fallback" not in plain._bound_deployment.init_kwargs


def test_serve_config_checks_the_fallback_deployment_and_thresholds() -> None:
    """With ``fallback`` in its args, the config checker counts the Fallback deployment's shutdown and loads the
    thresholds with the fallback step's count (the shipped file, fitted without it, is refused with the hint)."""
    from pipelines.serve import check_serve_config

    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    app = config["applications"][0]
    app["args"]["fallback"] = "/home/ray/anchornet/checkpoints/full224.pt"
    assert check_serve_config(config) == []  # keys only: deployments.fallback defaults like patch
    config["http_options"]["request_timeout_s"] = 60
    short = [p.split(":")[1].split()[0] for p in check_serve_config(config)]
    assert sorted(short) == ["AnchorNet", "Fallback", "Glance", "Ingress", "Patch"], short
    config["http_options"]["request_timeout_s"] = 30

    def local(path: str) -> str:
        mount = "/home/ray/anchornet/"
        return str(REPO / path.removeprefix(mount)) if path.startswith(mount) else path

    problems = "\n".join(check_serve_config(config, local_path=local))
    # the shipped file records its cascade: refused for it, with the hint, before its count is looked at
    assert "fitted for num_patches=4 without the fallback step" in problems, problems
    assert "this app runs num_patches=4 with the fallback step: refit with jobs/evaluate.py --fallback" in problems


def test_jobs_serve_and_the_load_test_take_a_fallback() -> None:
    from benchmarks.serve_load import app_name, default_thresholds
    from benchmarks.serve_load import parse_args as load_args
    from jobs.serve import parse_args, serve_args

    base = ["--anchornet", "a.pt", "--glance", "g.pt", "--patch", "p.pt"]
    args = serve_args(parse_args([*base, "--fallback", "full.pt"]))
    assert args.fallback == "full.pt" and args.deployments.fallback.num_cpus == 0.25
    assert serve_args(parse_args(base)).fallback is None
    assert load_args(["--data", "d", "--fallback"]).fallback and not load_args(["--data", "d"]).fallback
    assert app_name(False, True) == "early_exit+fallback" and app_name(True, False) == "early_exit_colocated"
    assert default_thresholds(0.6, 4, True) == "0.6,0.6,0.6,0.6,0.6"
    assert default_thresholds(0.6, 4, False).count(",") == 3
    assert default_thresholds(0.6, 2, True) == "0.6,0.6,0.6"


# ---------------------------------------------------------------------------------------------------------------
# The loop with fake models (no Ray): patches that run out, aggregate="probs", the costs


class FakeModel:
    """A model deployment's handle that answers every call with ``output`` (logits, or AnchorNet's proposal)."""

    def __init__(self, output: Any) -> None:
        self.output = output
        self.calls = 0

    async def remote(self, item: Any) -> Any:
        self.calls += 1
        return self.output


def _proposal(boxes: int) -> dict[str, np.ndarray]:
    return {
        "boxes": np.tile(np.array([[0.0, 0.0, 95.0, 95.0]], np.float32), (boxes, 1)),
        "scores": np.ones(boxes, np.float32),
        "crops": np.zeros((boxes, 3, 95, 95), np.uint8),
    }


def _spec(fallback_macs: int | None, aggregate: str = "logits") -> Any:
    from pipelines.serve import ServingSpec

    return ServingSpec(
        class_names=CLASSES[:4],
        class_labels=CLASSES[:4],
        preprocessing=Preprocessing().to_dict(),
        patch_size=95,
        min_side=95,
        num_patches=NUM_PATCHES,
        aggregate=aggregate,  # type: ignore[arg-type]
        anchornet_macs=1000,
        glance_macs=100,
        patch_macs=10,
        top_k=2,
        max_body_bytes=1_000_000,
        max_pixels=4_000_000,
        max_aspect_ratio=20.0,
        fallback_macs=fallback_macs,
    )


def _run(spec: Any, rho: list[float], boxes: int, fallback_logits: list[float] | None = None) -> tuple[Any, dict]:
    from pipelines.serve import ServerTiming, early_exit_steps

    unsure = np.zeros(4, np.float32)  # uniform: confidence 1/4 at every step
    models = {"glance": FakeModel(unsure), "anchornet": FakeModel(_proposal(boxes)), "patch": FakeModel(unsure)}
    if fallback_logits is not None:
        models["fallback"] = FakeModel(np.array(fallback_logits, np.float32))
    image = torch.zeros(3, 224, 224, dtype=torch.uint8)
    rho_t = ExitThresholds.from_confidences(rho)
    return asyncio.run(early_exit_steps(spec, rho_t, image, models, ServerTiming())), models


def test_patches_that_run_out_go_on_to_the_fallback() -> None:
    """AnchorNet found fewer boxes than num_patches: the sample is decided by the fallback, at step T, charged for
    the patches it saw; the fallback's logits alone decide (not added to z)."""
    spec = _spec(fallback_macs=5000)
    logits = [0.0, 3.0, 1.0, 0.5]
    for boxes in (1, 0):
        decision, models = _run(spec, [0.9] * (NUM_PATCHES + 1), boxes, logits)
        assert (decision.exit_step, decision.fallback, decision.patches_available) == (T, True, boxes)
        assert len(decision.patches) == boxes and models["patch"].calls == boxes
        assert decision.macs == 100 + 1000 + boxes * 10 + 5000
        assert decision.prediction == 1
        expected = torch.tensor(logits).softmax(-1)
        assert decision.confidence == pytest.approx(float(expected.max()))
        assert torch.allclose(decision.probabilities, expected)
    # Without a fallback the last patch found decides, as before.
    decision, _ = _run(_spec(fallback_macs=None), [0.9] * NUM_PATCHES, 1)
    assert (decision.exit_step, decision.fallback, decision.macs) == (2, False, 100 + 1000 + 10)


def test_the_fallback_confidence_is_of_one_step_with_probs() -> None:
    spec = _spec(fallback_macs=5000, aggregate="probs")
    logits = [0.0, 3.0, 1.0, 0.5]
    decision, _ = _run(spec, [1.0] * (NUM_PATCHES + 1), NUM_PATCHES, logits)
    expected = torch.tensor(logits).softmax(-1)
    assert (decision.exit_step, decision.fallback) == (T, True)
    assert decision.confidence == pytest.approx(float(expected.max()))  # the mean over one step, not over T
    assert torch.allclose(decision.probabilities, expected)
    assert decision.macs == 100 + 1000 + NUM_PATCHES * 10 + 5000


def test_the_last_patch_step_has_a_threshold_with_a_fallback() -> None:
    """rho_{T-1} belongs to the last patch: a sample confident enough there exits without the fallback."""
    rho = [1.0] * NUM_PATCHES + [0.0]
    decision, models = _run(_spec(fallback_macs=5000), rho, NUM_PATCHES, [0.0, 3.0, 1.0, 0.5])
    assert (decision.exit_step, decision.fallback, models["fallback"].calls) == (NUM_PATCHES + 1, False, 0)
    assert decision.macs == 100 + 1000 + NUM_PATCHES * 10
    decision, models = _run(_spec(fallback_macs=5000), [0.0] * (NUM_PATCHES + 1), NUM_PATCHES, [1.0, 0, 0, 0])
    assert (decision.exit_step, decision.macs, models["anchornet"].calls) == (1, 100, 0)


# ---------------------------------------------------------------------------------------------------------------
# Over HTTP, both layouts


@pytest.fixture(scope="module", params=["separate", "colocated"])
def layout(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def server(ray_local: None, checkpoints: dict[str, str], layout: str) -> Iterator[str]:
    """The app with the fallback step on a free 127.0.0.1 port."""
    with serve_app_on_free_port(_args(checkpoints, layout)) as url:
        yield url


def _classify(url: str, data: bytes, **params: str) -> Any:
    return requests.post(
        f"{url}/classify", data=data, headers={"Content-Type": "image/jpeg"}, params=params, timeout=60
    )


def _fallback_alone(checkpoints: dict[str, str], data: bytes) -> torch.Tensor:
    """The fallback model's own logits on the image as the app preprocesses it (AnchorNet's preprocessing)."""
    from pipelines.serve import classify_images

    model, card = load_checkpoint(checkpoints["fallback"])
    preprocessing = Preprocessing.from_dict(load_checkpoint(checkpoints["anchornet"])[1].preprocessing)
    image = preprocessing(decode_image(data, min_size=95))
    return classify_images(model, card.input_size, image[None])[0]


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_info_shows_the_fallback_step(server: str, checkpoints: dict[str, str], layout: str) -> None:
    from ray import serve

    info = requests.get(f"{server}/info", timeout=30).json()
    macs = _macs(checkpoints)
    assert (info["fallback"], info["num_steps"], info["layout"]) == (True, T, layout)
    fallback = {"arch": "mobilenet_v3_small", "input_size": 224, "macs": macs["fallback"], "runtime": "torch"}
    assert info["models"]["fallback"] == fallback
    assert len(info["step_macs"]) == T and info["step_macs"][-1] - info["step_macs"][-2] == macs["fallback"]
    assert len(info["budgets"]["q=0.50"]["thresholds"]) == NUM_PATCHES + 1
    deployments = set(serve.status().applications["anchornet"].deployments)
    separate = {"Ingress", "Glance", "AnchorNet", "Patch", "Fallback"}
    assert deployments == ({"Ingress"} if layout == "colocated" else separate)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_when_no_one_exits_the_fallback_decides(server: str, checkpoints: dict[str, str]) -> None:
    from pipelines.serve_http import parse_server_timing

    macs = _macs(checkpoints)
    for seed in (1, 5):
        data = _photo(seed)
        got = _classify(server, data, thresholds=",".join(["1"] * (NUM_PATCHES + 1)), top_k="3")
        assert got.status_code == 200, got.text
        body = got.json()
        assert (body["exit_step"], body["num_steps"], body["fallback"]) == (T, T, True)
        assert len(body["patches"]) == body["patches_available"] == NUM_PATCHES
        assert body["macs"] == macs["glance"] + macs["anchornet"] + NUM_PATCHES * macs["patch"] + macs["fallback"]
        probs = _fallback_alone(checkpoints, data).softmax(-1)
        assert body["prediction"]["index"] == int(probs.argmax())
        assert body["confidence"] == pytest.approx(float(probs.max()), abs=1e-4)
        top = probs.topk(3)
        assert [s["index"] for s in body["top_k"]] == top.indices.tolist()
        assert [s["probability"] for s in body["top_k"]] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert list(parse_server_timing(got.headers["Server-Timing"])) == [
            "decode",
            "glance",
            "anchornet",
            "patch",
            "fallback",
            "app",
        ]


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_http_equals_the_engine_with_its_fallback(server: str, checkpoints: dict[str, str]) -> None:
    """A response equals ``EarlyExitClassifier(fallback_net=...).predict`` on the same image and thresholds."""
    from anchornet import EarlyExitClassifier
    from anchornet.preprocessing import to_float

    nets = {role: load_checkpoint(checkpoints[role])[0] for role in ("anchornet", "glance", "patch", "fallback")}
    engine = EarlyExitClassifier(
        nets["anchornet"],
        nets["glance"],
        nets["patch"],
        [math.inf] * (NUM_PATCHES + 1),
        NUM_PATCHES,
        patch_size=95,
        fallback_net=nets["fallback"],
    ).eval()
    for seed in (4, 6):
        data = _photo(seed)
        image = to_float(Preprocessing()(decode_image(data, min_size=95)))[None]
        for rho in ([1.0] * (NUM_PATCHES + 1), [1.0] * NUM_PATCHES + [0.0], [0.5, 0.4, 0.3, 0.2], [0.0] * 4):
            engine.thresholds = rho
            want = engine.predict(image)
            got = _classify(server, data, thresholds=",".join(str(r) for r in rho))
            assert got.status_code == 200, got.text
            body = got.json()
            assert (body["prediction"]["index"], body["exit_step"], body["macs"]) == (
                int(want.prediction[0]),
                int(want.exit_step[0]),
                int(want.macs[0]),
            ), rho
            assert body["confidence"] == pytest.approx(float(want.confidence[0]), abs=1e-4)
            assert body["fallback"] == (body["exit_step"] == T)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_a_confident_glance_exits_at_step_one(server: str, checkpoints: dict[str, str]) -> None:
    got = _classify(server, _photo(2), thresholds=",".join(["0"] * (NUM_PATCHES + 1)))
    assert got.status_code == 200, got.text
    body = got.json()
    assert (body["exit_step"], body["fallback"], body["patches_available"]) == (1, False, None)
    assert body["macs"] == _macs(checkpoints)["glance"]
    assert _classify(server, _photo(2)).json()["budget"] == "q=0.50"  # the file fitted with the fallback


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_thresholds_of_the_old_length_are_a_400(server: str) -> None:
    for params in ({"thresholds": "0.5,0.5,0.5"}, {"log_odds": "1,1,1"}):
        got = _classify(server, _photo(3), **params)
        assert got.status_code == 400, got.text
        error = got.json()["error"]
        assert error["code"] == "bad_thresholds" and "jobs/evaluate.py --fallback" in error["message"]
    assert requests.get(f"{server}/healthz", timeout=30).status_code == 200
