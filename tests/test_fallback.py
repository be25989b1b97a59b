"""The fallback step (our extension of Alg. 1): a full-size network decides the samples still unsure after their
last patch. Checked against a per-sample loop, the step tables and the cost accounting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anchornet import (
    AnchorNet,
    EarlyExitClassifier,
    StepTable,
    anchornet_test,
    anytime_macs,
    budgeted_search,
    class_activation_map,
    count_macs,
    cumulative_step_macs,
    evaluate_thresholds,
    fit_thresholds,
    select_patches,
)
from anchornet.early_exit import sample_macs

pytestmark = pytest.mark.model

NUM_CLASSES = 5
SIZE = 160  # a 9 x 9 grid for K = 95, S = 8: NMS at IoU 0.3 leaves 1 to 4 windows
K_PATCHES = 3
STEPS = K_PATCHES + 2  # glance, 3 patches, fallback

Nets = tuple[AnchorNet, nn.Module, nn.Module, nn.Module]


def _tiny_classifier(num_classes: int = NUM_CLASSES, stride: int = 4) -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 5, stride=stride), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes)
    )
    nn.init.normal_(net[-1].weight, std=3.0)  # spread the confidences
    return net


@pytest.fixture
def nets() -> Nets:
    anchornet = anchornet_test(NUM_CLASSES)
    nn.init.normal_(anchornet.classifier.weight)
    glance, patch, fallback = _tiny_classifier(), _tiny_classifier(), _tiny_classifier(stride=2)
    return anchornet.double().eval(), glance.double().eval(), patch.double().eval(), fallback.double().eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(16, 3, SIZE, SIZE, dtype=torch.float64)


def _engine(nets: Nets, thresholds=(0.5,) * (STEPS - 1), **kwargs) -> EarlyExitClassifier:
    anchornet, glance, patch, fallback = nets
    kwargs.setdefault("image_size", (SIZE, SIZE))
    return EarlyExitClassifier(anchornet, glance, patch, thresholds, K_PATCHES, fallback_net=fallback, **kwargs)


def _mixed_thresholds(engine: EarlyExitClassifier, images: torch.Tensor) -> tuple[float, ...]:
    """Thresholds between sample confidences, so that some samples exit at every step."""
    outputs, _ = engine.step_logits(images)
    table = StepTable.from_logits(outputs, torch.zeros(len(images), dtype=torch.long), fallback=True)
    rho = []
    for t in range(STEPS - 1):
        values = table.confidence[:, t].sort(descending=True).values
        rho.append(float((values[3] + values[4]) / 2))
    return tuple(rho)


def _reference(nets: Nets, image: torch.Tensor, thresholds: tuple[float, ...]) -> tuple[int, int, int]:
    """Alg. 1 plus the fallback for one image, step by step: (prediction, exit step, MACs)."""
    anchornet, glance_net, patch_net, fallback_net = nets
    rf = anchornet.receptive_field
    costs = {
        "anchornet": count_macs(anchornet, SIZE),
        "glance": count_macs(glance_net, rf.size),
        "patch": count_macs(patch_net, rf.size),
        "fallback": count_macs(fallback_net, SIZE),
    }
    with torch.no_grad():
        glance = F.interpolate(image[None], size=(rf.size, rf.size), mode="bilinear", antialias=True)
        z = glance_net(glance)[0]
        if float(z.softmax(-1).max()) >= thresholds[0]:
            return int(z.argmax()), 1, costs["glance"]
        cam, _ = class_activation_map(anchornet, image[None])
        selection = select_patches(cam, rf, K_PATCHES, 0.3)
        boxes = selection.boxes[0][selection.valid[0]].tolist()
        for t, box in enumerate(boxes, start=2):
            x0, y0, x1, y1 = (int(v) for v in box)
            z = z + patch_net(image[None, :, y0:y1, x0:x1])[0]
            if float(z.softmax(-1).max()) >= thresholds[t - 1]:
                return int(z.argmax()), t, costs["anchornet"] + costs["glance"] + (t - 1) * costs["patch"]
        # not confident after the last patch, or out of patches: the fallback alone decides
        full = fallback_net(image[None])[0]
        macs = costs["anchornet"] + costs["glance"] + len(boxes) * costs["patch"] + costs["fallback"]
        return int(full.argmax()), STEPS, macs


def test_engine_matches_a_per_sample_loop(nets, images) -> None:
    engine = _engine(nets)
    engine.thresholds = _mixed_thresholds(engine, images)
    result = engine.predict(images)
    assert set(result.exit_step.tolist()) >= {1, STEPS}, "thresholds should spread the exits up to the fallback"
    for b, image in enumerate(images):
        expected = _reference(nets, image, engine.thresholds.confidences)
        assert (int(result.prediction[b]), int(result.exit_step[b]), int(result.macs[b])) == expected


def test_samples_out_of_patches_go_to_the_fallback(nets, images) -> None:
    engine = _engine(nets, thresholds=(0.0,) + (math.inf,) * (STEPS - 2))
    engine.thresholds = (math.inf,) * (STEPS - 1)  # nobody exits before the fallback
    calls: list[int] = []
    engine.fallback_net.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    result = engine.predict(images)
    _, selection = engine.step_logits(images)
    assert (selection.num_valid < K_PATCHES).any(), "the test needs images with fewer windows"
    assert (result.exit_step == STEPS).all()
    assert calls[0] == len(images)  # one dense pass for all of them
    costs = sample_macs(
        torch.full((len(images),), STEPS),
        1,
        engine.anchornet_macs,
        engine.glance_macs,
        engine.patch_macs,
        patches_seen=selection.num_valid,
        ran_fallback=1,
        fallback_macs=engine.fallback_macs,
    )
    assert torch.equal(result.macs, costs)
    assert (result.macs <= engine.step_macs[-1]).all() and (result.macs < engine.step_macs[-1]).any()
    torch.testing.assert_close(result.logits, engine.fallback_net(images))
    torch.testing.assert_close(result.confidence, engine.fallback_net(images).softmax(-1).amax(-1))


def test_zero_thresholds_never_run_the_fallback(nets, images) -> None:
    engine = _engine(nets, thresholds=(0.0,) * (STEPS - 1))
    calls = []
    engine.fallback_net.register_forward_hook(lambda m, i, o: calls.append(1))
    result = engine.predict(images)
    assert calls == [] and (result.exit_step == 1).all() and (result.macs == engine.glance_macs).all()


@pytest.mark.parametrize("aggregate", ["logits", "probs"])
def test_step_table_predicts_the_engine(nets, images, aggregate: str) -> None:
    engine = _engine(nets, aggregate=aggregate)
    outputs, selection = engine.step_logits(images, max_batch=5)
    assert outputs.shape == (len(images), STEPS, NUM_CLASSES) and outputs[:, -1].isfinite().all()
    labels = torch.randint(0, NUM_CLASSES, (len(images),))
    table = StepTable.from_logits(outputs, labels, aggregate, fallback=True)
    assert (table.last_step == STEPS).all()
    engine.thresholds = _mixed_thresholds(engine, images) if aggregate == "logits" else (0.9,) * (STEPS - 1)
    result = engine.predict(images)
    assert torch.equal(table.exit_steps(engine.thresholds), result.exit_step)
    _, accuracy, _ = evaluate_thresholds(table, engine.thresholds, engine.step_macs)
    assert accuracy == pytest.approx((result.prediction == labels).double().mean().item())
    # anytime: exit_at = T is the fallback for everyone; earlier steps as without a fallback
    for t in range(1, STEPS + 1):
        anytime = engine.predict(images, exit_at=t)
        assert torch.equal(anytime.prediction, table.prediction[:, t - 1])
        expected_step = torch.full_like(anytime.exit_step, t) if t == STEPS else (1 + selection.num_valid).clamp(max=t)
        assert torch.equal(anytime.exit_step, expected_step)


def test_step_macs_and_search_include_the_fallback(nets, images) -> None:
    engine = _engine(nets)
    assert engine.num_steps == STEPS and engine.has_fallback
    assert engine.fallback_macs == count_macs(engine.fallback_net, SIZE)
    assert engine.step_macs == cumulative_step_macs(
        engine.anchornet_macs, engine.glance_macs, engine.patch_macs, STEPS, engine.fallback_macs
    )
    assert engine.step_macs[-1] == engine.step_macs[-2] + engine.fallback_macs
    outputs, _ = engine.step_logits(images)
    table = StepTable.from_logits(outputs, outputs[:, -1].argmax(-1), fallback=True)  # the fallback is always right
    points = budgeted_search(table, table, engine.step_macs, qs=(0.05, 1.0, 1.95))
    assert [len(p.thresholds) for p in points] == [STEPS - 1] * 3
    assert points[0].expected_macs < points[-1].expected_macs
    macs, accuracy, fractions = evaluate_thresholds(table, [math.inf] * (STEPS - 1), engine.step_macs)
    assert (accuracy, fractions) == (1.0, [0.0] * (STEPS - 1) + [1.0])
    assert table.patch_steps.tolist() != [K_PATCHES + 1] * len(images)  # some have fewer patches: they pay less
    for thresholds in ([math.inf] * (STEPS - 1), points[1].thresholds):  # the table charges what the engine spends
        engine.thresholds = thresholds
        result = engine.predict(images)
        assert table.exit_steps(thresholds).tolist() == result.exit_step.tolist()
        assert evaluate_thresholds(table, thresholds, engine.step_macs)[0] == result.macs.double().mean().item()
    assert macs < engine.step_macs[-1] and anytime_macs(table, engine.step_macs)[-1] == macs  # all at the fallback


def test_cumulative_step_macs_with_a_fallback() -> None:
    assert cumulative_step_macs(60, 700, 750, 4, fallback_macs=4000) == [700, 1510, 2260, 6260]
    assert cumulative_step_macs(60, 700, 750, 2, fallback_macs=4000) == [700, 4700]
    with pytest.raises(ValueError, match="at least 2"):
        cumulative_step_macs(60, 700, 750, 1, fallback_macs=4000)


def test_bad_fallbacks(nets) -> None:
    anchornet, glance, patch, _ = nets
    with pytest.raises(ValueError, match="classes of glance_net"):
        EarlyExitClassifier(anchornet, glance, patch, [0.5] * 4, 3, fallback_net=_tiny_classifier(7).double())
    engine = _engine(nets)
    with pytest.raises(ValueError, match=r"expected 4 thresholds .*fallback"):
        engine.thresholds = [0.5] * 3  # fitted without the fallback
    with pytest.raises(ValueError, match="fallback step must be finite"):
        StepTable.from_logits(torch.full((2, 3, 4), math.nan), torch.zeros(2, dtype=torch.long), fallback=True)


def test_a_zero_threshold_does_not_exit_a_sample_at_a_patch_it_does_not_have(nets, images) -> None:
    """rho = 0 exits every sample that reaches the step; one whose patches ran out goes on to the fallback."""
    engine = _engine(nets)
    outputs, selection = engine.step_logits(images)
    assert (selection.num_valid < K_PATCHES).any(), "the test needs images with fewer windows"
    table = StepTable.from_logits(outputs, torch.zeros(len(images), dtype=torch.long), fallback=True)
    engine.thresholds = (*_mixed_thresholds(engine, images)[:-1], 0.0)
    result = engine.predict(images)
    assert torch.equal(table.exit_steps(engine.thresholds), result.exit_step)
    assert (result.exit_step[selection.num_valid < K_PATCHES] == STEPS).any()


def test_fitted_thresholds_never_come_from_a_missing_patch_step() -> None:
    steps = torch.randn(4, 4, 3, generator=torch.Generator().manual_seed(0))
    steps[0, 2] = math.nan  # sample 0 has one patch: step 3 is missing, it goes on to the fallback
    table = StepTable.from_logits(steps, torch.zeros(4, dtype=torch.long), fallback=True)
    assert table.log_odds[0, 2] == -math.inf
    rho = fit_thresholds(table, [0.0, 0.0, 1.0, 0.0])  # everyone left is asked to exit at step 3
    assert math.isfinite(rho.log_odds[2])
    assert table.exit_steps(rho).tolist() == [4, 3, 3, 3]
