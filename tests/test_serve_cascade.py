"""The colocated ingress's cascade (``InProcessCascade``): concurrent requests share each step's forward pass, and
each still gets the decision it gets alone, whatever budget it asked for."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

import pytest
import torch
from _helpers import tiny_fallback_checkpoint, tiny_serving_checkpoints

from anchornet.early_exit import ExitThresholds
from anchornet.preprocessing import to_float
from pipelines.serve import ColocatedModels, InProcessCascade

CLASSES = [f"class{i}" for i in range(4)]
NUM_PATCHES = 2
BUDGETS = {
    "glance-only": ExitThresholds.from_confidences([0.0] * (NUM_PATCHES + 1)),
    "every-step": ExitThresholds.from_confidences([math.inf] * (NUM_PATCHES + 1)),
    "middle": ExitThresholds.from_confidences([0.4, 0.45, 0.5]),
}


@pytest.fixture
def in_a_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``@serve.batch`` reads of its replica (to warn about batches over max_ongoing_requests)."""
    from ray import serve

    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=16))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)


@pytest.fixture(scope="module")
def cascade_args(tmp_path_factory: pytest.TempPathFactory) -> ColocatedModels:
    root = tmp_path_factory.mktemp("cascade")
    paths = tiny_serving_checkpoints(root, CLASSES)
    fallback = tiny_fallback_checkpoint(root, CLASSES)
    return ColocatedModels(
        paths["anchornet"], paths["glance"], paths["patch"], NUM_PATCHES, 0.3, 16, 0.05, fallback=fallback
    )


def _images(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8, generator=generator) for _ in range(count)]


def _counted(cascade: InProcessCascade) -> list[int]:
    """Batch sizes of the cascade's ``predict`` calls, recorded from now on."""
    sizes: list[int] = []
    predict = cascade._predict

    def counting(images: torch.Tensor, rho: ExitThresholds) -> object:
        sizes.append(images.shape[0])
        return predict(images, rho)

    cascade._predict = counting  # type: ignore[method-assign]
    return sizes


@pytest.mark.usefixtures("in_a_replica")
def test_concurrent_requests_share_passes_and_each_gets_its_own_decision(cascade_args: ColocatedModels) -> None:
    cascade = cascade_args.load()
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


@pytest.mark.usefixtures("in_a_replica")
def test_a_decision_is_the_engines(cascade_args: ColocatedModels) -> None:
    """Against ``EarlyExitClassifier.predict`` on the batch of float images: exits, predictions, MACs, patches, the
    probabilities (softmax of the accumulated logits, or the fallback's own) and which models each request ran."""
    cascade = cascade_args.load()
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
