"""The Serve app over HTTP on the shared local Ray: early exit equal to the engine, live thresholds, bad input."""

from __future__ import annotations

import importlib
import io
import json
import math
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _helpers import asgi_request, serve_app_on_free_port, tiny_serving_checkpoints
from fastapi import FastAPI, Request
from PIL import Image
from torch import nn

from anchornet import (
    EarlyExitClassifier,
    ExitThresholds,
    Preprocessing,
    build_classifier,
    decode_image,
    load_checkpoint,
    save_thresholds,
)
from anchornet.early_exit import resize_square
from anchornet.preprocessing import to_float
from pipelines import serve_http
from pipelines.serve_http import (
    ApiError,
    install_error_handlers,
    parse_multipart,
    parse_server_timing,
    parse_thresholds,
    read_image_bytes,
    resolve_thresholds,
)

requests = pytest.importorskip("requests")

REPO = Path(__file__).resolve().parents[1]
CLASSES = [f"class{i}" for i in range(10)]
NUM_PATCHES = 3
MAX_BODY = 300_000
MAX_PIXELS = 4_000_000
MOUNT = "/home/ray/anchornet/"  # where cluster.yaml mounts this repository on every node


def _encode(image: Image.Image, fmt: str = "JPEG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _photo(seed: int, size: tuple[int, int] = (256, 240)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(3, 8, 8, generator=g)
    big = torch.nn.functional.interpolate(small[None], size=size[::-1], mode="bilinear")[0]
    noise = torch.rand(3, *size[::-1], generator=g) * 0.2
    pixels = ((big * 0.8 + noise).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(pixels, "RGB")


def _png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels."""
    png = bytearray(_encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    png[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    png[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(png[ihdr - 4 : ihdr + 13])))
    return bytes(png)


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers (no Ray)


def test_parse_thresholds() -> None:
    assert parse_thresholds("0.9, 0.8,inf", 3) == (0.9, 0.8, math.inf)
    for bad in ("0.9,0.8", "a,b,c", "0.9,nan,0.1", ""):
        with pytest.raises(ApiError) as err:
            parse_thresholds(bad, 3)
        assert err.value.status == 400


def test_a_request_picks_a_budget_confidences_or_log_odds() -> None:
    fitted = ExitThresholds((17.25, 36.5))  # what a fitted budget holds: both would print as confidence 1.0
    budgets = {"q=1.95": fitted}
    assert resolve_thresholds(budgets, "q=1.95", 2) == ("q=1.95", fitted)
    assert resolve_thresholds(budgets, "q=1.95", 2, log_odds="17.25,36.5") == (None, fitted)  # exact, as /info shows
    assert resolve_thresholds(budgets, "q=1.95", 2, thresholds="0.5,inf") == (None, ExitThresholds((0.0, math.inf)))
    for asked in ({"budget": "q=1.95", "log_odds": "1,2"}, {"thresholds": "0.5,0.5", "log_odds": "1,2"}):
        with pytest.raises(ApiError, match="not several"):
            resolve_thresholds(budgets, "q=1.95", 2, **asked)
    with pytest.raises(ApiError, match="expected 2 thresholds"):
        resolve_thresholds(budgets, "q=1.95", 2, log_odds="17.25")
    assert resolve_thresholds(budgets, "q=1.95", 2, thresholds="0,1")[1] == ExitThresholds((-math.inf, math.inf))
    for outside in ("5,0.5", "0.5,-3", "-inf,0.5", "1.0001,0"):  # confidences: likely a percent or a log-odds
        with pytest.raises(ApiError, match=r"confidences in \[0, 1\]") as err:
            resolve_thresholds(budgets, "q=1.95", 2, thresholds=outside)
        assert err.value.status == 400
    assert resolve_thresholds(budgets, "q=1.95", 2, log_odds="5,-3")[1] == ExitThresholds((5.0, -3.0))


def test_parse_server_timing() -> None:
    header = (
        'decode;dur=0.5, glance;desc="forward";dur=12.25, patch;dur=3, patch;dur=1.5, cache;desc="miss", app;dur=20'
    )
    assert parse_server_timing(header) == {"decode": 0.5, "glance": 12.25, "patch": 4.5, "app": 20.0}
    assert parse_server_timing("") == {}


def test_parse_multipart() -> None:
    body = b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\nJPEGDATA\r\n--XX--\r\n'
    assert parse_multipart(body, "multipart/form-data; boundary=XX") == b"JPEGDATA"
    for content_type, broken in (
        ("multipart/form-data; boundary=XX", b"no boundaries here"),
        ("multipart/form-data", body),
        # A parameter ending in "*" with no "=": the email parser itself fails (IndexError), in either header.
        ("multipart/form-data; boundary=XX; x*", body),
        ("multipart/form-data; boundary=XX", body.replace(b'filename="a.jpg"', b"filename*")),
    ):
        with pytest.raises(ApiError) as err:
            parse_multipart(broken, content_type)
        assert (err.value.status, err.value.code) == (400, "bad_multipart")


def test_unexpected_errors_are_json_500() -> None:
    """A bug in a handler gets the JSON error shape (code internal_error) instead of a text/plain 500."""
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/classify")
    async def classify() -> dict[str, str]:
        raise RuntimeError("a bug")

    status, headers, body = asgi_request(app, body=b"x", content_type="image/jpeg")
    assert status == 500 and headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == "internal_error" and "RuntimeError" in error["message"] and "\n" not in error["message"]


def test_multipart_is_parsed_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The email parser takes seconds on some 10 MB bodies: it must not block the ingress's event loop."""
    threads: list[int] = []
    parse = serve_http.parse_multipart

    def recording_parse(body: bytes, content_type: str) -> bytes:
        threads.append(threading.get_ident())
        return parse(body, content_type)

    monkeypatch.setattr(serve_http, "parse_multipart", recording_parse)
    app = FastAPI()
    install_error_handlers(app)
    loop_threads: list[int] = []

    @app.post("/classify")
    async def classify(request: Request) -> dict[str, int]:
        loop_threads.append(threading.get_ident())
        return {"bytes": len(await read_image_bytes(request, 10_000))}

    body = b'--XX\r\nContent-Disposition: form-data; name="file"\r\n\r\nJPEGDATA\r\n--XX--\r\n'
    status, _, answer = asgi_request(app, body=body, content_type="multipart/form-data; boundary=XX")
    assert (status, answer) == (200, b'{"bytes":8}')
    assert len(threads) == 1 and threads != loop_threads


def test_openapi_documents_the_classify_responses() -> None:
    """The /classify endpoints return pre-serialised JSON; their schemas must still be in the docs."""
    from pipelines.serve import api, baseline_api

    for app, model in ((api, "Classification"), (baseline_api, "FullClassification")):
        spec = app.openapi()
        content = spec["paths"]["/classify"]["post"]["responses"]["200"]["content"]["application/json"]
        assert content["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert {"prediction", "top_k", "macs", "latency_ms"} <= set(spec["components"]["schemas"][model]["properties"])


def _local(path: str) -> str:
    """A path of serve_config.yaml (on the cluster's mount of the repository) in this checkout."""
    return str(REPO / path.removeprefix(MOUNT)) if path.startswith(MOUNT) else path


def test_serve_config_yaml_is_valid_and_strict() -> None:
    from pipelines.serve import check_serve_config

    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    assert check_serve_config(config) == []
    assert check_serve_config(config, local_path=_local) == []  # the thresholds its Ingress replicas load
    app = config["applications"][0]
    assert app["import_path"] == "pipelines.serve:build_app"

    typo = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    typo["applications"][0]["deployments"] = [{"name": "Glance", "max_ongoing_request": 8}]
    typo["applications"][0]["args"]["deployments"]["patch"]["autoscaling_config"]["target_ongoing_request"] = 3
    typo["applications"][0]["args"]["num_patch"] = 4
    typo["http_options"]["request_timeout"] = typo["http_options"].pop("request_timeout_s")  # Serve: no timeout
    typo["applications"][0]["deployments"].append({"name": "Patch", "ray_actor_options": {"num_cpu": 1}})
    problems = "\n".join(check_serve_config(typo))
    assert "max_ongoing_request" in problems
    assert "target_ongoing_request" in problems
    assert "num_patch" in problems
    assert "unknown key config.http_options.request_timeout" in problems
    assert "unknown key applications[0].deployments[1].ray_actor_options.num_cpu" in problems


def test_serve_config_checks_the_ingress_user_config() -> None:
    """The Ingress user_config of the YAML replaces the one build_app makes from args: every Ingress replica loads
    it at start, and a bad one fails them all. check_serve_config loads it as they will."""
    from pipelines.serve import check_serve_config

    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    app = config["applications"][0]
    (ingress,) = [d for d in app["deployments"] if d["name"] == "Ingress"]
    assert _local(ingress["user_config"]["thresholds_path"]) == _local(app["args"]["thresholds"])
    for user_config, expected in (
        ({"thresholds_path": "/models/thresholds.json"}, "/models/thresholds.json"),  # not where it is deployed
        ({"thresholds_path": MOUNT + "checkpoints/thresholds.json", "default_budget": "q=0.5O"}, "q=0.5O"),
        ({"budgets": {"mine": [0.9, 0.8]}}, "'mine' needs 4 thresholds"),
        ({"thresholds_paths": "x.json"}, "thresholds_paths"),
    ):
        ingress["user_config"] = user_config
        problems = "\n".join(check_serve_config(config, local_path=_local))
        assert "Ingress user_config" in problems and expected in problems, (user_config, problems)
    assert "thresholds_paths" in "\n".join(check_serve_config(config))  # key typos even without the files
    # Your models in args, the shipped thresholds still in the user_config: the user_config would win, silently.
    ingress["user_config"] = {"thresholds_path": app["args"]["thresholds"], "default_budget": "q=0.50"}
    assert check_serve_config(config) == []
    app["args"]["thresholds"] = "s3://bucket/report/thresholds.json"
    problems = "\n".join(check_serve_config(config))
    assert "replaces args.thresholds s3://bucket/report/thresholds.json" in problems, problems
    ingress["user_config"] = {"default_budget": "glance-only"}  # the file's budgets gone with it
    assert "no thresholds_path" in "\n".join(check_serve_config(config))
    app["args"]["thresholds"] = MOUNT + "checkpoints/thresholds.json"
    # Without an override the replicas get the builder's user_config, from args.
    app["deployments"] = [d for d in app["deployments"] if d["name"] != "Ingress"]
    assert check_serve_config(config, local_path=_local) == []
    app["args"]["default_budget"] = "q=0.5O"
    assert "q=0.5O" in "\n".join(check_serve_config(config, local_path=_local))


def test_serve_config_fits_the_cluster_at_its_largest() -> None:
    """Every deployment at max_replicas must fit cluster.yaml's workers, or Serve scales into replicas the
    autoscaler can never place (the head has CPU 0)."""
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    capacity = {"CPU": 0.0, "GPU": 0.0}
    for node in cluster["available_node_types"].values():
        for resource in capacity:
            capacity[resource] += node.get("max_workers", 0) * node["resources"].get(resource, 0)
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    asked = {"CPU": 0.0, "GPU": 0.0}
    for options in config["applications"][0]["args"]["deployments"].values():
        replicas = options["autoscaling_config"]["max_replicas"]
        asked["CPU"] += replicas * options.get("num_cpus", 1)
        asked["GPU"] += replicas * options.get("num_gpus", 0)
    assert asked["CPU"] <= capacity["CPU"] and asked["GPU"] <= capacity["GPU"], (asked, capacity)


def test_the_default_budget_is_the_middle_of_the_file_only(tmp_path) -> None:
    from pipelines.serve import load_budgets

    inline = {"fast": [0.5, 0.5], "slow": [0.9, 0.9], "exact": {"log_odds": [17.25, "inf"]}}
    budgets, default = load_budgets({"budgets": inline}, 3)
    assert default == "all-steps"  # no file: inline budgets do not pick it
    assert budgets["exact"]["thresholds"] == ExitThresholds((17.25, math.inf))
    with pytest.raises(ValueError, match="log_odds"):
        load_budgets({"budgets": {"typo": {"logodds": [1.0, 2.0]}}}, 3)
    for bad in ([90, 80], [0.5, -0.1], [0.5, math.nan], {"log_odds": [1.0, math.nan]}):  # percent, sign, NaN
        with pytest.raises(ValueError, match="budget 'bad'"):
            load_budgets({"budgets": {"bad": bad}}, 3)
    path = tmp_path / "t.json"
    save_thresholds({f"q={q}": [q, q] for q in (0.1, 0.2, 0.3)}, path)
    many = {f"z{i}": [0.5, 0.5] for i in range(40)}
    budgets, default = load_budgets({"thresholds_path": str(path), "budgets": many}, 3)
    assert default == "q=0.2" and "z0" in budgets  # 40 inline budgets do not move it


def test_a_bad_live_update_keeps_the_last_good_budgets() -> None:
    """A bad user_config fails a replica at start; on a running replica it is refused and said, not fatal."""
    from pipelines.serve import LiveBudgets, reconfigured_budgets

    good = reconfigured_budgets(None, {"budgets": {"mine": [0.9, 0.8]}, "default_budget": "mine"}, 3)
    assert (good.default, good.error) == ("mine", None)
    assert good.named["mine"]["thresholds"] == ExitThresholds.from_confidences([0.9, 0.8])
    for bad in ({"default_budget": "nope"}, {"budgets": {"mine": [0.9]}}, {"thresholds_path": "/no/such.json"}):
        with pytest.raises((ValueError, OSError)):
            reconfigured_budgets(None, bad, 3)  # at start: the replica fails, so does the deploy
        kept = reconfigured_budgets(good, bad, 3)
        assert (kept.named, kept.default) == (good.named, good.default)
        assert kept.error is not None and "refused" in kept.error and "\n" not in kept.error
    again = reconfigured_budgets(kept, {"default_budget": "glance-only"}, 3)
    assert (again.default, again.error) == ("glance-only", None)
    with pytest.raises(AttributeError):  # one immutable value, replaced whole
        good.default = "all-steps"  # type: ignore[misc]
    assert isinstance(LiveBudgets.load(None, 3), LiveBudgets)


def test_classifier_outputs_own_their_storage() -> None:
    """Each image's logits are their own tensor: a view of the batch's would ship the whole batch through Ray."""
    from pipelines.serve import classify_images

    model = build_classifier("mobilenet_v3_small", 10).eval()
    outputs = classify_images(model, 95, torch.zeros(3, 3, 95, 95, dtype=torch.uint8))
    assert len(outputs) == 3
    for logits in outputs:
        assert logits.shape == (10,) and logits.untyped_storage().nbytes() == 10 * 4


def test_replicas_run_the_classifier_folded_and_channels_last(tmp_path: Path) -> None:
    """``load_on_replica`` gives the checkpoint's classifier as ``prepare_classifier_for_inference`` makes it: no
    batch norm left, channels-last weights, and through ``classify_images`` the logits of the checkpoint's model."""
    from pipelines.serve import classify_images, load_on_replica

    classes = ["cls_a", "cls_b", "cls_c"]
    path = tiny_serving_checkpoints(tmp_path, classes)["glance"]
    model, card = load_on_replica(path, use_gpu=False)
    assert card.input_size == 95 and not model.training
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    reference, _ = load_checkpoint(path)
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        expected = reference.eval()(resize_square(to_float(images), 95))
    torch.testing.assert_close(torch.stack(classify_images(model, 95, images)), expected, rtol=1e-4, atol=1e-4)


def test_handle_payloads_travel_as_arrays_and_come_back_as_tensors() -> None:
    """Handle calls ship NumPy arrays (Ray pickles their buffer; a tensor goes through torch.save), and the
    receiving side gets back tensors equal to what was sent, writable even from Ray's read-only buffers."""
    import pickle

    import numpy as np

    from pipelines.serve import from_wire, to_wire

    proposal = {
        "boxes": torch.tensor([[0.0, 0.0, 95.0, 95.0]]),
        "scores": torch.tensor([1.5]),
        "crops": torch.randint(0, 256, (1, 3, 95, 95), dtype=torch.uint8),
    }
    sent = to_wire([proposal, torch.arange(3), "name", torch.ones(2, dtype=torch.bfloat16)])
    assert isinstance(sent[0]["crops"], np.ndarray) and isinstance(sent[1], np.ndarray) and sent[2] == "name"
    assert isinstance(sent[3], torch.Tensor)  # no NumPy dtype for bfloat16: it stays a tensor
    received = from_wire(pickle.loads(pickle.dumps(sent, protocol=5)))
    for key, value in proposal.items():
        assert isinstance(received[0][key], torch.Tensor) and torch.equal(received[0][key], value)
    assert torch.equal(received[1], torch.arange(3)) and received[2] == "name"
    # one crop of the n AnchorNet returned ships its own bytes as an array; as a tensor view, all n crops
    one_crop = torch.zeros(4, 3, 95, 95, dtype=torch.uint8)[1]
    assert len(pickle.dumps(to_wire(one_crop), protocol=5)) < one_crop.numel() + 1000
    assert len(pickle.dumps(one_crop, protocol=5)) > 4 * one_crop.numel()
    frozen = np.zeros(4, dtype=np.float32)
    frozen.flags.writeable = False
    thawed = from_wire(frozen)
    thawed += 1  # a copy: the read-only buffer is untouched
    assert frozen.sum() == 0 and thawed.sum() == 4


@pytest.mark.parametrize("script", ["serve_load", "serve_overhead"])
def test_serve_benchmarks_refuse_a_budget_they_cannot_find(tmp_path: Path, script: str) -> None:
    """Every request would be a 400: the benchmark says so in one line before starting Ray."""
    main = importlib.import_module(f"benchmarks.{script}").main

    with pytest.raises(SystemExit) as err:
        main(["--data", str(tmp_path), "--budget", "q=0.50"])
    assert "--thresholds" in str(err.value) and "\n" not in str(err.value)


def test_serve_load_prints_the_ratio_to_the_baseline() -> None:
    from benchmarks.serve_load import BASELINE, _ratios

    def loaded(rps: float, accuracy: float) -> dict[str, dict[str, float]]:
        return {"loaded": {"throughput_rps": rps, "accuracy": accuracy}}

    results = {"colocated": loaded(45.0, 0.95), "separate": loaded(15.0, 0.95), BASELINE: loaded(30.0, 0.98)}
    assert _ratios(results).splitlines() == [
        "ratio colocated / full224, loaded: 1.50x req/s (top-1 0.950 against 0.980)",
        "ratio separate / full224, loaded: 0.50x req/s (top-1 0.950 against 0.980)",
    ]
    assert _ratios({"colocated": loaded(45.0, 0.95)}) == "ratio: no full-224 baseline in this run"


def test_serve_config_deploys_the_shipped_checkpoints() -> None:
    """The YAML's paths are the shipped imagenette models where cluster.yaml mounts the repository; they fit
    together (classes, K, MACs) and the default budget is in the thresholds file."""
    from pipelines.serve import ServeArgs, load_budgets, serving_spec

    args = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"]
    local = {k: _local(v) if isinstance(v, str) else v for k, v in args.items()}
    spec = serving_spec(ServeArgs.model_validate(local))
    assert spec.class_names == sorted(spec.class_names) and len(spec.class_names) == 10
    labels = dict(zip(spec.class_names, spec.class_labels, strict=True))
    assert labels["n03417042"] == "garbage truck, dustcart" and labels["n01440764"] == "tench, Tinca tinca"
    assert spec.patch_size == 95 and spec.num_steps == 5
    budgets, default = load_budgets(
        {"thresholds_path": local["thresholds"], "default_budget": args["default_budget"]}, 5
    )
    assert default == args["default_budget"] and default in budgets


# ---------------------------------------------------------------------------------------------------------------
# The app over HTTP


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("serve")
    paths = tiny_serving_checkpoints(root, CLASSES)
    paths["thresholds"] = str(root / "thresholds.json")
    save_thresholds({"q=0.50": [0.5, 0.4, 0.3], "strict": [math.inf] * NUM_PATCHES}, paths["thresholds"])
    return paths


def _tiny(**autoscaling: int) -> dict[str, object]:
    return {
        "num_cpus": 0.1,
        "max_ongoing_requests": 16,
        "max_batch_size": 4,
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1, **autoscaling},
    }


@pytest.fixture(scope="module", params=["separate", "colocated"])
def layout(request: pytest.FixtureRequest) -> str:
    """Every HTTP test runs against both layouts: one deployment per model, and the models in the ingress."""
    return request.param


def _app_args(checkpoints: dict[str, str], layout: str, default_budget: str = "q=0.50") -> dict[str, Any]:
    """``build_app`` args of the test app in ``layout``, every replica on a tenth of a CPU. The colocated app runs
    its models on ONNX Runtime (``runtime: onnxruntime``, the CPU layout's fast runtime); the separate one its glance
    deployment, the others on torch: every HTTP test covers both runtimes (``ColocatedModels`` with torch:
    ``test_colocated_models_load_on_the_ingress_runtime``)."""
    deployments = {name: _tiny() for name in ("ingress", "glance", "anchornet", "patch")}
    deployments["ingress" if layout == "colocated" else "glance"]["runtime"] = "onnxruntime"
    return {
        "anchornet": checkpoints["anchornet"],
        "glance": checkpoints["glance"],
        "patch": checkpoints["patch"],
        "thresholds": checkpoints["thresholds"],
        "default_budget": default_budget,
        "num_patches": NUM_PATCHES,
        "max_body_bytes": MAX_BODY,
        "max_pixels": MAX_PIXELS,
        "deployments": deployments,
        "colocate": layout == "colocated",
    }


@pytest.fixture(scope="module")
def server(ray_local: None, checkpoints: dict[str, str], layout: str) -> Iterator[str]:
    """The app on a free 127.0.0.1 port, every replica on a tenth of a CPU."""
    with serve_app_on_free_port(_app_args(checkpoints, layout)) as url:
        yield url


@pytest.fixture(scope="module")
def engine(checkpoints: dict[str, str]) -> EarlyExitClassifier:
    anchornet, _ = load_checkpoint(checkpoints["anchornet"])
    glance, _ = load_checkpoint(checkpoints["glance"])
    patch, _ = load_checkpoint(checkpoints["patch"])
    return EarlyExitClassifier(anchornet, glance, patch, [math.inf] * NUM_PATCHES, NUM_PATCHES, patch_size=95).eval()


def _classify(url: str, data: bytes, content_type: str = "image/jpeg", **params: str) -> requests.Response:
    return requests.post(
        f"{url}/classify", data=data, headers={"Content-Type": content_type}, params=params, timeout=60
    )


def _engine_result(engine: EarlyExitClassifier, data: bytes, thresholds: list[float]) -> dict[str, object]:
    image = Preprocessing()(decode_image(data, min_size=95))
    engine.thresholds = thresholds
    result = engine.predict(to_float(image)[None])
    return {
        "prediction": int(result.prediction[0]),
        "exit_step": int(result.exit_step[0]),
        "macs": int(result.macs[0]),
        "confidence": float(result.confidence[0]),
    }


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_health_info_and_openapi(server: str, layout: str) -> None:
    from ray import serve

    assert requests.get(f"{server}/healthz", timeout=30).json() == {"status": "ok"}
    info = requests.get(f"{server}/info", timeout=30).json()
    assert info["layout"] == layout
    runtimes = {"anchornet": "torch", "glance": "onnxruntime", "patch": "torch"}
    if layout == "colocated":
        runtimes = dict.fromkeys(runtimes, "onnxruntime")
    assert {role: m["runtime"] for role, m in info["models"].items()} == runtimes
    deployments = set(serve.status().applications["anchornet"].deployments)
    assert deployments == ({"Ingress"} if layout == "colocated" else {"Ingress", "Glance", "AnchorNet", "Patch"})
    assert info["classes"] == CLASSES and info["labels"] == CLASSES  # not WordNet ids: labelled by their names
    assert info["num_steps"] == NUM_PATCHES + 1
    assert info["default_budget"] == "q=0.50"
    strict = info["budgets"]["strict"]  # saved as confidences of inf: log-odds inf, shown as confidence 1
    assert (strict["thresholds"], strict["log_odds"]) == ([1.0] * NUM_PATCHES, ["inf"] * NUM_PATCHES)
    assert info["budgets"]["q=0.50"]["thresholds"] == pytest.approx([0.5, 0.4, 0.3])
    assert {"all-steps", "glance-only", "q=0.50"} <= set(info["budgets"])
    macs = info["step_macs"]
    assert len(macs) == NUM_PATCHES + 1 and macs == sorted(macs)
    assert "/classify" in requests.get(f"{server}/openapi.json", timeout=30).json()["paths"]


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_http_equals_engine(server: str, engine: EarlyExitClassifier) -> None:
    data = _encode(_photo(1))
    outputs, _ = engine.step_logits(to_float(Preprocessing()(decode_image(data)))[None])
    confidences = outputs[0].float().cumsum(0).softmax(-1).amax(-1).tolist()  # confidence of z_t, t = 1..T
    # Exit exactly at step 3: rho_1, rho_2 just above the confidence there, rho_3 just below.
    mid = [confidences[0] + 1e-3, confidences[1] + 1e-3, confidences[2] - 1e-3]
    for rho, expected_step in (([0.0] * NUM_PATCHES, 1), ([math.inf] * NUM_PATCHES, NUM_PATCHES + 1), (mid, 3)):
        got = _classify(server, data, thresholds=",".join(str(r) for r in rho))
        assert got.status_code == 200, got.text
        body = got.json()
        want = _engine_result(engine, data, rho)
        assert want["exit_step"] == expected_step
        assert (body["prediction"]["index"], body["exit_step"], body["macs"]) == (
            want["prediction"],
            want["exit_step"],
            want["macs"],
        )
        assert body["confidence"] == pytest.approx(want["confidence"], abs=1e-4)
        assert len(body["patches"]) == body["exit_step"] - 1
        assert body["prediction"]["name"] == body["prediction"]["label"] == CLASSES[body["prediction"]["index"]]
    # Named budgets, the default, and top_k.
    strict = _classify(server, data, budget="strict", top_k="3").json()
    assert strict["budget"] == "strict" and strict["exit_step"] == NUM_PATCHES + 1 and len(strict["top_k"]) == 3
    for patch in strict["patches"]:
        x0, y0, x1, y1 = patch["box"]
        assert x1 - x0 == y1 - y0 == 95 and math.isfinite(patch["cam_score"])
    assert _classify(server, data).json()["budget"] == "q=0.50"
    # A budget's log-odds, as /info and the response show them, sent back decide exactly as the budget does.
    by_name = _classify(server, data, budget="q=0.50").json()
    log_odds = requests.get(f"{server}/info", timeout=30).json()["budgets"]["q=0.50"]["log_odds"]
    assert by_name["log_odds"] == log_odds
    by_log_odds = _classify(server, data, log_odds=",".join(str(v) for v in log_odds)).json()
    assert (by_log_odds["exit_step"], by_log_odds["log_odds"], by_log_odds["budget"]) == (
        by_name["exit_step"],
        log_odds,
        None,
    )


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_server_timing_says_where_the_time_went(server: str, layout: str) -> None:
    desc = "forward" if layout == "colocated" else "call"
    data = _encode(_photo(2))
    for rho, models in ((0.0, ["glance"]), (math.inf, ["glance", "anchornet", "patch"])):
        got = _classify(server, data, thresholds=",".join([str(rho)] * NUM_PATCHES))
        assert got.status_code == 200, got.text
        header = got.headers["Server-Timing"]
        timing = parse_server_timing(header)
        assert list(timing) == ["decode", *models, "app"]
        assert all(f'{model};desc="{desc}"' in header for model in models)
        assert timing["app"] == pytest.approx(got.json()["latency_ms"], abs=1e-3)
        assert all(ms > 0 for ms in timing.values())
        assert sum(timing[name] for name in ("decode", *models)) < timing["app"]  # one request: nothing shared


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_concurrent_requests_each_get_their_own_result(server: str) -> None:
    """Concurrent requests share batches (glance, AnchorNet and patch calls interleaved): each must still get
    exactly the answer it gets alone."""
    images = [_encode(_photo(seed)) for seed in range(10, 18)]
    alone = [_classify(server, data, budget="strict").json() for data in images]
    with ThreadPoolExecutor(len(images)) as pool:
        together = list(pool.map(lambda data: _classify(server, data, budget="strict"), images * 2))
    for i, response in enumerate(together):
        assert response.status_code == 200, response.text
        body, want = response.json(), alone[i % len(images)]
        assert (body["prediction"]["index"], body["exit_step"], body["macs"]) == (
            want["prediction"]["index"],
            want["exit_step"],
            want["macs"],
        )
        assert body["confidence"] == pytest.approx(want["confidence"], abs=1e-4)
        assert [p["box"] for p in body["patches"]] == [p["box"] for p in want["patches"]]


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_image_modes_and_multipart(server: str) -> None:
    photo = _photo(2)
    cmyk = _encode(photo.convert("CMYK"), "JPEG")
    palette = _encode(photo.convert("P", palette=Image.Palette.ADAPTIVE), "PNG")
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    for data, content_type in (
        (_encode(photo.convert("L")), "image/jpeg"),
        (cmyk, "image/jpeg"),
        (palette, "image/png"),
        (_encode(rgba, "PNG"), "image/png"),
        (_encode(photo, "PNG"), "application/octet-stream"),
    ):
        got = _classify(server, data, content_type)
        assert got.status_code == 200, got.text
    got = requests.post(f"{server}/classify", files={"file": ("a.jpg", _encode(photo), "image/jpeg")}, timeout=60)
    assert got.status_code == 200, got.text
    assert got.json()["image_size"] == list(photo.size)


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_bad_input_gets_4xx_json_and_service_stays_up(server: str) -> None:
    good = _encode(_photo(3))
    multipart = "multipart/form-data; boundary=XYZ"
    form = b'--XX\r\nContent-Disposition: form-data; name="file"\r\n\r\n' + good + b"\r\n--XX--\r\n"
    cases = [
        ("empty body", lambda: _classify(server, b""), 400),
        ("not an image", lambda: _classify(server, b"this is not an image at all"), 400),
        ("truncated JPEG", lambda: _classify(server, good[: len(good) // 2]), 400),
        ("corrupt DDS", lambda: _classify(server, b"DDS " + struct.pack("<7I", 124, 0x1007, 200, 200, 0, 0, 0)), 400),
        ("too small", lambda: _classify(server, _encode(_photo(4, (64, 200)))), 400),
        ("too elongated", lambda: _classify(server, _encode(Image.new("RGB", (95, 2000)), "PNG"), "image/png"), 400),
        ("decompression bomb", lambda: _classify(server, _png_bomb(), "image/png"), 413),
        ("body over the limit", lambda: _classify(server, b"\xff" * (MAX_BODY + 1)), 413),
        ("unsupported media type", lambda: _classify(server, good, "text/plain"), 415),
        ("malformed multipart", lambda: _classify(server, b"--nope\r\nbroken", multipart), 400),
        ("multipart without boundary", lambda: _classify(server, good, "multipart/form-data"), 400),
        (
            "multipart Content-Type parameter x*",
            lambda: _classify(server, form, "multipart/form-data; boundary=XX; x*"),
            400,
        ),
        (
            "multipart part parameter name*",
            lambda: _classify(server, form.replace(b'name="file"', b"name*"), "multipart/form-data; boundary=XX"),
            400,
        ),
        ("unknown budget", lambda: _classify(server, good, budget="q=9.99"), 400),
        ("too few thresholds", lambda: _classify(server, good, thresholds="0.9,0.8"), 400),
        ("non-numeric thresholds", lambda: _classify(server, good, thresholds="a,b,c"), 400),
        ("thresholds outside [0, 1]", lambda: _classify(server, good, thresholds="5,-3,0.5,inf"), 400),
        ("budget and thresholds", lambda: _classify(server, good, budget="strict", thresholds="1,1,1"), 400),
        ("bad top_k", lambda: _classify(server, good, top_k="zero"), 422),
        ("unknown path", lambda: requests.get(f"{server}/classfy", timeout=30), 404),
        ("wrong method", lambda: requests.get(f"{server}/classify", timeout=30), 405),
    ]
    codes = {}
    for what, send, status in cases:
        got = send()
        assert got.status_code == status, f"{what}: {got.status_code} {got.text}"
        error = got.json()["error"]
        assert error["code"] and error["message"], what
        codes[what] = error["code"]
    assert codes["multipart Content-Type parameter x*"] == codes["multipart part parameter name*"] == "bad_multipart"
    assert codes["too elongated"] == codes["corrupt DDS"] == "bad_image"
    assert codes["thresholds outside [0, 1]"] == "bad_thresholds"
    assert (codes["unknown path"], codes["wrong method"]) == ("not_found", "method_not_allowed")
    too_small = _classify(server, _encode(_photo(4, (64, 200)))).json()["error"]["message"]
    assert "95" in too_small and "too small" in too_small
    got = _classify(server, good)
    assert got.status_code == 200, got.text
    assert requests.get(f"{server}/healthz", timeout=30).status_code == 200


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_thresholds_are_live_config(server: str, checkpoints: dict[str, str], layout: str) -> None:
    from ray import serve

    from pipelines.serve import build_app

    args = _app_args(checkpoints, layout, default_budget="strict")  # the same layout: only the thresholds change
    before = requests.get(f"{server}/info", timeout=30).json()
    serve.run(build_app(args), name="anchornet", route_prefix="/", blocking=False)
    info = requests.get(f"{server}/info", timeout=30).json()
    assert before["default_budget"] == "q=0.50" and info["default_budget"] == "strict"
    assert info["layout"] == before["layout"] == layout
    body = _classify(server, _encode(_photo(5))).json()
    assert body["budget"] == "strict" and body["exit_step"] == NUM_PATCHES + 1


def _deploy_config(checkpoints: dict[str, str], layout: str, user_config: dict[str, Any]) -> None:
    """Deploy the app from a config, as ``serve deploy`` does, with ``user_config`` under ``Ingress``.

    The app's code version is then a hash of its import path and args, so a change of the user_config alone
    reconfigures the running Ingress replicas (``serve.run`` gives every deploy a new version: new replicas)."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    app = {
        "name": "anchornet",
        "route_prefix": "/",
        "import_path": "pipelines.serve:build_app",
        "args": _app_args(checkpoints, layout),
        "deployments": [{"name": "Ingress", "user_config": user_config}],
    }
    # Sets the app DEPLOYING before it returns; RUNNING again once every deployment reached the new target.
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))
    deadline = time.monotonic() + 150
    while (status := serve.status().applications["anchornet"]).status != "RUNNING":
        assert time.monotonic() < deadline and status.status == "DEPLOYING", (status.status, status.message)
        time.sleep(0.5)


def _info_when(server: str, ready: Callable[[dict[str, Any]], bool], timeout: float = 120) -> dict[str, Any]:
    """``GET /info`` polled until ``ready`` holds (through a redeploy); its last answer otherwise."""
    deadline = time.monotonic() + timeout
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            got = requests.get(f"{server}/info", timeout=30)
            info = got.json() if got.ok else {}
        except requests.RequestException:
            info = {}
        if info and ready(info):
            break
        time.sleep(0.5)
    return info


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_bad_live_update_is_refused_and_the_service_stays_up(
    server: str, checkpoints: dict[str, str], layout: str
) -> None:
    """A typo in a live thresholds update (serve deploy of a changed user_config) must not stop the replicas that
    run: they keep the last good budgets and say why in /info; the next good update applies."""
    thresholds = checkpoints["thresholds"]
    _deploy_config(checkpoints, layout, {"thresholds_path": thresholds, "default_budget": "strict"})
    info = _info_when(server, lambda i: i["default_budget"] == "strict")
    assert info["default_budget"] == "strict" and info["config_error"] is None and info["layout"] == layout

    _deploy_config(checkpoints, layout, {"thresholds_path": thresholds, "default_budget": "q=0.5O"})
    info = _info_when(server, lambda i: i["config_error"] is not None)
    assert info["config_error"] and "q=0.5O" in info["config_error"], info
    assert info["default_budget"] == "strict" and "q=0.50" in info["budgets"]
    body = _classify(server, _encode(_photo(6))).json()
    assert body["budget"] == "strict" and body["exit_step"] == NUM_PATCHES + 1

    _deploy_config(checkpoints, layout, {"thresholds_path": thresholds, "default_budget": "q=0.50"})
    info = _info_when(server, lambda i: i["config_error"] is None)
    assert (info["default_budget"], info["config_error"]) == ("q=0.50", None)
    assert _classify(server, _encode(_photo(6))).json()["budget"] == "q=0.50"


def test_replicas_run_on_the_gpu_they_ask_for() -> None:
    from pipelines.serve import model_device

    assert model_device(False) == torch.device("cpu")
    if torch.cuda.is_available():
        assert model_device(True).type == "cuda"
    else:  # a deployment with num_gpus > 0 on a torch without CUDA fails at start, not silently on the CPU
        with pytest.raises(RuntimeError, match="num_gpus > 0"):
            model_device(True)


def test_jobs_serve_arguments() -> None:
    from jobs.serve import parse_args, serve_args

    args = serve_args(parse_args(["--anchornet", "a.pt", "--glance", "g.pt", "--patch", "p.pt", "--port", "9000"]))
    assert (args.anchornet, args.num_patches, args.thresholds) == ("a.pt", 4, None)
    assert args.deployments.glance.num_cpus == 0.25
    assert not args.colocate
    assert serve_args(parse_args(["--anchornet", "a", "--glance", "g", "--patch", "p", "--colocate"])).colocate
