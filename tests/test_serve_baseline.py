"""The one-deployment full-size baseline app (``build_baseline_app``) over HTTP on the shared local Ray."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
import torch
from PIL import Image

from anchornet import Preprocessing, build_classifier, decode_image, load_checkpoint, save_checkpoint
from anchornet.early_exit import resize_square
from anchornet.preprocessing import to_float
from pipelines.serve_http import parse_server_timing

requests = pytest.importorskip("requests")

CLASSES = ["n01440764", "n03417042", "not-a-wordnet-id"]
INPUT_SIZE = 96


def _jpeg(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(180, 200, 3, generator=g) * 255).byte().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("baseline") / "full.pt")
    preprocessing = Preprocessing(image_size=INPUT_SIZE, resize_size=110)
    model = build_classifier("mobilenet_v3_small", len(CLASSES))
    save_checkpoint(model, path, input_size=INPUT_SIZE, class_names=CLASSES, preprocessing=preprocessing)
    return path


@pytest.fixture(scope="module")
def server(ray_local: None, classifier: str) -> Iterator[str]:
    from _s3 import free_port
    from ray import serve

    from pipelines.serve import build_baseline_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    deployment = {"num_cpus": 0.1, "max_batch_size": 4, "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
    app = build_baseline_app(
        {"classifier": classifier, "top_k": 2, "max_body_bytes": 100_000, "deployment": deployment}
    )
    serve.run(app, name="baseline", route_prefix="/", blocking=False)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_baseline_classifies_like_the_checkpoint_with_readable_labels(server: str, classifier: str) -> None:
    model, card = load_checkpoint(classifier)
    data = _jpeg(1)
    image = Preprocessing.from_dict(card.preprocessing)(decode_image(data))
    with torch.inference_mode():
        want = model.eval()(resize_square(to_float(image)[None], INPUT_SIZE))[0].softmax(-1)

    got = requests.post(f"{server}/classify", data=data, headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["exit_step"] == 1 and body["macs"] == card.macs and body["image_size"] == [200, 180]
    timing = parse_server_timing(got.headers["Server-Timing"])
    assert list(timing) == ["decode", "model", "app"] and timing["app"] == pytest.approx(body["latency_ms"], abs=1e-3)
    assert len(body["top_k"]) == 2
    labels = {"n01440764": "tench, Tinca tinca", "n03417042": "garbage truck, dustcart"}
    for score in body["top_k"]:
        assert score["name"] == CLASSES[score["index"]]
        assert score["label"] == labels.get(score["name"], score["name"])
        assert score["probability"] == pytest.approx(float(want[score["index"]]), abs=1e-5)
    assert body["prediction"]["index"] == int(want.argmax())


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_baseline_rejects_bad_input_and_stays_up(server: str) -> None:
    for data, content_type, status in (
        (b"", "image/jpeg", 400),
        (b"not an image", "image/jpeg", 400),
        (_jpeg(2)[:300], "image/jpeg", 400),
        (b"x" * 200_000, "image/jpeg", 413),
        (_jpeg(2), "text/plain", 415),
    ):
        got = requests.post(f"{server}/classify", data=data, headers={"Content-Type": content_type}, timeout=60)
        assert got.status_code == status, (content_type, got.status_code, got.text)
        assert "error" in got.json()
    good = requests.post(f"{server}/classify", data=_jpeg(3), headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert good.status_code == 200, good.text
