"""The colocated ingress's cascade (``InProcessCascade``): concurrent requests share each step's forward pass, and
each still gets the decision it gets alone, whatever budget it asked for."""

from __future__ import annotations

import asyncio
import math
from functools import partial

import pytest
import torch
from _helpers import tiny_fallback_checkpoint, tiny_serving_checkpoints

from anchornet.early_exit import ExitThresholds
from anchornet.preprocessing import to_float
from pipelines.serve import (
    ColocatedModels,
    InProcessCascade,
    ServeArgs,
    ServerTiming,
    classify_images,
    early_exit_steps,
    from_wire,
    propose_patches,
    serving_spec,
    to_wire,
)

CLASSES = [f"class{i}" for i in range(4)]
NUM_PATCHES = 2
BUDGETS = {
    "glance-only": ExitThresholds.from_confidences([0.0] * (NUM_PATCHES + 1)),
    "every-step": ExitThresholds.from_confidences([math.inf] * (NUM_PATCHES + 1)),
    "middle": ExitThresholds.from_confidences([0.4, 0.45, 0.5]),
}


def _varied(cascade: InProcessCascade) -> InProcessCascade:
    """``cascade`` with small random classifiers in place of the untrained ones, whose outputs are the same for every
    image (so every image would exit at the same step); seeded, different per role."""
    for seed, role in enumerate(("glance", "patch", "fallback")):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 5, stride=4),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(8, len(CLASSES)),
        )
        torch.nn.init.normal_(net[-1].weight, std=4.0)
        cascade.runners[role].model = net.eval()
    return cascade


def _spread(cascade: InProcessCascade, images: list[torch.Tensor]) -> ExitThresholds:
    """Thresholds halfway between the middle two confidences of each step on ``images`` (never on one, where float
    rounding could decide): some exit at every step, some go on."""
    from anchornet import StepTable

    outputs, _ = cascade.engine.step_logits(to_float(torch.stack(images)))
    labels = torch.zeros(len(images), dtype=torch.long)
    table = StepTable.from_logits(outputs, labels, cascade.engine.aggregate, fallback=cascade.engine.has_fallback)
    middle = [
        table.confidence[:, t].sort().values[len(images) // 2 - 1 : len(images) // 2 + 1]
        for t in range(NUM_PATCHES + 1)
    ]
    return ExitThresholds.from_confidences([float(pair.mean()) for pair in middle])


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cascade")
    return {**tiny_serving_checkpoints(root, CLASSES), "fallback": tiny_fallback_checkpoint(root, CLASSES)}


def _colocated(paths: dict[str, str], **kwargs: object) -> ColocatedModels:
    return ColocatedModels(
        paths["anchornet"],
        paths["glance"],
        paths["patch"],
        NUM_PATCHES,
        0.3,
        16,
        0.05,
        fallback=paths["fallback"],
        **kwargs,
    )


@pytest.fixture(scope="module")
def cascade_args(paths: dict[str, str]) -> ColocatedModels:
    return _colocated(paths)


def _images(count: int) -> list[torch.Tensor]:
    """Smooth random colour fields with some noise, as uint8 ``(3, 224, 224)``: varied enough that the untrained
    models' confidences differ between images."""
    generator = torch.Generator().manual_seed(3)
    images = []
    for _ in range(count):
        coarse = torch.rand(1, 3, 6, 6, generator=generator)
        smooth = torch.nn.functional.interpolate(coarse, size=(224, 224), mode="bilinear")[0]
        noisy = smooth * 0.8 + torch.rand(3, 224, 224, generator=generator) * 0.2
        images.append((noisy.clamp(0, 1) * 255).to(torch.uint8))
    return images


def _counted(cascade: InProcessCascade) -> list[int]:
    """Batch sizes of the cascade's ``predict`` calls, recorded from now on."""
    sizes: list[int] = []
    predict = cascade._predict

    def counting(images: torch.Tensor, rho: ExitThresholds) -> object:
        sizes.append(images.shape[0])
        return predict(images, rho)

    cascade._predict = counting  # type: ignore[method-assign]
    return sizes


@pytest.mark.usefixtures("serve_replica_context")
def test_concurrent_requests_share_passes_and_each_gets_its_own_decision(cascade_args: ColocatedModels) -> None:
    cascade = _varied(cascade_args.load())
    images = _images(5)  # 15 requests: one batch of at most max_batch_size 16
    requests = [(image, BUDGETS[name]) for image in images for name in BUDGETS]

    sizes = _counted(cascade)

    async def scenario() -> tuple[list, list]:
        alone = [await cascade.decide(image, rho) for image, rho in requests]
        return alone, await asyncio.gather(*(cascade.decide(image, rho) for image, rho in requests))

    alone, together = asyncio.run(scenario())
    assert sizes[: len(requests)] == [1] * len(requests)
    assert sorted(sizes[len(requests) :]) == [len(images)] * len(BUDGETS)  # one pass per budget, not per request
    exits = set()
    for (want, want_spent), (got, got_spent) in zip(alone, together, strict=True):
        assert (got.exit_step, got.prediction, got.macs, got.fallback) == (
            want.exit_step,
            want.prediction,
            want.macs,
            want.fallback,
        )
        assert (got.patches, got.patches_available) == (want.patches, want.patches_available)
        torch.testing.assert_close(got.probabilities, want.probabilities, atol=1e-5, rtol=0)
        assert list(got_spent) == list(want_spent)
        exits.add(got.exit_step)
    assert {1, NUM_PATCHES + 2} <= exits  # the glance and the fallback both decided some


@pytest.mark.usefixtures("serve_replica_context")
def test_a_decision_is_the_engines(cascade_args: ColocatedModels) -> None:
    """Against ``EarlyExitClassifier.predict`` on the batch of float images: exits, predictions, MACs, patches, the
    probabilities (softmax of the accumulated logits, or the fallback's own) and which models each request ran."""
    cascade = _varied(cascade_args.load())
    images = _images(5)
    rho = BUDGETS["middle"]

    async def scenario() -> list:
        return [await cascade.decide(image, rho) for image in images]

    decided = asyncio.run(scenario())
    want = cascade.engine.predict(to_float(torch.stack(images)), thresholds=rho)
    for b, (decision, spent) in enumerate(decided):
        assert (decision.exit_step, decision.prediction, decision.macs) == (
            int(want.exit_step[b]),
            int(want.prediction[b]),
            int(want.macs[b]),
        )
        looked = [j for j in range(NUM_PATCHES) if not want.boxes[b, j].isnan().any()]
        assert [p.box for p in decision.patches] == [want.boxes[b, j].tolist() for j in looked]
        assert [p.step for p in decision.patches] == [j + 2 for j in looked]
        torch.testing.assert_close(decision.probabilities, want.logits[b].softmax(-1))
        roles = ["glance"] + (["anchornet"] if decision.exit_step > 1 else []) + (["patch"] if looked else [])
        assert list(spent) == roles + (["fallback"] if decision.fallback else [])
        assert all(ms > 0 for ms in spent.values())
        assert decision.patches_available == (None if decision.exit_step == 1 else int(want.patches_available[b]))


class _InProcess:
    """A deployment handle's ``remote`` over a function of a batch, as the separate layout's deployments compute it."""

    def __init__(self, forward: object) -> None:
        self.forward = forward

    async def remote(self, item: object) -> object:
        return to_wire(self.forward(from_wire(item)[None])[0])


@pytest.mark.usefixtures("serve_replica_context")
@pytest.mark.parametrize("aggregate", ["logits", "probs"])
def test_the_cascade_decides_as_the_step_by_step_loop(paths: dict[str, str], aggregate: str) -> None:
    """``InProcessCascade`` against ``early_exit_steps`` (the separate layout's loop) over the same models: every
    field of the decision, for budgets that exit at the glance, at a patch and at the fallback."""
    cascade = _varied(_colocated(paths, aggregate=aggregate).load())
    spec = serving_spec(ServeArgs(**paths, num_patches=NUM_PATCHES, aggregate=aggregate))
    models = {role: cascade.runners[role].model for role in ("glance", "patch", "fallback")}
    handles = {
        **{
            role: _InProcess(partial(classify_images, model, 224 if role == "fallback" else 95))
            for role, model in models.items()
        },
        "anchornet": _InProcess(
            partial(propose_patches, cascade.runners["anchornet"].model, num_patches=NUM_PATCHES, iou_threshold=0.3)
        ),
    }
    images = _images(8)
    budgets = [*BUDGETS.values(), _spread(cascade, images)]

    async def scenario() -> list[tuple[object, object]]:
        pairs = []
        for rho in budgets:
            together = await asyncio.gather(*(cascade.decide(image, rho) for image in images))
            for image, (got, _) in zip(images, together, strict=True):
                pairs.append((got, await early_exit_steps(spec, rho, image, handles, ServerTiming())))
        return pairs

    exits = set()
    for got, want in asyncio.run(scenario()):
        assert (got.exit_step, got.prediction, got.macs, got.fallback, got.patches_available) == (
            want.exit_step,
            want.prediction,
            want.macs,
            want.fallback,
            want.patches_available,
        )
        assert [(p.step, p.box) for p in got.patches] == [(p.step, p.box) for p in want.patches]
        assert [p.cam_score for p in got.patches] == pytest.approx([p.cam_score for p in want.patches], abs=1e-5)
        assert got.confidence == pytest.approx(want.confidence, abs=1e-5)
        torch.testing.assert_close(got.probabilities, want.probabilities, atol=1e-5, rtol=0)
        exits.add(got.exit_step)
    assert {1, NUM_PATCHES + 2} <= exits and exits & {2, 3}, exits  # the glance, a patch and the fallback decided


@pytest.mark.usefixtures("serve_replica_context")
def test_on_onnxruntime_the_sessions_run_the_passes(paths: dict[str, str], cascade_args: ColocatedModels) -> None:
    from pipelines.onnx_runtime import OnnxRuntimeModel

    on_ort = _colocated(paths, runtime="onnxruntime").load()
    on_torch = cascade_args.load()
    assert all(isinstance(runner.model, OnnxRuntimeModel) for runner in on_ort.runners.values())
    assert set(on_ort.runners) == {"glance", "anchornet", "patch", "fallback"}
    images = _images(4)

    async def scenario(cascade: InProcessCascade) -> list:
        return [await cascade.decide(image, BUDGETS["middle"]) for image in images]

    for (got, _), (want, _) in zip(asyncio.run(scenario(on_ort)), asyncio.run(scenario(on_torch)), strict=True):
        assert (got.exit_step, got.prediction, got.macs) == (want.exit_step, want.prediction, want.macs)
        torch.testing.assert_close(got.probabilities, want.probabilities, atol=1e-4, rtol=0)


class _Clock:
    """A clock that moves one second per reading: every timed pass takes exactly 1000 ms."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.mark.usefixtures("serve_replica_context")
def test_a_request_is_charged_the_passes_it_took_part_in(cascade_args: ColocatedModels) -> None:
    """Server-Timing: each model's passes of the request's group, the patch steps only as far as the request went
    (a step that ran for others after it exited is not its)."""
    cascade = _varied(cascade_args.load())
    images = _images(8)
    spread = _spread(cascade, images)
    for runner in cascade.runners.values():
        runner.clock = _Clock()

    async def scenario() -> list:
        return await asyncio.gather(*(cascade.decide(image, spread) for image in images))

    decided = asyncio.run(scenario())
    steps = {decision.exit_step for decision, _ in decided}
    assert len(steps) >= 3, f"the budget should spread the exits, got {steps}"
    for decision, spent in decided:
        want = {"glance": 1000.0}
        if decision.patches_available is not None:
            want["anchornet"] = 1000.0
        if decision.patches:
            want["patch"] = 1000.0 * len(decision.patches)
        if decision.fallback:
            want["fallback"] = 1000.0
        assert spent == want


class _Broken(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


@pytest.mark.usefixtures("serve_replica_context")
def test_a_failing_model_fails_only_the_requests_that_reach_it(cascade_args: ColocatedModels) -> None:
    """A broken patch classifier fails the requests of the budgets that reach it; the others in the same batches
    are answered, and their successes do not reset the patch classifier's failure count: the health check fails."""
    from pipelines.serve import UNHEALTHY_AFTER_FAILURES

    cascade = cascade_args.load()
    cascade.runners["patch"].model = _Broken()
    image = _images(1)[0]

    async def one_batch() -> list:
        requests = (cascade.decide(image, BUDGETS["glance-only"]), cascade.decide(image, BUDGETS["every-step"]))
        return await asyncio.gather(*requests, return_exceptions=True)

    async def scenario() -> list:
        return [await one_batch() for _ in range(UNHEALTHY_AFTER_FAILURES)]

    for glance_only, every_step in asyncio.run(scenario()):
        assert glance_only[0].exit_step == 1
        assert isinstance(every_step, RuntimeError) and "CUDA error" in str(every_step)
    with pytest.raises(RuntimeError, match="in a row failed"):
        cascade.check()
