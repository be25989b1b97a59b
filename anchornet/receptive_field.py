"""Receptive field of a padding-free CNN (paper Eq. 1) and the exact cell-to-window map.

For a chain of layers with kernel k_l and stride s_l and no padding,

    K_l = K_{l-1} + (k_l - 1) * S_{l-1},    S_l = S_{l-1} * s_l,    K_0 = 1, S_0 = 1,

and on an H x W input the final map has floor((H - K) / S) + 1 by floor((W - K) / S) + 1 cells.
Cell (r, c) sees exactly the input rows [S r, S r + K) and columns [S c, S c + K).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from anchornet.layers import Normalize

__all__ = ["ReceptiveField", "receptive_field_of"]


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise ValueError(f"expected an int or a pair, got {value!r}")
    return int(value[0]), int(value[1])


@dataclass(frozen=True)
class ReceptiveField:
    """Accumulated receptive field ``size`` (K) and ``stride`` (S) of a padding-free network, in pixels."""

    size: int
    stride: int

    @classmethod
    def from_layers(cls, layers: Iterable[tuple[int, int]]) -> ReceptiveField:
        """Eq. 1 over ``(kernel, stride)`` pairs in the order the input flows through them."""
        size, stride = 1, 1
        for kernel, layer_stride in layers:
            if kernel < 1 or layer_stride < 1:
                raise ValueError(f"kernel and stride must be positive, got kernel={kernel}, stride={layer_stride}")
            size = size + (kernel - 1) * stride
            stride = stride * layer_stride
        return cls(size=size, stride=stride)

    def check_input(self, height: int, width: int) -> None:
        """Raise ``ValueError`` when an input of ``height`` x ``width`` is smaller than one window."""
        if height < self.size or width < self.size:
            raise ValueError(
                f"input of {height} x {width} pixels is smaller than the receptive field: "
                f"AnchorNet needs at least {self.size} x {self.size}"
            )

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Number of output cells ``(rows, cols)`` on a ``height`` x ``width`` input."""
        self.check_input(height, width)
        return (height - self.size) // self.stride + 1, (width - self.size) // self.stride + 1

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Half-open input window ``(x0, y0, x1, y1)`` that cell ``(row, col)`` sees."""
        if row < 0 or col < 0:
            raise ValueError(f"cell indices must be non-negative, got ({row}, {col})")
        x0, y0 = col * self.stride, row * self.stride
        return x0, y0, x0 + self.size, y0 + self.size

    def boxes(self, height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
        """Windows of every cell of a ``height`` x ``width`` input, float ``(rows * cols, 4)``, row-major."""
        return self.cell_boxes(*self.grid(height, width), device=device)

    def cell_boxes(self, rows: int, cols: int, device: torch.device | None = None) -> torch.Tensor:
        """Windows of a ``rows`` x ``cols`` grid of cells, float ``(rows * cols, 4)``; cell ``r * cols + c``."""
        ys = torch.arange(rows, device=device) * self.stride
        xs = torch.arange(cols, device=device) * self.stride
        y0, x0 = torch.meshgrid(ys, xs, indexing="ij")
        x0, y0 = x0.reshape(-1), y0.reshape(-1)
        return torch.stack([x0, y0, x0 + self.size, y0 + self.size], dim=1).float()


_SPATIAL_LAYERS = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
#: Layers that map each location of a map to the same location: no effect on the receptive field.
_POINTWISE_LAYERS = (
    nn.Identity,
    Normalize,
    nn.BatchNorm2d,
    nn.SyncBatchNorm,
    nn.Dropout,
    nn.Dropout2d,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
)


def receptive_field_of(module: nn.Module, skip: tuple[type[nn.Module], ...] = ()) -> ReceptiveField:
    """Receptive field of a sequential padding-free network, read from its layers.

    Walks the module tree depth-first in registration order, which for the networks in this package is the
    order the input flows through them, and applies Eq. 1 to every convolution and pooling layer; pointwise
    layers (activations, batch norm, dropout, ``nn.Identity``, ``Normalize``) change nothing. Sub-trees rooted
    at a type in ``skip`` (for instance squeeze-excitation, which acts on a pooled 1 x 1 map) are ignored. Pass
    the layers up to the final feature map only (AnchorNet's classifier acts on the pooled map).

    Raises ``ValueError`` on padding, dilation or ``ceil_mode``, which break the exact mapping, and on any other
    layer (adaptive pooling, linear, ...), whose effect on the grid it cannot know.
    """
    return ReceptiveField.from_layers(_spatial_layers(module, skip, prefix=""))


def _spatial_layers(module: nn.Module, skip: tuple[type[nn.Module], ...], prefix: str) -> list[tuple[int, int]]:
    name = prefix or type(module).__name__
    if isinstance(module, _SPATIAL_LAYERS):
        return [_kernel_and_stride(module, name)]
    if isinstance(module, _POINTWISE_LAYERS):
        return []
    children = list(module.named_children())
    if not children:
        raise ValueError(
            f"layer {name!r} ({type(module).__name__}) is not a convolution, pooling or pointwise layer: "
            "its effect on the receptive field is unknown"
        )
    layers: list[tuple[int, int]] = []
    for child_name, child in children:
        if skip and isinstance(child, skip):
            continue
        layers += _spatial_layers(child, skip, f"{prefix}.{child_name}" if prefix else child_name)
    return layers


def _kernel_and_stride(layer: nn.Module, name: str) -> tuple[int, int]:
    kernel, stride = _pair(layer.kernel_size), _pair(layer.stride)
    padding = layer.padding if isinstance(layer.padding, str) else _pair(layer.padding)
    if padding not in ((0, 0), "valid"):
        raise ValueError(f"layer {name!r} has padding {layer.padding}: the receptive-field mapping is not exact")
    if _pair(getattr(layer, "dilation", 1)) != (1, 1):
        raise ValueError(f"layer {name!r} has dilation {layer.dilation}: not supported")
    if getattr(layer, "ceil_mode", False):
        raise ValueError(f"layer {name!r} has ceil_mode=True: its output grid is not floor((H - K) / S) + 1")
    if kernel[0] != kernel[1] or stride[0] != stride[1]:
        raise ValueError(f"layer {name!r} is not square (kernel {kernel}, stride {stride})")
    return kernel[0], stride[0]
