"""Downstream classifiers (f_glance, f_patch) by name, with their weights and their normalisation.

``build_classifier("resnet50", num_classes=10, weights="imagenet")`` gives a ``Classifier``: the network
behind a ``Normalize`` layer, so it takes ``[0, 1]`` RGB tensors like every model in this package. Any
torchvision classification model can be added with ``register_classifier``.
"""

from __future__ import annotations

import io
import urllib.error
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from anchornet import storage
from anchornet.layers import IMAGENET_MEAN, IMAGENET_STD, Normalize

__all__ = [
    "Classifier",
    "ClassifierEntry",
    "WeightsUnavailableError",
    "build_classifier",
    "class_labels",
    "classifier_names",
    "imagenet_indices",
    "is_classifier_name",
    "register_classifier",
]


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be fetched (offline, say); the message says what to do instead.

    ``reason`` is the cause alone, for callers that word their own advice (a job names its flag, not ``weights=``).
    """

    def __init__(self, reason: str, hint: str | None = "pass weights=PATH (a local file or s3:// URI) instead") -> None:
        super().__init__(f"{reason}; {hint}" if hint else reason)
        self.reason = reason


@dataclass(frozen=True)
class ClassifierEntry:
    """How to build one architecture and where its ImageNet weights come from.

    ``builder(num_classes)`` returns the bare network; ``imagenet_weights()`` returns a state dict for
    ``builder(1000)``.
    """

    builder: Callable[[int], nn.Module]
    imagenet_weights: Callable[[], dict[str, torch.Tensor]] | None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


_REGISTRY: dict[str, ClassifierEntry] = {}


def register_classifier(name: str, entry: ClassifierEntry) -> None:
    """Make ``name`` available to ``build_classifier`` (and to checkpoints that name it)."""
    _REGISTRY[name] = entry


def classifier_names() -> list[str]:
    """The registered names; ``build_classifier`` also takes any torchvision classification model."""
    return sorted(_REGISTRY)


def is_classifier_name(name: str) -> bool:
    """Whether ``build_classifier`` knows ``name`` (registered, or a torchvision classification model); builds none."""
    return name in _REGISTRY or name in torchvision.models.list_models(module=torchvision.models)


#: torchvision models that train with auxiliary heads (a namedtuple of outputs) unless told not to; their
#: ImageNet state dicts hold those heads under these prefixes
_AUX_HEADS = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


def _torchvision_entry(name: str) -> ClassifierEntry:
    aux = _AUX_HEADS.get(name, ())

    def build(num_classes: int) -> nn.Module:
        options = {"aux_logits": False} if aux else {}  # plain logits in training too, as every other model
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **options)

    def imagenet_weights() -> dict[str, torch.Tensor]:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        state = download_state_dict(weights.url, f"torchvision weights {weights}")
        return {key: value for key, value in state.items() if not key.startswith(aux)} if aux else state

    return ClassifierEntry(build, imagenet_weights)


def _lite0_entry() -> ClassifierEntry:
    from anchornet import pretrained

    def build(num_classes: int) -> nn.Module:
        import timm

        return timm.create_model(pretrained.LITE0_TIMM_NAME, pretrained=False, num_classes=num_classes)

    return ClassifierEntry(
        build, pretrained.load_efficientnet_lite0_imagenet, pretrained.LITE0_MEAN, pretrained.LITE0_STD
    )


for _name in (
    "resnet18",
    "resnet34",
    "resnet50",
    "densenet121",
    "densenet201",
    "mobilenet_v3_large",
    "efficientnet_b0",
):
    register_classifier(_name, _torchvision_entry(_name))
register_classifier("efficientnet_lite0", _lite0_entry())


def download_state_dict(url: str, what: str) -> dict[str, torch.Tensor]:
    """Fetch a state dict through torch.hub's cache; offline, a ``WeightsUnavailableError`` in one line.

    A file name that carries a SHA-256 prefix (``resnet18-f37072fd.pth``, as torchvision's do) is checked
    against it, so a truncated download is never cached. A cached file that cannot be loaded (written by a
    download that was not checked) is deleted and fetched once more.
    """
    cached = Path(torch.hub.get_dir(), "checkpoints", Path(urllib.parse.urlparse(url).path).name)
    if cached.is_file():
        try:
            return _load_hub_file(url)
        except Exception as err:  # unpickling, zip and weights_only errors: a corrupt file, not a missing one
            try:
                cached.unlink()
            except OSError:
                raise WeightsUnavailableError(
                    f"cached {what} {cached} cannot be loaded ({_first_line(err)}); delete that file"
                ) from err
    try:
        return _load_hub_file(url)
    except (urllib.error.URLError, OSError, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        raise WeightsUnavailableError(f"could not download {what} from {url} ({_first_line(reason)})") from err
    except Exception as err:  # a hash mismatch (nothing cached), or a fresh file that does not load
        if cached.is_file():
            cached.unlink(missing_ok=True)
            raise WeightsUnavailableError(
                f"downloaded {what} from {url} but cannot load it ({_first_line(err)}); the download was deleted"
            ) from err
        raise WeightsUnavailableError(f"could not download {what} from {url} ({_first_line(err)})") from err


def _load_hub_file(url: str) -> dict[str, torch.Tensor]:
    """torch.hub's cached copy of ``url`` (downloaded first when absent), its SHA-256 prefix checked on download."""
    return torch.hub.load_state_dict_from_url(
        url, map_location="cpu", progress=True, check_hash=True, weights_only=True
    )


class Classifier(nn.Module):
    """A named downstream network behind its own input normalisation; takes ``[0, 1]`` RGB images."""

    def __init__(self, arch: str, num_classes: int, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.arch = arch
        self.num_classes = num_classes
        self.normalize = Normalize(tuple(mean), tuple(std))
        self.net = net

    @property
    def config(self) -> dict[str, Any]:
        """``build_classifier(**model.config)`` rebuilds the architecture (without weights)."""
        return {"name": self.arch, "num_classes": self.num_classes}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def build_classifier(
    name: str,
    num_classes: int,
    weights: str | None = None,
    *,
    head_from: Sequence[int] | None = None,
) -> Classifier:
    """A downstream classifier with ``num_classes`` outputs.

    Args:
        name: a registered architecture (``classifier_names()``).
        weights: ``None`` (random init); ``"imagenet"`` (torchvision's default weights, downloaded when online,
            or the packaged offline weights for ``efficientnet_lite0``); or a local path / ``s3://`` URI of a
            checkpoint of this package or a plain state dict of the same architecture; ``ValueError`` (one line,
            naming the file) when it cannot be read or holds no state dict.
        head_from: with ImageNet weights, the ImageNet class behind each output (one index per class): the
            classifier rows are taken from these classes instead of at random, so a pretrained network is usable
            on a subset of ImageNet classes before any fine-tuning. With 1000 classes it reorders the head
            (the identity keeps it as it is), for ImageNet-1k classes listed in another order.
    """
    if not is_classifier_name(name):
        raise ValueError(
            f"unknown classifier {name!r}; known: {', '.join(classifier_names())} or any torchvision classification "
            "model (torchvision.models.list_models(module=torchvision.models))"
        )
    if name not in _REGISTRY:
        register_classifier(name, _torchvision_entry(name))  # any torchvision classification model works
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    entry = _REGISTRY[name]
    if weights is None:
        return Classifier(name, num_classes, entry.builder(num_classes), entry.mean, entry.std)
    if weights == "imagenet":
        if entry.imagenet_weights is None:
            raise WeightsUnavailableError(f"no ImageNet weights are known for {name!r}", hint=None)
        net = entry.builder(1000)
        net.load_state_dict(entry.imagenet_weights())
        if num_classes != 1000 or head_from is not None:
            _replace_head(net, num_classes, head_from)
        return Classifier(name, num_classes, net, entry.mean, entry.std)
    model = Classifier(name, num_classes, entry.builder(num_classes), entry.mean, entry.std)
    state = _load_state_dict(weights)
    if not any(k.startswith("net.") for k in state):
        state = {f"net.{k}": v for k, v in state.items()}
    model.load_state_dict(state)
    return model


def _load_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """The state dict in ``uri`` (or under its ``"state_dict"`` key); ``FileNotFoundError`` when it is missing,
    ``ValueError`` in one line for a file that cannot be read (a directory, no permission) or is not a torch file."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise ValueError(f"cannot read {uri}: {_first_line(err)}") from err
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights_only errors all mean "not a torch state dict"
        raise ValueError(f"{uri} is not a PyTorch state dict or checkpoint ({type(err).__name__})") from err
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{uri} holds no state dict")
    return obj


def _first_line(err: object) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def _replace_head(net: nn.Module, num_classes: int, head_from: Sequence[int] | None) -> None:
    """Swap the last ``nn.Linear`` of ``net`` for one with ``num_classes`` outputs, its rows ``head_from``'s."""
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:  # squeezenet's head is a convolution
        raise ValueError(f"{type(net).__name__} has no nn.Linear head to give {num_classes} classes")
    name, old = linears[-1]
    rows = list(head_from) if head_from is not None else None
    if rows is not None and (len(rows) != num_classes or not all(0 <= r < old.out_features for r in rows)):
        raise ValueError(f"head_from needs {num_classes} class indices in [0, {old.out_features})")
    if rows == list(range(old.out_features)):
        return  # the head as it is
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    if rows is not None:
        with torch.no_grad():
            new.weight.copy_(old.weight[rows])
            if old.bias is not None:
                new.bias.copy_(old.bias[rows])
    parent_name, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent_name) if parent_name else net, attr, new)


def class_labels(class_names: Sequence[str]) -> list[str]:
    """A readable label per class: ImageNet's description for a WordNet id (``n03417042`` -> ``garbage truck,
    dustcart``), the name itself otherwise. Offline: the descriptions ship with timm."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    wnids = set(info.label_names())
    return [info.label_name_to_description(name) if name in wnids else name for name in class_names]


def imagenet_indices(class_names: Sequence[str]) -> list[int]:
    """ImageNet-1k output index of each class named by its WordNet id (``n01440764`` -> 0), for ``head_from``.

    Raises ``ValueError`` naming the first class that is not an ImageNet-1k WordNet id.
    """
    from timm.data import ImageNetInfo

    wnids = {wnid: i for i, wnid in enumerate(ImageNetInfo().label_names())}
    missing = [name for name in class_names if name not in wnids]
    if missing:
        raise ValueError(f"class {missing[0]!r} is not an ImageNet-1k WordNet id; give the class indices explicitly")
    return [wnids[name] for name in class_names]
