"""What a job should know of the Ray cluster it runs on: local paths that every node must see."""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from typing import Any

from anchornet import storage

__all__ = ["alive_nodes", "local_paths_warning", "unreachable_address"]


def alive_nodes(nodes: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The alive ones of ``nodes`` (as ``ray.nodes()`` lists them)."""
    return [node for node in nodes if node.get("Alive", node.get("alive", False))]


def local_paths_warning(
    nodes: Sequence[Mapping[str, Any]], paths: Mapping[str, str | None], consequence: str
) -> str | None:
    """A one-line warning when the cluster has more than one alive node and some of ``paths`` (flag name -> path or
    URI; ``None`` skipped) are local: the job's workers open them on their own nodes, so they must be shared storage
    mounted at the same path everywhere. ``consequence`` ends the line: what goes wrong otherwise. ``None`` when
    there is nothing to say."""
    alive = len(alive_nodes(nodes))
    local = [f"--{flag} {path}" for flag, path in paths.items() if path is not None and not storage.is_remote(path)]
    if alive <= 1 or not local:
        return None
    verb = "is a local path" if len(local) == 1 else "are local paths"
    return (
        f"the Ray cluster has {alive} nodes and {' and '.join(local)} {verb}: "
        f"it must be shared storage (NFS, EFS, FSx) mounted at the same path on every node, else {consequence}"
    )


def unreachable_address(address: str | None, timeout: float = 5.0) -> str | None:
    """One line saying why ``address`` cannot be a Ray cluster, when it names one (``host:port``, a GCS, or
    ``ray://host:port``, a Ray client server) whose port takes no TCP connection within ``timeout`` seconds:
    ``ray.init`` would otherwise retry in silence for minutes. ``None`` when the port answers, and for what only Ray
    can resolve (``None``, ``auto``, ``local``, other schemes)."""
    if not address or address in ("auto", "local"):
        return None
    target = address.removeprefix("ray://")
    if "://" in target or ":" not in target:
        return None
    host, _, port = target.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:6379
    if not port.isdigit():
        return f"Ray address {address!r} has no port number: expected host:port"
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        return (
            f"cannot reach the Ray cluster at {address} ({err.strerror or err}): is it running, and is the port open?"
        )
    return None
