"""Budgeted batch classification: threshold fitting on hand-built tables, the q sweep, JSON persistence."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from anchornet import (
    BudgetPoint,
    EarlyExitClassifier,
    ExitThresholds,
    StepTable,
    anchornet_test,
    anytime_accuracy,
    anytime_macs,
    budgeted_search,
    collect_step_table,
    confidence_log_odds,
    evaluate_thresholds,
    fit_thresholds,
    load_thresholds,
    save_thresholds,
)
from anchornet.early_exit import step_contribution
from anchornet.thresholds import DEFAULT_QS

pytestmark = pytest.mark.math

STEP_MACS = [10, 30, 50]


def _hand_table(last_step: list[int] | None = None) -> StepTable:
    """Ten samples, three steps; see the expected fits in the tests below."""
    step1 = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5]
    step2 = [0.99, 0.99, 0.99, 0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.95]
    step3 = [0.5] * 10
    correct = torch.zeros(10, 3, dtype=torch.bool)
    correct[[0, 1], 0] = True  # sample 2 wrong at step 1
    correct[[4, 6], 1] = True  # sample 9 wrong at step 2
    correct[3, 2] = True
    return StepTable(
        confidence=torch.tensor([step1, step2, step3]).T,
        correct=correct,
        last_step=torch.tensor(last_step) if last_step is not None else None,
    )


def test_fit_and_evaluate_by_hand() -> None:
    table = _hand_table()
    thresholds = fit_thresholds(table, [0.3, 0.3, 0.4])  # 3, 3 and 4 exits
    assert thresholds.confidences == (pytest.approx(0.85), pytest.approx(0.8))
    assert table.exit_steps(thresholds).tolist() == [1, 1, 1, 3, 2, 3, 2, 3, 3, 2]
    macs, accuracy, fractions = evaluate_thresholds(table, thresholds, STEP_MACS)
    assert macs == pytest.approx((3 * 10 + 3 * 30 + 4 * 50) / 10)
    assert accuracy == pytest.approx(0.5)  # samples 0, 1, 4, 6 and 3
    assert fractions == pytest.approx([0.3, 0.3, 0.4])


def test_proportions_are_normalised() -> None:
    table = _hand_table()
    assert fit_thresholds(table, [3, 3, 4]) == fit_thresholds(table, [0.3, 0.3, 0.4])


def test_fit_edge_cases() -> None:
    table = _hand_table()
    assert fit_thresholds(table, [0.0, 0.5, 0.5]).log_odds[0] == math.inf  # floor(N p_1) = 0: nobody exits
    thresholds = fit_thresholds(table, [1.0, 0.0, 0.0])
    assert thresholds.confidences[0] == pytest.approx(0.5)  # everyone at step 1, nobody left
    assert thresholds.log_odds[1] == math.inf
    assert evaluate_thresholds(table, thresholds, STEP_MACS)[2] == [1.0, 0.0, 0.0]
    assert fit_thresholds(table, [0.05, 0.05, 0.9]).log_odds == (math.inf, math.inf)  # floor(0.5) = 0

    tied = StepTable(confidence=torch.full((10, 3), 0.5), correct=torch.ones(10, 3, dtype=torch.bool))
    thresholds = fit_thresholds(tied, [0.5, 0.5, 0.0])
    assert thresholds.log_odds == (0.0, math.inf)  # ties exit together, then nobody is left
    assert evaluate_thresholds(tied, thresholds, STEP_MACS)[2] == [1.0, 0.0, 0.0]


def test_samples_without_more_patches_exit_first() -> None:
    last_step = [3] * 10
    last_step[3] = 2  # sample 3 (conf 0.1 at step 2) has no second patch
    table = _hand_table(last_step)
    thresholds = fit_thresholds(table, [0.3, 0.3, 0.4])
    assert thresholds.confidences == (pytest.approx(0.85), pytest.approx(0.9))  # sample 3 takes the first place
    assert table.exit_steps(thresholds).tolist() == [1, 1, 1, 2, 2, 3, 3, 3, 3, 2]
    assert table.exit_steps((math.inf, math.inf)).tolist() == [3, 3, 3, 2, 3, 3, 3, 3, 3, 3]

    last_step[9] = 1
    thresholds = fit_thresholds(_hand_table(last_step), [0.3, 0.3, 0.4])
    assert thresholds.confidences[0] == pytest.approx(0.9)


def test_from_logits_accumulates() -> None:
    log3 = math.log(3.0)
    logits = torch.tensor(
        [
            [[0.0, 0.0], [log3, 0.0], [0.0, 10.0]],
            [[0.0, 0.0], [0.0, log3], [math.nan, math.nan]],
        ]
    )
    labels = torch.tensor([0, 1])
    table = StepTable.from_logits(logits, labels)
    assert table.last_step.tolist() == [3, 2]
    torch.testing.assert_close(table.confidence[:, :2], torch.tensor([[0.5, 0.75], [0.5, 0.75]]))
    assert table.prediction[:, 1:].tolist() == [[0, 1], [1, 1]]
    assert table.correct[:, 1:].tolist() == [[True, False], [True, True]]

    probs = StepTable.from_logits(logits, labels, aggregate="probs")
    torch.testing.assert_close(probs.confidence[1], torch.tensor([0.5, 0.625, 0.625]))  # mean of [.5, .75]
    assert anytime_accuracy(probs) == pytest.approx([0.5, 1.0, 0.5])


def test_the_table_adds_steps_as_the_engine_does() -> None:
    """``z_t = z_{t-1} + f(x_t)`` in the outputs' dtype, one addition per step, bit for bit as the engine and Serve
    add them (a float64 running sum, as ``cumsum`` keeps on the CPU, differs in the last bit: an exit at rho moves)."""
    torch.manual_seed(0)
    logits = torch.randn(1000, 5, 10) * 5
    for aggregate in ("logits", "probs"):
        table = StepTable.from_logits(logits, torch.zeros(1000, dtype=torch.long), aggregate)
        z = step_contribution(logits[:, 0], aggregate)
        for t in range(1, 6):
            if t > 1:
                z = z + step_contribution(logits[:, t - 1], aggregate)
            assert torch.equal(table.log_odds[:, t - 1], confidence_log_odds(z, t, aggregate)), (aggregate, t)


def test_anytime_accuracy() -> None:
    assert anytime_accuracy(_hand_table()) == pytest.approx([0.2, 0.2, 0.1])


def test_anytime_macs_charge_a_sample_only_up_to_its_last_step() -> None:
    assert anytime_macs(_hand_table(), STEP_MACS) == [10.0, 30.0, 50.0]
    last_step = [3] * 10
    last_step[3], last_step[9] = 2, 1  # no second patch; no patch at all
    assert anytime_macs(_hand_table(last_step), STEP_MACS) == pytest.approx([10.0, 28.0, 44.0])
    with pytest.raises(ValueError, match="expected 3 step costs"):
        anytime_macs(_hand_table(), STEP_MACS[:2])


def _random_table(num: int = 400, steps: int = 5) -> StepTable:
    confidence = torch.rand(num, steps, dtype=torch.float64).sort(dim=1).values  # more confident later
    correct = torch.rand(num, steps) < torch.linspace(0.5, 0.9, steps)
    return StepTable(confidence=confidence, correct=correct)


def test_budgeted_search_moves_cost_with_q() -> None:
    val, test = _random_table(), _random_table()
    step_macs = [100, 260, 330, 400, 470]
    points = budgeted_search(val, test, step_macs)
    assert [p.q for p in points] == list(DEFAULT_QS)
    assert points[0].name == "q=0.05" and points[-1].name == "q=1.95"
    coarse = [p.expected_macs for p in points if p.q in (0.05, 0.5, 1.0, 1.5, 1.95)]
    assert coarse == sorted(coarse) and len(set(coarse)) == 5
    assert points[0].exit_fractions[0] > 0.9 and points[-1].exit_fractions[-1] > 0.4
    for p in points:
        assert len(p.thresholds) == 4 and sum(p.exit_fractions) == pytest.approx(1.0)
        assert step_macs[0] <= p.expected_macs <= step_macs[-1]


def test_fitted_proportions_hold_on_the_fitting_table() -> None:
    table = _random_table(num=200)
    for q in (0.5, 1.0, 1.5):
        (point,) = budgeted_search(table, table, [1, 2, 3, 4, 5], qs=[q])
        p = torch.tensor([q**k for k in range(1, 6)], dtype=torch.float64)
        counts = (200 * p / p.sum() + 1e-9).floor()
        counts[-1] = 200 - counts[:-1].sum()  # the floors' remainder ends at the last step
        assert point.exit_fractions == pytest.approx((counts / 200).tolist())


def test_json_round_trip_with_infinities(tmp_path) -> None:
    points = budgeted_search(_random_table(100), _random_table(100), [1, 2, 3, 4, 5], qs=[0.05, 1.0])
    points.append(BudgetPoint(name="never exit", thresholds=(math.inf,) * 4))
    points.append(BudgetPoint(name="glance only", thresholds=(-math.inf, 0.0, 0.5, 1.0), accuracy=0.7))
    path = tmp_path / "thresholds.json"
    save_thresholds(points, path)
    text = path.read_text()
    assert '"inf"' in text and '"-inf"' in text and "Infinity" not in text
    json.loads(text)  # strict JSON
    loaded = load_thresholds(path)
    assert list(loaded) == ["q=0.05", "q=1.00", "never exit", "glance only"]
    assert list(loaded.values()) == points

    save_thresholds({"fast": [0.5, 0.6, 0.7, math.inf]}, path)
    assert load_thresholds(path)["fast"] == BudgetPoint(name="fast", thresholds=(0.5, 0.6, 0.7, math.inf))
    entry = json.loads(path.read_text())["budgets"][0]
    assert entry["thresholds"] == [0.5, pytest.approx(0.6), pytest.approx(0.7), 1.0]  # for reading
    assert entry["log_odds"] == [0.0, pytest.approx(math.log(1.5)), pytest.approx(math.log(7 / 3)), "inf"]


def test_a_file_records_the_cascade_it_was_fitted_for(tmp_path) -> None:
    """``num_patches`` and ``fallback`` travel with the file into every budget; each budget must have that cascade's
    count of thresholds, on save and on load; files without them load with both None."""
    path = tmp_path / "thresholds.json"
    save_thresholds({"a": [0.5, 0.6, 0.7], "b": [0.1, 0.2, 0.3]}, path, num_patches=2, fallback=True)
    document = json.loads(path.read_text())
    assert (document["num_patches"], document["fallback"]) == (2, True)
    assert {(p.num_patches, p.fallback) for p in load_thresholds(path).values()} == {(2, True)}
    save_thresholds({"a": [0.5, 0.6, 0.7]}, path, num_patches=3, fallback=False)
    assert load_thresholds(path)["a"].fallback is False
    with pytest.raises(ValueError, match=r"budget 'a' has 3 thresholds, num_patches=2 needs 2"):
        save_thresholds({"a": [0.5, 0.6, 0.7]}, path, num_patches=2, fallback=False)
    save_thresholds(list(load_thresholds(path).values()), path)  # loaded budgets keep their record
    assert (load_thresholds(path)["a"].num_patches, load_thresholds(path)["a"].fallback) == (3, False)
    for num_patches, fallback in [(0, False), (True, False), (None, True), (3, "yes")]:
        with pytest.raises(ValueError, match=r"num_patches|fallback"):
            save_thresholds({"a": [0.5, 0.6, 0.7]}, path, num_patches=num_patches, fallback=fallback)
    save_thresholds({"a": [0.5, 0.6, 0.7]}, path)
    assert (load_thresholds(path)["a"].num_patches, load_thresholds(path)["a"].fallback) == (None, None)
    for bad, match in [
        ({"num_patches": 4}, "needs 4"),  # edited by hand: the count no longer fits
        ({"num_patches": 0}, "positive integer"),
        ({"num_patches": True}, "positive integer"),
        ({"num_patches": 3, "fallback": "yes"}, "true or false"),
        ({"fallback": True}, "only with num_patches"),
    ]:
        document = json.loads(path.read_text())
        path.write_text(json.dumps({**document, **bad}))
        with pytest.raises(ValueError, match=match) as err:
            load_thresholds(path)
        assert "\n" not in str(err.value)
        save_thresholds({"a": [0.5, 0.6, 0.7]}, path)


def test_version_1_files_hold_confidences(tmp_path) -> None:
    path = tmp_path / "v1.json"
    budgets = [{"name": "old", "thresholds": [0.9, 0.0, 0.99, "inf"], "q": 0.5}]
    path.write_text(json.dumps({"format": "anchornet.thresholds", "version": 1, "budgets": budgets}))
    (point,) = load_thresholds(path).values()
    assert point.thresholds.log_odds == (pytest.approx(math.log(9)), -math.inf, pytest.approx(math.log(99)), math.inf)
    assert point.q == 0.5
    # A threshold of 1.0 relied on float32 confidences rounding to 1.0: read now, it would let no one out.
    budgets.append({"name": "q=1.95", "thresholds": [1.0, 1.0, 1.0, 0.965]})
    path.write_text(json.dumps({"format": "anchornet.thresholds", "version": 1, "budgets": budgets}))
    with pytest.raises(ValueError, match=r"budget 'q=1\.95' .*threshold of 1\.0,.*re-run jobs/evaluate\.py"):
        load_thresholds(path)
    # A hand-written version 2 budget may give confidences instead of log-odds.
    path.write_text(json.dumps({"format": "anchornet.thresholds", "version": 2, "budgets": budgets}))
    assert load_thresholds(path)["q=1.95"].thresholds.log_odds[:3] == (math.inf,) * 3


def _saturated_table(num: int = 100) -> StepTable:
    """Two steps; at step 1 the top logit leads by 20 + i / 10 for sample i: every float32 confidence is 1.0."""
    gaps = 20.0 + torch.arange(num, dtype=torch.float32) / 10
    glance = torch.stack([gaps, torch.zeros(num)], dim=1)
    logits = torch.stack([glance, torch.zeros(num, 2)], dim=1)  # step 2 adds nothing
    return StepTable.from_logits(logits, torch.zeros(num, dtype=torch.long))


def test_confidences_that_round_to_one_stay_apart() -> None:
    table = _saturated_table()
    assert (table.confidence[:, 0] == 1.0).all()  # max softmax cannot tell these samples apart
    torch.testing.assert_close(table.log_odds[:, 0], 20.0 + torch.arange(100.0) / 10)
    for wanted in (1, 7, 30, 64):
        thresholds = fit_thresholds(table, [wanted, 100 - wanted])
        assert thresholds.log_odds[0] == pytest.approx(20.0 + (100 - wanted) / 10)  # the wanted-th largest gap
        _, _, fractions = evaluate_thresholds(table, thresholds, [1, 2])
        assert fractions == pytest.approx([wanted / 100, 1 - wanted / 100])  # as asked, not all at once
    # what the same fit gave before: ranking confidences, a threshold of 1.0 let all 100 samples exit at step 1
    assert (table.confidence[:, 0] >= 1.0).float().mean() == 1.0


def test_tables_decide_in_the_scores_dtype_as_the_engine_does() -> None:
    """log(0.7 / 0.3) is not a float32; a float32 score equal to its float32 rounding (just below it) exits in the
    engine and in Serve (a float32 tensor against a Python float), so it must exit in the table too."""
    rho = ExitThresholds.from_confidences([0.7])
    score = torch.tensor(rho.log_odds[0], dtype=torch.float32)
    assert float(score) < rho.log_odds[0]
    logits = torch.stack([torch.stack([score, torch.tensor(0.0)]), torch.zeros(2)])[None]  # (1, 2 steps, 2 classes)
    assert bool(confidence_log_odds(logits[0, :1], 1) >= rho.log_odds[0])  # the engine's comparison
    assert StepTable.from_logits(logits, torch.zeros(1, dtype=torch.long)).exit_steps(rho).tolist() == [1]


def test_a_threshold_of_one_exits_no_one() -> None:
    table = _saturated_table()
    assert table.exit_steps([1.0]).tolist() == [2] * 100  # softmax of finite logits never reaches 1
    assert table.exit_steps([0.0]).tolist() == [1] * 100
    assert table.exit_steps([math.inf]).tolist() == [2] * 100


def test_bad_inputs(tmp_path) -> None:
    table = _hand_table()
    with pytest.raises(ValueError, match="expected 3 exit proportions"):
        fit_thresholds(table, [0.5, 0.5])
    with pytest.raises(ValueError, match="non-negative"):
        fit_thresholds(table, [0.5, -0.1, 0.6])
    with pytest.raises(ValueError, match="expected 2 thresholds"):
        evaluate_thresholds(table, [0.5], STEP_MACS)
    with pytest.raises(ValueError, match="expected 3 step costs"):
        evaluate_thresholds(table, [0.5, 0.5], STEP_MACS[:2])
    with pytest.raises(ValueError, match="last_step"):
        StepTable(
            confidence=torch.rand(2, 3), correct=torch.ones(2, 3, dtype=torch.bool), last_step=torch.tensor([0, 3])
        )
    with pytest.raises(ValueError, match="unique"):
        save_thresholds([BudgetPoint("a", (0.5,)), BudgetPoint("a", (0.6,))], tmp_path / "t.json")
    with pytest.raises(ValueError, match="NaN"):
        evaluate_thresholds(table, [0.5, math.nan], STEP_MACS)
    (tmp_path / "other.json").write_text('{"budgets": []}')
    with pytest.raises(ValueError, match=r"not an anchornet\.thresholds file"):
        load_thresholds(tmp_path / "other.json")
    head = '{"format": "anchornet.thresholds", "version": 2'
    for body, message in (
        ("", "'budgets' must be a list"),
        (', "budgets": [{"name": "x"}]', "budget 'x' needs a list of 'log_odds' or of 'thresholds'"),
        (', "budgets": [{"log_odds": [1.0]}]', "budget 1 must be a mapping with a 'name'"),
        (', "budgets": [', "is not JSON"),
    ):
        (tmp_path / "bad.json").write_text(head + body + "}")
        with pytest.raises(ValueError, match=r"bad\.json.*" + message) as refused:
            load_thresholds(tmp_path / "bad.json")
        assert "\n" not in str(refused.value)


@pytest.mark.model
def test_collect_step_table_matches_anytime_predictions() -> None:
    def tiny() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 5, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    engine = EarlyExitClassifier(
        anchornet_test(3), tiny(), tiny(), [0.5], num_patches=1, image_size=(128, 128)
    ).double()
    engine.eval()
    batches = [(torch.rand(n, 3, 128, 128, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (3, 4)]
    table = collect_step_table(engine, batches, max_batch=2)
    assert (table.num_samples, table.num_steps) == (7, 2)
    for t in (1, 2):
        predictions = torch.cat([engine.predict(images, exit_at=t).prediction for images, _ in batches])
        labels = torch.cat([labels for _, labels in batches])
        assert anytime_accuracy(table)[t - 1] == pytest.approx((predictions == labels).double().mean().item())
