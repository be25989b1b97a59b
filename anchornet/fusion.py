"""Inference-time graph simplification: fold each batch norm into the convolution before it.

In eval mode ``BN(conv(x)) = conv'(x)`` with ``W' = W * g / sqrt(v + eps)`` and
``b' = (b - m) * g / sqrt(v + eps) + beta`` (per output channel), so the folded model computes the same function
with one memory pass less per layer.
"""

from __future__ import annotations

import copy
import itertools
from typing import TypeVar

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["fold_batchnorm"]

M = TypeVar("M", bound=nn.Module)


def fold_batchnorm(model: M) -> M:
    """An eval-mode copy of ``model`` where every ``Conv2d`` directly followed by a ``BatchNorm2d`` (consecutive
    children of a ``nn.Sequential``) is replaced by one fused ``Conv2d`` and the batch norm by ``nn.Identity``.

    The input model is left untouched; the copy is for inference only (its batch norms are gone).
    """
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in itertools.pairwise(names):
            conv, bn = module._modules[first], module._modules[second]
            if type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats:
                module._modules[first] = fuse_conv_bn_eval(conv, bn)
                module._modules[second] = nn.Identity()
    return folded
