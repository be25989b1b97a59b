"""``jobs/serve.py`` end to end in its own process (its own embedded Ray): Serve's high-throughput mode."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from anchornet import Preprocessing, anchornet_test, build_classifier, save_checkpoint
from jobs.serve import main
from pipelines.serve import HAPROXY_PORTS

requests = pytest.importorskip("requests")

REPO = Path(__file__).resolve().parents[1]


def _jpeg() -> bytes:
    pixels = (torch.rand(240, 256, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_serve_job_in_high_throughput_mode(tmp_path: Path) -> None:
    """HAProxy takes the port in place of Serve's proxy: classification, a 4xx for bad input, a clean stop."""
    from _s3 import free_port

    torch.manual_seed(0)
    classes = ["n01440764", "n03417042"]
    paths = {role: str(tmp_path / f"{role}.pt") for role in ("anchornet", "glance", "patch")}
    save_checkpoint(anchornet_test(2), paths["anchornet"], class_names=classes, preprocessing=Preprocessing())
    for role in ("glance", "patch"):
        save_checkpoint(build_classifier("mobilenet_v3_small", 2), paths[role], input_size=95, class_names=classes)
    port = free_port()
    command = [sys.executable, "jobs/serve.py", "--port", str(port), "--num-cpus", "1", "--replica-cpus", "0.1"]
    command += [f"--{role}={path}" for role, path in paths.items()] + ["--colocate", "--high-throughput"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.update({variable: str(free_port()) for variable in HAPROXY_PORTS})  # not HAProxy's fixed defaults
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in job.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "AnchorNet serving at" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(150), "".join(lines[-30:])
        url = f"http://127.0.0.1:{port}"
        info = requests.get(f"{url}/info", timeout=30).json()
        assert info["layout"] == "colocated" and info["labels"] == ["tench, Tinca tinca", "garbage truck, dustcart"]
        bad = requests.post(f"{url}/classify", data=b"not an image", headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["code"]
        good = requests.post(f"{url}/classify", data=_jpeg(), headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert good.status_code == 200, good.text
        assert good.json()["prediction"]["name"] in classes and good.json()["image_size"] == [256, 240]
    finally:
        job.send_signal(signal.SIGTERM)
        try:
            code = job.wait(60)
        except subprocess.TimeoutExpired:
            job.kill()
            raise
    assert code == 0, "".join(lines[-30:])
    with pytest.raises(requests.ConnectionError):  # HAProxy went with it
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_serve_job_refuses_busy_haproxy_ports(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """HAProxy would crash at start with a traceback; the job says which port and which variable, in one line."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        monkeypatch.setenv("RAY_SERVE_HAPROXY_METRICS_PORT", str(port))
        code = main(["--anchornet", "a.pt", "--glance", "g.pt", "--patch", "p.pt", "--high-throughput"])
    assert code == 1
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0 and f"{port} (RAY_SERVE_HAPROXY_METRICS_PORT)" in out
