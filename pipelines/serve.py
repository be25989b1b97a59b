"""Ray Serve app: early-exit classification over HTTP (paper Alg. 1, REFERENCE section 4), one deployment per model.

::

    HTTP -> Ingress (FastAPI: decode, preprocess, thresholds, the early-exit loop)
              |-> Glance      f_glance on the image resized to K          (batched, autoscaled)
              |-> AnchorNet   CAM, NMS boxes and K x K crops, once         (batched, autoscaled)
              |-> Patch       f_patch on one crop per call, step by step  (batched, autoscaled)
              '-> Fallback    optional: a full-size classifier, last step (batched, autoscaled)

With ``colocate: true`` the models run inside the ingress replica instead (no handle calls): one deployment, scaled
as a whole. Its concurrent requests are batched once, on arrival, and decided together by
``EarlyExitClassifier.predict`` (``InProcessCascade``): each step's forward pass is shared by the requests still
unsure at that step. On CPU nodes each handle call costs milliseconds of Serve overhead, as much as a glance forward
pass (docs/serving.md); separate deployments are for GPU nodes, where the models need their own resources and
scale independently.

The ingress asks the glance classifier first and stops when ``confidence(z_1) >= rho_1``; otherwise it asks
AnchorNet once for the patches and the patch classifier one patch at a time until ``confidence(z_t) >= rho_t``
or the patches run out. Decisions use ``anchornet.accumulated_confidence`` and the MACs
``anchornet.cumulative_step_macs``, so a response equals ``EarlyExitClassifier.predict`` on the same image.

With a ``fallback`` checkpoint (our extension of Alg. 1) there is one more, last step, ``T = num_patches + 2``: a
sample still unsure after its last patch, or whose patches ran out, is decided by the fallback network alone on the
whole preprocessed image (``early_exit_steps``); the thresholds are then ``num_patches + 1``, fitted with it.

Each deployment runs its models on torch (prepared: folded, channels-last) or, with ``runtime: onnxruntime``, on
ONNX Runtime on the CPU (``pipelines.onnx_runtime``: the same models exported, checked and cached at load).

Build it with ``build_app(ServeArgs(...))`` (``serve_config.yaml`` fills the same args for ``serve deploy``).
``high_throughput_env()`` is the environment of Ray Serve's high-throughput mode (HAProxy in place of the
Python HTTP proxy), for ``ray start`` or an embedded ``ray.init`` (``jobs/serve.py --high-throughput``).
Thresholds are live: they come from the ingress ``user_config`` (``thresholds_path``, ``default_budget``,
inline ``budgets``) through ``reconfigure``, without restarting replicas. A bad config fails a replica at start; a
bad live update is refused (the last good budgets stay, ``GET /info`` says why in ``config_error``).

Under failure and overload (docs/serving.md): a model call whose replica died is retried once
(``call_deployment``); a model still lost, overloaded (``max_queued_requests``) or undeployed is a JSON 503
``model_unavailable`` with ``Retry-After``; a model replica whose forward passes keep failing fails its
``check_health`` (``FailureStreak``).

This module has no ``from __future__ import annotations``: Serve reads the builder's annotation as a class.
"""

import asyncio
import dataclasses
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import AutoscalingConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from torch import nn

from anchornet import (
    BudgetPoint,
    ImageDecodeError,
    Preprocessing,
    accumulated_confidence,
    class_labels,
    count_macs,
    crop_patches,
    cumulative_step_macs,
    decode_image,
    load_checkpoint,
    load_thresholds,
    prepare_classifier_for_inference,
    prepare_for_inference,
    select_patches,
)
from anchornet.early_exit import (
    Aggregate,
    EarlyExitClassifier,
    EarlyExitResult,
    ExitThresholds,
    confidence_log_odds,
    resize_square,
    sample_macs,
    step_contribution,
)
from anchornet.model import AnchorNet
from anchornet.preprocessing import DEFAULT_MAX_ASPECT_RATIO, to_float
from pipelines.onnx_runtime import CamAndLogits, OnnxRuntimeModel, Runtime, require_onnxruntime
from pipelines.serve_http import (
    ApiError,
    are_confidences,
    install_error_handlers,
    jsonable,
    model_response,
    read_image_bytes,
    resolve_thresholds,
    retry_after,
)

__all__ = [
    "BaselineArgs",
    "DeploymentArgs",
    "DeploymentsArgs",
    "LiveBudgets",
    "ServeArgs",
    "ServingSpec",
    "build_app",
    "build_baseline_app",
    "call_deployment",
    "check_serve_config",
    "classify_images",
    "load_anchornet_on_replica",
    "load_budgets",
    "load_on_replica",
    "model_device",
    "model_unavailable",
    "propose_patches",
    "reconfigured_budgets",
]

logger = logging.getLogger("ray.serve")

#: Built-in budgets, always available: every step (the most accurate and costly) and the glance only.
BUILTIN_BUDGETS: dict[str, tuple[float, ...] | None] = {"all-steps": None, "glance-only": None}
#: Keys of the ingress ``user_config`` (``load_budgets``).
USER_CONFIG_KEYS = ("thresholds_path", "budgets", "default_budget")
#: Longest image side over the shortest that serving accepts by default (checked before decoding).
MAX_ASPECT_RATIO = DEFAULT_MAX_ASPECT_RATIO
#: Serve's end-to-end limit on a request (``http_options.request_timeout_s`` of serve_config.yaml, and
#: ``jobs/serve.py --request-timeout``); ``DeploymentArgs.graceful_shutdown_timeout_s`` defaults to it + 5 s.
REQUEST_TIMEOUT_S = 30.0
#: Autoscaling delays where an ``autoscaling_config`` sets none (Serve's own: 30 s up, 600 s down).
AUTOSCALING_DELAYS = {"upscale_delay_s": 10.0, "downscale_delay_s": 120.0}
#: Failed forward passes in a row after which a model replica fails its health check (and Serve replaces it).
UNHEALTHY_AFTER_FAILURES = 3


# --------------------------------------------------------------------------------------------------------------
# Typed arguments (the ``args:`` of serve_config.yaml)


class DeploymentArgs(BaseModel):
    """Resources, autoscaling and batching of one deployment."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int | None = Field(
        None,
        ge=-1,
        description="requests each caller (Serve's proxy, an ingress replica) holds for this deployment while every "
        "replica is at max_ongoing_requests; beyond it, 503 with Retry-After. null: 2 x max_ongoing_requests; "
        "-1: unbounded (Serve's default)",
    )
    retry_after_s: float = Field(
        1.0, ge=0, description="Retry-After (seconds, rounded up) of the 503s when this deployment is unavailable"
    )
    graceful_shutdown_timeout_s: float = Field(
        REQUEST_TIMEOUT_S + 5,
        ge=0,
        description="how long a stopping replica may finish its requests before it is killed: at least the "
        "request timeout (Serve's default of 20 s is shorter than ours of 30 s)",
    )
    autoscaling_config: dict[str, Any] = Field(
        default_factory=lambda: {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8},
        description="Serve's AutoscalingConfig; upscale_delay_s / downscale_delay_s default to AUTOSCALING_DELAYS",
    )
    max_batch_size: int = Field(
        16, ge=1, description="largest @serve.batch of a model deployment (of a colocated ingress: of whole requests)"
    )
    batch_wait_timeout_s: float = Field(
        0.005, ge=0, description="wait to fill a batch (model deployments, and a colocated ingress)"
    )
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per replica")
    runtime: Runtime = Field(
        "torch",
        description="what runs the replica's models: torch, or onnxruntime (CPU only, pip install "
        "'anchornet[onnx]'; the same function, 2-3x faster on one thread and a small image: docs/serving.md)",
    )

    @model_validator(mode="after")
    def _check_autoscaling(self) -> "DeploymentArgs":
        unknown = set(self.autoscaling_config) - set(AutoscalingConfig.model_fields)
        if unknown:
            raise ValueError(f"unknown autoscaling_config keys {sorted(unknown)}")
        AutoscalingConfig(**self.autoscaling_config)
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests must be -1 (unbounded), null (2 x max_ongoing_requests) or >= 1")
        if self.runtime == "onnxruntime" and self.num_gpus > 0:
            raise ValueError("runtime onnxruntime runs on the CPU: use runtime torch for a deployment on a GPU")
        return self

    @property
    def queue_limit(self) -> int:
        """Serve's ``max_queued_requests``: as given, else twice ``max_ongoing_requests``; -1 is unbounded."""
        return 2 * self.max_ongoing_requests if self.max_queued_requests is None else self.max_queued_requests

    def options(self, name: str) -> dict[str, Any]:
        """``Deployment.options(...)`` for this deployment."""
        return {
            "name": name,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.queue_limit,
            "backpressure_config": {"retry_after_s": self.retry_after_s},
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "autoscaling_config": {**AUTOSCALING_DELAYS, **self.autoscaling_config},
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }


def _ingress_defaults() -> DeploymentArgs:
    return DeploymentArgs(
        num_cpus=0.5,
        max_ongoing_requests=64,
        autoscaling_config={
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 16,
            **AUTOSCALING_DELAYS,
        },
    )


class DeploymentsArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ingress: DeploymentArgs = Field(default_factory=_ingress_defaults)
    glance: DeploymentArgs = Field(default_factory=DeploymentArgs)
    anchornet: DeploymentArgs = Field(default_factory=DeploymentArgs)
    patch: DeploymentArgs = Field(default_factory=DeploymentArgs)
    fallback: DeploymentArgs = Field(
        default_factory=DeploymentArgs, description="the Fallback deployment; used only with ServeArgs.fallback"
    )


class ServeArgs(BaseModel):
    """Arguments of ``build_app``: checkpoints, thresholds, the early-exit settings, limits and deployments."""

    model_config = ConfigDict(extra="forbid")

    anchornet: str = Field(description="AnchorNet checkpoint (path or s3:// URI)")
    glance: str = Field(description="f_glance checkpoint")
    patch: str = Field(description="f_patch checkpoint")
    fallback: str | None = Field(
        None,
        description="a full-size classifier checkpoint run on the whole image as the last step, T = num_patches + 2, "
        "for samples still unsure after their patches; null: no fallback step (thresholds must be fitted with it)",
    )
    thresholds: str | None = Field(None, description="saved thresholds JSON (anchornet.save_thresholds)")
    default_budget: str | None = Field(None, description="budget used when a request names none")
    num_patches: int = Field(4, ge=1, description="T - 1")
    iou_threshold: float = Field(0.3, ge=0, le=1)
    aggregate: Aggregate = "logits"
    top_k: int = Field(5, ge=1, description="classes returned by default")
    max_body_bytes: int = Field(10 * 1024**2, ge=1)
    max_pixels: int = Field(40_000_000, ge=1, description="decompression-bomb limit, checked before decoding")
    max_aspect_ratio: float | None = Field(
        MAX_ASPECT_RATIO, ge=1, description="longest side / shortest side, checked before decoding; null: no limit"
    )
    colocate: bool = Field(
        False,
        description="run the models (the fallback too) inside the ingress replica (no handle calls; the ingress's "
        "resources, autoscaling, torch_threads and runtime cover them, and its max_batch_size / "
        "batch_wait_timeout_s batch the requests, which share each step's forward passes)",
    )
    deployments: DeploymentsArgs = Field(default_factory=DeploymentsArgs)


class BaselineArgs(BaseModel):
    """Arguments of ``build_baseline_app``: one full-size classifier in one deployment."""

    model_config = ConfigDict(extra="forbid")

    classifier: str
    top_k: int = Field(5, ge=1)
    max_body_bytes: int = Field(10 * 1024**2, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    max_aspect_ratio: float | None = Field(MAX_ASPECT_RATIO, ge=1)
    deployment: DeploymentArgs = Field(default_factory=DeploymentArgs)


# --------------------------------------------------------------------------------------------------------------
# What the ingress knows about the models (read from the checkpoint cards by the builder)


@dataclass(frozen=True)
class ServingSpec:
    """Everything the ingress needs from the model cards, so that it loads no model itself."""

    class_names: list[str]
    class_labels: list[str]  # readable: ImageNet's description of a WordNet id, else the name
    preprocessing: dict[str, Any]
    patch_size: int  # K, the side of the crops and of the networks' input
    min_side: int  # smallest image side accepted (AnchorNet's K)
    num_patches: int
    aggregate: Aggregate
    anchornet_macs: int
    glance_macs: int
    patch_macs: int
    top_k: int
    max_body_bytes: int
    max_pixels: int
    max_aspect_ratio: float | None  # longest side / shortest side; None: no limit
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    fallback_macs: int | None = None  # the fallback network's MACs; None: no fallback step

    @property
    def has_fallback(self) -> bool:
        return self.fallback_macs is not None

    @property
    def num_steps(self) -> int:
        """``T``: the glance, one step per patch, and the fallback when there is one."""
        return self.num_patches + (2 if self.has_fallback else 1)

    @property
    def step_macs(self) -> list[int]:
        return cumulative_step_macs(
            self.anchornet_macs, self.glance_macs, self.patch_macs, self.num_steps, fallback_macs=self.fallback_macs
        )

    def thresholds_hint(self, count: int) -> str | None:
        """Why ``count`` thresholds do not fit when that is the count of the other cascade (with or without the
        fallback step), as a hint for the error message; None otherwise."""
        return thresholds_hint(count, self.num_patches, self.has_fallback)


def thresholds_hint(count: int, num_patches: int, fallback: bool) -> str | None:
    """The hint of a wrong number of thresholds that is the other cascade's: fitted without the fallback step they
    are ``num_patches``, with it ``num_patches + 1``."""
    if fallback and count == num_patches:
        why = "thresholds fitted without the fallback step have num_patches thresholds; with it num_patches + 1"
    elif not fallback and count == num_patches + 1:
        why = "num_patches + 1 thresholds are those of a cascade with the fallback step (num_patches without it)"
    else:
        return None
    return f"{why}: {_other_cascade_advice(fallback)}"


def _other_cascade_advice(fallback: bool) -> str:
    """What to do with thresholds fitted with the fallback step when the app has none (``fallback`` False), or
    fitted without it when the app has one."""
    if fallback:
        return "refit with jobs/evaluate.py --fallback"
    return "serve with its --fallback checkpoint, or use thresholds fitted without it"


def _class_names(card: Any) -> list[str]:
    num_classes = card.arch["num_classes"]
    return list(card.class_names) if card.class_names else [str(i) for i in range(num_classes)]


def _classifier_info(card: Any) -> dict[str, Any]:
    """A classifier as ``/info`` shows it: its architecture, input size and MACs there (from its card)."""
    return {"arch": card.arch["name"], "input_size": card.input_size, "macs": card.macs}


def serving_spec(args: ServeArgs) -> ServingSpec:
    """Read the checkpoints (three, or four with a fallback) and check that they fit together; the MACs come from
    the flop counter (the cards'). Raises ``ValueError`` (one line) for a checkpoint of the wrong kind, classes
    that differ between the classifiers, or sizes that do not fit."""
    anchornet, anchornet_card = load_checkpoint(args.anchornet)
    _, glance_card = load_checkpoint(args.glance)
    _, patch_card = load_checkpoint(args.patch)
    fallback_card = load_checkpoint(args.fallback)[1] if args.fallback else None
    if not isinstance(anchornet, AnchorNet):
        raise ValueError(f"{args.anchornet} is a {anchornet_card.kind} checkpoint, not an AnchorNet one")
    for role, card in (("glance", glance_card), ("patch", patch_card), ("fallback", fallback_card)):
        if card is not None and card.kind != "classifier":
            raise ValueError(f"--{role} checkpoint is a {card.kind} checkpoint, not a classifier")
    class_names = _class_names(glance_card)
    if class_names != _class_names(patch_card):
        raise ValueError("the glance and patch classifiers must have the same classes (names and order)")
    if fallback_card is not None and class_names != (fallback_names := _class_names(fallback_card)):
        counts = (len(fallback_names), len(class_names))
        how = f"{counts[0]} classes against {counts[1]}" if counts[0] != counts[1] else "other names or another order"
        raise ValueError(
            f"the fallback classifier must have the glance's classes (names and order): {args.fallback} has {how}"
        )
    if glance_card.input_size != patch_card.input_size:
        raise ValueError(f"glance and patch input sizes differ: {glance_card.input_size} and {patch_card.input_size}")
    preprocessing = Preprocessing.from_dict(anchornet_card.preprocessing or {})
    k = anchornet.receptive_field.size
    if preprocessing.image_size < k:
        raise ValueError(f"preprocessing image_size {preprocessing.image_size} is smaller than AnchorNet's K={k}")
    size = preprocessing.image_size
    if fallback_card is not None and fallback_card.input_size != size:
        # EarlyExitClassifier, and so jobs/evaluate.py --fallback, runs the fallback on the preprocessed image as is
        raise ValueError(
            f"the fallback classifier works at {fallback_card.input_size} px but the images are preprocessed to "
            f"{size} px: export it with --input-size {size}, so that it runs (and costs) what the thresholds were "
            "fitted with"
        )
    anchornet_macs = anchornet_card.macs if anchornet_card.input_size == size else count_macs(anchornet, size)
    return ServingSpec(
        class_names=class_names,
        class_labels=class_labels(class_names),
        preprocessing=preprocessing.to_dict(),
        patch_size=glance_card.input_size,
        min_side=k,
        num_patches=args.num_patches,
        aggregate=args.aggregate,
        anchornet_macs=int(anchornet_macs),
        glance_macs=int(glance_card.macs),
        patch_macs=int(patch_card.macs),
        top_k=args.top_k,
        max_body_bytes=args.max_body_bytes,
        max_pixels=args.max_pixels,
        max_aspect_ratio=args.max_aspect_ratio,
        models={
            role: {**info, "runtime": _runtime_of(args, role)}
            for role, info in {
                "anchornet": {"arch": "anchornet", "input_size": size, "macs": int(anchornet_macs), "K": k},
                "glance": _classifier_info(glance_card),
                "patch": _classifier_info(patch_card),
                **({"fallback": _classifier_info(fallback_card)} if fallback_card is not None else {}),
            }.items()
        },
        fallback_macs=int(fallback_card.macs) if fallback_card is not None else None,
    )


def _runtimes_used(args: ServeArgs) -> set[str]:
    """The runtimes ``args`` will load models on. Raises ``ValueError`` (one line) for a model deployment that sets a
    runtime other than the ingress's when colocated, where the ingress's runtime runs every model."""
    d = args.deployments
    roles = ["glance", "anchornet", "patch", *(["fallback"] if args.fallback else [])]
    if args.colocate:
        options = {role: getattr(d, role) for role in roles}
        ignored = [r for r, o in options.items() if "runtime" in o.model_fields_set and o.runtime != d.ingress.runtime]
        if ignored:
            raise ValueError(
                f"colocated, the ingress's runtime ({d.ingress.runtime}) runs every model: set runtime on "
                f"deployments.ingress, not on {', '.join(ignored)}"
            )
    return {_runtime_of(args, role) for role in roles}


def _runtime_of(args: ServeArgs, role: str) -> str:
    """What runs the model of ``role``: its deployment's runtime, or colocated, the ingress's."""
    deployments = args.deployments
    return (deployments.ingress if args.colocate else getattr(deployments, role)).runtime


def load_budgets(
    config: dict[str, Any], num_steps: int, *, fallback: bool = False
) -> tuple[dict[str, dict[str, Any]], str]:
    """Named budgets and the default one from an ingress ``user_config``, for ``num_steps`` steps (the last one the
    fallback step when ``fallback``).

    ``config`` keys: ``thresholds_path`` (a saved thresholds JSON), ``budgets`` (``name -> [rho...]``, confidences,
    or ``name -> {log_odds: [...]}``, added after the file's), ``default_budget`` (else the middle budget of the
    file, else ``all-steps``). Two budgets are always there: ``all-steps`` (every ``rho = inf``) and
    ``glance-only`` (every ``rho = 0``). Each budget's ``thresholds`` are ``ExitThresholds``. Raises
    ``ValueError`` for unknown keys, a wrong number of thresholds (one line; it says so when they are those of the
    cascade with the fallback step, or without it) or an unknown default.
    """
    unknown = set(config) - set(USER_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown user_config keys {sorted(unknown)}")
    count = num_steps - 1
    budgets: dict[str, dict[str, Any]] = {}
    num_patches = num_steps - (2 if fallback else 1)
    if config.get("thresholds_path"):
        for name, point in load_thresholds(config["thresholds_path"]).items():
            _check_fitted_cascade(config["thresholds_path"], point, num_patches, fallback)
            fields = {f.name: getattr(point, f.name) for f in dataclasses.fields(point)}
            budgets[name] = {k: v for k, v in fields.items() if v is not None and k not in _CASCADE_FIELDS}
    from_file = list(budgets)
    for name, rho in (config.get("budgets") or {}).items():
        budgets[name] = {"thresholds": _inline_thresholds(name, rho)}
    budgets.setdefault("all-steps", {"thresholds": ExitThresholds.from_confidences([math.inf] * count)})
    budgets.setdefault("glance-only", {"thresholds": ExitThresholds.from_confidences([0.0] * count)})
    for name, budget in budgets.items():
        rho = budget["thresholds"]
        if len(rho) != count:
            hint = thresholds_hint(len(rho), num_patches, fallback)
            raise ValueError(
                f"budget {name!r} needs {count} thresholds (T = {num_steps} steps), got {list(rho.confidences)}"
                + (f": {hint}" if hint else "")
            )
    # the middle of the file's sweep (cheap to costly); inline budgets never move the default
    default = config.get("default_budget") or (from_file[len(from_file) // 2] if from_file else "all-steps")
    if default not in budgets:
        raise ValueError(f"default_budget {default!r} is not one of {list(budgets)}")
    return budgets, default


_CASCADE_FIELDS = ("name", "num_patches", "fallback")  # a file's, not a budget's: left out of /info's budgets


def _check_fitted_cascade(path: str, point: BudgetPoint, num_patches: int, fallback: bool) -> None:
    """``ValueError`` (one line, with what to do) when the file records the cascade its budgets were fitted for and
    it is not this one: the same number of thresholds (2 patches + fallback, 3 patches without) would otherwise
    pass."""
    if point.num_patches is None:
        return  # written before files recorded it: only the count is checked
    fitted = (point.num_patches, bool(point.fallback))
    if fitted == (num_patches, fallback):
        return

    def cascade(n: int, with_fallback: bool) -> str:
        return f"num_patches={n} " + ("with" if with_fallback else "without") + " the fallback step"

    if fitted[1] != fallback:
        hint = _other_cascade_advice(fallback)
    else:
        hint = f"serve with num_patches={fitted[0]}, or refit with jobs/evaluate.py --num-patches {num_patches}"
    this = cascade(num_patches, fallback)
    raise ValueError(f"{path!r} was fitted for {cascade(*fitted)}, this app runs {this}: {hint}")


def _inline_thresholds(name: str, rho: Any) -> ExitThresholds:
    """An inline ``user_config`` budget: a list of confidences, or ``{log_odds: [...]}`` (``inf`` allowed)."""
    if isinstance(rho, Mapping):
        if set(rho) != {"log_odds"}:
            raise ValueError(f"budget {name!r}: a mapping must be {{log_odds: [...]}}, got keys {sorted(rho)}")
        log_odds = tuple(float(v) for v in rho["log_odds"])
        if any(math.isnan(v) for v in log_odds):
            raise ValueError(f"budget {name!r}: log-odds thresholds must not be NaN, got {list(log_odds)}")
        return ExitThresholds(log_odds)
    confidences = [float(r) for r in rho]
    if not are_confidences(confidences):
        raise ValueError(f"budget {name!r}: thresholds are confidences in [0, 1] (or inf: no one exits), got {rho}")
    return ExitThresholds.from_confidences(confidences)


def _budget_info(budget: Mapping[str, Any]) -> dict[str, Any]:
    """A budget as ``/info`` shows it: its thresholds as confidences (for reading) and as the log-odds applied."""
    rho: ExitThresholds = budget["thresholds"]
    return {**budget, "thresholds": list(rho.confidences), "log_odds": list(rho.log_odds)}


@dataclass(frozen=True)
class LiveBudgets:
    """The ingress's live thresholds, ``load_budgets`` of its ``user_config``, as one immutable value.

    ``reconfigure`` (on a worker thread) replaces it in one assignment and a request reads it once, so no request
    pairs the budgets of one config with the default of another. ``error`` says why the last live update was
    refused; ``named`` and ``default`` are then those of the last good config.
    """

    named: Mapping[str, Mapping[str, Any]]
    default: str
    error: str | None = None

    @classmethod
    def load(cls, config: Mapping[str, Any] | None, num_steps: int, *, fallback: bool = False) -> "LiveBudgets":
        named, default = load_budgets(dict(config or {}), num_steps, fallback=fallback)
        return cls(named=named, default=default)


def reconfigured_budgets(
    current: LiveBudgets | None, config: Mapping[str, Any] | None, num_steps: int, *, fallback: bool = False
) -> LiveBudgets:
    """The budgets after a ``user_config`` update. At start (``current`` is None) a bad config raises, failing the
    replica and so the deploy; on a running replica it is refused and logged: ``current`` stays, with ``error``
    saying why, so that a typo in a live update does not take the service down."""
    try:
        return LiveBudgets.load(config, num_steps, fallback=fallback)
    except Exception as err:  # a missing file, bad JSON, wrong thresholds, unknown keys: all refused alike
        if current is None:
            raise
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        error = f"user_config update refused, the previous budgets stay: {reason}"
        logger.error(error)
        return replace(current, error=error)


# --------------------------------------------------------------------------------------------------------------
# Model deployments


class FailureStreak:
    """Failed forward passes in a row of one model in a replica, for its ``check_health``.

    A replica whose model fails every pass (a sticky CUDA error, a lost device) would otherwise stay healthy and
    keep taking requests; from ``limit`` failures in a row its health check raises and Serve replaces it. One
    success resets the count. ``check`` runs no forward pass: the controller calls it every few seconds."""

    def __init__(self, limit: int = UNHEALTHY_AFTER_FAILURES) -> None:
        self.limit = limit
        self.count = 0
        self.last_error = ""

    def run(self, forward: Callable[..., Any], *args: Any) -> Any:
        """``forward(*args)``, counted."""
        try:
            output = forward(*args)
        except Exception as err:
            self.count += 1
            self.last_error = " ".join(f"{type(err).__name__}: {err}".split())
            raise
        self.count = 0
        return output

    def check(self) -> None:
        """Raise ``RuntimeError`` (one line) once ``limit`` passes in a row have failed."""
        if self.count >= self.limit:
            raise RuntimeError(f"{self.count} forward passes in a row failed, the last with {self.last_error}")


def _by_shape(items: Sequence[torch.Tensor], run: Callable[[torch.Tensor], list[Any]]) -> list[Any]:
    """Run ``run`` once per group of equally shaped tensors of ``items``; results back in ``items`` order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(tuple(item.shape), []).append(i)
    results: list[Any] = [None] * len(items)
    for indices in groups.values():
        for i, result in zip(indices, run(torch.stack([items[i] for i in indices])), strict=True):
            results[i] = result
    return results


def to_wire(value: Any) -> Any:
    """What a handle call ships: each CPU tensor (in lists, tuples and dicts too) as a NumPy array sharing its
    memory. Ray pickles an array as its buffer; a tensor's storage goes through ``torch.save`` and back through
    ``torch.load``, which cost about 1.5 ms more per tensor per call on a 2-core node (docs/serving.md)."""
    if isinstance(value, torch.Tensor):
        try:
            return value.detach().cpu().numpy()
        except TypeError:  # a dtype NumPy lacks (bfloat16): shipped as the tensor it is
            return value
    if isinstance(value, dict):
        return {key: to_wire(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_wire(item) for item in value)
    return value


def from_wire(value: Any) -> Any:
    """``to_wire`` undone: arrays back to tensors (copied when Ray hands out a read-only buffer)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value if value.flags.writeable else value.copy())
    if isinstance(value, dict):
        return {key: from_wire(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(from_wire(item) for item in value)
    return value


def high_throughput_env(draining_period_s: float | None = None) -> dict[str, str]:
    """Environment of Ray Serve's high-throughput mode (Ray >= 2.56): HAProxy, a C load balancer, takes the HTTP
    port in place of the Python proxy and forwards straight to the ingress replicas; replicas talk over direct
    gRPC. Serve's processes read it when they start, so it goes into the environment of ``ray start`` (or of
    the driver before an embedded ``ray.init``). ``draining_period_s`` shortens how long a stopping ingress
    replica stays up so that load balancers can deregister it (Serve's default: 30 s).

    User code stays on its own thread (``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=1``; the throughput mode
    would move it onto the replica's control loop). Our forward passes block the loop they run on, and with
    direct ingress a replica samples its own ongoing requests for the autoscaler on that loop: it then samples
    only between batches, when the requests have just finished, so the full-224 app never scaled past one
    replica under load. On its own thread it scales 1 -> 2 -> 1 (docs/serving.md), for 0.1-0.6 ms per request."""
    env = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1",
    }
    if draining_period_s is not None:
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = str(draining_period_s)
    return env


# HAProxy's own listeners in high-throughput mode (Ray's defaults, moved by these variables), on every interface.
HAPROXY_PORTS = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}


def _busy_haproxy_ports() -> list[str]:
    """HAProxy's stats and metrics ports that something else already holds (HAProxy would crash at start)."""
    busy = []
    for variable, default in HAPROXY_PORTS.items():
        port = int(os.environ.get(variable, default))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as HAProxy binds: TIME_WAIT is no conflict
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                busy.append(f"{port} ({variable})")
    return busy


def enable_high_throughput(draining_period_s: float | None = None) -> None:
    """Put ``high_throughput_env`` into this process's environment, for an embedded ``ray.init`` that follows.

    Raises ``RuntimeError`` (one line, naming the ports and their variables) when HAProxy's own ports are taken:
    HAProxy would crash at start with a long traceback."""
    if busy := _busy_haproxy_ports():
        raise RuntimeError(f"HAProxy's ports are in use: {', '.join(busy)}; set those variables to free ports")
    os.environ.update(high_throughput_env(draining_period_s))


def model_device(use_gpu: bool) -> torch.device:
    """Where a replica runs its model: the GPU Ray gave it when its deployment asks for ``num_gpus``, else the
    CPU. Raises ``RuntimeError`` when GPUs were asked for but torch sees none (a CPU-only torch build)."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("the deployment asks for num_gpus > 0 but torch sees no CUDA device")
    return torch.device("cuda")


def load_on_replica(checkpoint: str, use_gpu: bool, runtime: Runtime = "torch") -> tuple[nn.Module, Any]:
    """A classifier checkpoint ready for serving on the replica's device (``model_device``), and its card:
    ``anchornet.prepare_classifier_for_inference``, batch norms folded and weights channels-last (1.35x to 3x faster
    on one CPU thread, docs/serving.md; the same function up to float32 rounding). ``runtime="onnxruntime"``: that
    model run by ONNX Runtime (``pipelines.onnx_runtime``), on the CPU."""
    model, card = load_checkpoint(checkpoint)
    prepared = prepare_classifier_for_inference(model, card.input_size, model_device(use_gpu))
    if runtime == "onnxruntime":
        prepared = OnnxRuntimeModel(prepared, _example(2, card.input_size))
    return prepared, card


def load_anchornet_on_replica(checkpoint: str, use_gpu: bool, runtime: Runtime = "torch") -> CamAndLogits:
    """An AnchorNet checkpoint ready for serving on the replica's device, as a module that gives ``(cam, logits)``
    of float images: ``anchornet.prepare_for_inference``, the same folded, channels-last, exact-float32 model the
    precompute job runs (up to float32 rounding with the batch shape: the job runs 16 images per pass, a replica
    the batch it formed). ``runtime="onnxruntime"``: run by ONNX Runtime, on the CPU (its CAM within 1e-3)."""
    model, card = load_checkpoint(checkpoint)
    if not isinstance(model, AnchorNet):
        raise ValueError(f"{checkpoint} is a {card.kind} checkpoint, not an AnchorNet one")
    cam = CamAndLogits(prepare_for_inference(model, model_device(use_gpu)))
    if runtime == "onnxruntime":
        cam = OnnxRuntimeModel(cam, _example(2, card.input_size), dynamic_dims=(0, 2, 3))
    return cam


def _example(batch: int, size: int) -> torch.Tensor:
    """Random float images in [0, 1), the same each call: the example a model is exported and checked on."""
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _in_layout(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``images`` in the memory layout ``model`` reads fastest: channels-last for the prepared torch models, as they
    are (NCHW) for ONNX Runtime, which copies its input to NCHW anyway."""
    if isinstance(model, OnnxRuntimeModel):
        return images
    return images.contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def classify_images(model: nn.Module, input_size: int, images: torch.Tensor) -> list[torch.Tensor]:
    """What a classifier deployment computes for a batch: uint8 ``(B, 3, H, W)`` -> ``B`` float32 logits
    (on the CPU, wherever the model runs, each in its own storage)."""
    images = images.to(_device_of(model), non_blocking=True)
    logits = model(_in_layout(model, resize_square(to_float(images), input_size))).float().cpu()
    return [row.clone() for row in logits]  # each its own storage: a view would pickle the whole batch


@torch.inference_mode()
def propose_patches(
    model: CamAndLogits, images: torch.Tensor, num_patches: int, iou_threshold: float
) -> list[dict[str, torch.Tensor]]:
    """What the AnchorNet deployment computes for a batch: CAM (Eq. 2, ``load_anchornet_on_replica``'s model),
    NMS-selected boxes and their crops (on the CPU, wherever the model runs)."""
    receptive_field = model.receptive_field
    inputs = _in_layout(model, images.to(_device_of(model), non_blocking=True))  # uint8: a quarter of the bytes
    cam, _ = model(to_float(inputs))
    selection = select_patches(cam.cpu(), receptive_field, num_patches, iou_threshold)
    crops = crop_patches(images, selection.boxes, size=receptive_field.size)
    return [
        {"boxes": selection.boxes[b][valid], "scores": selection.scores[b][valid].float(), "crops": crops[b][valid]}
        for b, valid in enumerate(selection.valid)
    ]


@serve.deployment
class ClassifierDeployment:
    """A downstream classifier (glance, patch or fallback): uint8 ``(3, H, W)`` in, float32 logits ``(C,)`` out.

    Images are resized to the checkpoint's ``input_size`` when they differ; concurrent calls share one batch.
    Over the handle, arrays as ``to_wire`` ships them (tensors are taken too); ``from_wire`` reads the output.
    """

    def __init__(
        self,
        checkpoint: str,
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.005,
        torch_threads: int = 1,
        use_gpu: bool = False,
        runtime: Runtime = "torch",
    ) -> None:
        torch.set_num_threads(torch_threads)
        self.model, self.card = load_on_replica(checkpoint, use_gpu, runtime)
        self.input_size = self.card.input_size
        self.failures = FailureStreak()
        self.__call__.set_max_batch_size(max_batch_size)
        self.__call__.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def _forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return classify_images(self.model, self.input_size, images)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def __call__(self, images: list[Any]) -> list[Any]:
        return to_wire(self.failures.run(_by_shape, from_wire(images), self._forward))

    def check_health(self) -> None:
        self.failures.check()


@serve.deployment
class AnchorNetDeployment:
    """AnchorNet: uint8 ``(3, H, W)`` in; the CAM's best patches out, ``{"boxes", "scores", "crops"}``.

    ``boxes`` ``(n, 4)`` half-open windows, best first; ``scores`` their CAM scores ``(n,)``; ``crops`` the
    ``K x K`` uint8 pixels ``(n, 3, K, K)``; ``n <= num_patches`` (fewer when NMS leaves fewer cells). Over the
    handle, arrays as ``to_wire`` ships them (tensors are taken too); ``from_wire`` reads the output.
    """

    def __init__(
        self,
        checkpoint: str,
        num_patches: int = 4,
        iou_threshold: float = 0.3,
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.005,
        torch_threads: int = 1,
        use_gpu: bool = False,
        runtime: Runtime = "torch",
    ) -> None:
        torch.set_num_threads(torch_threads)
        self.model = load_anchornet_on_replica(checkpoint, use_gpu, runtime)
        self.num_patches = num_patches
        self.iou_threshold = iou_threshold
        self.failures = FailureStreak()
        self.__call__.set_max_batch_size(max_batch_size)
        self.__call__.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def _propose(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return propose_patches(self.model, images, self.num_patches, self.iou_threshold)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def __call__(self, images: list[Any]) -> list[dict[str, Any]]:
        return to_wire(self.failures.run(_by_shape, from_wire(images), self._propose))

    def check_health(self) -> None:
        self.failures.check()


@dataclass(frozen=True)
class ColocatedModels:
    """What the ingress loads itself with ``colocate: true``: the checkpoints, the early-exit settings and the
    batching of the whole cascade (``fallback`` None: no fallback step)."""

    anchornet: str
    glance: str
    patch: str
    num_patches: int
    iou_threshold: float
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.005
    aggregate: Aggregate = "logits"
    image_size: int = 224  # the preprocessed images' side, where AnchorNet and the fallback are charged
    torch_threads: int = 1
    use_gpu: bool = False
    fallback: str | None = None
    runtime: Runtime = "torch"

    def load(self) -> "InProcessCascade":
        """The models loaded in this process, as the deployments load them, in one ``InProcessCascade``."""
        torch.set_num_threads(self.torch_threads)
        cam = load_anchornet_on_replica(self.anchornet, self.use_gpu, self.runtime)
        checkpoints = {"glance": self.glance, "patch": self.patch, "fallback": self.fallback}
        loaded = {role: load_on_replica(path, self.use_gpu, self.runtime) for role, path in checkpoints.items() if path}
        nets = {role: model for role, (model, _) in loaded.items()}

        def in_torch(model: nn.Module) -> nn.Module:  # the MACs are counted on the torch modules
            return model.source if isinstance(model, OnnxRuntimeModel) else model

        engine = EarlyExitClassifier(
            in_torch(cam).model,
            in_torch(nets["glance"]),
            in_torch(nets["patch"]),
            [math.inf] * (self.num_patches + int(self.fallback is not None)),  # every request brings its own
            self.num_patches,
            self.iou_threshold,
            patch_size=loaded["glance"][1].input_size,
            aggregate=self.aggregate,
            image_size=(self.image_size, self.image_size),
            fallback_net=in_torch(nets["fallback"]) if "fallback" in nets else None,
        )
        return InProcessCascade(
            engine, nets, cam, self.max_batch_size, self.batch_wait_timeout_s, model_device(self.use_gpu)
        )


# --------------------------------------------------------------------------------------------------------------
# Ingress

api = FastAPI(
    title="AnchorNet early-exit classifier",
    description="Glance at the image, then look at AnchorNet's patches only while the prediction is unsure.",
    version="1",
)
install_error_handlers(api)

_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
            },
        },
    }
}


class ClassScore(BaseModel):
    index: int
    name: str = Field(description="the class name in the checkpoint (a WordNet id for ImageNet classes)")
    label: str = Field(description="readable: ImageNet's description of a WordNet id, else the name")
    probability: float


class PatchInfo(BaseModel):
    step: int = Field(description="the step that looked at this patch (2 = the best patch)")
    box: list[float] = Field(description="half-open (x0, y0, x1, y1) in the preprocessed image")
    cam_score: float


class Classification(BaseModel):
    prediction: ClassScore
    top_k: list[ClassScore]
    confidence: float
    exit_step: int = Field(
        description="1 = the glance, t >= 2 = after the (t-1)-th patch; with a fallback, T = num_patches + 2 is the "
        "fallback step (whatever the number of patches seen)"
    )
    num_steps: int
    macs: int = Field(description="multiply-accumulates spent on this image")
    gmacs: float
    budget: str | None
    thresholds: list[float | str] = Field(description="rho_1..rho_{T-1} as confidences, for reading")
    log_odds: list[float | str] = Field(description="the same as log-odds: what the exits were decided on")
    patches: list[PatchInfo]
    patches_available: int | None = Field(description="patches AnchorNet proposed; null when it did not run")
    fallback: bool = Field(
        False, description="the fallback network decided (its prediction alone, on the whole image: the last step)"
    )
    image_size: list[int] = Field(description="(width, height) as received")
    latency_ms: float = Field(description="time in the ingress, decoding included")


async def decode_request(request: Request, spec: ServingSpec | dict[str, Any]) -> tuple[torch.Tensor, list[int], float]:
    """Read, decode and preprocess the image of a request: uint8 ``(3, S, S)``, the original (width, height) and
    the milliseconds decoding and preprocessing took (in their worker thread)."""
    get = spec.get if isinstance(spec, dict) else lambda key: getattr(spec, key)
    data = await read_image_bytes(request, get("max_body_bytes"))
    preprocessing = Preprocessing.from_dict(get("preprocessing"))

    def decode() -> tuple[torch.Tensor, list[int], float]:
        start = time.perf_counter()
        image = decode_image(
            data, min_size=get("min_side"), max_pixels=get("max_pixels"), max_aspect_ratio=get("max_aspect_ratio")
        )
        return preprocessing(image), list(image.size), (time.perf_counter() - start) * 1e3

    try:
        return await asyncio.to_thread(decode)
    except ImageDecodeError as err:
        status = 413 if "exceeds" in str(err) else 400
        raise ApiError(status, "bad_image", str(err)) from None


class ServerTiming:
    """Where a request's time went, as the ``Server-Timing`` response header (W3C Server Timing): ``decode``,
    each model (``glance``, ``anchornet``, ``patch`` summed over steps, ``fallback``) and ``app``, the whole
    handler.

    A model's entry is its forward pass when it runs in this replica (``desc="forward"``; a batched forward is
    counted in full for every request that shared it), or the handle call as the ingress waited for it when it is
    a separate deployment (``desc="call"``: forward, batching wait and the hop)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.entries: dict[str, list[Any]] = {}  # name -> [milliseconds, desc]

    def add(self, name: str, ms: float, desc: str | None = None) -> None:
        entry = self.entries.setdefault(name, [0.0, desc])
        entry[0] += ms

    async def wait(self, name: str, pending: Awaitable[Any]) -> Any:
        """``await pending``, its wall time added to ``name`` as a ``call``."""
        start = time.perf_counter()
        output = await pending
        self.add(name, (time.perf_counter() - start) * 1e3, "call")
        return output

    async def call(self, name: str, model: Any, item: Any) -> Any:
        """``await model.remote(item)`` of a deployment handle, timed as ``name`` (a ``call``)."""
        return from_wire(await self.wait(name, model.remote(to_wire(item))))

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.start) * 1e3

    def header(self, app_ms: float) -> str:
        parts = [
            f'{name};desc="{desc}";dur={ms:.3f}' if desc else f"{name};dur={ms:.3f}"
            for name, (ms, desc) in self.entries.items()
        ]
        return ", ".join([*parts, f"app;dur={app_ms:.3f}"])


def model_unavailable(name: str, err: Exception, retry_after_s: float) -> ApiError:
    """The 503 ``model_unavailable`` (with ``Retry-After``) for a model call that Serve could not complete: its
    deployment overloaded (``BackPressureError``: its callers' queue is full; its own ``retry_after_s`` wins),
    failed to deploy (``DeploymentUnavailableError``) or its replica lost (``RayActorError``), logged as one line."""
    if isinstance(err, BackPressureError):
        why = f"overloaded: {err.message.rstrip('.')}"
        retry_after_s = retry_after_s if err.retry_after_s is None else err.retry_after_s
    elif isinstance(err, DeploymentUnavailableError):
        why = "its deployment failed to deploy"
    else:
        why = f"its replica was lost, on the retry too ({type(err).__name__})"
    message = f"the {name} model is unavailable: {why}; retry later"
    logger.warning("503 model_unavailable: %s", message)
    return ApiError(503, "model_unavailable", message, retry_after(retry_after_s))


async def call_deployment(name: str, handle: Any, item: Any, retry_after_s: float = 1.0) -> Any:
    """``await handle.remote(item)`` as the ingress calls a model deployment.

    Serve retries a call on another replica only when its replica was gone before taking it; once taken, a replica
    that dies or becomes unreachable raises ``RayActorError`` here. Inference is idempotent, so that call is retried
    once (Serve's router has then dropped that replica). A second loss, an overloaded deployment or one that failed
    to deploy is ``model_unavailable``: an ``ApiError`` 503 with ``Retry-After``, not a 500 with a traceback."""
    try:
        return await handle.remote(item)
    except RayActorError as err:
        logger.warning("%s call lost its replica (%s); retrying once", name, type(err).__name__)
    except (BackPressureError, DeploymentUnavailableError) as err:
        raise model_unavailable(name, err, retry_after_s) from None
    try:
        return await handle.remote(item)
    except (RayActorError, BackPressureError, DeploymentUnavailableError) as err:
        raise model_unavailable(name, err, retry_after_s) from None


class RetryingHandle:
    """A model deployment's handle as the ingress holds it: ``await model.remote(item)`` is ``call_deployment``."""

    def __init__(self, name: str, handle: DeploymentHandle, retry_after_s: float = 1.0) -> None:
        self.name = name
        self.handle = handle
        self.retry_after_s = retry_after_s

    async def remote(self, item: Any) -> Any:
        return await call_deployment(self.name, self.handle, item, self.retry_after_s)


def _class_score(index: int, probability: float, names: list[str], labels: list[str]) -> ClassScore:
    return ClassScore(index=index, name=names[index], label=labels[index], probability=probability)


def _top_k(probs: torch.Tensor, names: list[str], labels: list[str], k: int) -> list[ClassScore]:
    values, indices = probs.topk(min(k, probs.numel()))
    return [_class_score(int(i), float(v), names, labels) for v, i in zip(values, indices, strict=True)]


@dataclass(frozen=True)
class EarlyExit:
    """What the early-exit loop decided for one image (``early_exit_steps``)."""

    exit_step: int
    confidence: float
    prediction: int
    probabilities: torch.Tensor  # (C,) of the outputs the prediction comes from, for the top-k
    patches: list[PatchInfo]
    patches_available: int | None  # None: AnchorNet did not run
    fallback: bool  # the fallback step decided
    macs: int


async def early_exit_steps(
    spec: ServingSpec, rho: ExitThresholds, image: torch.Tensor, models: Mapping[str, Any], timing: ServerTiming
) -> EarlyExit:
    """Paper Alg. 1 on one preprocessed uint8 image ``(3, S, S)``, step by step over the model deployments
    (``models``: role -> a handle, through ``timing.call``).

    The glance, then (unless it is confident) AnchorNet once and the patches one by one, summing ``z_t``, until
    ``confidence(z_t) >= rho_t``; without a fallback the last patch, or the last one AnchorNet found, decides. With
    one (``spec.has_fallback``), a sample still unsure after its last patch or whose patches ran out goes to the
    fallback step ``T = num_patches + 2``: the fallback network's output alone on the whole image, not added to
    ``z``, decides (its confidence that of one step seen). The MACs are those spent (``sample_macs``)."""
    aggregate = spec.aggregate
    z = step_contribution(await timing.call("glance", models["glance"], image), aggregate)
    t, patches, available = 1, [], None
    confidence, prediction = accumulated_confidence(z, t, aggregate)
    decided = spec.num_steps == 1 or bool(confidence_log_odds(z, t, aggregate) >= rho.log_odds[0])
    if not decided:
        proposal = await timing.call("anchornet", models["anchornet"], image)
        available = int(proposal["boxes"].shape[0])
        for j in range(available):
            t = j + 2
            crop = proposal["crops"][j]  # to_wire ships a view's own bytes only (a tensor view: its storage)
            z = z + step_contribution(await timing.call("patch", models["patch"], crop), aggregate)
            confidence, prediction = accumulated_confidence(z, t, aggregate)
            patches.append(PatchInfo(step=t, box=proposal["boxes"][j].tolist(), cam_score=float(proposal["scores"][j])))
            if t == spec.num_steps or confidence_log_odds(z, t, aggregate) >= rho.log_odds[t - 1]:
                decided = True
                break
    steps_in_z = t
    fallback = not decided and spec.has_fallback
    if fallback:
        z = step_contribution(await timing.call("fallback", models["fallback"], image), aggregate)
        t, steps_in_z = spec.num_steps, 1
        confidence, prediction = accumulated_confidence(z, steps_in_z, aggregate)
    macs = sample_macs(
        t,
        int(available is not None),
        spec.anchornet_macs,
        spec.glance_macs,
        spec.patch_macs,
        patches_seen=len(patches),
        ran_fallback=int(fallback),
        fallback_macs=int(spec.fallback_macs or 0),
    )
    return EarlyExit(
        exit_step=t,
        confidence=float(confidence),
        prediction=int(prediction),
        probabilities=z.softmax(dim=-1) if aggregate == "logits" else z / steps_in_z,
        patches=patches,
        patches_available=available,
        fallback=fallback,
        macs=int(macs),
    )


class _Runner(nn.Module):
    """One of the cascade's models as ``InProcessCascade`` runs it: the input in the layout the model reads fastest
    (``_in_layout``); each pass timed (milliseconds, appended to ``passes``: one per call of a ``predict``, so the
    patch classifier's in step order; on a GPU the timer waits for the pass) and counted in ``failures``."""

    def __init__(self, model: nn.Module, clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__()
        self.model, self.clock = model, clock
        self.passes: list[float] = []
        self.failures = FailureStreak()

    def forward(self, images: torch.Tensor) -> Any:
        start = self.clock()
        output = self.failures.run(self.model, _in_layout(self.model, images))
        if images.is_cuda:
            torch.cuda.synchronize(images.device)
        self.passes.append((self.clock() - start) * 1e3)
        return output


class InProcessCascade:
    """Paper Alg. 1 inside the ingress replica (``colocate: true``) for the requests it holds at once.

    Concurrent requests are batched (``@serve.batch``, run on the event loop) and decided by one
    ``EarlyExitClassifier.predict`` per batch and per thresholds among them: they share each step's forward pass,
    the glance's for all of them, AnchorNet's for those still unsure, each patch step's for those unsure after it.
    On CPU nodes that is 1.1-1.4 ms less CPU per request at four to eight requests in flight than one batching
    queue per step (docs/serving.md). The passes run on ``nets`` and ``cam`` (``load_on_replica`` /
    ``load_anchornet_on_replica``: torch or ONNX Runtime); a decision equals ``early_exit_steps`` on the same
    models. A group whose ``predict`` fails fails its own requests only; ``runners`` (role -> ``_Runner``) count
    each model's failed passes in a row, for the ingress's ``check_health``.
    """

    def __init__(
        self,
        engine: EarlyExitClassifier,
        nets: Mapping[str, nn.Module],
        cam: nn.Module,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        device: torch.device,
    ) -> None:
        self.runners = {role: _Runner(net) for role, net in {"anchornet": cam, **nets}.items()}
        self.engine = engine.run_on(
            cam=self.runners["anchornet"],
            **{role: self.runners[role] for role in ("glance", "patch", "fallback") if role in nets},
        )
        self.device = device
        self._decide = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)(self._run)

    def check(self) -> None:
        """``RuntimeError`` (one line) once one of the models' passes keep failing (``FailureStreak.check``)."""
        for runner in self.runners.values():
            runner.failures.check()

    async def decide(self, image: torch.Tensor, rho: ExitThresholds) -> tuple[EarlyExit, dict[str, float]]:
        """The decision for one preprocessed uint8 image ``(3, S, S)`` under ``rho``, and the milliseconds of the
        forward passes it took part in (role -> ms: the patch steps it saw, summed; a batched pass counted in full
        for every request in it)."""
        decided = await self._decide((image, rho))
        if isinstance(decided, Exception):
            raise decided
        return decided

    async def _run(self, items: list[tuple[torch.Tensor, ExitThresholds]]) -> list[Any]:
        groups: dict[tuple[ExitThresholds, tuple[int, ...]], list[int]] = {}
        for i, (image, rho) in enumerate(items):
            groups.setdefault((rho, tuple(image.shape)), []).append(i)
        decided: list[Any] = [None] * len(items)
        for (rho, _), indices in groups.items():
            for runner in self.runners.values():
                runner.passes.clear()
            try:
                result = self._predict(torch.stack([items[i][0] for i in indices]).to(self.device), rho)
            except Exception as err:  # this group's requests fail; the others in the batch go on
                for i in indices:
                    decided[i] = err
                continue
            for row, i in enumerate(indices):
                decided[i] = self._decision(result, row)
        return decided

    @torch.inference_mode()
    def _predict(self, images: torch.Tensor, rho: ExitThresholds) -> EarlyExitResult:
        result = self.engine.predict(to_float(images), thresholds=rho)
        return EarlyExitResult(**{f.name: getattr(result, f.name).cpu() for f in dataclasses.fields(result)})

    def _decision(self, result: EarlyExitResult, row: int) -> tuple[EarlyExit, dict[str, float]]:
        engine = self.engine
        t, available = int(result.exit_step[row]), int(result.patches_available[row])
        fallback = engine.has_fallback and t == engine.num_steps
        seen = [j for j in range(engine.num_patches) if not math.isnan(float(result.boxes[row, j, 0]))]
        patches = [
            PatchInfo(step=j + 2, box=result.boxes[row, j].tolist(), cam_score=float(result.scores[row, j]))
            for j in seen
        ]
        z = result.logits[row]
        decision = EarlyExit(
            exit_step=t,
            confidence=float(result.confidence[row]),
            prediction=int(result.prediction[row]),
            probabilities=z.softmax(dim=-1) if engine.aggregate == "logits" else z / (1 if fallback else t),
            patches=patches,
            patches_available=available if available >= 0 else None,
            fallback=fallback,
            macs=int(result.macs[row]),
        )
        passes = {"glance": 1, "anchornet": int(available >= 0), "patch": len(seen), "fallback": int(fallback)}
        spent = {role: sum(self.runners[role].passes[:n]) for role, n in passes.items() if n}
        return decision, spent


@serve.deployment
@serve.ingress(api)
class Ingress:
    """Decodes and preprocesses, then runs the early-exit loop over the model deployments (or, colocated, over
    the same models loaded in this replica).

    Model calls go through ``call_deployment`` (a lost replica is retried once; then 503 ``model_unavailable``
    with ``Retry-After: retry_after_s``). Colocated, the models run in this replica as one ``InProcessCascade``, and
    ``check_health`` fails once its passes keep failing. ``fallback`` (a handle, or in ``colocated``) is there
    exactly when ``spec`` has a fallback step."""

    def __init__(
        self,
        spec: ServingSpec,
        glance: DeploymentHandle | None = None,
        anchornet: DeploymentHandle | None = None,
        patch: DeploymentHandle | None = None,
        colocated: ColocatedModels | None = None,
        retry_after_s: float = 1.0,
        fallback: DeploymentHandle | None = None,
    ) -> None:
        self.models: dict[str, RetryingHandle] = {}  # role -> handle, in the separate layout
        self.cascade: InProcessCascade | None = None
        if colocated is not None:
            if (colocated.num_patches, colocated.aggregate) != (spec.num_patches, spec.aggregate):
                raise ValueError(
                    f"the colocated models run {colocated.num_patches} patches with aggregate {colocated.aggregate!r} "
                    f"but the spec says {spec.num_patches} and {spec.aggregate!r}"
                )
            self.cascade = colocated.load()
            has_fallback = self.cascade.engine.has_fallback
        elif glance is None or anchornet is None or patch is None:
            raise ValueError("Ingress needs the three model handles, or colocated models")
        else:
            handles = {"glance": glance, "anchornet": anchornet, "patch": patch, "fallback": fallback}
            self.models = {role: RetryingHandle(role, h, retry_after_s) for role, h in handles.items() if h is not None}
            has_fallback = fallback is not None
        if has_fallback != spec.has_fallback:
            raise ValueError(
                "the Ingress got a fallback model but its spec has no fallback step"
                if has_fallback
                else "the Ingress's spec has a fallback step but it got no fallback model"
            )
        self.layout = "colocated" if colocated is not None else "separate"
        self.spec = spec
        # the built-in budgets, until a user_config comes
        self.budgets = LiveBudgets.load({}, spec.num_steps, fallback=spec.has_fallback)
        self.configured = False

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Live thresholds: ``user_config`` as ``load_budgets`` reads it. A bad one fails the replica at start;
        once it has started with a good one, a bad update is refused (``reconfigured_budgets``)."""
        current = self.budgets if self.configured else None
        self.budgets = reconfigured_budgets(current, config, self.spec.num_steps, fallback=self.spec.has_fallback)
        self.configured = True

    def check_health(self) -> None:
        """Serve's health check: colocated, fails once the forward passes in this replica keep failing."""
        if self.cascade is not None:
            self.cascade.check()

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/info")
    async def info(self) -> dict[str, Any]:
        spec, live = self.spec, self.budgets
        return jsonable(
            {
                "classes": spec.class_names,
                "labels": spec.class_labels,
                "num_steps": spec.num_steps,
                "num_patches": spec.num_patches,
                "fallback": spec.has_fallback,
                "layout": self.layout,
                "patch_size": spec.patch_size,
                "min_image_side": spec.min_side,
                "aggregate": spec.aggregate,
                "preprocessing": spec.preprocessing,
                "models": spec.models,
                "step_macs": spec.step_macs,
                "default_budget": live.default,
                "budgets": {
                    name: {
                        **b,
                        "thresholds": list(b["thresholds"].confidences),
                        "log_odds": list(b["thresholds"].log_odds),
                    }
                    for name, b in live.named.items()
                },
                "config_error": live.error,
                "limits": {
                    "max_body_bytes": spec.max_body_bytes,
                    "max_pixels": spec.max_pixels,
                    "max_aspect_ratio": spec.max_aspect_ratio,
                },
            }
        )

    @api.post("/classify", response_model=Classification, openapi_extra=_IMAGE_BODY)
    async def classify(
        self,
        request: Request,
        budget: str | None = Query(None, description="a named budget, e.g. q=0.50 (see /info)"),
        thresholds: str | None = Query(None, description="rho_1..rho_{T-1}, comma-separated, e.g. 0.9,0.8,0.7,0.6"),
        log_odds: str | None = Query(
            None, description="rho_1..rho_{T-1} as log-odds, comma-separated (exact where confidences round to 1)"
        ),
        top_k: int | None = Query(None, ge=1, description="classes to return"),
    ) -> Response:
        timing = ServerTiming()
        spec, live = self.spec, self.budgets  # read once: reconfigure may replace it meanwhile
        thresholds_of = {name: b["thresholds"] for name, b in live.named.items()}
        count = spec.num_steps - 1
        budget_name, rho = resolve_thresholds(
            thresholds_of, live.default, count, budget, thresholds, log_odds, hint=spec.thresholds_hint
        )
        image, image_size, decode_ms = await decode_request(request, spec)
        timing.add("decode", decode_ms)
        if self.cascade is not None:
            decision, spent = await self.cascade.decide(image, rho)
            for role, ms in spent.items():
                timing.add(role, ms, "forward")
        else:
            decision = await early_exit_steps(spec, rho, image, self.models, timing)
        names, labels = spec.class_names, spec.class_labels
        result = Classification(
            prediction=_class_score(decision.prediction, decision.confidence, names, labels),
            top_k=_top_k(decision.probabilities, names, labels, top_k or spec.top_k),
            confidence=decision.confidence,
            exit_step=decision.exit_step,
            num_steps=spec.num_steps,
            macs=decision.macs,
            gmacs=decision.macs / 1e9,
            budget=budget_name,
            thresholds=jsonable(list(rho.confidences)),
            log_odds=jsonable(list(rho.log_odds)),
            patches=decision.patches,
            patches_available=decision.patches_available,
            fallback=decision.fallback,
            image_size=image_size,
            latency_ms=timing.elapsed_ms(),
        )
        return model_response(result, {"Server-Timing": timing.header(result.latency_ms)})


def build_app(args: ServeArgs | dict[str, Any]) -> serve.Application:
    """The early-exit app: Glance, AnchorNet and Patch deployments (and Fallback, with ``args.fallback``) behind
    the FastAPI ``Ingress`` (with ``colocate``, the ingress alone, running the models itself).

    Reads the checkpoint cards (class names, K, MACs, preprocessing) and checks the thresholds here, so that a
    bad configuration fails at deploy time rather than at the first request. ``RuntimeError`` (one line) when a
    deployment's runtime is onnxruntime and it is not installed.
    """
    args = ServeArgs.model_validate(args) if isinstance(args, dict) else args
    if "onnxruntime" in _runtimes_used(args):
        require_onnxruntime()
    spec = serving_spec(args)
    user_config = {"thresholds_path": args.thresholds, "default_budget": args.default_budget}
    load_budgets(user_config, spec.num_steps, fallback=spec.has_fallback)
    d = args.deployments
    ingress = Ingress.options(**d.ingress.options("Ingress"), user_config=user_config)
    if args.colocate:
        models = ColocatedModels(
            anchornet=args.anchornet,
            glance=args.glance,
            patch=args.patch,
            num_patches=args.num_patches,
            iou_threshold=args.iou_threshold,
            max_batch_size=d.ingress.max_batch_size,
            batch_wait_timeout_s=d.ingress.batch_wait_timeout_s,
            aggregate=args.aggregate,
            image_size=Preprocessing.from_dict(spec.preprocessing).image_size,
            torch_threads=d.ingress.torch_threads,
            use_gpu=d.ingress.num_gpus > 0,
            fallback=args.fallback,
            runtime=d.ingress.runtime,
        )
        return ingress.bind(spec, colocated=models, retry_after_s=d.ingress.retry_after_s)

    def model(deployment: Any, name: str, opts: DeploymentArgs, checkpoint: str, **kwargs: Any) -> Any:
        batching = {"max_batch_size": opts.max_batch_size, "batch_wait_timeout_s": opts.batch_wait_timeout_s}
        runtime = {"torch_threads": opts.torch_threads, "use_gpu": opts.num_gpus > 0, "runtime": opts.runtime}
        return deployment.options(**opts.options(name)).bind(checkpoint, **kwargs, **batching, **runtime)

    glance = model(ClassifierDeployment, "Glance", d.glance, args.glance)
    anchornet = model(
        AnchorNetDeployment,
        "AnchorNet",
        d.anchornet,
        args.anchornet,
        num_patches=args.num_patches,
        iou_threshold=args.iou_threshold,
    )
    patch = model(ClassifierDeployment, "Patch", d.patch, args.patch)
    handles = {"glance": glance, "anchornet": anchornet, "patch": patch}
    if args.fallback:
        handles["fallback"] = model(ClassifierDeployment, "Fallback", d.fallback, args.fallback)
    return ingress.bind(spec, **handles, retry_after_s=d.ingress.retry_after_s)


# --------------------------------------------------------------------------------------------------------------
# Baseline: one deployment, one full-size classifier (the comparison of the load test)

baseline_api = FastAPI(title="Full-size classifier (baseline)", version="1")
install_error_handlers(baseline_api)


class FullClassification(BaseModel):
    """The baseline's answer: one step, the whole image."""

    prediction: ClassScore
    top_k: list[ClassScore]
    exit_step: int = 1
    macs: int = Field(description="multiply-accumulates spent on this image")
    gmacs: float
    image_size: list[int] = Field(description="(width, height) as received")
    latency_ms: float = Field(description="time in the replica, decoding included")


@serve.deployment
@serve.ingress(baseline_api)
class FullClassifier:
    """Decode, preprocess to the checkpoint's input size and classify, all in one (batched) deployment."""

    def __init__(
        self,
        checkpoint: str,
        top_k: int = 5,
        max_body_bytes: int = 10 * 1024**2,
        max_pixels: int = 40_000_000,
        max_aspect_ratio: float | None = MAX_ASPECT_RATIO,
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.005,
        torch_threads: int = 1,
        use_gpu: bool = False,
        runtime: Runtime = "torch",
    ) -> None:
        torch.set_num_threads(torch_threads)
        self.model, card = load_on_replica(checkpoint, use_gpu, runtime)
        self.input_size = card.input_size
        self.class_names = _class_names(card)
        self.class_labels = class_labels(self.class_names)
        self.macs = int(card.macs)
        preprocessing = Preprocessing.from_dict(card.preprocessing or {})
        if preprocessing.image_size != card.input_size:
            preprocessing = Preprocessing(image_size=card.input_size, resize_size=max(card.input_size, 256))
        self.limits = {
            "max_body_bytes": max_body_bytes,
            "max_pixels": max_pixels,
            "max_aspect_ratio": max_aspect_ratio,
            "min_side": 1,
            "preprocessing": preprocessing.to_dict(),
        }
        self.top_k = top_k
        self.failures = FailureStreak()
        self.classify_batch.set_max_batch_size(max_batch_size)
        self.classify_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def classify_batch(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.failures.run(_by_shape, images, partial(classify_images, self.model, self.input_size))

    def check_health(self) -> None:
        self.failures.check()

    @baseline_api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @baseline_api.post("/classify", response_model=FullClassification, openapi_extra=_IMAGE_BODY)
    async def classify(self, request: Request, top_k: int | None = Query(None, ge=1)) -> Response:
        timing = ServerTiming()
        image, image_size, decode_ms = await decode_request(request, self.limits)
        timing.add("decode", decode_ms)
        probs = (await timing.wait("model", self.classify_batch(image))).softmax(dim=-1)
        scores = _top_k(probs, self.class_names, self.class_labels, top_k or self.top_k)
        result = FullClassification(
            prediction=scores[0],
            top_k=scores,
            macs=self.macs,
            gmacs=self.macs / 1e9,
            image_size=image_size,
            latency_ms=timing.elapsed_ms(),
        )
        return model_response(result, {"Server-Timing": timing.header(result.latency_ms)})


def build_baseline_app(args: BaselineArgs | dict[str, Any]) -> serve.Application:
    args = BaselineArgs.model_validate(args) if isinstance(args, dict) else args
    opts = args.deployment
    if opts.runtime == "onnxruntime":
        require_onnxruntime()
    return FullClassifier.options(**opts.options("FullClassifier")).bind(
        args.classifier,
        top_k=args.top_k,
        max_body_bytes=args.max_body_bytes,
        max_pixels=args.max_pixels,
        max_aspect_ratio=args.max_aspect_ratio,
        max_batch_size=opts.max_batch_size,
        batch_wait_timeout_s=opts.batch_wait_timeout_s,
        torch_threads=opts.torch_threads,
        use_gpu=opts.num_gpus > 0,
        runtime=opts.runtime,
    )


# --------------------------------------------------------------------------------------------------------------
# Serve config YAML: Serve's schema plus a strict key check (the schema ignores unknown keys)


def _unknown_keys(data: Any, allowed: Sequence[str], where: str) -> list[str]:
    if not isinstance(data, dict):
        return [f"{where} must be a mapping"]
    return [f"unknown key {where}.{key}" for key in data if key not in allowed]


def _check_ingress_user_config(
    app: dict[str, Any], args: ServeArgs, where: str, local_path: Callable[[str], str] | None
) -> list[str]:
    """Problems of the ``user_config`` the Ingress replicas of a ``build_app`` application will get: the one under
    its ``Ingress`` deployment, which replaces the one ``build_app`` makes from ``args``, or else that one."""
    overrides = [
        d
        for d in app.get("deployments") or []
        if isinstance(d, dict) and d.get("name") == "Ingress" and "user_config" in d
    ]
    problems = []
    if overrides:
        user_config, where = overrides[-1]["user_config"], f"{where}: Ingress user_config"
        path = user_config.get("thresholds_path") if isinstance(user_config, dict) else None
        if args.thresholds and path != args.thresholds:
            instead = f"thresholds_path {path}" if path else "no thresholds_path (only the built-in budgets)"
            problems.append(
                f"{where}: {instead} replaces args.thresholds {args.thresholds} (the user_config wins): "
                "point both at the same file"
            )
    else:
        user_config = {"thresholds_path": args.thresholds, "default_budget": args.default_budget}
        where = f"{where}.args (thresholds, default_budget)"
    if not isinstance(user_config, dict):
        return [*problems, f"{where} must be a mapping"]
    if local_path is None:
        return [*problems, *(f"{where}: unknown key {key}" for key in user_config if key not in USER_CONFIG_KEYS)]
    config = dict(user_config)
    if config.get("thresholds_path"):
        config["thresholds_path"] = local_path(config["thresholds_path"])
    try:
        load_budgets(config, args.num_patches + (2 if args.fallback else 1), fallback=bool(args.fallback))
    except Exception as err:  # what reconfigure would raise at replica start
        return [*problems, f"{where}: {type(err).__name__}: {' '.join(str(err).split())}"]
    return problems


def _deployment_args(args: ServeArgs | BaselineArgs) -> dict[str, DeploymentArgs]:
    """Serve's deployment name -> its ``DeploymentArgs``, as the builders name them."""
    if isinstance(args, BaselineArgs):
        return {"FullClassifier": args.deployment}
    d = args.deployments
    if args.colocate:
        return {"Ingress": d.ingress}
    models = {"Ingress": d.ingress, "Glance": d.glance, "AnchorNet": d.anchornet, "Patch": d.patch}
    return {**models, "Fallback": d.fallback} if args.fallback else models


def _check_shutdown_timeouts(
    app: dict[str, Any], args: ServeArgs | BaselineArgs, timeout: float, where: str
) -> list[str]:
    """A replica stopped (downscale, redeploy) with requests in flight is killed after graceful_shutdown_timeout_s:
    shorter than the request timeout, it cuts off requests the proxy would still have waited for."""
    overrides = {
        d["name"]: d["graceful_shutdown_timeout_s"]
        for d in app.get("deployments") or []
        if isinstance(d, dict) and "graceful_shutdown_timeout_s" in d and "name" in d
    }
    problems = []
    for name, opts in _deployment_args(args).items():
        grace = overrides.get(name, opts.graceful_shutdown_timeout_s)
        if isinstance(grace, (int, float)) and grace < timeout:
            problems.append(
                f"{where}: {name} graceful_shutdown_timeout_s {grace} is under http_options.request_timeout_s "
                f"{timeout}: a stopping replica would be killed with requests in flight"
            )
    return problems


def check_serve_config(config: dict[str, Any], *, local_path: Callable[[str], str] | None = None) -> list[str]:
    """Problems of a ``serve deploy`` config; empty when it is valid.

    Validates with Serve's ``ServeDeploySchema``, then checks every key of the top level, the HTTP and gRPC
    options, the applications, their deployments, autoscaling configs and actor options against the schema's
    fields (Serve silently drops unknown keys,
    so a typo like ``max_ongoing_request`` would otherwise be ignored), the ``args`` of applications built
    by ``build_app`` / ``build_baseline_app`` against ``ServeArgs`` / ``BaselineArgs`` (which forbid extras), and
    the keys of the ``user_config`` the ``build_app`` Ingress replicas will get, and that their replicas' graceful
    shutdown lasts at least ``http_options.request_timeout_s``.

    With ``local_path`` (a path in the config -> where that file is here, e.g. from the cluster's mount of the
    repository to this checkout) it also loads that ``user_config`` as the replicas will (``load_budgets``: the
    thresholds file, the number of thresholds, the default budget), which otherwise fails every replica at start.
    """
    from pydantic import ValidationError
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
        gRPCOptionsSchema,
    )

    problems = _unknown_keys(config, list(ServeDeploySchema.model_fields), "config")
    if problems:
        return problems
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as err:
        return [f"serve schema: {line}" for line in str(err).splitlines()]
    for key, schema in (("http_options", HTTPOptionsSchema), ("grpc_options", gRPCOptionsSchema)):
        if isinstance(config.get(key), dict):  # e.g. request_timeout: 5 would leave no timeout at all
            problems += _unknown_keys(config[key], list(schema.model_fields), f"config.{key}")
    builders = {f"{__name__}:build_app": ServeArgs, f"{__name__}:build_baseline_app": BaselineArgs}
    timeout = (config.get("http_options") or {}).get("request_timeout_s")
    for i, app in enumerate(config.get("applications") or []):
        where = f"applications[{i}]"
        problems += _unknown_keys(app, list(ServeApplicationSchema.model_fields), where)
        for j, deployment in enumerate(app.get("deployments") or []):
            dwhere = f"{where}.deployments[{j}]"
            problems += _unknown_keys(deployment, list(DeploymentSchema.model_fields), dwhere)
            for key, fields in (
                ("autoscaling_config", AutoscalingConfig.model_fields),
                ("ray_actor_options", RayActorOptionsSchema.model_fields),
            ):
                if isinstance(deployment.get(key), dict):
                    problems += _unknown_keys(deployment[key], list(fields), f"{dwhere}.{key}")
        model = builders.get(app.get("import_path", ""))
        if model is not None:
            try:
                args = model.model_validate(app.get("args") or {})
            except ValidationError as err:
                problems += [f"{where}.args: {e['loc']}: {e['msg']}" for e in err.errors()]
                continue
            if isinstance(args, ServeArgs):
                problems += _check_ingress_user_config(app, args, where, local_path)
            if isinstance(timeout, (int, float)):
                problems += _check_shutdown_timeouts(app, args, timeout, where)
    return problems
