"""Eq. 1 and the exact cell-to-window mapping."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from anchornet import AnchorNet, ReceptiveField, anchornet_test, fold_batchnorm, fold_normalize, receptive_field_of

pytestmark = pytest.mark.math


def test_eq1_on_table1_layers() -> None:
    # stem k3 s2, then the depthwise k3 of B1..B7 with strides 2, 2, 1, 1, 1, 1, 1 (1x1 convs change nothing)
    rf = ReceptiveField.from_layers([(3, 2), (3, 2), (3, 2), (3, 1), (3, 1), (3, 1), (3, 1), (3, 1)])
    assert (rf.size, rf.stride) == (95, 8)


def test_eq1_accumulates_in_order() -> None:
    assert ReceptiveField.from_layers([(7, 2), (3, 2)]) == ReceptiveField(size=11, stride=4)
    assert ReceptiveField.from_layers([(3, 2), (7, 2)]) == ReceptiveField(size=15, stride=4)
    assert ReceptiveField.from_layers([]) == ReceptiveField(size=1, stride=1)


def test_grid_and_box() -> None:
    rf = ReceptiveField(size=95, stride=8)
    assert rf.grid(224, 224) == (17, 17)
    assert rf.grid(160, 160) == (9, 9)
    assert rf.grid(224, 160) == (17, 9)
    assert rf.grid(95, 95) == (1, 1)
    assert rf.box(0, 0) == (0, 0, 95, 95)
    assert rf.box(2, 16) == (128, 16, 223, 111)
    boxes = rf.boxes(224, 160)
    assert boxes.shape == (17 * 9, 4)
    assert boxes[2 * 9 + 5].tolist() == list(rf.box(2, 5))


@pytest.mark.parametrize("size", [(94, 224), (224, 94), (10, 10)])
def test_input_smaller_than_window_is_an_error(size: tuple[int, int]) -> None:
    rf = ReceptiveField(size=95, stride=8)
    with pytest.raises(ValueError, match="at least 95 x 95"):
        rf.grid(*size)


def test_receptive_field_of_refuses_padding() -> None:
    with pytest.raises(ValueError, match="padding"):
        receptive_field_of(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)))
    with pytest.raises(ValueError, match="dilation"):
        receptive_field_of(nn.Sequential(nn.Conv2d(3, 3, 3, dilation=2)))
    assert receptive_field_of(nn.Sequential(nn.Conv2d(3, 3, 5, stride=2), nn.MaxPool2d(2))) == ReceptiveField(7, 4)


def _input_gradient(model: nn.Module, height: int, width: int, row: int, col: int) -> torch.Tensor:
    x = torch.randn(1, 3, height, width, dtype=torch.float64, requires_grad=True)
    model.forward_features(x)[0, :, row, col].sum().backward()
    return x.grad[0].abs().sum(0)


@pytest.fixture(scope="module")
def exact_model() -> AnchorNet:
    torch.manual_seed(0)
    return AnchorNet(10).double().eval()


CELLS = [
    (224, 224, 0, 0),
    (224, 224, 16, 16),
    (224, 224, 5, 11),
    (160, 160, 0, 8),
    (160, 160, 4, 4),
    (224, 160, 16, 0),
    (224, 160, 9, 8),
    (100, 231, 0, 17),
]


@pytest.mark.model
@pytest.mark.parametrize(("height", "width", "row", "col"), CELLS)
def test_gradient_of_one_cell_lies_exactly_in_its_box(
    exact_model: AnchorNet, height: int, width: int, row: int, col: int
) -> None:
    rows, cols = exact_model.receptive_field.grid(height, width)
    assert row < rows and col < cols
    grad = _input_gradient(exact_model, height, width, row, col)
    x0, y0, x1, y1 = exact_model.receptive_field.box(row, col)
    inside = torch.zeros_like(grad, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    assert grad[~inside].abs().max() == 0, "gradient leaks outside the cell's window"
    # ... and it reaches every edge of the window, so the window is no larger than needed
    assert grad[y0, x0:x1].max() > 0 and grad[y1 - 1, x0:x1].max() > 0
    assert grad[y0:y1, x0].max() > 0 and grad[y0:y1, x1 - 1].max() > 0


@pytest.mark.model
def test_top_left_shortcut_crop_is_also_inside_the_window() -> None:
    model = AnchorNet(10, shortcut_crop="top_left").double().eval()
    grad = _input_gradient(model, 224, 224, 7, 3)
    x0, y0, x1, y1 = model.receptive_field.box(7, 3)
    inside = torch.zeros_like(grad, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    assert grad[~inside].abs().max() == 0


@pytest.mark.model
def test_squeeze_excitation_breaks_the_mapping() -> None:
    model = AnchorNet(10, se=True).double().eval()
    assert not model.exact
    grad = _input_gradient(model, 224, 224, 0, 0)
    x0, y0, x1, y1 = model.receptive_field.box(0, 0)
    outside = torch.ones_like(grad, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert grad[outside].abs().max() > 0


def test_receptive_field_of_refuses_ceil_mode() -> None:
    for pool in (nn.MaxPool2d(3, 2, ceil_mode=True), nn.AvgPool2d(3, 2, ceil_mode=True)):
        with pytest.raises(ValueError, match="'1' has ceil_mode=True"):
            receptive_field_of(nn.Sequential(nn.Conv2d(3, 3, 3), pool))


@pytest.mark.parametrize("layer", [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3), nn.Upsample(scale_factor=2)])
def test_receptive_field_of_refuses_unknown_layers(layer: nn.Module) -> None:
    with pytest.raises(ValueError, match=rf"layer 'body\.1' \({type(layer).__name__}\) .* is unknown"):
        receptive_field_of(nn.Sequential(OrderedDict(body=nn.Sequential(nn.Conv2d(3, 3, 3), layer))))


def test_receptive_field_of_passes_through_pointwise_layers() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout2d(), nn.Identity(), nn.Conv2d(4, 4, 3, stride=2)
    )
    assert receptive_field_of(net) == ReceptiveField(5, 2)
    folded = fold_normalize(fold_batchnorm(anchornet_test()))  # Identity and biased Conv2d in place of BN
    spatial = nn.Sequential(folded.normalize, folded.features, folded.head)
    assert receptive_field_of(spatial) == folded.receptive_field == ReceptiveField(95, 8)
