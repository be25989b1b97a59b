"""One self-describing checkpoint format for AnchorNet and the downstream classifiers.

A checkpoint is a ``torch.save``d dict of plain values and tensors, loadable with ``weights_only=True``:

    {"format": "anchornet-checkpoint", "version": 1, "kind": "anchornet" | "classifier",
     "arch": {...constructor arguments...}, "state_dict": {...}, "card": {...}}

The card holds the class names, the preprocessing, the working input size, the MACs at that size, the
training provenance and anything else given to ``save_checkpoint`` (metrics, thresholds).
"""

from __future__ import annotations

import datetime
import io
import os
import platform
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from anchornet import storage
from anchornet.classifiers import Classifier, build_classifier
from anchornet.macs import count_macs
from anchornet.model import AnchorNet
from anchornet.preprocessing import Preprocessing

__all__ = ["FORMAT", "VERSION", "CheckpointError", "ModelCard", "load_checkpoint", "save_checkpoint"]

FORMAT = "anchornet-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A file that cannot be read, is not a checkpoint of this package, or does not match its own card."""


@dataclass(frozen=True)
class ModelCard:
    """What a checkpoint says about its model."""

    kind: str
    arch: dict[str, Any]
    input_size: int
    macs: int
    class_names: list[str] | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "arch": self.arch,
            "input_size": self.input_size,
            "macs": self.macs,
            "class_names": self.class_names,
            "preprocessing": self.preprocessing,
            "provenance": self.provenance,
            **self.extra,
        }


def _kind_and_arch(model: nn.Module) -> tuple[str, dict[str, Any]]:
    model = getattr(model, "module", model)  # DistributedDataParallel
    if isinstance(model, AnchorNet):
        return "anchornet", model.config
    if isinstance(model, Classifier):
        return "classifier", model.config
    raise TypeError(f"can only checkpoint AnchorNet or Classifier models, got {type(model).__name__}")


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    input_size: int | None = None,
    class_names: list[str] | None = None,
    preprocessing: Preprocessing | dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    **extra: Any,
) -> ModelCard:
    """Write ``model`` and its card to a local path or ``s3://`` URI; returns the card.

    ``input_size`` is the side of the square input the model works at: 224 by default for AnchorNet, required
    for a classifier (K for the glance and patch networks); the MACs at that size are counted here. ``extra``
    keys (metrics, thresholds, ...) must be plain values (str, int, float, bool, None, lists and dicts of them).

    Raises ``ValueError`` for a model whose weights do not fit the architecture its config rebuilds, such as one
    from ``fold_batchnorm``, ``fold_normalize`` or ``prepare_for_inference``: save the model before folding.
    """
    kind, arch = _kind_and_arch(model)
    net = getattr(model, "module", model)
    if input_size is None:
        if kind != "anchornet":
            raise ValueError("input_size is required for a classifier: the side of the square input it works at")
        input_size = 224
    state_dict = net.state_dict()
    _check_rebuildable(kind, arch, state_dict)
    num_classes = arch["num_classes"]
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {num_classes} classes")
    if isinstance(preprocessing, Preprocessing):
        preprocessing = preprocessing.to_dict()
    info = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        **(provenance or {}),
    }
    card = ModelCard(
        kind=kind,
        arch=arch,
        input_size=int(input_size),
        macs=int(count_macs(net, (int(arch.get("in_channels", 3)), int(input_size), int(input_size)))),
        class_names=list(class_names) if class_names is not None else None,
        preprocessing=dict(preprocessing or {}),
        provenance=info,
        extra=dict(extra),
    )
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "arch": _plain(arch, "arch"),
        "card": _plain(card.to_dict(), "card"),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    storage.write_bytes(path, buffer.getvalue())
    return card


def load_checkpoint(path: str | os.PathLike[str], data: bytes | None = None) -> tuple[nn.Module, ModelCard]:
    """Read a checkpoint written by ``save_checkpoint``: the model in eval mode on CPU, and its card.

    ``data``: the file's bytes when the caller has read them already (say, to hash them: the model is then the one
    hashed, whatever happens to the file since); ``path`` only names it in errors.

    Raises ``FileNotFoundError`` when the file is missing and ``CheckpointError`` (one line, naming ``path``) for
    one that cannot be read (a directory, no permission on S3), is not one of ours (or a newer format version),
    is malformed (a key missing, an arch that does not build) or does not match its own card (kind, arch, the
    number of class names against the model's outputs).
    """
    if data is None:
        try:
            data = storage.read_bytes(path)
        except FileNotFoundError:
            raise
        except OSError as err:
            first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise CheckpointError(f"cannot read {path}: {first}") from err
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights_only errors all mean "not ours"
        raise CheckpointError(f"{path} is not an AnchorNet checkpoint ({type(err).__name__})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an AnchorNet checkpoint (no '{FORMAT}' header)")
    version = payload.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path} is a malformed checkpoint: version {version!r} is not an integer")
    if version > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {version}; this package reads <= {VERSION}")
    for key, kind_of in (("kind", str), ("arch", dict), ("state_dict", dict), ("card", dict)):
        if key not in payload:
            raise CheckpointError(f"{path} is a malformed checkpoint: it has no {key!r}")
        if not isinstance(payload[key], kind_of):
            raise CheckpointError(f"{path} is a malformed checkpoint: {key!r} is a {type(payload[key]).__name__}")
    kind, arch = payload["kind"], payload["arch"]
    if kind not in ("anchornet", "classifier"):
        raise CheckpointError(f"{path} holds an unknown model kind {kind!r}")
    try:
        model = _build(kind, arch)
    except Exception as err:  # a missing, unknown or ill-typed constructor argument: whatever it raises
        raise CheckpointError(f"{path}: the {kind} arch on its card does not build ({_one_line(err)})") from err
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: weights do not match the architecture on its card: {_one_line(err)}") from err
    return model.eval(), _read_card(path, payload["card"], kind, arch, model.config.get("num_classes"))


_CARD_FIELDS = ("kind", "arch", "input_size", "macs", "class_names", "preprocessing", "provenance")


def _read_card(
    path: str | os.PathLike[str], card: dict[str, Any], kind: str, arch: dict[str, Any], num_classes: int | None
) -> ModelCard:
    """The card of a checkpoint whose ``kind`` and ``arch`` built a model of ``num_classes`` outputs;
    ``CheckpointError`` unless it fits."""
    missing = [key for key in ("kind", "arch", "input_size", "macs") if key not in card]
    if missing:
        raise CheckpointError(f"{path} is a malformed checkpoint: its card has no {missing[0]!r}")
    if card["kind"] != kind:
        raise CheckpointError(f"{path}: the card says kind {card['kind']!r} but the checkpoint holds a {kind}")
    if card["arch"] != arch:
        raise CheckpointError(f"{path}: the arch on the card differs from the one the weights were built with")
    for key in ("input_size", "macs"):
        value = card[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < (key == "input_size"):
            raise CheckpointError(f"{path} is a malformed checkpoint: card {key} {value!r} is not a count")
    names = card.get("class_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise CheckpointError(f"{path} is a malformed checkpoint: card class_names is not a list of strings")
        if num_classes is not None and len(names) != num_classes:
            raise CheckpointError(f"{path}: the card names {len(names)} classes for a model with {num_classes} outputs")
    for key in ("preprocessing", "provenance"):
        if not isinstance(card.get(key, {}), dict):
            raise CheckpointError(f"{path} is a malformed checkpoint: card {key} is a {type(card[key]).__name__}")
    known = {key: card[key] for key in _CARD_FIELDS if key in card}
    return ModelCard(**known, extra={key: value for key, value in card.items() if key not in _CARD_FIELDS})


def _build(kind: str, arch: dict[str, Any]) -> nn.Module:
    """The empty architecture a checkpoint of ``kind`` with ``arch`` on its card loads into."""
    if kind == "anchornet":
        return AnchorNet(**arch)
    if set(arch) != {"name", "num_classes"}:
        raise TypeError(f"a classifier arch holds name and num_classes, got {sorted(arch)}")
    return build_classifier(arch["name"], arch["num_classes"])


def _one_line(err: BaseException) -> str:
    """``Type: message`` with the message's lines joined (load_state_dict lists one mismatch per line)."""
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def _check_rebuildable(kind: str, arch: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` unless ``load_checkpoint`` can load ``state_dict`` into ``_build(kind, arch)``."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        expected = {k: tuple(v.shape) for k, v in _build(kind, arch).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    if got == expected:
        return
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    details = ", ".join(
        f"{what} {keys[:3]}{' ...' if len(keys) > 3 else ''}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("reshaped", reshaped))
        if keys
    )
    raise ValueError(
        f"the model's weights do not fit the {kind} its config rebuilds ({details}); "
        "save it before fold_batchnorm, fold_normalize or prepare_for_inference"
    )


def _plain(value: Any, where: str) -> Any:
    """``value`` as built-in types only (``weights_only`` loading refuses subclasses such as TorchVersion)."""
    if value is None or isinstance(value, bool):
        return value
    for kind in (str, int, float):  # inf and nan floats included (thresholds)
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError(f"{where} has a non-string key")
        return {str(key): _plain(item, f"{where}.{key}") for key, item in value.items()}
    raise TypeError(
        f"{where} is a {type(value).__name__}; card values must be plain (str, int, float, bool, list, dict)"
    )
