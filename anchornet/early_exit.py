"""Sequential early-exit inference (paper Alg. 1): a glance at the resized image, then AnchorNet's patches.

Step 1 classifies ``x_1``, the whole image resized to ``K x K``, with ``f_glance``; steps ``t = 2..T`` add
``f_patch`` on the ``t - 1``-th best patch ``x_t``. With ``z_t = sum_{s <= t} f(x_s)`` a sample exits at the
first ``t < T`` with ``confidence(z_t) >= rho_t``, else at ``T`` with ``argmax z_T``. The batch shrinks at every
step: each network runs only on the samples still undecided, as a dense sub-batch, and AnchorNet runs once,
only on the samples that go past step 1.

The test ``confidence >= rho`` is made on log-odds, ``log(c / (1 - c)) >= log(rho / (1 - rho))``: the same decision
for every ``c`` and ``rho``, without rounding ``c`` to 1. In float32, ``max softmax(z)`` is exactly 1 once the top
logit leads the next by about 17, which summed logits reach after a step or two; all those samples would tie at
1 and no threshold could tell them apart. ``confidence_log_odds`` computes ``z_top - logsumexp_{j != top} z_j``
instead, and ``ExitThresholds`` keeps the thresholds as log-odds, so fitted thresholds above ``1 - 1e-16`` survive.

Beyond the paper, an optional **fallback** network (a full-size classifier on the whole image) adds one last step
``T = num_patches + 2``: a sample still unsure after its last patch (or whose patches ran out) is decided by the
fallback's own output, not added to ``z``. Its thresholds ``rho_1..rho_{T-1}`` then include the last patch step.
It trades the paper's fixed end point for the full network's accuracy on the few hard images (docs/algorithm.md).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from anchornet.cam import class_activation_map
from anchornet.macs import count_macs
from anchornet.model import AnchorNet
from anchornet.patches import PatchSelection, crop_patches, random_patches, select_patches

__all__ = [
    "Aggregate",
    "EarlyExitClassifier",
    "EarlyExitResult",
    "ExitThresholds",
    "PatchPolicy",
    "accumulated_confidence",
    "check_thresholds",
    "confidence_log_odds",
    "cumulative_step_macs",
    "log_odds_of",
    "resize_square",
    "sample_macs",
    "step_contribution",
]

Aggregate = Literal["logits", "probs"]
PatchPolicy = Literal["anchornet", "random"]
T = TypeVar("T", int, torch.Tensor)


def cumulative_step_macs(
    anchornet_macs: int, glance_macs: int, patch_macs: int, num_steps: int, fallback_macs: int | None = None
) -> list[int]:
    """MACs of one sample that exits at step ``t = 1..num_steps`` (REFERENCE section 4, cost accounting).

    ``C(exit at 1) = glance``; ``C(exit at t >= 2) = anchornet + glance + (t - 1) * patch``. Pass
    ``anchornet_macs=0`` for the random-patch baseline, which runs no AnchorNet.

    With ``fallback_macs`` the last of the ``num_steps`` steps is the fallback network on the whole image (our
    extension, docs/algorithm.md): ``C(exit at T) = C(exit at T - 1) + fallback``.
    """
    if num_steps < (2 if fallback_macs is not None else 1):
        raise ValueError(f"num_steps must be at least {2 if fallback_macs is not None else 1}, got {num_steps}")
    if fallback_macs is not None:
        costs = cumulative_step_macs(anchornet_macs, glance_macs, patch_macs, num_steps - 1)
        return [*costs, costs[-1] + int(fallback_macs)]
    costs = [int(glance_macs)]
    costs += [int(anchornet_macs) + int(glance_macs) + (t - 1) * int(patch_macs) for t in range(2, num_steps + 1)]
    return costs


def sample_macs(
    exit_step: T,
    ran_anchornet: T,
    anchornet_macs: int,
    glance_macs: int,
    patch_macs: int,
    *,
    patches_seen: T | None = None,
    ran_fallback: T | int = 0,
    fallback_macs: int = 0,
) -> T:
    """MACs actually spent on a sample (REFERENCE section 4): the glance, AnchorNet when it ran (``ran_anchornet``
    1 or 0: every sample past step 1, and one whose patches ran out before any step), one patch pass per patch
    seen (``patches_seen``; ``exit_step - 1`` when not given, as without a fallback), and the fallback network
    when it ran (``ran_fallback`` 1 or 0). Ints or int tensors alike (the values of a batch)."""
    patches = exit_step - 1 if patches_seen is None else patches_seen
    return glance_macs + ran_anchornet * anchornet_macs + patches * patch_macs + ran_fallback * fallback_macs


def _log_odds(rho: float) -> float:
    """``log(rho / (1 - rho))`` in float64: ``-inf`` for ``rho <= 0`` (everyone exits), ``+inf`` for ``rho >= 1``."""
    if math.isnan(rho):
        raise ValueError("thresholds must not be NaN")
    if rho <= 0.0:
        return -math.inf
    if rho >= 1.0:
        return math.inf
    return math.log(rho) - math.log1p(-rho)


def _confidence(log_odds: float) -> float:
    """``1 / (1 + exp(-log_odds))``, the inverse of ``_log_odds`` (it rounds to 1.0 above about 37)."""
    if log_odds >= 0:
        return 1.0 / (1.0 + math.exp(-log_odds))
    e = math.exp(log_odds)
    return e / (1.0 + e)


@dataclass(frozen=True)
class ExitThresholds:
    """``rho_1..rho_{T-1}``, kept as the log-odds of the confidence: a sample exits at step ``t < T`` when
    ``confidence_log_odds(z_t) >= log_odds[t - 1]``, i.e. when ``confidence(z_t) >= rho_t``.

    Build it from confidences with ``from_confidences`` (``rho <= 0`` exits everyone, ``rho >= 1`` no one: a
    softmax of finite logits never reaches 1); ``confidences`` gives them back for display (rounded to 1.0 above
    log-odds of about 37, which is why the log-odds are what is kept and saved).
    """

    log_odds: tuple[float, ...]

    def __post_init__(self) -> None:
        values = tuple(float(v) for v in self.log_odds)
        if any(math.isnan(v) for v in values):
            raise ValueError(f"thresholds must not be NaN, got log-odds {values}")
        object.__setattr__(self, "log_odds", values)

    @classmethod
    def from_confidences(cls, rho: Sequence[float]) -> ExitThresholds:
        return cls(tuple(_log_odds(float(r)) for r in rho))

    @property
    def confidences(self) -> tuple[float, ...]:
        return tuple(_confidence(v) for v in self.log_odds)

    def __len__(self) -> int:
        return len(self.log_odds)


def check_thresholds(thresholds: Sequence[float] | ExitThresholds, num_steps: int) -> ExitThresholds:
    """``rho_1..rho_{T-1}`` as ``ExitThresholds``: confidences (a sequence of floats) or ``ExitThresholds`` as they
    are; ``ValueError`` for the wrong count (none for the last step) or a NaN."""
    values = thresholds if isinstance(thresholds, ExitThresholds) else ExitThresholds.from_confidences(thresholds)
    expected = num_steps - 1
    if len(values) != expected:
        raise ValueError(
            f"expected {expected} thresholds rho_1..rho_{expected} (T = {num_steps} steps: the glance, one per patch "
            f"and the fallback if any; none for the last), got {len(values)}"
        )
    return values


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, C, H, W)`` to ``(B, C, size, size)``, bilinear with antialiasing: the glance ``x_1`` and patch resizing."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def step_contribution(outputs: torch.Tensor, aggregate: Aggregate = "logits") -> torch.Tensor:
    """``f(x_t)`` as it enters the sum ``z_t``: logits, or softmax probabilities, at least float32."""
    dtype = torch.promote_types(outputs.dtype, torch.float32)
    return outputs.to(dtype) if aggregate == "logits" else outputs.softmax(dim=-1, dtype=dtype)


def accumulated_confidence(
    z: torch.Tensor, num_steps: int | torch.Tensor, aggregate: Aggregate = "logits"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence and prediction of accumulated outputs ``z_t`` (classes on the last dimension).

    ``aggregate="logits"``: ``z_t`` sums logits, confidence ``max softmax(z_t)``. ``aggregate="probs"``: ``z_t``
    sums softmax probabilities, confidence ``max(z_t) / t`` (the mean probability; ``num_steps`` is ``t``, an
    int or a tensor broadcastable to ``z.shape[:-1]``). Returns ``(confidence, argmax z_t)``.
    """
    if aggregate == "logits":
        confidence = z.softmax(dim=-1).amax(dim=-1)
    elif aggregate == "probs":
        confidence = z.amax(dim=-1) / num_steps
    else:
        raise ValueError(f"aggregate must be 'logits' or 'probs', got {aggregate!r}")
    return confidence, z.argmax(dim=-1)


def confidence_log_odds(
    z: torch.Tensor, num_steps: int | torch.Tensor, aggregate: Aggregate = "logits"
) -> torch.Tensor:
    """``log(c / (1 - c))`` of the confidence ``c`` of ``accumulated_confidence``, what exits are decided on.

    ``aggregate="logits"``: ``z_top - logsumexp_{j != top} z_j``, exact where ``c`` itself rounds to 1 (``+inf``
    with one class). ``aggregate="probs"``: from the mean probability ``c``, which saturates like its inputs.
    """
    if aggregate == "logits":
        top = z.argmax(dim=-1, keepdim=True)
        rest = z.scatter(-1, top, -math.inf).logsumexp(dim=-1)
        return _below_inf(z.gather(-1, top).squeeze(-1) - rest)
    confidence, _ = accumulated_confidence(z, num_steps, aggregate)
    return log_odds_of(confidence)


def log_odds_of(confidence: torch.Tensor) -> torch.Tensor:
    """``log(c / (1 - c))`` of confidences in ``[0, 1]`` (no better than ``c``'s own precision near 1)."""
    c = confidence.clamp(0.0, 1.0)
    return _below_inf(c.log() - (-c).log1p())


def _below_inf(log_odds: torch.Tensor) -> torch.Tensor:
    """``+inf`` (one class; a confidence of exactly 1) to the largest finite value, so an infinite threshold still
    lets no sample exit; ``-inf`` stays (a zero threshold lets every sample exit)."""
    return log_odds.clamp(max=torch.finfo(log_odds.dtype).max)


@dataclass(frozen=True)
class EarlyExitResult:
    """What the engine decided for a batch of ``B`` images with ``k = num_patches``.

    Attributes:
        prediction: class index, ``(B,)``.
        confidence: the confidence at the exit step, ``(B,)`` (see ``accumulated_confidence``).
        exit_step: 1-based step the sample exited at, ``(B,)``; 1 is the glance, ``t >= 2`` the ``t - 1``-th patch,
            ``T = num_patches + 2`` the fallback network when there is one.
        macs: multiply-accumulates actually spent on the sample, int64 ``(B,)``.
        logits: the accumulated ``z`` at the exit step, ``(B, num_classes)`` (summed probabilities for
            ``aggregate="probs"``); the fallback's own output for samples it decided.
        boxes: half-open windows ``(x0, y0, x1, y1)`` of the patches the sample looked at, best first,
            ``(B, k, 4)``; NaN in the slots it did not look at.
        scores: CAM scores of those patches, ``(B, k)``; NaN likewise (and always for random patches).
        patches_available: valid patches the selection offered the sample (``PatchSelection.num_valid``), ``(B,)``;
            -1 where there was no selection (the sample exited at the glance).
    """

    prediction: torch.Tensor
    confidence: torch.Tensor
    exit_step: torch.Tensor
    macs: torch.Tensor
    logits: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    patches_available: torch.Tensor


class EarlyExitClassifier(nn.Module):
    """The sequential early-exit pipeline of paper Alg. 1 over ``T = num_patches + 1`` steps (``+ 2`` with a
    fallback network).

    The caller moves the module and the images to a device and calls ``.eval()``; every forward pass runs
    under ``torch.inference_mode()``.

    Args:
        anchornet: the patch proposer; its ``receptive_field.size`` is the patch side ``K``.
        glance_net: ``f_glance``, classifies the whole image resized to ``patch_size x patch_size``.
        patch_net: ``f_patch``, classifies one patch; same classes as ``glance_net``.
        thresholds: ``rho_1..rho_{T-1}``, one confidence per step but the last (0 exits everyone, 1 or ``inf`` no
            one), or ``ExitThresholds`` (what ``fit_thresholds`` returns). With a fallback, ``T - 1 =
            num_patches + 1``: the last patch step has a threshold too.
        num_patches: patches per image, ``T - 1``.
        iou_threshold: NMS threshold of ``select_patches``.
        patch_size: input side of both downstream networks; ``K`` by default. Patches are always cut ``K x K``
            from the full image and resized only when this differs from ``K``.
        aggregate: accumulate ``"logits"`` (default, the released code) or softmax ``"probs"`` (the paper).
        patch_policy: ``"anchornet"`` patches, or ``"random"`` grid cells (``random_patches``, the baseline of
            paper Table 3). Random patches are drawn for the whole batch on every call, so that a sample's
            patches do not depend on the thresholds; AnchorNet never runs and its MACs are not charged.
        generator: random generator of the random policy (its device is where the draws happen).
        image_size: ``(H, W)`` at which ``step_macs`` charges AnchorNet (and the fallback); ``predict`` charges the
            size it gets.
        fallback_net: optional last step, a classifier of the whole image as given (``(B, C, H, W)``, e.g. a
            full-224 network); same classes as ``glance_net``. Its prediction alone decides the samples that reach
            it, those not confident after their last patch.
    """

    def __init__(
        self,
        anchornet: AnchorNet,
        glance_net: nn.Module,
        patch_net: nn.Module,
        thresholds: Sequence[float] | ExitThresholds,
        num_patches: int = 4,
        iou_threshold: float = 0.3,
        *,
        patch_size: int | None = None,
        aggregate: Aggregate = "logits",
        patch_policy: PatchPolicy = "anchornet",
        generator: torch.Generator | None = None,
        image_size: tuple[int, int] = (224, 224),
        fallback_net: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if num_patches < 1:
            raise ValueError(f"num_patches must be at least 1, got {num_patches}")
        if aggregate not in ("logits", "probs"):
            raise ValueError(f"aggregate must be 'logits' or 'probs', got {aggregate!r}")
        if patch_policy not in ("anchornet", "random"):
            raise ValueError(f"patch_policy must be 'anchornet' or 'random', got {patch_policy!r}")
        if not 0.0 <= iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
        self.anchornet = anchornet
        self.glance_net = glance_net
        self.patch_net = patch_net
        self.fallback_net = fallback_net
        self.cam_net: nn.Module | None = None  # set by run_on; None: class_activation_map(anchornet, .)
        # what the fallback's MACs are counted on, whatever run_on puts in its place (not a second submodule)
        object.__setattr__(self, "_fallback_counted", fallback_net)
        self.receptive_field = anchornet.receptive_field
        self.num_patches = num_patches
        self.iou_threshold = iou_threshold
        self.patch_size = patch_size if patch_size is not None else self.receptive_field.size
        self.aggregate: Aggregate = aggregate
        self.patch_policy: PatchPolicy = patch_policy
        self.generator = generator
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.receptive_field.check_input(*self.image_size)
        self.thresholds = thresholds

        input_shape = (anchornet.config["in_channels"], self.patch_size, self.patch_size)
        self.glance_macs, glance_classes = _macs_and_classes(glance_net, input_shape)
        self.patch_macs, patch_classes = _macs_and_classes(patch_net, input_shape)
        if glance_classes != patch_classes:
            raise ValueError(
                f"glance_net and patch_net must have the same classes, got {glance_classes} and {patch_classes} outputs"
            )
        self._anchornet_macs: dict[tuple[int, int], int] = {}
        self.anchornet_macs = self._anchornet_cost(*self.image_size)
        self._fallback_macs: dict[tuple[int, int], int] = {}
        self.fallback_macs: int | None = None
        if fallback_net is not None:
            shape = (anchornet.config["in_channels"], *self.image_size)
            self.fallback_macs, fallback_classes = _macs_and_classes(fallback_net, shape)
            self._fallback_macs[self.image_size] = self.fallback_macs
            if fallback_classes != glance_classes:
                raise ValueError(
                    f"fallback_net must have the classes of glance_net, got {fallback_classes} and {glance_classes} "
                    "outputs"
                )

    @property
    def has_fallback(self) -> bool:
        return self.fallback_net is not None

    @property
    def num_steps(self) -> int:
        """``T``: the glance, one step per patch, and the fallback if there is one."""
        return self.num_patches + 1 + int(self.has_fallback)

    @property
    def thresholds(self) -> ExitThresholds:
        """``rho_1..rho_{T-1}``; set it (confidences or ``ExitThresholds``) to switch budgets without rebuilding."""
        return self._thresholds

    @thresholds.setter
    def thresholds(self, thresholds: Sequence[float] | ExitThresholds) -> None:
        self._thresholds = check_thresholds(thresholds, self.num_steps)

    @property
    def step_macs(self) -> list[int]:
        """Cumulative MACs of exiting at ``t = 1..T`` on an ``image_size`` image (``cumulative_step_macs``)."""
        return cumulative_step_macs(
            self.anchornet_macs, self.glance_macs, self.patch_macs, self.num_steps, self.fallback_macs
        )

    def run_on(
        self,
        *,
        cam: nn.Module | None = None,
        glance: nn.Module | None = None,
        patch: nn.Module | None = None,
        fallback: nn.Module | None = None,
    ) -> EarlyExitClassifier:
        """This engine with some of its forward passes run by other modules that compute the same functions
        (prepared, compiled or exported copies, e.g. ONNX Runtime sessions): the same thresholds, settings and MACs,
        counted on the original networks. ``cam`` maps images to ``(cam, logits)`` as
        ``class_activation_map(anchornet, images)`` does. The engine itself is not changed."""
        if fallback is not None and self.fallback_net is None:
            raise ValueError("run_on got a fallback module but this engine has no fallback step")
        engine = copy.copy(self)
        for name, value in vars(self).items():  # a shallow copy shares nn.Module's dicts: submodules, hooks, caches
            if isinstance(value, (dict, set)):
                object.__setattr__(engine, name, type(value)(value))
        given = {"cam_net": cam, "glance_net": glance, "patch_net": patch, "fallback_net": fallback}
        for name, module in given.items():
            if module is not None:
                setattr(engine, name, module)
        return engine

    def _macs_at(self, net: nn.Module, cache: dict[tuple[int, int], int], height: int, width: int) -> int:
        """MACs of ``net`` on one ``height x width`` image, counted once per size."""
        if (height, width) not in cache:
            cache[height, width] = count_macs(net, (self.anchornet.config["in_channels"], height, width))
        return cache[height, width]

    def _anchornet_cost(self, height: int, width: int) -> int:
        if self.patch_policy == "random":
            return 0
        return self._macs_at(self.anchornet, self._anchornet_macs, height, width)

    def _fallback_cost(self, height: int, width: int) -> int:
        if self._fallback_counted is None:
            return 0
        return self._macs_at(self._fallback_counted, self._fallback_macs, height, width)

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4:
            raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(images.shape)}")
        self.receptive_field.check_input(images.shape[-2], images.shape[-1])

    def _draw_random(self, images: torch.Tensor) -> PatchSelection | None:
        if self.patch_policy != "random":
            return None
        drawn = random_patches(
            self.receptive_field,
            (images.shape[-2], images.shape[-1]),
            images.shape[0],
            self.num_patches,
            generator=self.generator,
        )
        return _index_selection(drawn, slice(None), images.device)

    def _select(self, images: torch.Tensor) -> PatchSelection:
        """AnchorNet's patches of ``images``: CAM of its own top-1 class, then greedy NMS, best first."""
        cam, _ = self.cam_net(images) if self.cam_net is not None else class_activation_map(self.anchornet, images)
        return select_patches(cam, self.receptive_field, self.num_patches, self.iou_threshold)

    def _patches(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """One ``K x K`` window per image, ``boxes`` ``(B, 4)``, resized to the networks' input side."""
        return resize_square(
            crop_patches(images, boxes[:, None], size=self.receptive_field.size)[:, 0], self.patch_size
        )

    def forward(
        self,
        images: torch.Tensor,
        *,
        exit_at: int | None = None,
        thresholds: Sequence[float] | ExitThresholds | None = None,
    ) -> EarlyExitResult:
        return self.predict(images, exit_at=exit_at, thresholds=thresholds)

    @torch.inference_mode()
    def predict(
        self,
        images: torch.Tensor,
        *,
        exit_at: int | None = None,
        thresholds: Sequence[float] | ExitThresholds | None = None,
    ) -> EarlyExitResult:
        """Alg. 1 on a batch ``(B, C, H, W)`` with ``H, W >= K``, with ``thresholds`` for this call when given
        (else ``self.thresholds``).

        ``exit_at=t`` (1..T) is anytime mode: every sample exits at step ``t`` whatever its confidence. A sample
        with fewer valid patches than ``num_patches`` (``PatchSelection.num_valid``) exits at its last available
        step ``1 + num_valid`` at the latest; with a fallback it goes on to the fallback instead (in anytime mode
        only when ``exit_at`` is the fallback step).
        """
        self._check_images(images)
        steps, last_patch_step = self.num_steps, self.num_patches + 1
        rho = self._thresholds if thresholds is None else check_thresholds(thresholds, steps)
        if exit_at is not None and not (isinstance(exit_at, int) and 1 <= exit_at <= steps):
            raise ValueError(f"exit_at must be an int step in 1..{steps} (T = {steps}), got {exit_at!r}")
        # A sample out of patches exits where it is, unless a fallback step is still ahead of it.
        to_fallback = self.has_fallback and (exit_at is None or exit_at == steps)
        batch, device, k = images.shape[0], images.device, self.num_patches
        drawn = self._draw_random(images)

        z = step_contribution(self.glance_net(resize_square(images, self.patch_size)), self.aggregate)
        logits = torch.empty_like(z)
        confidence = z.new_empty(batch)
        prediction = torch.empty(batch, dtype=torch.long, device=device)
        exit_step = torch.empty(batch, dtype=torch.long, device=device)
        boxes = torch.full((batch, k, 4), float("nan"), device=device)
        scores = torch.full((batch, k), float("nan"), dtype=z.dtype, device=device)
        ran_anchornet = torch.zeros(batch, dtype=torch.bool, device=device)
        patches_seen = torch.zeros(batch, dtype=torch.long, device=device)
        patches_available = torch.full((batch,), -1, dtype=torch.long, device=device)
        active = torch.arange(batch, device=device)  # rows of the batch still undecided, in order
        fallback_rows: list[torch.Tensor] = []  # rows whose patches ran out, bound for the fallback

        def stop_at(t: int, z_t: torch.Tensor) -> torch.Tensor:
            if exit_at is not None:
                return torch.full(z_t.shape[:1], t >= exit_at, dtype=torch.bool, device=device)
            if t == steps:
                return torch.ones(z_t.shape[:1], dtype=torch.bool, device=device)
            return confidence_log_odds(z_t, t, self.aggregate) >= rho.log_odds[t - 1]

        def record(t: int, stop: torch.Tensor, step_confidence: torch.Tensor, step_prediction: torch.Tensor) -> None:
            rows = active[stop]
            prediction[rows] = step_prediction[stop]
            confidence[rows] = step_confidence[stop]
            exit_step[rows] = t
            logits[rows] = z[stop]

        step_confidence, step_prediction = accumulated_confidence(z, 1, self.aggregate)
        stop = stop_at(1, z)
        record(1, stop, step_confidence, step_prediction)
        keep = ~stop
        active, z = active[keep], z[keep]
        step_confidence, step_prediction = step_confidence[keep], step_prediction[keep]

        if active.numel() > 0:
            sub_images = images.index_select(0, active)
            selection = _index_selection(drawn, active) if drawn is not None else self._select(sub_images)
            ran_anchornet[active] = self.patch_policy == "anchornet"
            patches_available[active] = selection.num_valid.to(device=device, dtype=torch.long)
            last_step = 1 + selection.num_valid
            # Only possible without any valid patch: such a sample exits at step 1, having paid for AnchorNet
            # (or goes on to the fallback).
            out_of_patches = last_step <= 1
            if to_fallback:
                fallback_rows.append(active[out_of_patches])
            else:
                record(1, out_of_patches, step_confidence, step_prediction)
            keep = ~out_of_patches
            active, z, sub_images, last_step = active[keep], z[keep], sub_images[keep], last_step[keep]
            selection = _index_selection(selection, keep)

            for t in range(2, last_patch_step + 1):
                if active.numel() == 0:
                    break
                j = t - 2
                patches = self._patches(sub_images, selection.boxes[:, j])
                z = z + step_contribution(self.patch_net(patches), self.aggregate)
                patches_seen[active] = t - 1
                boxes[active, j] = selection.boxes[:, j].to(boxes.dtype)
                scores[active, j] = selection.scores[:, j].to(scores.dtype)
                step_confidence, step_prediction = accumulated_confidence(z, t, self.aggregate)
                stop = stop_at(t, z)
                out_of_patches = (last_step <= t) & ~stop
                if to_fallback:
                    fallback_rows.append(active[out_of_patches])
                else:
                    stop = stop | out_of_patches
                record(t, stop, step_confidence, step_prediction)
                keep = ~(stop | out_of_patches)
                active, z, sub_images, last_step = active[keep], z[keep], sub_images[keep], last_step[keep]
                selection = _index_selection(selection, keep)

        ran_fallback = torch.zeros(batch, dtype=torch.bool, device=device)
        if self.fallback_net is not None:
            rows = torch.cat([*fallback_rows, active])  # active: not confident at the last patch step
            if rows.numel() > 0:
                z = step_contribution(self.fallback_net(images.index_select(0, rows)), self.aggregate)
                step_confidence, step_prediction = accumulated_confidence(z, 1, self.aggregate)
                prediction[rows], confidence[rows], logits[rows] = step_prediction, step_confidence, z
                exit_step[rows] = steps
                ran_fallback[rows] = True

        height, width = images.shape[-2], images.shape[-1]
        macs = sample_macs(
            exit_step,
            ran_anchornet.long(),
            self._anchornet_cost(height, width) if ran_anchornet.any() else 0,
            self.glance_macs,
            self.patch_macs,
            patches_seen=patches_seen,
            ran_fallback=ran_fallback.long(),
            fallback_macs=self._fallback_cost(height, width) if ran_fallback.any() else 0,
        )
        return EarlyExitResult(
            prediction=prediction,
            confidence=confidence,
            exit_step=exit_step,
            macs=macs,
            logits=logits,
            boxes=boxes,
            scores=scores,
            patches_available=patches_available,
        )

    @torch.inference_mode()
    def step_logits(self, images: torch.Tensor, *, max_batch: int | None = None) -> tuple[torch.Tensor, PatchSelection]:
        """Every sample through all ``T`` steps, for confidence tables (threshold search, anytime accuracy).

        Returns:
            ``(outputs, selection)``: ``outputs[:, t - 1]`` is the raw ``f(x_t)`` of step ``t``, **not**
            accumulated, ``(B, T, num_classes)``; NaN rows for the patch steps past a sample's last valid patch.
            With a fallback, ``outputs[:, -1]`` is the fallback's output on the whole image (``StepTable.from_logits
            (..., fallback=True)``).
            ``selection`` is the ``PatchSelection`` the patches came from. All valid patches of all images go
            through ``patch_net`` in one batch, or in chunks of at most ``max_batch`` (likewise the glance and
            AnchorNet passes).
        """
        self._check_images(images)
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        batch = images.shape[0]
        chunk = max_batch or max(batch * self.num_patches, 1)
        drawn = self._draw_random(images)

        glance = torch.cat([self.glance_net(resize_square(x, self.patch_size)) for x in images.split(chunk)])
        selection = drawn or _cat_selections([self._select(x) for x in images.split(chunk)])
        outputs = glance.new_full((batch, self.num_steps, glance.shape[-1]), float("nan"))
        outputs[:, 0] = glance
        rows, slots = selection.valid.nonzero(as_tuple=True)
        for start in range(0, rows.numel(), chunk):
            b, j = rows[start : start + chunk], slots[start : start + chunk]
            patches = self._patches(images.index_select(0, b), selection.boxes[b, j])
            outputs[b, j + 1] = self.patch_net(patches).to(outputs.dtype)
        if self.fallback_net is not None:
            outputs[:, -1] = torch.cat([self.fallback_net(x) for x in images.split(chunk)]).to(outputs.dtype)
        return outputs, selection


def _macs_and_classes(net: nn.Module, input_shape: tuple[int, int, int]) -> tuple[int, int]:
    """``count_macs(net, input_shape)`` and the number of classes ``net`` outputs, read from that same pass."""
    outputs: list[torch.Tensor] = []
    handle = net.register_forward_hook(lambda _module, _args, output: outputs.append(output))
    try:
        macs = count_macs(net, input_shape)
    finally:
        handle.remove()
    output = outputs[-1]
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"glance_net and patch_net must return (B, num_classes) logits, got {shape}")
    return macs, output.shape[-1]


def _index_selection(
    selection: PatchSelection, index: torch.Tensor | slice, device: torch.device | None = None
) -> PatchSelection:
    """The rows ``index`` of a ``PatchSelection`` (optionally moved to ``device``)."""
    return PatchSelection(
        boxes=selection.boxes[index].to(device),
        cells=selection.cells[index].to(device),
        scores=selection.scores[index].to(device),
        valid=selection.valid[index].to(device),
    )


def _cat_selections(selections: Sequence[PatchSelection]) -> PatchSelection:
    return PatchSelection(
        boxes=torch.cat([s.boxes for s in selections]),
        cells=torch.cat([s.cells for s in selections]),
        scores=torch.cat([s.scores for s in selections]),
        valid=torch.cat([s.valid for s in selections]),
    )
