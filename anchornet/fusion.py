"""Inference-time graph simplification: fold the linear per-channel maps into the convolutions next to them.

- Batch norm after a convolution: in eval mode ``BN(conv(x)) = conv'(x)`` with ``W' = W * g / sqrt(v + eps)`` and
  ``b' = (b - m) * g / sqrt(v + eps) + beta`` (per output channel).
- AnchorNet's input normalisation before its stem: ``conv(W, (x - m) / s) = conv(W', x) + b'`` with
  ``W' = W / s`` and ``b' = b - sum_(c,i,j) W[:, c, i, j] * m_c / s_c`` (per input channel). Exact only because the
  stem has no padding: a zero border would be ``-m / s`` after normalisation, not 0.

The folded model computes the same function with one memory pass less per folded layer.
``prepare_for_inference`` applies both to AnchorNet and puts the result where batch jobs and serving run it;
``prepare_classifier_for_inference`` does the same for a downstream classifier (batch norms only).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections import Counter
from typing import TypeVar

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

from anchornet.layers import Normalize
from anchornet.model import AnchorNet

__all__ = ["fold_batchnorm", "fold_normalize", "prepare_classifier_for_inference", "prepare_for_inference"]

M = TypeVar("M", bound=nn.Module)


def fold_batchnorm(model: M, example: torch.Tensor | None = None) -> M:
    """An eval-mode copy of ``model`` with its batch norms folded into the convolutions that feed them.

    Without ``example``, a pair is a ``Conv2d`` directly followed by a ``BatchNorm2d``, consecutive children of an
    ``nn.Sequential`` (AnchorNet, torchvision's ``Conv2dNormActivation``). With ``example`` (an input batch), the
    pairs are found by running it: a batch norm whose input is the output of a convolution, wherever the two sit in
    the module tree (timm's blocks hold them as attributes). timm's ``BatchNormAct2d`` (batch norm, dropout,
    activation) then leaves its dropout and activation behind. The folded copy is checked against ``model`` on
    ``example``; ``ValueError`` if they differ (a convolution whose output also goes elsewhere, say).

    The input model is left untouched; the copy is for inference only (its folded batch norms are gone).
    """
    folded = copy.deepcopy(model).eval()
    if example is None:
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
    pairs, expected = _traced_conv_batchnorm_pairs(folded, example)
    if not isinstance(expected, torch.Tensor):
        raise ValueError(
            f"fold_batchnorm(model, example) checks the model's output: {type(model).__name__} returned a "
            f"{type(expected).__name__}, not one tensor"
        )
    modules = dict(folded.named_modules())
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        conv.weight, conv.bias = weight, bias
        _replace_everywhere(folded, bn, _what_is_left(bn))
    with torch.inference_mode():
        got = folded(example)
    scale = expected.abs().max().clamp_min(1.0)
    if not torch.allclose(got, expected, rtol=1e-3, atol=1e-4 * float(scale)):
        raise ValueError(f"folding the batch norms of this {type(model).__name__} changes its output")
    return folded


def _replace_everywhere(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is a child, under every parent that holds it (a module may have several)."""
    for parent in root.modules():
        for name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, name, new)


def _is_foldable_conv(module: nn.Module) -> bool:
    """A convolution whose output is ``conv(x, weight) + bias``, linear in its weight and bias: ``nn.Conv2d``, and
    timm's ``Conv2dSame`` (pads, then the same). Weight-standardised convolutions and the like are not."""
    return type(module) is nn.Conv2d or type(module).__name__ == "Conv2dSame"


def _what_is_left(bn: nn.BatchNorm2d) -> nn.Module:
    """What replaces a folded batch norm: nothing, or timm's ``BatchNormAct2d``'s dropout and activation."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if isinstance(bn.drop, nn.Identity):
        return bn.act  # one module call less per layer: at 95 x 95 and batch 1 the calls are a good part of a pass
    return nn.Sequential(bn.drop, bn.act)


def _is_foldable_batchnorm(module: nn.Module) -> bool:
    if type(module) is not nn.BatchNorm2d and type(module).__name__ != "BatchNormAct2d":
        return False
    return module.track_running_stats and module.running_mean is not None


def _traced_conv_batchnorm_pairs(model: nn.Module, example: torch.Tensor) -> tuple[list[tuple[str, str]], object]:
    """``(conv name, batch norm name)`` for every foldable batch norm fed straight by a foldable convolution, by
    running ``example`` through ``model``: the batch norm's input is the convolution's output tensor, not modified
    in place since (its version counter, hence ``no_grad`` rather than ``inference_mode``, whose tensors have
    none). Modules called more than once, and a convolution that feeds several batch norms, are left out (folding
    one would change the others). Also returns the model's output on ``example``, before any folding."""
    outputs: dict[int, tuple[str, torch.Tensor, int]] = {}  # id of a conv output -> (conv, the output, its version)
    feeds: list[tuple[str, str]] = []
    calls: Counter[str] = Counter()
    handles = []

    for name, module in model.named_modules():
        if _is_foldable_conv(module):

            def after_conv(_module: nn.Module, _args: tuple, output: torch.Tensor, name: str = name) -> None:
                calls[name] += 1
                outputs[id(output)] = (name, output, output._version)  # the output kept alive: ids stay unique

            handles.append(module.register_forward_hook(after_conv))
        elif _is_foldable_batchnorm(module):

            def before_bn(_module: nn.Module, args: tuple, name: str = name) -> None:
                calls[name] += 1
                source = outputs.get(id(args[0]))
                if source is not None and source[1] is args[0] and source[2] == args[0]._version:
                    feeds.append((source[0], name))

            handles.append(module.register_forward_pre_hook(before_bn))
    try:
        with torch.inference_mode(False), torch.no_grad():
            output = model(example)
    finally:
        for handle in handles:
            handle.remove()
    fed = Counter(conv for conv, _ in feeds)
    pairs = [(conv, bn) for conv, bn in feeds if calls[conv] == 1 and calls[bn] == 1 and fed[conv] == 1]
    return pairs, output


def fold_normalize(model: AnchorNet) -> AnchorNet:
    """An eval-mode copy of ``model`` whose ``Normalize`` is folded into the stem convolution (then an identity).

    Takes the model as it is, batch norms folded or not. Raises ``ValueError`` when the stem is not a plain
    padding-free ``Conv2d`` (folding would then change the border).
    """
    folded = copy.deepcopy(model).eval()
    if not isinstance(folded.normalize, Normalize):
        return folded  # already folded
    stem = next(m for m in folded.features.modules() if isinstance(m, nn.Conv2d))
    if type(stem) is not nn.Conv2d or stem.padding not in ((0, 0), "valid") or stem.groups != 1:
        raise ValueError(f"can fold the normalisation only into a padding-free, ungrouped stem Conv2d, got {stem}")
    mean = folded.normalize.mean.to(stem.weight).view(1, -1, 1, 1)
    std = folded.normalize.std.to(stem.weight).view(1, -1, 1, 1)
    with torch.no_grad():
        weight = stem.weight / std
        shift = (weight * mean).sum(dim=(1, 2, 3))
        bias = stem.bias if stem.bias is not None else torch.zeros_like(shift)
        stem.weight.copy_(weight)
        stem.bias = nn.Parameter(bias - shift, requires_grad=False)
    folded.normalize = nn.Identity()
    return folded


def prepare_for_inference(model: AnchorNet, device: torch.device | str = "cpu") -> AnchorNet:
    """An inference-only copy of ``model`` as the precompute job and the Serve deployments run it: batch norms and
    the input normalisation folded, weights channels-last, on ``device``.

    Feed it uint8 images made channels-last *before* ``to_float`` (a quarter of the bytes to reorder); NCHW input
    works too, only slower. On one CPU thread the CAM of one 224 image took 4.5-5.4 ms against 5.9-6.9 ms eager
    (p50s of three runs).

    On a CUDA device this also turns TF32 off **for the whole process** (torch has no per-module switch), for
    cuDNN's convolutions and for the matrix products of the CAM and the classifier: on an H100 TF32 moved the CAM
    by up to 0.06 against the CPU and changed which patches were chosen. AnchorNet is 0.06 GMACs; exact float32
    costs it nothing that matters, but other models in the same process lose TF32 too. It uses torch's
    ``fp32_precision`` flags, which win over a global ``torch.backends.fp32_precision = "tf32"`` (the legacy
    ``allow_tf32 = False`` does not); torch then refuses to *read* the legacy ``cudnn.allow_tf32`` flag.
    """
    device = torch.device(device)
    if device.type == "cuda":
        _exact_float32()
    prepared = fold_normalize(fold_batchnorm(model))
    return prepared.to(device, memory_format=torch.channels_last)


def prepare_classifier_for_inference(model: M, input_size: int, device: torch.device | str = "cpu") -> M:
    """An inference-only copy of a downstream classifier as Serve runs it: batch norms folded (found by running one
    ``input_size`` image, ``fold_batchnorm(model, example)``), weights channels-last, on ``device``.

    Feed it channels-last images. On one CPU thread and one image, EfficientNet-Lite0 took 5.8 ms against 10.0
    eager at 95 x 95, and 15.3 against 20.7 at 224 (``benchmarks/classifier_inference.py``): eager NCHW runs its
    1 x 1 convolutions on small feature maps through PyTorch's slow non-oneDNN path. A model whose batch norms do
    not fold (``fold_batchnorm`` raises ``ValueError``) keeps them, with a ``RuntimeWarning``.
    """
    weight = next(model.parameters())
    example = torch.rand(1, 3, input_size, input_size, dtype=weight.dtype, device=weight.device)
    try:
        prepared = fold_batchnorm(model, example)
    except ValueError as err:  # an architecture whose pairs do not fold: served unfolded, still channels-last
        warnings.warn(f"{err}; keeping its batch norms", RuntimeWarning, stacklevel=2)
        prepared = copy.deepcopy(model).eval()
    return prepared.to(torch.device(device), memory_format=torch.channels_last)


def _exact_float32() -> None:
    """IEEE float32 for cuDNN convolutions and CUDA matrix products in this process (``prepare_for_inference``)."""
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "ieee"
