"""Budgeted batch classification (MSDNet's protocol, REFERENCE section 5): exit thresholds fit on a held-out split.

A ``StepTable`` holds, for each of ``N`` held-out samples and each step ``t = 1..T``, the confidence and the
prediction of the accumulated ``z_t``. For exit proportions ``p_k`` (``k = 1..T``), ``fit_thresholds`` picks
``rho_k`` as the confidence of the ``floor(N p_k)``-th most confident sample not yet exited at an earlier step;
``budgeted_search`` sweeps ``p_k ∝ q^k`` and evaluates each fit on a *different* (test) table.

Confidences are ranked and compared as log-odds (``anchornet.early_exit.confidence_log_odds``): in float32 most
samples' ``max softmax`` of summed logits rounds to exactly 1 after a step or two, and a threshold of 1 would let
all of them exit together whatever ``p_k`` asks. Thresholds are saved as log-odds too (file version 2).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from anchornet import storage
from anchornet.early_exit import (
    Aggregate,
    EarlyExitClassifier,
    ExitThresholds,
    accumulated_confidence,
    check_thresholds,
    confidence_log_odds,
    log_odds_of,
    step_contribution,
)

__all__ = [
    "DEFAULT_QS",
    "BudgetPoint",
    "StepTable",
    "anytime_accuracy",
    "anytime_macs",
    "budgeted_search",
    "collect_step_table",
    "evaluate_thresholds",
    "exit_counts",
    "fit_thresholds",
    "load_thresholds",
    "save_thresholds",
]

#: The standard sweep q = 0.05, 0.10, ..., 1.95.
DEFAULT_QS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 40))

_FORMAT = "anchornet.thresholds"
_VERSION = 2  # 1: thresholds as confidences only (read as such)


@dataclass(frozen=True)
class StepTable:
    """Per-sample, per-step outcomes of the early-exit engine on ``N`` samples and ``T`` steps.

    Attributes:
        confidence: confidence of ``z_t``, ``(N, T)`` (see ``accumulated_confidence``).
        correct: whether ``argmax z_t`` is the label, bool ``(N, T)``.
        prediction: ``argmax z_t``, ``(N, T)``; optional for hand-built tables.
        last_step: the last step each sample can reach, ``(N,)`` in ``1..T`` (``1 + num_valid`` patches; ``T``
            when omitted). A sample exits there whatever its confidence; its columns past it repeat it.
        log_odds: ``log(c / (1 - c))`` of the confidence, ``(N, T)``, what exits are ranked and decided on
            (``confidence_log_odds``: exact where ``c`` rounds to 1); computed from ``confidence`` (float64) when
            omitted, as for hand-built tables.
        patch_steps: tables with a fallback step only (``from_logits(fallback=True)``): the last step before the
            fallback that each sample reaches, ``(N,)`` in ``1..T-1`` (``1 + num_valid`` patches), which is what
            its patches cost (``step_costs``); None for tables without a fallback step.
    """

    confidence: torch.Tensor
    correct: torch.Tensor
    prediction: torch.Tensor | None = None
    last_step: torch.Tensor | None = None
    log_odds: torch.Tensor | None = None
    patch_steps: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.confidence.dim() != 2 or self.correct.shape != self.confidence.shape:
            raise ValueError(
                f"confidence and correct must both be (N, T), got {tuple(self.confidence.shape)} "
                f"and {tuple(self.correct.shape)}"
            )
        if self.prediction is not None and self.prediction.shape != self.confidence.shape:
            raise ValueError(f"prediction must be (N, T), got {tuple(self.prediction.shape)}")
        object.__setattr__(self, "correct", self.correct.bool())
        num, steps = self.confidence.shape
        if self.last_step is None:
            object.__setattr__(self, "last_step", torch.full((num,), steps, dtype=torch.long))
        last_step = self.last_step.to(self.confidence.device, torch.long)
        if last_step.shape != (num,) or (last_step < 1).any() or (last_step > steps).any():
            raise ValueError(f"last_step must be (N,) with values in 1..{steps}")
        object.__setattr__(self, "last_step", last_step)
        if self.log_odds is None:
            object.__setattr__(self, "log_odds", log_odds_of(self.confidence.double()))
        elif self.log_odds.shape != self.confidence.shape:
            raise ValueError(f"log_odds must be (N, T), got {tuple(self.log_odds.shape)}")
        if self.patch_steps is not None:
            patch_steps = self.patch_steps.to(self.confidence.device, torch.long)
            if patch_steps.shape != (num,) or (patch_steps < 1).any() or (patch_steps > steps - 1).any():
                raise ValueError(f"patch_steps must be (N,) with values in 1..{steps - 1}")
            object.__setattr__(self, "patch_steps", patch_steps)

    @property
    def num_samples(self) -> int:
        return self.confidence.shape[0]

    @property
    def num_steps(self) -> int:
        return self.confidence.shape[1]

    @classmethod
    def from_logits(
        cls,
        step_logits: torch.Tensor,
        labels: torch.Tensor,
        aggregate: Aggregate = "logits",
        *,
        fallback: bool = False,
    ) -> StepTable:
        """Accumulate raw per-step outputs ``f(x_t)``, ``(N, T, num_classes)`` as ``step_logits`` returns them.

        ``z_t = sum_{s <= t} f(x_s)`` (logits) or ``sum softmax(f(x_s))`` (``aggregate="probs"``). Steps whose
        row holds NaN (no valid patch) end the sample: ``last_step`` is the count of leading finite steps.

        ``fallback=True``: the last step is the fallback network (``EarlyExitClassifier(fallback_net=...)``), decided
        by its own output alone and reached by every sample (``last_step = T``). A sample out of patches goes on to
        it: its patch steps past the last valid one repeat that one's outcome (what anytime mode reports) with
        log-odds ``-inf``: no threshold makes it exit there (``exit_steps`` and ``fit_thresholds`` skip them), as
        the engine sends it on to the fallback.
        """
        if step_logits.dim() != 3 or labels.shape != step_logits.shape[:1]:
            raise ValueError(
                f"expected step_logits (N, T, C) and labels (N,), got {tuple(step_logits.shape)} "
                f"and {tuple(labels.shape)}"
            )
        if fallback:
            if step_logits.shape[1] < 2:
                raise ValueError("a table with a fallback step needs at least 2 steps")
            last = step_logits[:, -1]
            if torch.isnan(last).any():
                raise ValueError("the fallback step must be finite for every sample")
            table = cls.from_logits(step_logits[:, :-1], labels, aggregate)
            steps = torch.arange(1, table.num_steps + 1, device=table.log_odds.device)
            log_odds = table.log_odds.masked_fill(steps > table.last_step[:, None], -math.inf)
            z = step_contribution(last, aggregate)
            confidence, prediction = accumulated_confidence(z, 1, aggregate)
            correct = prediction == labels.to(prediction.device)
            return cls(
                confidence=torch.cat([table.confidence, confidence[:, None].to(table.confidence.dtype)], 1),
                correct=torch.cat([table.correct, correct[:, None]], 1),
                prediction=torch.cat([table.prediction, prediction[:, None]], 1),
                log_odds=torch.cat([log_odds, confidence_log_odds(z, 1, aggregate)[:, None].to(log_odds.dtype)], 1),
                patch_steps=table.last_step,
            )
        available = (~torch.isnan(step_logits).any(dim=-1)).long().cumprod(dim=1).bool()
        last_step = available.sum(dim=1)
        if (last_step < 1).any():
            raise ValueError("step 1 (the glance) must be finite for every sample")
        dtype = torch.promote_types(step_logits.dtype, torch.float32)
        outputs = torch.where(available[..., None], step_logits.to(dtype), 0.0)
        if aggregate == "probs":
            outputs = outputs.softmax(dim=-1) * available[..., None]
        z = _running_sum(outputs)
        steps_seen = available.cumsum(dim=1).clamp(min=1)
        confidence, prediction = accumulated_confidence(z, steps_seen, aggregate)
        log_odds = confidence_log_odds(z, steps_seen, aggregate)
        correct = prediction == labels.to(prediction.device)[:, None]
        return cls(
            confidence=confidence, correct=correct, prediction=prediction, last_step=last_step, log_odds=log_odds
        )

    @classmethod
    def concat(cls, tables: Sequence[StepTable]) -> StepTable:
        """Stack the samples of several tables with the same number of steps (all with a fallback step or none)."""
        if not tables:
            raise ValueError("no tables to concatenate")
        if len({t.patch_steps is None for t in tables}) > 1:
            raise ValueError("cannot concatenate tables with and without a fallback step")
        predictions = [t.prediction for t in tables]
        return cls(
            confidence=torch.cat([t.confidence for t in tables]),
            correct=torch.cat([t.correct for t in tables]),
            prediction=None if any(p is None for p in predictions) else torch.cat(predictions),
            last_step=torch.cat([t.last_step for t in tables]),
            log_odds=torch.cat([t.log_odds for t in tables]),
            patch_steps=None if tables[0].patch_steps is None else torch.cat([t.patch_steps for t in tables]),
        )

    def cpu(self) -> StepTable:
        """The same table with every tensor on the CPU."""
        return StepTable(**{f.name: _on_cpu(getattr(self, f.name)) for f in fields(self)})

    def step_costs(self, step_macs: Sequence[int]) -> torch.Tensor:
        """MACs each sample spends when it exits at step ``t = 1..T``, ``(N, T)`` float64, as the engine charges it
        (``sample_macs``): past its last step a sample has stopped there and pays that step. With a fallback step
        it pays its own patches (``patch_steps``) and then the fallback network: ``C(T) - C(T - 1)`` on top. (A
        sample with no valid patch at all, which only an empty CAM grid gives, is charged without AnchorNet: the
        cumulative costs do not separate it from the first patch.)"""
        if len(step_macs) != self.num_steps:
            raise ValueError(f"expected {self.num_steps} step costs, got {len(step_macs)}")
        device = self.last_step.device
        costs = torch.tensor([float(c) for c in step_macs], dtype=torch.float64, device=device)
        steps = torch.arange(1, self.num_steps + 1, device=device)
        if self.patch_steps is None:
            return costs[torch.minimum(steps[None, :], self.last_step[:, None]) - 1]
        paid = costs[torch.minimum(steps[None, :], self.patch_steps[:, None]) - 1]
        paid[:, -1] = costs[self.patch_steps - 1] + (costs[-1] - costs[-2])
        return paid

    def exit_steps(self, thresholds: Sequence[float] | ExitThresholds) -> torch.Tensor:
        """1-based exit step of every sample under ``rho_1..rho_{T-1}``, ``(N,)`` (Alg. 1, ``confidence >= rho``,
        compared as log-odds)."""
        rho = check_thresholds(thresholds, self.num_steps).log_odds
        steps = torch.arange(1, self.num_steps + 1, device=self.confidence.device)
        # in the scores' own dtype, as the engine and Serve compare a float32 score with a threshold
        rho = torch.tensor([*rho, -math.inf], dtype=self.log_odds.dtype, device=self.confidence.device)
        # log-odds -inf mark the patch steps a sample of a fallback table does not have: no threshold exits it there
        exits = ((self.log_odds >= rho) & (self.log_odds > -math.inf)) | (steps >= self.last_step[:, None])
        exits[:, -1] = True
        return exits.long().argmax(dim=1) + 1


@dataclass(frozen=True)
class BudgetPoint:
    """One named budget: thresholds and, when fitted by ``budgeted_search``, what they gave on the test table.

    Attributes:
        name: how a deployment picks it, e.g. ``"q=0.50"``.
        thresholds: ``rho_1..rho_{T-1}`` as ``ExitThresholds`` (given as confidences, they are converted).
        q: the proportion ratio of the search, ``p_k ∝ q^k``.
        expected_macs: mean MACs per sample on the test table.
        accuracy: top-1 accuracy on the test table, in ``[0, 1]``.
        exit_fractions: fraction of test samples exiting at each step ``t = 1..T``.
        num_patches, fallback: the cascade the thresholds were fitted for, as ``load_thresholds`` reads them from
            a file that records it (``save_thresholds(..., num_patches=, fallback=)``); None: not recorded.
    """

    name: str
    thresholds: ExitThresholds
    q: float | None = None
    expected_macs: float | None = None
    accuracy: float | None = None
    exit_fractions: tuple[float, ...] | None = None
    num_patches: int | None = None
    fallback: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.thresholds, ExitThresholds):  # confidences, as a hand-written budget gives them
            object.__setattr__(self, "thresholds", ExitThresholds.from_confidences(self.thresholds))


def collect_step_table(
    engine: EarlyExitClassifier,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    max_batch: int | None = None,
) -> StepTable:
    """Run ``engine.step_logits`` on every ``(images, labels)`` batch; the table is gathered on the CPU.

    Images go to the device of the caller's choosing beforehand; labels are moved next to the outputs.
    """
    tables = []
    for images, labels in batches:
        outputs, _ = engine.step_logits(images, max_batch=max_batch)
        table = StepTable.from_logits(
            outputs, labels.to(outputs.device), engine.aggregate, fallback=engine.has_fallback
        )
        tables.append(table.cpu())
    return StepTable.concat(tables)


def _on_cpu(value: torch.Tensor | None) -> torch.Tensor | None:
    return None if value is None else value.cpu()


def _running_sum(outputs: torch.Tensor) -> torch.Tensor:
    """``z_t = z_{t-1} + f(x_t)`` along dim 1, one float addition per step as the engine and Serve add them
    (``cumsum`` on the CPU accumulates float32 in float64: a last bit apart, which can move an exit at rho)."""
    running = [outputs[:, 0]]
    for t in range(1, outputs.shape[1]):
        running.append(running[-1] + outputs[:, t])
    return torch.stack(running, dim=1)


def anytime_accuracy(table: StepTable) -> list[float]:
    """Anytime protocol: accuracy when every sample exits at step ``t``, for ``t = 1..T`` (at most its last step)."""
    return table.correct.double().mean(dim=0).tolist()


def anytime_macs(table: StepTable, step_macs: Sequence[int]) -> list[float]:
    """Anytime protocol: mean MACs per sample when every sample exits at step ``t``, for ``t = 1..T``; a sample
    with fewer patches stops at its last step and pays for that one (as ``anytime_accuracy`` reads it there), and
    with a fallback step pays only its own patches before it (``StepTable.step_costs``)."""
    return table.step_costs(step_macs).mean(dim=0).tolist()


def exit_counts(num_samples: int, p_exit: Sequence[float]) -> list[int]:
    """``floor(N p_k)`` for proportions ``p_k`` normalised to sum to one (a 1e-9 slack absorbs rounding)."""
    p = torch.as_tensor(p_exit, dtype=torch.float64)
    if p.dim() != 1 or not torch.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"exit proportions must be finite, non-negative and not all zero, got {list(p_exit)}")
    p = p / p.sum()
    return [math.floor(num_samples * float(pk) + 1e-9) for pk in p]


def fit_thresholds(table: StepTable, p_exit: Sequence[float]) -> ExitThresholds:
    """``rho_1..rho_{T-1}`` that make ``floor(N p_k)`` held-out samples exit at step ``k`` (MSDNet's rule).

    ``rho_k`` is the confidence of the ``n_k = floor(N p_k)``-th most confident sample among those that did not
    exit before step ``k`` (ranked and returned as log-odds, ``table.log_odds``, so that confidences that round to
    1 stay apart); samples tied with it exit too. ``rho_T = -inf`` is implied and not returned.
    Edge cases: ``n_k = 0`` or nobody left gives ``rho_k = +inf`` (no exit); fewer than ``n_k`` left gives the
    least confident of them (all exit). Samples whose ``last_step`` is ``k`` must exit there and take their
    places among the ``n_k`` first.

    Args:
        p_exit: ``T`` non-negative proportions ``p_1..p_T``, normalised here.
    """
    steps = table.num_steps
    if len(p_exit) != steps:
        raise ValueError(f"expected {steps} exit proportions p_1..p_{steps}, got {len(p_exit)}")
    counts = exit_counts(table.num_samples, p_exit)
    remaining = torch.ones(table.num_samples, dtype=torch.bool, device=table.confidence.device)
    thresholds: list[float] = []
    for k in range(1, steps):
        score = table.log_odds[:, k - 1]
        forced = table.last_step == k
        present = score > -math.inf  # not a missing patch step of a fallback table (StepTable.from_logits)
        ranked = torch.where(forced, math.inf, score)[remaining & (present | forced)].sort(descending=True).values
        wanted = counts[k - 1]
        rho = math.inf if wanted == 0 or ranked.numel() == 0 else float(ranked[min(wanted, ranked.numel()) - 1])
        thresholds.append(rho)
        remaining &= ~(((score >= rho) & present) | forced)
    return ExitThresholds(tuple(thresholds))


def evaluate_thresholds(
    table: StepTable, thresholds: Sequence[float] | ExitThresholds, step_macs: Sequence[int]
) -> tuple[float, float, list[float]]:
    """Apply ``rho_1..rho_{T-1}`` to a table.

    Args:
        step_macs: cumulative MACs of exiting at ``t = 1..T`` (``EarlyExitClassifier.step_macs``).

    Returns:
        ``(expected_macs, accuracy, exit_fractions)``: mean MACs per sample, top-1 accuracy in ``[0, 1]`` and
        the fraction of samples exiting at each step ``t = 1..T``.
    """
    costs = table.step_costs(step_macs)
    exit_step = table.exit_steps(thresholds)
    index = (exit_step - 1)[:, None]
    accuracy = table.correct.gather(1, index).double().mean()
    fractions = torch.bincount(exit_step - 1, minlength=table.num_steps).double() / table.num_samples
    return float(costs.gather(1, index).mean()), float(accuracy), fractions.tolist()


def budgeted_search(
    val_table: StepTable,
    test_table: StepTable,
    step_macs: Sequence[int],
    qs: Sequence[float] = DEFAULT_QS,
) -> list[BudgetPoint]:
    """MSDNet's sweep: for each ``q``, ``p_k ∝ q^k`` (``k = 1..T``), thresholds fit on ``val_table`` and
    evaluated on ``test_table``. Small ``q`` exits early (cheap), large ``q`` late (costly)."""
    if val_table.num_steps != test_table.num_steps:
        raise ValueError(f"tables differ in steps: {val_table.num_steps} and {test_table.num_steps}")
    points = []
    for q in qs:
        if not q > 0:
            raise ValueError(f"q must be positive, got {q}")
        p_exit = [q**k for k in range(1, val_table.num_steps + 1)]
        thresholds = fit_thresholds(val_table, p_exit)
        expected_macs, accuracy, fractions = evaluate_thresholds(test_table, thresholds, step_macs)
        points.append(
            BudgetPoint(
                name=f"q={q:.2f}",
                thresholds=thresholds,
                q=float(q),
                expected_macs=expected_macs,
                accuracy=accuracy,
                exit_fractions=tuple(fractions),
            )
        )
    return points


def save_thresholds(
    budgets: Iterable[BudgetPoint] | Mapping[str, Sequence[float] | ExitThresholds],
    path: str | os.PathLike[str],
    *,
    num_patches: int | None = None,
    fallback: bool | None = None,
) -> None:
    """Write named budgets as JSON: ``{"format", "version": 2, "budgets": [{"name", "log_odds", "thresholds", ...}]}``.

    ``log_odds`` are the thresholds as they are applied (``ExitThresholds``); ``thresholds`` the same as
    confidences, for reading (those above log-odds of about 37 print as 1.0). ``budgets`` is a list of
    ``BudgetPoint`` or a mapping ``name -> thresholds`` (confidences or ``ExitThresholds``). JSON has no infinity,
    so infinite values are written as the strings ``"inf"`` and ``"-inf"``; fields that are ``None`` are left out.

    ``num_patches`` and ``fallback`` record the cascade the budgets were fitted for (top-level keys): a server then
    refuses them for another cascade, even one with as many thresholds (2 patches + fallback, 3 patches without).
    With ``num_patches``, every budget must have ``num_patches`` thresholds, ``num_patches + 1`` with the fallback
    step (``ValueError`` otherwise).
    """
    if isinstance(budgets, Mapping):
        budgets = [
            BudgetPoint(name=name, thresholds=check_thresholds(rho, len(rho) + 1)) for name, rho in budgets.items()
        ]
    budgets = list(budgets)
    if num_patches is None and fallback is None:  # budgets loaded from a file that records them keep the record
        recorded = {(point.num_patches, point.fallback) for point in budgets}
        if len(recorded) == 1:
            num_patches, fallback = recorded.pop()
    where = repr(os.fspath(path))
    _check_cascade_fields(num_patches, fallback, where)
    if num_patches is not None:
        _check_cascade(budgets, num_patches, bool(fallback), where)
    entries = []
    for point in budgets:
        entry: dict[str, object] = {
            "name": point.name,
            "log_odds": [_encode(r) for r in point.thresholds.log_odds],
            "thresholds": [_encode(r) for r in point.thresholds.confidences],
        }
        if point.q is not None:
            entry["q"] = point.q
        if point.expected_macs is not None:
            entry["expected_macs"] = point.expected_macs
        if point.accuracy is not None:
            entry["accuracy"] = point.accuracy
        if point.exit_fractions is not None:
            entry["exit_fractions"] = list(point.exit_fractions)
        entries.append(entry)
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"budget names must be unique, got {names}")
    document: dict[str, object] = {"format": _FORMAT, "version": _VERSION}
    if num_patches is not None:
        document["num_patches"] = num_patches
    if fallback is not None:
        document["fallback"] = fallback
    document["budgets"] = entries
    _write_text(path, json.dumps(document, indent=2, allow_nan=False) + "\n")


def _check_cascade_fields(num_patches: object, fallback: object, where: str) -> None:
    """``ValueError`` (one line) unless ``num_patches`` is None or a positive integer, ``fallback`` None or a bool,
    and ``fallback`` comes with ``num_patches``."""
    if num_patches is not None and (type(num_patches) is not int or num_patches < 1):
        raise ValueError(f"{where}: num_patches must be a positive integer, got {num_patches!r}")
    if fallback is not None and not isinstance(fallback, bool):
        raise ValueError(f"{where}: fallback must be true or false, got {fallback!r}")
    if fallback is not None and num_patches is None:
        raise ValueError(f"{where}: fallback is recorded only with num_patches")


def _check_cascade(budgets: Sequence[BudgetPoint], num_patches: int, fallback: bool, where: str) -> None:
    """``ValueError`` (one line) unless every budget has the thresholds of that cascade: ``T - 1`` of them."""
    count = num_patches + (1 if fallback else 0)
    for point in budgets:
        if len(point.thresholds) != count:
            cascade = f"num_patches={num_patches}" + (" with the fallback step" if fallback else "")
            raise ValueError(
                f"{where}: budget {point.name!r} has {len(point.thresholds)} thresholds, {cascade} needs {count}"
            )


def load_thresholds(path: str | os.PathLike[str]) -> dict[str, BudgetPoint]:
    """Read what ``save_thresholds`` wrote: ``name -> BudgetPoint``, in file order.

    A budget's ``log_odds`` are what it applies; a budget with ``thresholds`` only (version 1 files, before
    2026-11-27, or a hand-written one) is read as those confidences. A version 1 threshold of exactly 1.0 is
    refused (``ValueError``): it relied on float32 rounding to 1.0, and means "no one exits" now.

    A file that records its cascade (``num_patches``, ``fallback``) gives them to every budget, and each budget must
    have that cascade's number of thresholds (``ValueError`` otherwise); older files leave both None.
    """
    where = repr(os.fspath(path))
    try:
        document = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not JSON: {err}") from None
    if not isinstance(document, dict) or document.get("format") != _FORMAT:
        raise ValueError(f"{where} is not an {_FORMAT} file")
    version = document.get("version")
    if version not in (1, _VERSION):
        raise ValueError(f"unsupported {_FORMAT} version {version!r}, expected 1 or {_VERSION}")
    num_patches, fallback = document.get("num_patches"), document.get("fallback")
    _check_cascade_fields(num_patches, fallback, repr(os.fspath(path)))
    if not isinstance(document.get("budgets"), list):
        raise ValueError(f"{where}: 'budgets' must be a list of budgets")
    budgets: dict[str, BudgetPoint] = {}
    for number, entry in enumerate(document["budgets"], start=1):
        _check_budget_entry(entry, number, where)
        fractions = entry.get("exit_fractions")
        if version == 1 or "log_odds" not in entry:  # confidences (a hand-written version 2 budget may give them)
            rho = [_decode(r) for r in entry["thresholds"]]
            if version == 1 and 1.0 in rho:
                raise ValueError(
                    f"{os.fspath(path)!r}: budget {entry['name']!r} of this version 1 file has a threshold of 1.0, "
                    "which let out whatever float32 rounded to a confidence of 1.0 and now lets out no one: "
                    "re-run jobs/evaluate.py to fit it again"
                )
            thresholds = ExitThresholds.from_confidences(rho)
        else:
            thresholds = ExitThresholds(tuple(_decode(r) for r in entry["log_odds"]))
        budgets[entry["name"]] = BudgetPoint(
            name=entry["name"],
            thresholds=thresholds,
            q=entry.get("q"),
            expected_macs=entry.get("expected_macs"),
            accuracy=entry.get("accuracy"),
            exit_fractions=tuple(fractions) if fractions is not None else None,
            num_patches=num_patches,
            fallback=fallback if fallback is not None or num_patches is None else False,
        )
    if num_patches is not None:
        _check_cascade(list(budgets.values()), num_patches, bool(fallback), repr(os.fspath(path)))
    return budgets


def _check_budget_entry(entry: Any, number: int, where: str) -> None:
    """``ValueError`` (one line, naming the file and the budget) for an entry ``load_thresholds`` cannot read."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ValueError(f"{where}: budget {number} must be a mapping with a 'name' string")
    key = "log_odds" if "log_odds" in entry else "thresholds"
    if not isinstance(entry.get(key), list):
        raise ValueError(f"{where}: budget {entry['name']!r} needs a list of 'log_odds' or of 'thresholds'")


def _encode(value: float) -> float | str:
    if math.isnan(value):
        raise ValueError("a threshold is NaN")
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def _decode(value: float | str) -> float:
    if isinstance(value, str):
        if value not in ("inf", "-inf"):
            raise ValueError(f"unexpected threshold {value!r}: numbers, 'inf' or '-inf' only")
        return float(value)
    return float(value)


def _write_text(path: str | os.PathLike[str], text: str) -> None:
    storage.write_bytes(path, text.encode("utf-8"))


def _read_text(path: str | os.PathLike[str]) -> str:
    return storage.read_bytes(path).decode("utf-8")
