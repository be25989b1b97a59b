"""Batch-norm and input-normalisation folding: the same function, nothing left to fold, the input model untouched."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from anchornet import (
    AnchorNet,
    anchornet_test,
    build_classifier,
    class_activation_map,
    fold_batchnorm,
    fold_normalize,
    prepare_for_inference,
)
from anchornet.preprocessing import to_float

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


@pytest.mark.parametrize("batchnorm_first", [True, False])
def test_folded_normalisation_computes_the_same_function(batchnorm_first: bool) -> None:
    model = _with_statistics(AnchorNet(10, mean=(0.3, 0.5, 0.7), std=(0.2, 0.25, 0.3))).double()
    folded = fold_normalize(fold_batchnorm(model)) if batchnorm_first else fold_batchnorm(fold_normalize(model))
    x = torch.rand(2, 3, 224, 224, dtype=torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-9, atol=1e-9)
        nhwc = folded.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(nhwc, model(x), rtol=1e-9, atol=1e-9)
    assert isinstance(folded.normalize, nn.Identity)
    assert not isinstance(model.normalize, nn.Identity)  # the input is untouched
    assert folded.receptive_field == model.receptive_field
    again = fold_normalize(folded)  # folding twice is a no-op, not a second shift
    with torch.inference_mode():
        torch.testing.assert_close(again(x), model(x), rtol=1e-9, atol=1e-9)


def test_folding_the_normalisation_into_a_padded_stem_is_refused() -> None:
    model = AnchorNet(10)
    stem = next(m for m in model.features.modules() if isinstance(m, nn.Conv2d))
    stem.padding = (1, 1)  # a zero border would no longer be zero after normalisation
    with pytest.raises(ValueError, match="padding-free"):
        fold_normalize(model)


def test_prepared_for_inference_is_folded_channels_last_and_gives_the_same_cam() -> None:
    model = _with_statistics(AnchorNet(10))
    prepared = prepare_for_inference(model)
    assert not prepared.training
    assert isinstance(prepared.normalize, nn.Identity)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
    stem = next(m for m in prepared.features.modules() if isinstance(m, nn.Conv2d))
    assert stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert not isinstance(model.normalize, nn.Identity)  # the input is untouched
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        cam, logits = class_activation_map(model, to_float(images))
        nhwc = to_float(images.contiguous(memory_format=torch.channels_last))
        prepared_cam, prepared_logits = class_activation_map(prepared, nhwc)
    torch.testing.assert_close(prepared_cam, cam, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(prepared_logits, logits, rtol=1e-4, atol=1e-4)


def test_exact_float32_wins_over_a_global_tf32_setting() -> None:
    """On CUDA, prepare_for_inference turns TF32 off even when the process asked for it through torch's new flags
    (the legacy ``allow_tf32 = False`` would not). Process-wide flags: checked in a child process."""
    code = (
        "import torch; from anchornet.fusion import _exact_float32; "
        "torch.backends.fp32_precision = 'tf32'; _exact_float32(); "
        "print(torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["ieee", "ieee"]
