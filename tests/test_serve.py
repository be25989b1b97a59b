"""The Serve app over HTTP on the shared local Ray: early exit equal to the engine, live thresholds, bad input."""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from anchornet import (
    EarlyExitClassifier,
    Preprocessing,
    anchornet_test,
    build_classifier,
    decode_image,
    load_checkpoint,
    save_checkpoint,
    save_thresholds,
)
from anchornet.preprocessing import to_float
from pipelines.serve_http import ApiError, parse_multipart, parse_server_timing, parse_thresholds

requests = pytest.importorskip("requests")

REPO = Path(__file__).resolve().parents[1]
CLASSES = [f"class{i}" for i in range(10)]
NUM_PATCHES = 3
MAX_BODY = 300_000
MAX_PIXELS = 4_000_000


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
    ):
        with pytest.raises(ApiError) as err:
            parse_multipart(broken, content_type)
        assert err.value.status == 400


def test_openapi_documents_the_classify_responses() -> None:
    """The /classify endpoints return pre-serialised JSON; their schemas must still be in the docs."""
    from pipelines.serve import api, baseline_api

    for app, model in ((api, "Classification"), (baseline_api, "FullClassification")):
        spec = app.openapi()
        content = spec["paths"]["/classify"]["post"]["responses"]["200"]["content"]["application/json"]
        assert content["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert {"prediction", "top_k", "macs", "latency_ms"} <= set(spec["components"]["schemas"][model]["properties"])


def test_serve_config_yaml_is_valid_and_strict() -> None:
    from pipelines.serve import check_serve_config

    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    assert check_serve_config(config) == []
    app = config["applications"][0]
    assert app["import_path"] == "pipelines.serve:build_app"

    typo = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    typo["applications"][0]["deployments"] = [{"name": "Glance", "max_ongoing_request": 8}]
    typo["applications"][0]["args"]["deployments"]["patch"]["autoscaling_config"]["target_ongoing_request"] = 3
    typo["applications"][0]["args"]["num_patch"] = 4
    problems = "\n".join(check_serve_config(typo))
    assert "max_ongoing_request" in problems
    assert "target_ongoing_request" in problems
    assert "num_patch" in problems


def test_serve_config_deploys_the_shipped_checkpoints() -> None:
    """The YAML's paths are the shipped imagenette models where cluster.yaml mounts the repository; they fit
    together (classes, K, MACs) and the default budget is in the thresholds file."""
    from pipelines.serve import ServeArgs, load_budgets, serving_spec

    args = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"]
    mount = "/home/ray/anchornet/"
    local = {
        k: str(REPO / v.removeprefix(mount)) if isinstance(v, str) and v.startswith(mount) else v
        for k, v in args.items()
    }
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
    torch.manual_seed(0)
    paths = {name: str(root / f"{name}.pt") for name in ("anchornet", "glance", "patch")}
    save_checkpoint(
        anchornet_test(10), paths["anchornet"], input_size=224, class_names=CLASSES, preprocessing=Preprocessing()
    )
    for name in ("glance", "patch"):
        save_checkpoint(build_classifier("mobilenet_v3_small", 10), paths[name], input_size=95, class_names=CLASSES)
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


@pytest.fixture(scope="module")
def server(ray_local: None, checkpoints: dict[str, str], layout: str) -> Iterator[str]:
    """The app on a free 127.0.0.1 port, every replica on a tenth of a CPU."""
    from _s3 import free_port
    from ray import serve

    from pipelines.serve import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    args = {
        "anchornet": checkpoints["anchornet"],
        "glance": checkpoints["glance"],
        "patch": checkpoints["patch"],
        "thresholds": checkpoints["thresholds"],
        "default_budget": "q=0.50",
        "num_patches": NUM_PATCHES,
        "max_body_bytes": MAX_BODY,
        "max_pixels": MAX_PIXELS,
        "deployments": {name: _tiny() for name in ("ingress", "glance", "anchornet", "patch")},
        "colocate": layout == "colocated",
    }
    serve.run(build_app(args), name="anchornet", route_prefix="/", blocking=False)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


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
    deployments = set(serve.status().applications["anchornet"].deployments)
    assert deployments == ({"Ingress"} if layout == "colocated" else {"Ingress", "Glance", "AnchorNet", "Patch"})
    assert info["classes"] == CLASSES and info["labels"] == CLASSES  # not WordNet ids: labelled by their names
    assert info["num_steps"] == NUM_PATCHES + 1
    assert info["default_budget"] == "q=0.50"
    assert info["budgets"]["strict"]["thresholds"] == ["inf"] * NUM_PATCHES
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
    cases = [
        ("empty body", lambda: _classify(server, b""), 400),
        ("not an image", lambda: _classify(server, b"this is not an image at all"), 400),
        ("truncated JPEG", lambda: _classify(server, good[: len(good) // 2]), 400),
        ("too small", lambda: _classify(server, _encode(_photo(4, (64, 200)))), 400),
        ("decompression bomb", lambda: _classify(server, _png_bomb(), "image/png"), 413),
        ("body over the limit", lambda: _classify(server, b"\xff" * (MAX_BODY + 1)), 413),
        ("unsupported media type", lambda: _classify(server, good, "text/plain"), 415),
        ("malformed multipart", lambda: _classify(server, b"--nope\r\nbroken", multipart), 400),
        ("multipart without boundary", lambda: _classify(server, good, "multipart/form-data"), 400),
        ("unknown budget", lambda: _classify(server, good, budget="q=9.99"), 400),
        ("too few thresholds", lambda: _classify(server, good, thresholds="0.9,0.8"), 400),
        ("non-numeric thresholds", lambda: _classify(server, good, thresholds="a,b,c"), 400),
        ("budget and thresholds", lambda: _classify(server, good, budget="strict", thresholds="1,1,1"), 400),
        ("bad top_k", lambda: _classify(server, good, top_k="zero"), 422),
    ]
    for what, send, status in cases:
        got = send()
        assert got.status_code == status, f"{what}: {got.status_code} {got.text}"
        error = got.json()["error"]
        assert error["code"] and error["message"], what
    too_small = _classify(server, _encode(_photo(4, (64, 200)))).json()["error"]["message"]
    assert "95" in too_small and "too small" in too_small
    got = _classify(server, good)
    assert got.status_code == 200, got.text
    assert requests.get(f"{server}/healthz", timeout=30).status_code == 200


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_thresholds_are_live_config(server: str, checkpoints: dict[str, str]) -> None:
    from ray import serve

    from pipelines.serve import build_app

    args = {
        "anchornet": checkpoints["anchornet"],
        "glance": checkpoints["glance"],
        "patch": checkpoints["patch"],
        "thresholds": checkpoints["thresholds"],
        "default_budget": "strict",
        "num_patches": NUM_PATCHES,
        "max_body_bytes": MAX_BODY,
        "max_pixels": MAX_PIXELS,
        "deployments": {name: _tiny() for name in ("ingress", "glance", "anchornet", "patch")},
    }
    before = requests.get(f"{server}/info", timeout=30).json()
    serve.run(build_app(args), name="anchornet", route_prefix="/", blocking=False)
    info = requests.get(f"{server}/info", timeout=30).json()
    assert before["default_budget"] == "q=0.50" and info["default_budget"] == "strict"
    body = _classify(server, _encode(_photo(5))).json()
    assert body["budget"] == "strict" and body["exit_step"] == NUM_PATCHES + 1


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
