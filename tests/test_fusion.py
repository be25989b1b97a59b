"""Batch-norm folding: the same function, no batch norm left, the input model untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anchornet import AnchorNet, anchornet_test, build_classifier, fold_batchnorm

pytestmark = pytest.mark.model


def _with_statistics(model: nn.Module) -> nn.Module:
    """Give every batch norm non-trivial running statistics and affine parameters."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize("build", [lambda: AnchorNet(10), lambda: AnchorNet(10, se=True), lambda: anchornet_test(10)])
def test_folded_anchornet_computes_the_same_function(build) -> None:
    model = _with_statistics(build()).double()
    folded = fold_batchnorm(model)
    x = torch.rand(2, 3, 224, 224, dtype=torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-9, atol=1e-9)
        nhwc = folded.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(nhwc, model(x), rtol=1e-9, atol=1e-9)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) >= 15  # the input keeps its batch norms


@pytest.mark.parametrize(
    ("name", "size", "left"),
    [
        # timm's BatchNormAct2d subclasses BatchNorm2d but also applies the activation: it must be left alone.
        ("efficientnet_lite0", 95, None),
        ("mobilenet_v3_small", 96, 0),  # torchvision's Conv2dNormActivation: every batch norm folds
    ],
)
def test_folded_classifier_computes_the_same_function(name: str, size: int, left: int | None) -> None:
    model = _with_statistics(build_classifier(name, 10)).double()
    folded = fold_batchnorm(model)
    x = torch.rand(2, 3, size, size, dtype=torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-9, atol=1e-9)
    if left is not None:
        assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == left
