"""cluster.yaml, offline: the JSON schema in the Ray wheel, Ray's own config validation, and what neither checks.

``ray up`` runs ``prepare_config`` -> (AWS calls) -> ``validate_config`` -> (AWS calls); the two middle steps
are the private API of the pinned Ray (2.60), run here without any network. The schema does not look inside
``node_config`` (free-form boto3 arguments) nor at ``provider.region``; ``check_cluster_config`` does, and the
negative tests show every check fires.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"

# vCPUs and GPUs of the instance types a worker may declare: `resources` must match the machine.
INSTANCE_SHAPES = {
    "g5.xlarge": (4, 1),
    "g5.2xlarge": (8, 1),
    "g5.12xlarge": (48, 4),
    "g6.xlarge": (4, 1),
    "g6.2xlarge": (8, 1),
    "g6e.xlarge": (4, 1),
    "g4dn.xlarge": (4, 1),
    "g4dn.2xlarge": (8, 1),
    "p4d.24xlarge": (96, 8),
}
IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d{3,})-(?P<flavour>gpu|cu\d+)$")
AMI = re.compile(r"^(ami-[0-9a-f]{8,17}|resolve:ssm:/aws/service/deeplearning/ami/x86_64/[a-z0-9.-]+/latest/ami-id)$")
PROFILE_ARN = re.compile(r"^arn:aws:iam::(\d{12}|ACCOUNT_ID):instance-profile/[\w+=,.@/-]+$")


def _base(v: str) -> str:
    return v.split("+")[0]  # 2.14.1+cu130 -> 2.14.1


def load() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def check_cluster_config(cfg: dict[str, Any]) -> list[str]:
    """What ``ray up`` would only find out on AWS (or never): one line per problem."""
    problems = []
    provider = cfg.get("provider", {})
    if provider.get("type") != "aws" or not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", str(provider.get("region", ""))):
        problems.append(f"provider must be aws with a region, got {provider}")

    types = cfg.get("available_node_types", {})
    head = cfg.get("head_node_type")
    for name, node in types.items():
        nc = node.get("node_config", {})
        if not nc.get("InstanceType"):
            problems.append(f"{name}: node_config has no InstanceType")
        if not AMI.match(str(nc.get("ImageId", ""))):
            problems.append(f"{name}: ImageId must be a pinned ami-... or a DLAMI SSM parameter: {nc.get('ImageId')}")
        resources = node.get("resources", {})
        if name == head:
            if resources.get("CPU") != 0 or resources.get("GPU", 0) != 0:
                problems.append(f"head {name}: resources must be {{'CPU': 0}} so no work lands there, got {resources}")
            continue
        gpus, cpus = resources.get("GPU"), resources.get("CPU")
        if not (isinstance(gpus, int) and gpus >= 1 and isinstance(cpus, int) and cpus >= 1):
            problems.append(f"worker {name}: resources must declare integer CPU and GPU (>= 1), got {resources}")
        elif INSTANCE_SHAPES.get(nc.get("InstanceType")) != (cpus, gpus):
            shape = INSTANCE_SHAPES.get(nc.get("InstanceType"), "unknown: add it to INSTANCE_SHAPES")
            problems.append(f"worker {name}: resources {resources} do not match {nc.get('InstanceType')} {shape}")
        if not PROFILE_ARN.match(str(nc.get("IamInstanceProfile", {}).get("Arn", ""))):
            problems.append(f"worker {name}: S3 needs node_config.IamInstanceProfile.Arn (an instance-profile ARN)")
        lo, hi = node.get("min_workers", 0), node.get("max_workers")
        if hi is None or not 0 <= lo <= hi <= cfg.get("max_workers", -1):
            problems.append(f"worker {name}: need 0 <= min_workers ({lo}) <= max_workers ({hi}) <= global max_workers")
    worker_max = sum(n.get("max_workers", 0) for k, n in types.items() if k != head)
    if cfg.get("max_workers") != worker_max:
        problems.append(f"global max_workers ({cfg.get('max_workers')}) != sum of worker max_workers ({worker_max})")

    image = IMAGE.match(str(cfg.get("docker", {}).get("image", "")))
    if image is None:
        problems.append(f"docker.image must be a pinned rayproject/ray:X.Y.Z-pyXY-gpu, got {cfg.get('docker')}")
    elif image["ray"] != ray.__version__:
        problems.append(f"image Ray {image['ray']} != installed Ray {ray.__version__}")

    setup = " ".join(cfg.get("setup_commands", []))
    for package in ("ray", "torch", "torchvision"):
        installed = version(package)
        pins = re.findall(rf'"?{package}(?:\[[\w,]+\])?==([\w.]+)"?', setup)
        if pins != [_base(installed)]:
            problems.append(f"setup_commands must pin {package}=={_base(installed)} once, found {pins}")
    repo = [dst for dst, src in cfg.get("file_mounts", {}).items() if src == "."]
    if len(repo) != 1 or not re.search(rf'pip install [^&]*-e "?{re.escape(repo[0])}(\[\w+\])?"?', setup):
        problems.append(f"the repo must be mounted from '.' and pip install -e'd on every node: {repo}, {setup!r}")

    run_options = " ".join(cfg.get("docker", {}).get("run_options", []))
    if "RAY_AUTH_MODE=token" not in run_options or "/home/ray/.ray/auth_token" not in cfg.get("file_mounts", {}):
        problems.append("token auth: docker run_options need --env RAY_AUTH_MODE=token and the token mounted")
    return problems


def test_schema_from_the_ray_wheel() -> None:
    jsonschema.validate(load(), json.loads(SCHEMA.read_text()))


def test_rays_own_validation() -> None:
    prepared = prepare_config(copy.deepcopy(load()))
    validate_config(prepared)
    # prepare_config merged aws/defaults.yaml: the start commands `ray up` will run are there, ours are not.
    assert prepared["head_start_ray_commands"] and prepared["worker_start_ray_commands"]
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_what_the_schema_does_not_check() -> None:
    assert check_cluster_config(load()) == []


def test_ray_version_equals_the_projects() -> None:
    (ray_dep,) = re.findall(r'"(ray\[[\w,]+\][<>=!~]=[\d.]+)"', (ROOT / "pyproject.toml").read_text())
    image = IMAGE.match(load()["docker"]["image"])
    assert image is not None and "ray-ml" not in image.group(0)
    assert ray_dep.endswith(f"=={image['ray']}") or ray_dep.endswith(f">={image['ray']}")
    assert image["ray"] == ray.__version__


def _set(cfg: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        cfg = cfg[key]
    if value is _DELETE:
        del cfg[last]
    else:
        cfg[last] = value


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("available_node_types.gpu_worker.resources", {"CPU": 4, "GPU": 0.5}),  # float GPU
        ("available_node_types.gpu_worker.min_worker", 1),  # typo in a node type
        ("setup_comands", ["true"]),  # typo at the top level
        ("available_node_types.head.resources", _DELETE),  # resources is required
        ("docker.image_name", "x"),  # docker is strict too
    ],
)
def test_schema_rejects(path: str, value: Any) -> None:
    cfg = load()
    _set(cfg, path, value)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, json.loads(SCHEMA.read_text()))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("head_node_type", "cpu_head"),
        ("available_node_types.gpu_worker.min_workers", 5),  # more than the global max_workers
    ],
)
def test_ray_validation_rejects(path: str, value: Any) -> None:
    cfg = load()
    _set(cfg, path, value)
    with pytest.raises(ValueError):
        validate_config(prepare_config(cfg))


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        ("provider.region", _DELETE, "region"),
        ("available_node_types.gpu_worker.node_config.InstanceType", _DELETE, "InstanceType"),
        ("available_node_types.gpu_worker.node_config.InstanceTyp", "g5.xlarge", "InstanceType"),
        ("available_node_types.gpu_worker.resources", {}, "integer CPU and GPU"),
        ("available_node_types.gpu_worker.resources", {"CPU": 4, "GPU": 4}, "do not match"),
        ("available_node_types.gpu_worker.node_config.ImageId", "ami-XXXXXXXX", "ImageId"),
        ("available_node_types.gpu_worker.node_config.IamInstanceProfile", _DELETE, "IamInstanceProfile"),
        ("available_node_types.head.resources", {"CPU": 8}, "CPU': 0"),
        ("max_workers", 8, "sum of worker max_workers"),
        ("docker.image", "rayproject/ray-ml:latest-gpu", "pinned rayproject/ray"),
        ("docker.image", "rayproject/ray:2.49.0-py311-gpu", "installed Ray"),
        ("setup_commands", ["pip install torch torchvision && pip install -e /home/ray/anchornet"], "pin"),
        ("docker.run_options", [], "token auth"),
    ],
)
def test_own_checks_reject(path: str, value: Any, problem: str) -> None:
    cfg = load()
    if path.endswith("InstanceTyp"):  # a typo'd key: the schema lets node_config through untouched
        del cfg["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"]
    _set(cfg, path, value)
    problems = check_cluster_config(cfg)
    assert any(problem in p for p in problems), problems


def test_high_throughput_lines_are_the_serve_mode() -> None:
    """The commented opt-in lines set exactly what ``jobs/serve.py --high-throughput`` sets (docs/serving.md)."""
    from pipelines.serve import high_throughput_env

    commented = re.findall(r"^\s*# - --env (RAY_SERVE_\w+)=(\S+)$", CLUSTER_YAML.read_text(), flags=re.MULTILINE)
    assert dict(commented) == high_throughput_env()


@pytest.mark.skipif(shutil.which("rsync") is None, reason="needs the rsync command")
def test_file_mounts_carry_the_shipped_checkpoints_and_leave_out_runs(tmp_path: Path) -> None:
    """What `ray up` copies to every node, with the rsync arguments Ray builds from this file (locally, no ssh):
    serve_config.yaml deploys checkpoints/*.pt from there; outputs and caches stay behind."""
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    source = tmp_path / "repo"
    for rel in (
        "checkpoints/anchornet.pt",
        "checkpoints/thresholds.json",
        "anchornet/model.py",
        "runs/a/anchornet.pt",
        "outputs/x.parquet",
        "anchornet/__pycache__/model.cpython-311.pyc",
        ".git/HEAD",
        "anchornet.egg-info/PKG-INFO",
    ):
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        (source / rel).write_bytes(b"x")
    shutil.copy(ROOT / ".gitignore", source / ".gitignore")
    cfg = load()
    options = {"rsync_exclude": cfg.get("rsync_exclude"), "rsync_filter": cfg.get("rsync_filter")}
    args = SSHCommandRunner._create_rsync_filter_args(None, options)  # type: ignore[arg-type]
    target = tmp_path / "node"
    subprocess.run(["rsync", "-a", *args, f"{source}/", f"{target}/"], check=True)
    copied = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    assert {"checkpoints/anchornet.pt", "checkpoints/thresholds.json", "anchornet/model.py"} <= copied
    assert not any(p.startswith(("runs/", "outputs/", ".git/", "anchornet.egg-info/")) for p in copied), copied
    assert not any("__pycache__" in p for p in copied), copied
