"""Multiply-accumulate counts, measured with ``torch.utils.flop_counter`` (never from a table)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs"]


def count_macs(model: nn.Module, input_size: int | tuple[int, int] | tuple[int, int, int]) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on one image.

    Counts the matrix-multiply and convolution operators that ``FlopCounterMode`` knows (conv, linear,
    matmul), at 2 FLOPs per MAC, so the result is in MACs as timm and torchvision report it. The model runs
    once in eval mode on a zero image of ``input_size`` (``S``, ``(H, W)`` or ``(C, H, W)``; 3 channels by
    default) on the device and dtype of its parameters; its training flag is restored afterwards.
    """
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    shape = tuple(input_size) if len(input_size) == 3 else (3, *input_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros((1, *shape), device=device, dtype=dtype))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
