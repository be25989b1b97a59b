"""Serving under failure and overload: lost replicas retried once, 503 model_unavailable with Retry-After, load
shedding, health checks of the model replicas, and the settings that bound a request's life (serve_config.yaml)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from _helpers import asgi_request, tiny_serving_checkpoints
from fastapi import FastAPI
from PIL import Image
from pydantic import ValidationError
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from anchornet import Preprocessing
from anchornet.early_exit import ExitThresholds
from pipelines.serve import (
    AUTOSCALING_DELAYS,
    UNHEALTHY_AFTER_FAILURES,
    AnchorNetDeployment,
    BaselineArgs,
    ClassifierDeployment,
    ColocatedModels,
    DeploymentArgs,
    FailureStreak,
    Ingress,
    RetryingHandle,
    ServeArgs,
    ServerTiming,
    ServingSpec,
    build_app,
    call_deployment,
    check_serve_config,
)
from pipelines.serve_http import ApiError, install_error_handlers

REPO = Path(__file__).resolve().parents[1]
CLASSES = [f"class{i}" for i in range(4)]


# ---------------------------------------------------------------------------------------------------------------
# The ingress's model calls (no Ray: a fake handle)


class FakeHandle:
    """``handle.remote(item)`` whose responses raise the queued ``outcomes`` in turn (values are returned)."""

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    def remote(self, item: Any) -> Any:
        self.calls += 1
        outcome = self.outcomes.pop(0)

        async def response() -> Any:
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        return response()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def serve_log() -> Iterator[list[logging.LogRecord]]:
    """Records of Serve's logger (which does not propagate to pytest's caplog)."""
    handler, logger = _Records(), logging.getLogger("ray.serve")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


def _call(handle: FakeHandle, retry_after_s: float = 1.0) -> Any:
    return asyncio.run(call_deployment("glance", handle, "image", retry_after_s))


def _refusal(handle: FakeHandle, retry_after_s: float = 1.0) -> ApiError:
    with pytest.raises(ApiError) as err:
        _call(handle, retry_after_s)
    return err.value


def test_a_lost_replica_is_retried_once(serve_log: list[logging.LogRecord]) -> None:
    for lost in (ActorDiedError(), ActorUnavailableError("connection reset", None)):
        handle = FakeHandle(lost, "logits")
        assert _call(handle) == "logits"
        assert handle.calls == 2
    assert [r.getMessage().split(" (")[0] for r in serve_log] == ["glance call lost its replica"] * 2
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in serve_log)


def test_a_replica_lost_twice_is_a_503_with_retry_after(serve_log: list[logging.LogRecord]) -> None:
    handle = FakeHandle(ActorDiedError(), ActorUnavailableError("gone", None))
    error = _refusal(handle, retry_after_s=2.5)
    assert handle.calls == 2
    assert (error.status, error.code, error.headers) == (503, "model_unavailable", {"Retry-After": "3"})
    assert "glance" in error.message and "\n" not in error.message
    warnings = [r for r in serve_log if "model_unavailable" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].exc_info is None and "\n" not in warnings[0].getMessage()


def test_overload_and_failed_deployments_are_503_without_retry() -> None:
    full = BackPressureError(num_queued_requests=4, max_queued_requests=4, retry_after_s=7)
    handle = FakeHandle(full)
    error = _refusal(handle)
    assert handle.calls == 1 and (error.status, error.code) == (503, "model_unavailable")
    assert error.headers == {"Retry-After": "7"}  # the deployment's backpressure_config
    assert "max_queued_requests=4" in error.message
    # No Retry-After in the deployment's backpressure_config: the ingress's own.
    error = _refusal(FakeHandle(BackPressureError(num_queued_requests=1, max_queued_requests=1)), retry_after_s=2)
    assert error.headers == {"Retry-After": "2"}
    handle = FakeHandle(DeploymentUnavailableError(DeploymentID(name="Glance", app_name="anchornet")))
    error = _refusal(handle)
    assert handle.calls == 1 and (error.status, error.code) == (503, "model_unavailable")
    assert "failed to deploy" in error.message


def test_model_errors_are_not_retried() -> None:
    """An exception of the model itself (a bug, bad weights) is not a lost replica: no retry, the 500 path."""
    bug = RayTaskError("__call__", "Traceback ...", ValueError("bad shape")).as_instanceof_cause()
    handle = FakeHandle(bug, "never")
    with pytest.raises(ValueError):
        _call(handle)
    assert handle.calls == 1


def test_server_timing_calls_go_through_the_retry() -> None:
    handle = FakeHandle(ActorDiedError(), np.arange(3, dtype=np.float32))
    timing = ServerTiming()
    out = asyncio.run(timing.call("glance", RetryingHandle("glance", handle), torch.zeros(3, 8, 8, dtype=torch.uint8)))
    assert torch.equal(out, torch.arange(3, dtype=torch.float32)) and handle.calls == 2
    assert "glance" in timing.entries


def test_a_503_is_json_with_retry_after() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/classify")
    async def classify() -> None:
        await call_deployment("patch", FakeHandle(ActorDiedError(), ActorDiedError()), "crop", 4)

    status, headers, body = asgi_request(app, "/classify", method="GET")
    assert (status, headers["retry-after"], headers["content-type"]) == (503, "4", "application/json")
    assert json.loads(body)["error"]["code"] == "model_unavailable"


# ---------------------------------------------------------------------------------------------------------------
# Health of the model replicas (the deployment classes, called directly)


class Broken(torch.nn.Module):
    """A model whose every forward pass fails, as after a sticky CUDA error."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.fail = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return torch.zeros(x.shape[0], len(CLASSES))


@pytest.fixture
def in_a_replica(serve_replica_context: None) -> Iterator[None]:
    """``serve_replica_context``; afterwards the batch queues of the deployment classes are dropped:
    ``@serve.batch`` keeps one per class, and a class holding one (bound to this test's event loop) could no longer
    be pickled for a deployment."""
    yield
    for deployment in (ClassifierDeployment, AnchorNetDeployment):
        deployment.func_or_class.__call__.set_max_batch_size.__self__._queue = None


def test_failure_streak() -> None:
    streak = FailureStreak(limit=2)

    def fail() -> None:
        raise RuntimeError("boom\nsecond line")

    for _ in range(2):
        streak.check()
        with pytest.raises(RuntimeError):
            streak.run(fail)
    with pytest.raises(RuntimeError, match="2 forward passes in a row failed") as err:
        streak.check()
    assert "\n" not in str(err.value)
    assert streak.run(lambda: 1) == 1
    streak.check()  # one success resets


@pytest.mark.usefixtures("in_a_replica")
def test_a_classifier_replica_whose_model_keeps_failing_is_unhealthy(checkpoints: dict[str, str]) -> None:
    replica = ClassifierDeployment.func_or_class(checkpoints["glance"], max_batch_size=2)
    broken = Broken()
    replica.model = broken
    image = torch.zeros(3, 95, 95, dtype=torch.uint8).numpy()

    async def scenario() -> None:
        for _ in range(UNHEALTHY_AFTER_FAILURES - 1):
            with pytest.raises(RuntimeError, match="CUDA error"):
                await replica(image)
            replica.check_health()  # not yet: a failure or two may be the input's
        with pytest.raises(RuntimeError, match="CUDA error"):
            await replica(image)
        with pytest.raises(RuntimeError, match=f"{UNHEALTHY_AFTER_FAILURES} forward passes in a row failed"):
            replica.check_health()
        broken.fail = False
        assert (await replica(image)).shape == (len(CLASSES),)
        replica.check_health()

    asyncio.run(scenario())


@pytest.mark.usefixtures("in_a_replica")
def test_an_anchornet_replica_whose_model_keeps_failing_is_unhealthy(checkpoints: dict[str, str]) -> None:
    replica = AnchorNetDeployment.func_or_class(checkpoints["anchornet"], num_patches=1, max_batch_size=2)
    # the replica's model is CamAndLogits around the AnchorNet; break the AnchorNet's features (an instance
    # attribute, not a submodule)
    object.__setattr__(replica.model.model, "forward_features", Broken())
    image = torch.zeros(3, 224, 224, dtype=torch.uint8).numpy()

    async def scenario() -> None:
        for _ in range(UNHEALTHY_AFTER_FAILURES):
            with pytest.raises(RuntimeError, match="CUDA error"):
                await replica(image)
        with pytest.raises(RuntimeError, match="in a row failed"):
            replica.check_health()

    asyncio.run(scenario())


@pytest.mark.usefixtures("in_a_replica")
def test_a_colocated_ingress_whose_model_keeps_failing_is_unhealthy(tmp_path: Path) -> None:
    """Colocated, the models run in the ingress as one ``InProcessCascade``: once any of its forward passes (the
    fallback step's too) keeps failing, the ingress's health check fails; one good batch makes it healthy again."""
    from _helpers import tiny_fallback_checkpoint

    paths = tiny_serving_checkpoints(tmp_path, CLASSES)
    fallback = tiny_fallback_checkpoint(tmp_path, CLASSES)
    models = ColocatedModels(paths["anchornet"], paths["glance"], paths["patch"], 2, 0.3, 2, 0.0, fallback=fallback)
    cascade = models.load()
    ingress = object.__new__(Ingress.func_or_class)  # check_health reads the cascade only
    ingress.cascade = cascade
    image = torch.zeros(3, 224, 224, dtype=torch.uint8)
    every_step = ExitThresholds.from_confidences([1.0] * 3)  # no one exits before the fallback

    async def scenario(role: str) -> None:
        runner = getattr(cascade.engine, role)
        working, runner.model = runner.model, Broken()
        for _ in range(UNHEALTHY_AFTER_FAILURES):
            with pytest.raises(RuntimeError, match="CUDA error"):
                await cascade.decide(image, every_step)
        with pytest.raises(RuntimeError, match="in a row failed"):
            ingress.check_health()
        runner.model = working
        decision, spent = await cascade.decide(image, every_step)
        assert decision.fallback and list(spent) == ["glance", "anchornet", "patch", "fallback"]
        ingress.check_health()

    async def every_model() -> None:  # one event loop: @serve.batch's queue is bound to the first one
        for role in ("glance_net", "cam_net", "patch_net", "fallback_net"):
            await scenario(role)

    asyncio.run(every_model())
    ingress.cascade = None  # separate: nothing in this replica to check
    ingress.check_health()


# ---------------------------------------------------------------------------------------------------------------
# Load shedding, shutdown and autoscaling settings


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return tiny_serving_checkpoints(tmp_path_factory.mktemp("resilience"), CLASSES)


def test_deployment_args_bound_the_queues() -> None:
    opts = DeploymentArgs(max_ongoing_requests=8, autoscaling_config={"target_ongoing_requests": 4}).options("X")
    assert opts["max_queued_requests"] == 16  # 2 x max_ongoing_requests unless given
    assert opts["backpressure_config"] == {"retry_after_s": 1.0}
    assert opts["graceful_shutdown_timeout_s"] >= 30 + 5  # Serve's 20 s is under the request timeout
    assert DeploymentArgs(max_queued_requests=-1).options("X")["max_queued_requests"] == -1
    assert DeploymentArgs(max_queued_requests=5).options("X")["max_queued_requests"] == 5
    for bad in (0, -2):
        with pytest.raises(ValidationError):
            DeploymentArgs(max_queued_requests=bad)


def test_deployment_args_accept_what_serve_accepts() -> None:
    """Serve takes a batch larger than max_ongoing_requests (it fills to what the replica holds, then waits
    batch_wait_timeout_s) and a target above it (the target counts queued requests too): configs that deployed
    before keep deploying."""
    paths = {"anchornet": "a.pt", "glance": "g.pt", "patch": "p.pt"}
    assert DeploymentArgs(max_ongoing_requests=5).options("X")["max_ongoing_requests"] == 5  # Serve's own default
    DeploymentArgs(max_ongoing_requests=8, autoscaling_config={"target_ongoing_requests": 16})
    small = {"max_ongoing_requests": 4, "max_batch_size": 8}
    ServeArgs(**paths, deployments={"glance": {"max_ongoing_requests": 8}, "patch": small})
    ServeArgs(**paths, colocate=True, deployments={"ingress": {**small, "max_batch_size": 1}})
    BaselineArgs(classifier="c.pt", deployment=small)


def test_build_app_sets_queues_shutdown_and_delays(checkpoints: dict[str, str]) -> None:
    app = build_app(ServeArgs(**checkpoints))
    ingress = app._bound_deployment
    models = {name: ingress.init_kwargs[name]._bound_deployment for name in ("glance", "anchornet", "patch")}
    assert ingress.init_kwargs["retry_after_s"] == 1.0
    for deployment in (ingress, *models.values()):
        config = deployment._deployment_config
        assert config.max_queued_requests == 2 * config.max_ongoing_requests
        assert config.backpressure_config.retry_after_s == 1.0
        assert config.graceful_shutdown_timeout_s >= 35
        scaling = config.autoscaling_config
        assert (scaling.upscale_delay_s, scaling.downscale_delay_s) == (10, 120), deployment.name
        assert scaling.target_ongoing_requests <= config.max_ongoing_requests
    # Delays given in the args win over the defaults.
    fast = {"autoscaling_config": {"upscale_delay_s": 2, "downscale_delay_s": 8}}
    app = build_app(ServeArgs(**checkpoints, colocate=True, deployments={"ingress": fast}))
    scaling = app._bound_deployment._deployment_config.autoscaling_config
    assert (scaling.upscale_delay_s, scaling.downscale_delay_s) == (2, 8)


def _serve_config() -> dict[str, Any]:
    return yaml.safe_load((REPO / "serve_config.yaml").read_text())


def test_serve_config_bounds_every_request() -> None:
    config = _serve_config()
    timeout = config["http_options"]["request_timeout_s"]
    deployments = config["applications"][0]["args"]["deployments"]
    assert set(deployments) == {"ingress", "glance", "anchornet", "patch"}
    for name, options in deployments.items():
        args = DeploymentArgs.model_validate(options)
        assert options.get("max_queued_requests", 0) >= 1, name  # bounded, explicitly
        assert options["graceful_shutdown_timeout_s"] >= timeout + 5, name
        scaling = options["autoscaling_config"]
        assert {key: scaling[key] for key in AUTOSCALING_DELAYS} == AUTOSCALING_DELAYS, name  # the ingress too
        assert args.options(name)["autoscaling_config"]["target_ongoing_requests"] <= args.max_ongoing_requests


def test_serve_config_checker_catches_short_shutdowns() -> None:
    config = _serve_config()
    config["http_options"]["request_timeout_s"] = 60
    problems = check_serve_config(config)
    assert len(problems) == 4 and all("under http_options.request_timeout_s 60" in p for p in problems), problems
    # A per-deployment override of the YAML counts too.
    app = config["applications"][0]
    for deployment in app["args"]["deployments"].values():
        deployment["graceful_shutdown_timeout_s"] = 65
    app["deployments"].append({"name": "Patch", "graceful_shutdown_timeout_s": 20})
    assert [p.split(":")[1].split()[0] for p in check_serve_config(config)] == ["Patch"]


def test_jobs_serve_sets_the_request_timeout() -> None:
    from jobs.serve import parse_args, serve_args

    base = ["--anchornet", "a", "--glance", "g", "--patch", "p"]
    assert parse_args(base).request_timeout == _serve_config()["http_options"]["request_timeout_s"]
    args = serve_args(parse_args([*base, "--request-timeout", "60"]))
    for name in ("ingress", "glance", "anchornet", "patch"):
        options = getattr(args.deployments, name).options(name)
        assert options["graceful_shutdown_timeout_s"] == 65
        assert options["max_queued_requests"] == 2 * options["max_ongoing_requests"]
    with pytest.raises(SystemExit):
        parse_args([*base, "--request-timeout", "0"])


# ---------------------------------------------------------------------------------------------------------------
# Over HTTP on the shared local Ray: a model deployment that is full, and one whose replica dies


def _jpeg() -> bytes:
    pixels = (torch.rand(240, 256, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def fake_models_server(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The real Ingress in front of a fake glance deployment (two replicas of one slot and one queued call each,
    Retry-After 3) steered by files: ``slow`` makes each call take 1 s; ``die`` kills the replica that takes the
    next call (and is removed by it)."""
    from _s3 import free_port
    from ray import serve

    control = tmp_path_factory.mktemp("control")

    @serve.deployment
    class FakeLogits:
        def __init__(self, control: str) -> None:
            self.control = Path(control)

        async def __call__(self, image: Any) -> np.ndarray:
            try:
                (self.control / "die").unlink()
            except FileNotFoundError:
                pass
            else:
                os._exit(1)
            if (self.control / "slow").exists():
                await asyncio.sleep(1.0)
            return np.linspace(0, 1, len(CLASSES), dtype=np.float32)

    spec = ServingSpec(
        class_names=CLASSES,
        class_labels=CLASSES,
        preprocessing=Preprocessing().to_dict(),
        patch_size=95,
        min_side=95,
        num_patches=1,
        aggregate="logits",
        anchornet_macs=1,
        glance_macs=1,
        patch_macs=1,
        top_k=2,
        max_body_bytes=1_000_000,
        max_pixels=4_000_000,
        max_aspect_ratio=20.0,
    )
    small = {"ray_actor_options": {"num_cpus": 0.1}}
    glance = FakeLogits.options(
        name="Glance", num_replicas=2, max_ongoing_requests=1, max_queued_requests=1, **small
    ).options(backpressure_config={"retry_after_s": 3})
    model = glance.bind(str(control))
    app = Ingress.options(name="Ingress", max_ongoing_requests=32, **small).bind(
        spec, glance=model, anchornet=model, patch=model, retry_after_s=2
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    serve.run(app, name="resilience", route_prefix="/", blocking=False)
    try:
        yield f"http://127.0.0.1:{port}", control
    finally:
        serve.shutdown()


def _classify(url: str) -> Any:
    import requests

    return requests.post(
        f"{url}/classify", data=_jpeg(), params={"thresholds": "0"}, headers={"Content-Type": "image/jpeg"}, timeout=60
    )


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_a_full_model_deployment_sheds_load_with_json_503(fake_models_server: tuple[str, Path]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    url, control = fake_models_server
    assert _classify(url).status_code == 200
    (control / "slow").touch()
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: _classify(url), range(8)))
    finally:
        (control / "slow").unlink()
    statuses = sorted(a.status_code for a in answers)
    assert set(statuses) == {200, 503} and statuses.count(200) >= 2, statuses  # 2 replicas x 1 slot at least
    for answer in answers:
        if answer.status_code == 503:
            assert answer.json()["error"]["code"] == "model_unavailable"
            assert answer.headers["Retry-After"] == "3"  # the Glance deployment's backpressure_config
    assert _classify(url).status_code == 200


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_a_call_whose_replica_dies_is_retried(fake_models_server: tuple[str, Path]) -> None:
    url, control = fake_models_server
    assert _classify(url).status_code == 200
    (control / "die").touch()
    answer = _classify(url)
    assert not (control / "die").exists()  # a replica took the call and died
    assert answer.status_code == 200, answer.text
    assert answer.json()["exit_step"] == 1 and math.isfinite(answer.json()["confidence"])
