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
    prepare_classifier_for_inference,
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


@pytest.mark.parametrize(("name", "size"), [("efficientnet_lite0", 95), ("mobilenet_v3_small", 96), ("resnet50", 64)])
def test_traced_folding_folds_every_batchnorm_of_the_registered_classifiers(name: str, size: int) -> None:
    """With an example input the pairs are found by running it: timm's attribute-held conv + BatchNormAct2d pairs
    (its Conv2dSame stems included) fold too, and the activation stays."""
    model = _with_statistics(build_classifier(name, 10)).double()
    x = torch.rand(2, 3, size, size, dtype=torch.float64)
    folded = fold_batchnorm(model, example=x[:1])
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-9, atol=1e-9)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) >= 30  # the input keeps its batch norms


class _SharedConv(nn.Module):
    """One convolution called twice, each time into its own batch norm: folding either would change the other."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x))


class _ConvOutputUsedTwice(nn.Module):
    """A convolution whose output also skips its batch norm: not a foldable pair, and the check must say so."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class _ResidualBeforeBatchNorm(nn.Module):
    """A convolution whose output gets a residual added in place before its batch norm: not a foldable pair."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y += x
        return self.bn(y)


def test_traced_folding_leaves_a_convolution_output_changed_in_place_alone() -> None:
    model = _with_statistics(_ResidualBeforeBatchNorm()).double()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    folded = fold_batchnorm(model, example=x)
    assert isinstance(folded.bn, nn.BatchNorm2d)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


class _OneConvTwoBatchNorms(nn.Module):
    """One convolution's output into two batch norms: folding it for one would change the other's input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn1(y) * self.bn2(y)


class _SharedBatchNorm(nn.Module):
    """A block held by two parents (the same module object), its pair folded once and replaced under both."""

    def __init__(self) -> None:
        super().__init__()
        block = nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3))
        self.first, self.alias = nn.ModuleDict({"block": block}), nn.ModuleDict({"block": block})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alias["block"](x)


def test_traced_folding_leaves_a_convolution_feeding_two_batchnorms_alone_and_folds_aliases_once() -> None:
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    for build, left in ((_OneConvTwoBatchNorms, 2), (_SharedBatchNorm, 0)):
        model = _with_statistics(build()).double()
        folded = fold_batchnorm(model, example=x)
        assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == left
        with torch.inference_mode():
            torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


def test_traced_folding_works_under_inference_mode_and_refuses_a_tuple_output() -> None:
    model = _with_statistics(build_classifier("mobilenet_v3_small", 3))
    with torch.inference_mode():  # as a model loaded for inference would be folded
        folded = fold_batchnorm(model, example=torch.rand(1, 3, 32, 32))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.bn(self.conv(x)), x

    with pytest.raises(ValueError, match="returned a tuple, not one tensor"):
        fold_batchnorm(Pair(), example=torch.rand(1, 3, 8, 8))


def test_a_classifier_whose_batchnorms_do_not_fold_is_prepared_with_them(recwarn) -> None:
    """prepare_classifier_for_inference keeps the batch norms (and says so) rather than fail a replica's start."""
    model = _with_statistics(_ConvOutputUsedTwice())
    prepared = prepare_classifier_for_inference(model, 16)
    assert isinstance(prepared.bn, nn.BatchNorm2d)
    assert any("changes its output; keeping its batch norms" in str(w.message) for w in recwarn)
    x = torch.rand(2, 3, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(prepared(x.contiguous(memory_format=torch.channels_last)), model(x))


def test_traced_folding_leaves_a_convolution_called_twice_alone() -> None:
    model = _with_statistics(_SharedConv()).double()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    folded = fold_batchnorm(model, example=x)
    assert isinstance(folded.bn1, nn.BatchNorm2d) and isinstance(folded.bn2, nn.BatchNorm2d)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


def test_traced_folding_refuses_a_convolution_whose_output_also_goes_elsewhere() -> None:
    model = _with_statistics(_ConvOutputUsedTwice())
    with pytest.raises(ValueError, match="changes its output"):
        fold_batchnorm(model, example=torch.rand(1, 3, 16, 16))


def test_prepared_classifier_is_folded_channels_last_and_gives_the_same_logits() -> None:
    model = _with_statistics(build_classifier("efficientnet_lite0", 10))
    prepared = prepare_classifier_for_inference(model, 95)
    assert not prepared.training
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
    convs = [m for m in prepared.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the input is untouched
    images = torch.rand(3, 3, 95, 95)
    with torch.inference_mode():
        expected = model(images)
        got = prepared(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


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


def test_classifier_inference_benchmark_times_both_models_and_prints_the_ratio(tmp_path, capsys) -> None:
    """``benchmarks.classifier_inference``: one row per size and batch, eager and prepared side by side."""
    import json

    from anchornet import save_checkpoint
    from benchmarks.classifier_inference import main

    path, out = tmp_path / "c.pt", tmp_path / "out.json"
    save_checkpoint(
        _with_statistics(build_classifier("mobilenet_v3_small", 3)), path, input_size=32, class_names=["a", "b", "c"]
    )
    threads = torch.get_num_threads()
    try:
        args = ["--checkpoint", str(path), "--sizes", "32", "--batch-sizes", "1,2", "--rounds", "1", "--passes", "1"]
        assert main([*args, "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text())["results"]
    assert [(row["size"], row["batch"]) for row in rows] == [(32, 1), (32, 2)]
    for row in rows:
        assert row["speedup"] == pytest.approx(row["eager_ms_per_image"] / row["prepared_ms_per_image"], rel=0.01)
        assert row["max_logit_difference"] < 1e-4
    assert capsys.readouterr().out.count(" x 32") == 2


@pytest.mark.slow
def test_classifier_inference_benchmark_times_onnx_runtime_and_anchornet(tmp_path, capsys) -> None:
    """``--runtime onnxruntime`` adds ONNX Runtime's column; an AnchorNet checkpoint is timed as CAM and logits."""
    import json

    from anchornet import anchornet_test, save_checkpoint
    from benchmarks.classifier_inference import main

    path, out = tmp_path / "a.pt", tmp_path / "out.json"
    save_checkpoint(anchornet_test(3), path, class_names=["a", "b", "c"])
    threads = torch.get_num_threads()
    try:
        args = ["--checkpoint", str(path), "--sizes", "112", "--batch-sizes", "1", "--rounds", "1", "--passes", "1"]
        assert main([*args, "--runtime", "onnxruntime", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    (row,) = json.loads(out.read_text())["results"]
    assert row["onnxruntime_speedup"] == pytest.approx(
        row["eager_ms_per_image"] / row["onnxruntime_ms_per_image"], rel=0.01
    )
    assert row["onnxruntime_max_difference"] < 1e-3 and row["max_logit_difference"] < 1e-3
    assert "onnxruntime" in capsys.readouterr().out
