"""The sequential early-exit engine (paper Alg. 1) against a plain per-sample loop, and its cost accounting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anchornet import (
    AnchorNet,
    EarlyExitClassifier,
    ExitThresholds,
    StepTable,
    anchornet_test,
    class_activation_map,
    confidence_log_odds,
    count_macs,
    cumulative_step_macs,
    evaluate_thresholds,
    random_patches,
    select_patches,
)
from anchornet.early_exit import resize_square

pytestmark = pytest.mark.model

NUM_CLASSES = 5
SIZE = 160  # a 9 x 9 grid for K = 95, S = 8: NMS at IoU 0.3 leaves 1 to 4 windows
K_PATCHES = 4
STEPS = K_PATCHES + 1


def _tiny_classifier(num_classes: int = NUM_CLASSES) -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes)
    )
    nn.init.normal_(net[-1].weight, std=3.0)  # spread the confidences
    return net


@pytest.fixture
def nets() -> tuple[AnchorNet, nn.Module, nn.Module]:
    anchornet = anchornet_test(NUM_CLASSES)
    nn.init.normal_(anchornet.classifier.weight)
    return anchornet.double().eval(), _tiny_classifier().double().eval(), _tiny_classifier().double().eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(12, 3, SIZE, SIZE, dtype=torch.float64)


def _engine(nets: tuple[AnchorNet, nn.Module, nn.Module], thresholds=(0.5,) * 4, **kwargs) -> EarlyExitClassifier:
    kwargs.setdefault("image_size", (SIZE, SIZE))
    return EarlyExitClassifier(*nets, thresholds, K_PATCHES, **kwargs)


def _between(values: torch.Tensor, fraction: float) -> float:
    """A threshold strictly between two sorted values, with about ``fraction`` of ``values`` at or above it."""
    v = values.sort(descending=True).values
    i = min(max(1, int(fraction * len(v))), len(v) - 1)
    return float((v[i - 1] + v[i]) / 2)


def _mixed_thresholds(engine: EarlyExitClassifier, images: torch.Tensor) -> tuple[float, ...]:
    outputs, _ = engine.step_logits(images)
    table = StepTable.from_logits(outputs, torch.zeros(len(images), dtype=torch.long), engine.aggregate)
    return tuple(_between(table.confidence[:, t], 0.35) for t in range(STEPS - 1))


def _costs(nets: tuple[AnchorNet, nn.Module, nn.Module]) -> dict[str, int]:
    anchornet, glance_net, patch_net = nets
    size = anchornet.receptive_field.size
    return {
        "anchornet": count_macs(anchornet, SIZE),
        "glance": count_macs(glance_net, size),
        "patch": count_macs(patch_net, size),
    }


def _reference(
    nets: tuple[AnchorNet, nn.Module, nn.Module],
    image: torch.Tensor,
    thresholds: tuple[float, ...],
    iou_threshold: float,
    aggregate: str,
    costs: dict[str, int],
) -> tuple[int, int, int, list[list[float]]]:
    """Alg. 1 for one image, step by step: (prediction, exit step, MACs, boxes looked at)."""
    anchornet, glance_net, patch_net = nets
    rf = anchornet.receptive_field

    def contribution(logits: torch.Tensor) -> torch.Tensor:
        return logits if aggregate == "logits" else logits.softmax(-1)

    def confidence(z: torch.Tensor, t: int) -> float:
        return float(z.softmax(-1).max()) if aggregate == "logits" else float(z.max() / t)

    with torch.no_grad():
        glance = F.interpolate(image[None], size=(rf.size, rf.size), mode="bilinear", antialias=True)
        z = contribution(glance_net(glance)[0])
        if confidence(z, 1) >= thresholds[0]:
            return int(z.argmax()), 1, costs["glance"], []
        cam, _ = class_activation_map(anchornet, image[None])
        selection = select_patches(cam, rf, K_PATCHES, iou_threshold)
        boxes = selection.boxes[0][selection.valid[0]].tolist()
        looked = []
        for t, box in enumerate(boxes, start=2):
            x0, y0, x1, y1 = (int(v) for v in box)
            z = z + contribution(patch_net(image[None, :, y0:y1, x0:x1])[0])
            looked.append(box)
            if t == STEPS or t == len(boxes) + 1 or confidence(z, t) >= thresholds[t - 1]:
                macs = costs["anchornet"] + costs["glance"] + (t - 1) * costs["patch"]
                return int(z.argmax()), t, macs, looked
    raise AssertionError("unreachable")


@pytest.mark.parametrize(("aggregate", "iou_threshold"), [("logits", 0.3), ("probs", 0.3), ("logits", 1.0)])
def test_batched_engine_matches_a_per_sample_loop(nets, images, aggregate: str, iou_threshold: float) -> None:
    engine = _engine(nets, aggregate=aggregate, iou_threshold=iou_threshold)
    engine.thresholds = _mixed_thresholds(engine, images)
    result = engine.predict(images)
    assert len(set(result.exit_step.tolist())) >= 3, "thresholds should spread the exits"
    costs = _costs(nets)
    for b, image in enumerate(images):
        rho = engine.thresholds.confidences  # the reference compares confidences, as Alg. 1 writes it
        prediction, step, macs, boxes = _reference(nets, image, rho, iou_threshold, aggregate, costs)
        assert (int(result.prediction[b]), int(result.exit_step[b]), int(result.macs[b])) == (prediction, step, macs)
        assert result.boxes[b, : len(boxes)].tolist() == boxes
        assert result.boxes[b, len(boxes) :].isnan().all()
        assert result.scores[b, : len(boxes)].isfinite().all() and result.scores[b, len(boxes) :].isnan().all()
    assert result.macs.dtype == torch.int64
    assert result.logits.shape == (len(images), NUM_CLASSES)


def test_zero_thresholds_exit_at_the_glance_without_running_anchornet(nets, images) -> None:
    engine = _engine(nets, thresholds=(0.0,) * 4)
    calls = []
    engine.anchornet.head.register_forward_hook(lambda m, i, o: calls.append("anchornet"))
    engine.patch_net.register_forward_hook(lambda m, i, o: calls.append("patch"))
    result = engine.predict(images)
    assert calls == []
    assert (result.exit_step == 1).all()
    assert (result.macs == engine.glance_macs).all() and engine.step_macs[0] == engine.glance_macs
    assert result.boxes.isnan().all() and result.scores.isnan().all()
    expected = engine.glance_net(F.interpolate(images, size=(engine.patch_size,) * 2, mode="bilinear", antialias=True))
    torch.testing.assert_close(result.logits, expected)


def test_infinite_thresholds_use_every_available_step(nets, images) -> None:
    engine = _engine(nets, thresholds=(math.inf,) * 4, iou_threshold=1.0)
    result = engine.predict(images)
    assert (result.exit_step == STEPS).all()
    assert (result.macs == engine.step_macs[-1]).all()
    assert result.boxes.isfinite().all()

    engine = _engine(nets, thresholds=(math.inf,) * 4, iou_threshold=0.3)
    result = engine.predict(images)
    _, selection = engine.step_logits(images)
    assert (selection.num_valid < K_PATCHES).any(), "the test needs images with fewer windows"
    assert torch.equal(result.exit_step, 1 + selection.num_valid)


def test_dense_sub_batches(nets, images) -> None:
    engine = _engine(nets)
    engine.thresholds = _mixed_thresholds(engine, images)
    seen: dict[str, list[int]] = {"anchornet": [], "patch": []}
    engine.anchornet.head.register_forward_hook(lambda m, i, o: seen["anchornet"].append(i[0].shape[0]))
    engine.patch_net.register_forward_hook(lambda m, i, o: seen["patch"].append(i[0].shape[0]))
    result = engine.predict(images)
    undecided = [int((result.exit_step >= t).sum()) for t in range(2, STEPS + 1)]
    assert seen["anchornet"] == [undecided[0]]
    assert seen["patch"] == [n for n in undecided if n > 0]
    assert undecided[0] < len(images)


@pytest.mark.parametrize("aggregate", ["logits", "probs"])
def test_anytime_mode_matches_the_step_table(nets, images, aggregate: str) -> None:
    engine = _engine(nets, aggregate=aggregate, iou_threshold=1.0)
    outputs, _ = engine.step_logits(images)
    table = StepTable.from_logits(outputs, torch.zeros(len(images), dtype=torch.long), aggregate)
    for t in range(1, STEPS + 1):
        result = engine.predict(images, exit_at=t)
        assert (result.exit_step == t).all()
        assert (result.macs == engine.step_macs[t - 1]).all()
        assert torch.equal(result.prediction, table.prediction[:, t - 1])
        torch.testing.assert_close(result.confidence, table.confidence[:, t - 1])


def test_step_table_predicts_the_engine_exits_and_cost(nets, images) -> None:
    engine = _engine(nets)
    engine.thresholds = _mixed_thresholds(engine, images)
    result = engine.predict(images)
    outputs, _ = engine.step_logits(images, max_batch=5)
    table = StepTable.from_logits(outputs, result.prediction)
    assert torch.equal(table.exit_steps(engine.thresholds), result.exit_step)
    macs, accuracy, fractions = evaluate_thresholds(table, engine.thresholds, engine.step_macs)
    assert macs == pytest.approx(result.macs.double().mean().item())
    assert accuracy == 1.0
    assert fractions == pytest.approx(torch.bincount(result.exit_step - 1, minlength=STEPS).double().div(12).tolist())


def test_step_logits_chunks_and_marks_missing_patches(nets, images) -> None:
    engine = _engine(nets)
    whole, selection = engine.step_logits(images)
    chunked, _ = engine.step_logits(images, max_batch=3)
    torch.testing.assert_close(whole, chunked, equal_nan=True)
    assert whole.shape == (len(images), STEPS, NUM_CLASSES)
    assert torch.equal(whole[..., 0].isnan()[:, 1:], ~selection.valid)


def test_random_patch_policy(nets, images) -> None:
    engine = _engine(
        nets, thresholds=(math.inf,) * 4, patch_policy="random", generator=torch.Generator().manual_seed(3)
    )
    calls = []
    engine.anchornet.head.register_forward_hook(lambda m, i, o: calls.append(1))
    result = engine.predict(images)
    assert calls == []
    expected = random_patches(
        engine.receptive_field, (SIZE, SIZE), len(images), K_PATCHES, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(result.boxes, expected.boxes)
    assert result.scores.isnan().all()
    assert engine.step_macs == cumulative_step_macs(0, engine.glance_macs, engine.patch_macs, STEPS)
    assert (result.macs == engine.glance_macs + K_PATCHES * engine.patch_macs).all()


def test_macs_are_measured_and_charged_at_the_input_size(nets, images) -> None:
    anchornet, glance_net, patch_net = nets
    engine = EarlyExitClassifier(anchornet, glance_net, patch_net, (math.inf,) * 4)  # image_size 224
    assert engine.step_macs == cumulative_step_macs(
        count_macs(anchornet, 224), count_macs(glance_net, 95), count_macs(patch_net, 95), STEPS
    )
    result = engine.predict(images, exit_at=2)
    assert (result.macs == count_macs(anchornet, SIZE) + count_macs(glance_net, 95) + count_macs(patch_net, 95)).all()


def test_cumulative_step_macs() -> None:
    assert cumulative_step_macs(60, 700, 750, 5) == [700, 1510, 2260, 3010, 3760]
    assert cumulative_step_macs(60, 700, 750, 1) == [700]
    with pytest.raises(ValueError, match="num_steps"):
        cumulative_step_macs(60, 700, 750, 0)


def test_bad_inputs(nets, images) -> None:
    with pytest.raises(ValueError, match="expected 4 thresholds"):
        _engine(nets, thresholds=(0.5,) * 3)
    with pytest.raises(ValueError, match="NaN"):
        _engine(nets, thresholds=(0.5, math.nan, 0.5, 0.5))
    with pytest.raises(ValueError, match="aggregate"):
        _engine(nets, aggregate="mean")
    with pytest.raises(ValueError, match="patch_policy"):
        _engine(nets, patch_policy="grid")
    engine = _engine(nets)
    with pytest.raises(ValueError, match="expected 4 thresholds"):
        engine.thresholds = [0.5] * 5
    for exit_at in (0, STEPS + 1, 1.5):
        with pytest.raises(ValueError, match=r"exit_at must be an int step in 1\.\.5"):
            engine.predict(images, exit_at=exit_at)
    with pytest.raises(ValueError, match="smaller than the receptive field"):
        engine.predict(images[..., :90, :])


def test_constructor_checks_the_nms_threshold_and_the_classes(nets) -> None:
    anchornet, glance_net, _ = nets
    for iou_threshold in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"iou_threshold must be in \[0, 1\]"):
            _engine(nets, iou_threshold=iou_threshold)
    with pytest.raises(ValueError, match="same classes, got 5 and 7 outputs"):
        _engine((anchornet, glance_net, _tiny_classifier(7).double().eval()))
    feature_map = nn.Conv2d(3, NUM_CLASSES, 5).double()
    with pytest.raises(ValueError, match=r"\(B, num_classes\) logits"):
        _engine((anchornet, glance_net, feature_map))


@pytest.mark.parametrize("patch_policy", ["anchornet", "random"])
def test_empty_batch(nets, images, patch_policy: str) -> None:
    engine = _engine(nets, patch_policy=patch_policy, generator=torch.Generator().manual_seed(0))
    empty = images[:0]
    result = engine.predict(empty)
    assert result.prediction.shape == result.exit_step.shape == result.macs.shape == (0,)
    assert result.logits.shape == (0, NUM_CLASSES) and result.boxes.shape == (0, K_PATCHES, 4)
    outputs, selection = engine.step_logits(empty)
    assert outputs.shape == (0, STEPS, NUM_CLASSES)
    assert selection.boxes.shape == (0, K_PATCHES, 4) and selection.valid.shape == (0, K_PATCHES)


def test_tied_cams_give_the_same_patches_alone_and_in_a_batch(nets) -> None:
    anchornet = nets[0]
    images = torch.rand(16, 3, 224, 224, dtype=torch.float64)  # 16 x 289 cells: batched_nms's other path
    # Class 0 gets zero weights, so its CAM is exactly 0 in every cell; its bias makes it the top-1 of half the images.
    with torch.no_grad():
        nn.init.zeros_(anchornet.classifier.weight[0])
        others = anchornet(images)[:, 1:].amax(dim=1)
        anchornet.classifier.bias[0] = others.median()
        tied = anchornet(images).argmax(dim=1) == 0
    assert 0 < tied.sum() < len(images)
    engine = _engine(nets, thresholds=(math.inf,) * 4, image_size=(224, 224))
    boxes = engine.predict(images).boxes
    first = list(engine.receptive_field.box(0, 0))
    for i in tied.nonzero()[:, 0].tolist():
        alone = engine.predict(images[i : i + 1]).boxes[0]
        assert torch.equal(boxes[i], alone)
        assert alone[0].tolist() == first, "ties go to the lowest cell"


class _Gap(nn.Module):
    """Logits with class 0 ahead of the others by 20..60 (from the top-left pixel): max softmax is 1.0 in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), NUM_CLASSES, dtype=x.dtype)
        logits[:, 0] = 20 + 40 * x[:, 0, 0, 0]
        return logits


def test_confidences_that_round_to_one_exit_by_their_log_odds(images) -> None:
    engine = EarlyExitClassifier(
        anchornet_test(NUM_CLASSES).eval(),
        _Gap(),
        _Gap(),
        ExitThresholds((40.0,) * 4),
        K_PATCHES,
        image_size=(SIZE,) * 2,
    )
    images = images.float()
    glance = _Gap()(resize_square(images, engine.patch_size))
    assert (glance.softmax(dim=-1).amax(dim=-1) == 1.0).all()  # compared as confidences, all would tie
    result = engine.predict(images)
    exited = confidence_log_odds(glance, 1) >= 40.0
    assert 0 < exited.sum() < len(images)
    assert torch.equal(result.exit_step == 1, exited)
    assert (result.exit_step[~exited] == 2).all()  # one patch adds 20 or more
    assert (result.confidence == 1.0).all()  # reported as the confidence it is


def _same_result(got, want) -> None:
    for name in ("prediction", "exit_step", "macs", "patches_available"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for name in ("confidence", "logits", "boxes", "scores"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), equal_nan=True)


def test_thresholds_for_one_call_leave_the_engine_as_it_was(nets, images) -> None:
    engine = _engine(nets)
    mixed = _mixed_thresholds(engine, images)
    got = engine.predict(images, thresholds=mixed)
    assert engine.thresholds.confidences == (0.5,) * 4  # unchanged
    engine.thresholds = mixed
    _same_result(got, engine.predict(images))
    assert len(set(got.exit_step.tolist())) >= 3
    with pytest.raises(ValueError):
        engine.predict(images, thresholds=(0.5,) * 3)  # T - 1 = 4 thresholds


def test_patches_available_says_what_the_selection_offered(nets, images) -> None:
    engine = _engine(nets, iou_threshold=0.3)
    mixed = _mixed_thresholds(engine, images)
    result = engine.predict(images, thresholds=mixed)
    _, selection = engine.step_logits(images)
    at_glance = result.exit_step == 1
    assert at_glance.any() and (~at_glance).any()
    assert (result.patches_available[at_glance] == -1).all()
    assert torch.equal(result.patches_available[~at_glance], selection.num_valid[~at_glance])
    looked = (~result.boxes[..., 0].isnan()).sum(dim=1)
    assert (looked[~at_glance] <= result.patches_available[~at_glance]).all()


class _Counted(nn.Module):
    """``forward`` of another module (or AnchorNet's CAM), its calls counted: a stand-in for a compiled or exported
    copy."""

    def __init__(self, module: nn.Module, cam: bool = False) -> None:
        super().__init__()
        self.module, self.cam, self.calls = module, cam, 0

    def forward(self, x: torch.Tensor):
        self.calls += 1
        return class_activation_map(self.module, x) if self.cam else self.module(x)


def test_run_on_other_modules_gives_the_same_result_and_leaves_the_engine(nets, images) -> None:
    anchornet, glance_net, patch_net = nets
    engine = _engine(nets)
    mixed = _mixed_thresholds(engine, images)
    cam, glance, patch = _Counted(anchornet, cam=True), _Counted(glance_net), _Counted(patch_net)
    other = engine.run_on(cam=cam, glance=glance, patch=patch)
    got = other.predict(images, thresholds=mixed)
    _same_result(got, engine.predict(images, thresholds=mixed))
    patch_steps = int((~got.boxes[..., 0].isnan()).sum(dim=1).max())  # one pass per step anyone reached
    assert (cam.calls, glance.calls, patch.calls) == (1, 1, patch_steps) and patch_steps >= 2
    assert engine.glance_net is glance_net and engine.patch_net is patch_net and engine.cam_net is None
    assert (other.glance_macs, other.patch_macs, other.step_macs, other.thresholds) == (
        engine.glance_macs,
        engine.patch_macs,
        engine.step_macs,
        engine.thresholds,
    )
    with pytest.raises(ValueError, match="no fallback step"):
        engine.run_on(fallback=glance_net)


def test_run_on_shares_no_hooks_and_counts_macs_on_the_originals(nets, images) -> None:
    """A hook on the copy does not fire on the engine; the fallback's MACs at a new image size are counted on the
    original network, not on the module that runs it (an exported copy would count 0)."""
    anchornet, glance_net, patch_net = nets
    fallback_net = _tiny_classifier().double().eval()
    engine = EarlyExitClassifier(anchornet, glance_net, patch_net, (1.0,) * 5, K_PATCHES, fallback_net=fallback_net)
    runs = _Counted(fallback_net)
    other = engine.run_on(fallback=runs)
    fired: list[str] = []
    other.register_forward_hook(lambda *_: fired.append("copy"))
    engine.predict(images)
    assert fired == []
    result = other.predict(images)  # at SIZE = 160, a size the constructor (224) did not count
    assert runs.calls == 1  # the fallback pass, and no pass for counting
    costs, looked = _costs(nets), (~result.boxes[..., 0].isnan()).sum(dim=1)
    fallback_at_size = count_macs(fallback_net, SIZE)
    assert (result.exit_step == K_PATCHES + 2).all()
    assert result.macs.tolist() == [
        costs["anchornet"] + costs["glance"] + int(n) * costs["patch"] + fallback_at_size for n in looked
    ]
