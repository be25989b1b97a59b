"""Building blocks of AnchorNet: a padding-free MBConv (EfficientNet's inverted residual) and its parts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ConvBnAct", "MBConv", "Normalize", "ShortcutCrop", "SqueezeExcite"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ShortcutCrop = Literal["center", "top_left"]
LayerFactory = Callable[..., nn.Module]


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` on ``[0, 1]`` RGB input, so a model carries its own normalisation."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean and std must have the same length and std > 0, got {mean} and {std}")
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():  # uint8 pixels: mean and std would cast to 0, and the output to NaN
            raise ValueError(
                f"expected float images in [0, 1], got {x.dtype}: convert them with anchornet.preprocessing.to_float"
            )
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class ConvBnAct(nn.Sequential):
    """Convolution with ``padding=0``, batch norm and an optional activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        act_layer: LayerFactory | None = nn.SiLU,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=0, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if act_layer is not None:
            layers.append(act_layer(inplace=True))
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """Squeeze-excitation (Hu et al.): a channel gate computed from the globally pooled map.

    It pools over the whole map, so every output location depends on every input pixel: a network that
    uses it has no exact receptive-field mapping any more.
    """

    def __init__(
        self,
        channels: int,
        squeeze_channels: int,
        act_layer: LayerFactory = nn.SiLU,
        gate_layer: LayerFactory = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze_channels, 1)
        self.act = act_layer(inplace=True)
        self.expand = nn.Conv2d(squeeze_channels, channels, 1)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)
        scale = self.expand(self.act(self.reduce(scale)))
        return x * self.gate(scale)


class MBConv(nn.Module):
    """Padding-free inverted residual: 1x1 expand, k x k depthwise, optional SE, 1x1 project.

    The depthwise convolution has no padding, so the output is ``kernel_size - 1`` pixels smaller than the
    input; where a residual applies (stride 1, same width) the shortcut is cropped to match. ``"center"``
    keeps each output aligned with the centre of its window; ``"top_left"`` is what the authors' released
    code does. Both keep each output inside the same input window.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        expand_ratio: float = 1.0,
        se_layer: LayerFactory | None = None,
        se_ratio: float = 0.25,
        act_layer: LayerFactory = nn.SiLU,
        shortcut_crop: ShortcutCrop = "center",
    ) -> None:
        super().__init__()
        if shortcut_crop not in ("center", "top_left"):
            raise ValueError(f"shortcut_crop must be 'center' or 'top_left', got {shortcut_crop!r}")
        mid = int(expand_ratio * in_channels)
        self.has_skip = stride == 1 and in_channels == out_channels
        self.trim = kernel_size - 1
        self.shortcut_crop = shortcut_crop
        self.expand = ConvBnAct(in_channels, mid, 1, act_layer=act_layer) if mid != in_channels else nn.Identity()
        self.depthwise = ConvBnAct(mid, mid, kernel_size, stride, groups=mid, act_layer=act_layer)
        self.se = se_layer(mid, max(1, int(in_channels * se_ratio))) if se_layer is not None else nn.Identity()
        self.project = ConvBnAct(mid, out_channels, 1, act_layer=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.depthwise(self.expand(x))))
        if not self.has_skip:
            return out
        return out + self._crop(x)

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut_crop == "center":
            lo, hi = self.trim // 2, self.trim - self.trim // 2
            return x[..., lo : x.shape[-2] - hi, lo : x.shape[-1] - hi]
        return x[..., : x.shape[-2] - self.trim, : x.shape[-1] - self.trim]
