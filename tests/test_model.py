"""AnchorNet construction: Table 1, no padding, parameter and MAC counts, shapes, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anchornet import TABLE1, AnchorNet, anchornet_test, count_macs

pytestmark = pytest.mark.model


@pytest.mark.parametrize("se", [False, True])
def test_no_convolution_has_padding(se: bool) -> None:
    convs = [m for m in AnchorNet(se=se).modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) > 20
    for conv in convs:
        assert conv.padding in ((0, 0), "valid"), conv


def test_receptive_field_and_grid_at_224() -> None:
    model = AnchorNet()
    assert model.receptive_field.size == 95
    assert model.receptive_field.stride == 8
    assert model.receptive_field.grid(224, 224) == (17, 17)
    assert model.forward_features(torch.zeros(1, 3, 224, 224)).shape == (1, 512, 17, 17)


def test_table1_output_resolutions() -> None:
    x = torch.zeros(1, 3, 224, 224)
    model = AnchorNet().eval()
    sizes = []
    for layer in model.features:
        x = layer(x)
        sizes.append(x.shape[-1])
    assert sizes == [111, 55, 27, 25, 23, 21, 19, 17]
    assert [b.out_channels for b in TABLE1] == [16, 24, 24, 48, 96, 96, 96]


def test_released_architecture_parameters_and_macs() -> None:
    model = AnchorNet(1000, se=True)
    params = sum(p.numel() for p in model.parameters())
    assert params == pytest.approx(0.675e6, rel=0.01)
    assert count_macs(model, 224) == pytest.approx(60.5e6, rel=0.01)
    # without SE the MACs barely change
    assert count_macs(AnchorNet(1000), 224) == pytest.approx(60.5e6, rel=0.01)


@pytest.mark.parametrize("num_classes", [1, 10, 37])
def test_num_classes_is_honoured(num_classes: int) -> None:
    model = AnchorNet(num_classes)
    assert model.classifier.out_features == num_classes
    assert model(torch.zeros(2, 3, 224, 224)).shape == (2, num_classes)


def test_forward_is_head_of_features() -> None:
    model = anchornet_test().eval()
    x = torch.randn(2, 3, 160, 200)
    assert torch.allclose(model(x), model.forward_head(model.forward_features(x)))
    assert model.forward_features(x).shape == (2, 16, 9, 14)


def test_config_rebuilds_the_same_architecture() -> None:
    model = AnchorNet(7, se=True, shortcut_crop="top_left")
    clone = AnchorNet(**model.config)
    clone.load_state_dict(model.state_dict())
    assert clone.config == model.config


def test_test_model_has_the_table1_receptive_field() -> None:
    assert anchornet_test().receptive_field == AnchorNet().receptive_field


@pytest.mark.parametrize("shape", [(1, 3, 94, 224), (1, 3, 224, 50)])
def test_too_small_input_says_the_minimum(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="at least 95 x 95"):
        AnchorNet()(torch.zeros(shape))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        AnchorNet(0)
    with pytest.raises(ValueError, match="shortcut_crop"):
        AnchorNet(shortcut_crop="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        AnchorNet()(torch.zeros(3, 224, 224))


def test_normalisation_needs_one_value_per_input_channel() -> None:
    with pytest.raises(ValueError, match=r"one value per input channel \(1\), got 3 and 3"):
        AnchorNet(in_channels=1)
    with pytest.raises(ValueError, match=r"one value per input channel \(3\), got 3 and 2"):
        AnchorNet(std=(0.2, 0.2))
    grey = anchornet_test(in_channels=1, mean=(0.5,), std=(0.25,))
    assert grey(torch.rand(2, 1, 95, 95)).shape == (2, 10)


def test_uint8_pixels_are_refused_not_normalised_to_nan() -> None:
    """The decoders and ``Preprocessing`` give uint8; the model's ``Normalize`` takes [0, 1] floats (``to_float``):
    a uint8 mean and std would be 0 and every output NaN."""
    with pytest.raises(ValueError, match=r"expected float images in \[0, 1\], got torch.uint8.*to_float"):
        anchornet_test()(torch.zeros(1, 3, 95, 95, dtype=torch.uint8))
