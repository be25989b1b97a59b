"""The quickstart: the whole pipeline, small, on an embedded local Ray (no cluster, no S3), in seven stages.

1. data: ``--data ROOT`` (any ImageFolder tree with train/ and val/), else Imagenette-160 downloaded into the
   cache (``anchornet.datasets``); a per-class subset of symlinks in ``OUT/data``.
2. AnchorNet from scratch, briefly (``pipelines.train``, stage I).
3. its patches of both splits precomputed to Parquet (``pipelines.precompute``).
4. the glance and patch classifiers fine-tuned briefly from ImageNet weights (``pipelines.train``, stage II;
   the patch role reads the Parquet patches). When the classes are ImageNet WordNet ids (Imagenette's are)
   the new heads start from the matching ImageNet rows (``head_from``), else at random. Every training stage
   leaves the same fifth of train/ out (``holdout_size``; fewer when a fifth would take every image of a class):
   the report fits the thresholds on those images.
5. the report: accuracy against MACs, random-patch baselines, thresholds, plot (``pipelines.evaluate``).
6. the Serve application (``pipelines.serve.build_app``) on 127.0.0.1, and a few val images classified over HTTP.
7. a summary (accuracy, MACs per image, where everything is), then Serve and Ray shut down.

Every stage reuses the pipelines' own functions; this module only wires them and picks small settings.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from anchornet.datasets import DatasetError, download_imagenette, subset_image_folder

__all__ = ["QuickstartConfig", "QuickstartError", "QuickstartResult", "run_quickstart"]

NUM_STAGES = 7
HOLDOUT_FRACTION = 0.2  # of train/, left out of training for the thresholds (none below 5 images)


class QuickstartError(RuntimeError):
    """A stage could not run; the message is one line for the user."""


@dataclass(frozen=True)
class QuickstartConfig:
    """The quickstart's settings; validated on construction. ``None`` per-class counts take every image.

    ``tiny`` (tests only) swaps in ``anchornet_test`` and an untrained ``mobilenet_v3_large`` classifier.
    """

    output: str = "quickstart-output"
    data: str | None = None
    cache_dir: str | None = None
    train_per_class: int | None = 20
    val_per_class: int | None = 10
    epochs: int = 2
    anchornet_epochs: int | None = None
    batch_size: int = 32
    arch: str = "efficientnet_lite0"
    weights: str | None = "imagenet"
    num_cpus: int | None = None
    loader_workers: int = 1
    serve_images: int = 5
    seed: int = 0
    tiny: bool = False

    def __post_init__(self) -> None:
        for name in ("train_per_class", "val_per_class", "anchornet_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {value}")
        for name in ("epochs", "batch_size", "serve_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"num-cpus must be at least 1, got {self.num_cpus}")
        if self.loader_workers < 0:
            raise ValueError(f"loader-workers must be >= 0, got {self.loader_workers}")
        if str(self.output).startswith("s3://") or str(self.data or "").startswith("s3://"):
            raise ValueError("the quickstart runs locally: --data and --output are local directories")

    @property
    def out(self) -> Path:
        return Path(self.output).expanduser().resolve()


@dataclass
class QuickstartResult:
    """What the run produced: paths, the report's numbers and the HTTP answers."""

    output: str
    data: str
    classes: list[str]
    checkpoints: dict[str, str]
    report: dict[str, Any]
    http: list[dict[str, Any]]
    seconds: float


def _stage(k: int, what: str) -> float:
    print(f"[quickstart] stage {k}/{NUM_STAGES}: {what}", flush=True)
    return time.perf_counter()


def _log(message: str) -> None:
    print(f"[quickstart] {message}", flush=True)


def run_quickstart(config: QuickstartConfig, *, on_serving: Callable[[str], None] | None = None) -> QuickstartResult:
    """Run the seven stages into ``config.output``; returns the summary (also in ``OUT/summary.json``).

    Uses the current Ray if one is initialised (and leaves it running), else starts a local one and shuts it
    down at the end. Raises ``QuickstartError`` (one line) when a stage cannot run.
    """
    started = time.perf_counter()
    out = config.out
    _claim_output(config)

    t = _stage(1, "data")
    data = _prepare_data(config)
    classes = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    counts = json.loads((data / "subset.json").read_text())["counts"]
    n_train, n_val = sum(counts["train"].values()), sum(counts["val"].values())
    _log(f"{len(classes)} classes, {n_train} train and {n_val} val images in {data} ({time.perf_counter() - t:.0f} s)")
    holdout_size = _holdout_size(data, int(n_train * HOLDOUT_FRACTION), config.seed)

    import ray

    for key, value in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}.items():
        os.environ.setdefault(key, value)  # a loopback-only cluster of this process; quiet, deduplication off
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(address="local", num_cpus=config.num_cpus, include_dashboard=False)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        checkpoints = _train_and_precompute(config, data, classes, cpus, holdout_size)
        t = _stage(5, "evaluate: accuracy against MACs, random-patch baselines, thresholds, plot")
        report = _evaluate(config, data, classes, checkpoints, cpus)
        _log(f"report in {out / 'report'} ({time.perf_counter() - t:.0f} s)")
        t = _stage(6, "serve: the early-exit application over HTTP on 127.0.0.1")
        http = _serve_and_classify(config, data, checkpoints, on_serving)
        _log(f"{len(http)} images classified over HTTP ({time.perf_counter() - t:.0f} s)")
    finally:
        if own_ray:
            ray.shutdown()

    _stage(7, "summary")
    result = QuickstartResult(
        output=str(out),
        data=str(data),
        classes=classes,
        checkpoints=checkpoints,
        report=report,
        http=http,
        seconds=time.perf_counter() - started,
    )
    (out / "summary.json").write_text(json.dumps(asdict(result), indent=1) + "\n")
    print(format_summary(result), flush=True)
    return result


def _claim_output(config: QuickstartConfig) -> None:
    """``OUT/quickstart.json`` records the request: a re-run with the same one continues, another one is refused,
    unless the recorded run left nothing else in ``OUT`` (it failed in stage 1, before its data subset: a wrong
    ``--data``, offline without it); its record is then replaced."""
    out = config.out
    record = out / "quickstart.json"
    request = {k: v for k, v in asdict(config).items() if k not in ("output", "num_cpus", "serve_images")}
    try:
        if out.exists() and not out.is_dir():
            raise QuickstartError(f"--output {out} is a file, not a directory: choose another --output")
        if record.is_file():
            others = [p.name for p in out.iterdir() if p != record]
            if json.loads(record.read_text()) != request and others:
                raise QuickstartError(f"{out} holds a quickstart with other settings: use a new --output or delete it")
        elif out.exists() and any(out.iterdir()):
            raise QuickstartError(f"{out} exists and is not a quickstart output: choose another --output")
        out.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(request, indent=1) + "\n")
    except OSError as err:  # a file on the way to --output, no permission
        raise QuickstartError(f"cannot use --output {out}: {err.strerror or err}") from err


def _holdout_size(data: Path, size: int, seed: int) -> int:
    """The most of ``size`` train/ images the training stages can hold out (drawn with ``seed``, as they draw them)
    while every class keeps an image to train on: a smaller draw is part of a larger one, so it only shrinks."""
    from anchornet.image_folder import holdout_indices, scan_image_folder

    index = scan_image_folder(str(data / "train"))
    images = Counter(label for _, label in index.items)
    for n in range(size, 0, -1):
        held = Counter(index.items[i][1] for i in holdout_indices(index, n, seed))
        if all(held[label] < count for label, count in images.items()):
            if n < size:
                _log(f"{n} train images held out for the thresholds, not {size}: more take every image of a class")
            return n
    if size:
        _log(
            "no train image held out: the first one drawn is its class's only image, so the thresholds are fitted "
            "on training images (biased high); two or more train images per class avoid it"
        )
    return 0


def _prepare_data(config: QuickstartConfig) -> Path:
    try:
        if config.data is not None:
            source = Path(config.data).expanduser()
            _log(f"using --data {source}")
        else:
            _log("no --data: Imagenette-160 from its authors (94 MiB, once; cached)")
            source = download_imagenette(config.cache_dir)
        return subset_image_folder(
            source, config.out / "data", config.train_per_class, config.val_per_class, seed=config.seed
        )
    except DatasetError as err:
        raise QuickstartError(str(err)) from err


def _is_wordnet(classes: list[str]) -> bool:
    from pipelines.train import imagenet_head

    return imagenet_head(classes, "imagenet") is not None


def _train_and_precompute(
    config: QuickstartConfig, data: Path, classes: list[str], cpus: int, holdout_size: int
) -> dict[str, str]:
    from pipelines.precompute import PrecomputeConfig, PrecomputeError, run_precompute
    from pipelines.train import TrainConfig, TrainError, run_training

    out = config.out
    common = {
        "data": str(data),
        "batch_size": config.batch_size,
        "num_workers": 1,
        "cpus_per_worker": float(cpus),
        "threads": cpus,
        "loader_workers": config.loader_workers,
        "seed": config.seed,
        "holdout_size": holdout_size,
        "holdout_seed": config.seed,
        "max_failures": 0,
        "keep_checkpoints": 1,
    }

    def train(k: int, what: str, **stage: Any) -> str:
        t = _stage(k, what)
        try:
            outcome = run_training(TrainConfig(**common, **stage), verbose=False)
        except (TrainError, ValueError, FileNotFoundError, ImportError) as err:
            raise QuickstartError(f"{stage['stage']} training failed: {err}") from err
        m = outcome.metrics
        seconds = time.perf_counter() - t
        _log(f"{stage['stage']}: val top-1 {m['val_top1']:.3f} after {m['epoch'] + 1} epochs ({seconds:.0f} s)")
        return outcome.checkpoint

    anchornet = train(
        2,
        "train AnchorNet from scratch (stage I)",
        output=str(out / "anchornet"),
        stage="anchornet",
        arch="anchornet_test" if config.tiny else "anchornet",
        epochs=config.anchornet_epochs or config.epochs,
        schedule="cosine",
    )

    t = _stage(3, "precompute AnchorNet's patches to Parquet (Ray Data)")
    for split in ("train", "val"):
        try:
            result = run_precompute(
                PrecomputeConfig(
                    input=str(data / split),
                    output=str(out / "patches" / split),
                    anchornet=anchornet,
                    workers=1,
                    num_cpus_per_worker=1.0,
                    batch_size=min(config.batch_size, 32),
                    shard_size=500,
                    verbose=False,
                )
            )
        except PrecomputeError as err:
            raise QuickstartError(f"precompute failed: {err}") from err
        if not result.complete:
            raise QuickstartError(f"precompute of {split} did not complete: re-run the quickstart to resume")
        _log(f"{split}: {result.rows} images, {result.errors} errors -> {out / 'patches' / split}")
    _log(f"patches in {out / 'patches'} ({time.perf_counter() - t:.0f} s)")

    arch, weights = ("mobilenet_v3_large", None) if config.tiny else (config.arch, config.weights)
    weights = _initial_weights(weights, classes)
    stage2 = {"output": str(out / "classifiers"), "arch": arch, "weights": weights, "epochs": config.epochs}
    glance = train(4, "fine-tune the glance classifier (stage II)", stage="glance", schedule="cosine", **stage2)
    patch = train(
        4, "fine-tune the patch classifier on the Parquet patches (stage II)", stage="patch", schedule="cosine",
        patches=str(out / "patches"), **stage2,
    )  # fmt: skip
    return {"anchornet": anchornet, "glance": glance, "patch": patch}


def _initial_weights(weights: str | None, classes: list[str]) -> str | None:
    """Say where the classifiers start; with ``"imagenet"`` the training job keeps the heads' rows of the matching
    ImageNet classes when the class names are WordNet ids (``pipelines.train.imagenet_head``)."""
    if weights == "imagenet":
        if _is_wordnet(classes):
            _log(f"classifiers start from ImageNet weights, heads from the {len(classes)} matching ImageNet classes")
        else:
            _log("classes are not ImageNet WordNet ids: the classifiers' heads start at random")
    return weights


def _evaluate(
    config: QuickstartConfig, data: Path, classes: list[str], checkpoints: dict[str, str], cpus: int
) -> dict[str, Any]:
    from anchornet import load_checkpoint, load_thresholds
    from pipelines.evaluate import EvaluateConfig, run_evaluation

    full_arch = config.arch if not config.tiny and config.weights == "imagenet" and _is_wordnet(classes) else None
    if full_arch is None:
        _log("full-224 baseline: the glance classifier applied to the whole 224 x 224 image")
    report_dir = config.out / "report"
    try:
        report = run_evaluation(
            EvaluateConfig(
                data=str(data),
                output=str(report_dir),
                full=None if full_arch else checkpoints["glance"],
                full_arch=full_arch,
                batch_size=min(config.batch_size, 32),
                gallery=8,
                timing_batch=16,
                timing_repeats=2,
                threads=cpus,
                seed=config.seed,
                **{k: checkpoints[k] for k in ("anchornet", "glance", "patch")},
            )
        )
    except (OSError, ValueError) as err:
        raise QuickstartError(f"evaluation failed: {err}") from err
    budgets = [b for b in load_thresholds(report_dir / "thresholds.json").values()]
    default = budgets[len(budgets) // 2] if budgets else None  # the Serve app's default budget
    anytime = report.curves[0]  # AnchorNet patches + glance, every image exits at step t
    cards = {k: load_checkpoint(v)[1] for k, v in checkpoints.items()}
    return {
        "test_images": report.num_test,
        "holdout": report.holdout,
        "full": {"top1": report.full_accuracy, "gmacs": report.full_gmacs, "what": report.full_kind},
        "glance_only": {"top1": anytime.points[0][2], "gmacs": anytime.points[0][1]},
        "all_steps": {"top1": anytime.points[-1][2], "gmacs": anytime.points[-1][1]},
        "budget": None
        if default is None
        else {"name": default.name, "top1": default.accuracy, "gmacs": (default.expected_macs or 0) / 1e9},
        "model_gmacs": {k: card.gmacs for k, card in cards.items()},
        "timing": report.timing,
        "files": report.files,
    }


def _serve_and_classify(
    config: QuickstartConfig, data: Path, checkpoints: dict[str, str], on_serving: Callable[[str], None] | None
) -> list[dict[str, Any]]:
    from ray import serve

    from pipelines.serve import ServeArgs, build_app

    one = {"num_cpus": 0.25, "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
    args = ServeArgs(
        **checkpoints,
        thresholds=str(config.out / "report" / "thresholds.json"),
        deployments={name: one for name in ("ingress", "glance", "anchornet", "patch")},
    )
    images = _serve_images(data, config.serve_images)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    answers = []
    try:
        serve.run(build_app(args), name="anchornet", route_prefix="/", blocking=False)
        _log(f"serving at {url} (POST {url}/classify, GET {url}/info)")
        if on_serving is not None:
            on_serving(url)
        for path in images:
            answer = _post_image(f"{url}/classify", path)
            truth = path.parent.name
            answers.append({"image": str(path.relative_to(data)), "truth": truth, **answer})
            p = answer["prediction"]
            _log(
                f"  {path.relative_to(data)} -> {p['name']} (p {p['probability']:.2f}) "
                f"{'right' if p['name'] == truth else 'wrong'}, exit step {answer['exit_step']}/{answer['num_steps']}, "
                f"{answer['gmacs']:.3f} GMACs, {answer['latency_ms']:.0f} ms"
            )
    finally:
        serve.shutdown()
    return answers


def _serve_images(data: Path, count: int) -> list[Path]:
    """The first val image of each class in turn, ``count`` in all."""
    per_class = [sorted(p for p in c.iterdir() if p.is_file()) for c in sorted((data / "val").iterdir()) if c.is_dir()]
    picks: list[Path] = []
    for depth in range(max((len(f) for f in per_class), default=0)):
        picks += [files[depth] for files in per_class if depth < len(files)]
    return picks[:count]


def _post_image(url: str, path: Path, timeout: float = 120.0) -> dict[str, Any]:
    body = path.read_bytes()
    kind = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
    request = urllib.request.Request(url, data=body, headers={"Content-Type": kind}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def format_summary(result: QuickstartResult) -> str:
    r = result.report
    right = sum(a["prediction"]["name"] == a["truth"] for a in result.http)
    g = r["model_gmacs"]
    lines = [
        "",
        f"AnchorNet quickstart: done in {result.seconds / 60:.1f} min, {len(result.classes)} classes, "
        f"{r['test_images']} test images (val)",
        "  top-1 accuracy and GMACs per image:",
    ]
    if r["budget"]:
        b = r["budget"]
        label = f"early exit, budget {b['name']}"
        lines.append(f"    {label:<26} {100 * b['top1']:6.2f} %  {b['gmacs']:.3f} GMACs")
    for label, key in (("glance only", "glance_only"), ("every step (all patches)", "all_steps"), ("full-224", "full")):
        lines.append(f"    {label:<26} {100 * r[key]['top1']:6.2f} %  {r[key]['gmacs']:.3f} GMACs")
    lines += [
        f"  full-224 baseline: {r['full']['what']}",
        f"  models (GMACs per call): AnchorNet {g['anchornet']:.3f} at 224, glance {g['glance']:.3f} and "
        f"patch {g['patch']:.3f} at K",
        f"  over HTTP: {right}/{len(result.http)} val images right",
        f"  outputs in {result.output}:",
        "    anchornet/anchornet.pt, classifiers/glance.pt, classifiers/patch.pt   checkpoints",
        "    patches/{train,val}/                                                   Parquet patches",
        "    report/results.md, report/accuracy_vs_gmacs.png, report/gallery.png    the report",
        "    report/thresholds.json                                                 budgets for jobs/serve.py",
        "    summary.json                                                           this summary",
        f"  next: python jobs/serve.py --anchornet {result.checkpoints['anchornet']} --glance "
        f"{result.checkpoints['glance']} --patch {result.checkpoints['patch']} --thresholds "
        f"{Path(result.output) / 'report' / 'thresholds.json'}",
    ]
    return "\n".join(lines)
