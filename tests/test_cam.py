"""Class activation map, paper Eq. 2."""

from __future__ import annotations

import pytest
import torch

from anchornet import AnchorNet, anchornet_test, cam_from_features, class_activation_map

pytestmark = pytest.mark.math


@pytest.mark.parametrize("size", [(224, 224), (160, 200)])
def test_cam_mean_plus_bias_is_the_top1_logit(size: tuple[int, int]) -> None:
    model = AnchorNet(10).double().eval()
    torch.nn.init.normal_(model.classifier.bias)
    images = torch.randn(3, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        cam, logits = class_activation_map(model, images)
    assert cam.shape == (3, *model.receptive_field.grid(*size))
    top1 = logits.argmax(1)
    torch.testing.assert_close(cam.mean((1, 2)) + model.classifier.bias[top1], logits.max(1).values)


def test_cam_is_the_weighted_channel_sum() -> None:
    features = torch.randn(2, 5, 3, 4)
    weight = torch.randn(2, 5)
    expected = torch.stack([sum(weight[b, c] * features[b, c] for c in range(5)) for b in range(2)])
    torch.testing.assert_close(cam_from_features(features, weight), expected)


def test_cam_for_given_classes() -> None:
    model = anchornet_test(num_classes=4).eval()
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        cam, logits = class_activation_map(model, images, classes=torch.tensor([3, 1]))
    torch.testing.assert_close(cam.mean((1, 2)) + model.classifier.bias[[3, 1]], logits[[0, 1], [3, 1]])
