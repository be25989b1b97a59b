"""MACs measured by torch's flop counter against published figures."""

from __future__ import annotations

import pytest
import torchvision

from anchornet import AnchorNet, count_macs

pytestmark = pytest.mark.model


@pytest.mark.parametrize(
    ("name", "size", "gmacs"),
    [
        ("resnet50", 224, 4.089),
        ("resnet50", 95, 0.7527),
        ("densenet201", 95, 0.7898),
        ("resnet18", 95, 0.3336),
    ],
)
def test_torchvision_models(name: str, size: int, gmacs: float) -> None:
    model = torchvision.models.get_model(name, weights=None)
    assert count_macs(model, size) / 1e9 == pytest.approx(gmacs, rel=2e-3)


def test_anchornet_released_architecture() -> None:
    assert count_macs(AnchorNet(se=True), 224) / 1e9 == pytest.approx(0.0605, rel=2e-3)


def test_input_size_forms_and_training_flag() -> None:
    model = AnchorNet(10).train()
    assert count_macs(model, 224) == count_macs(model, (224, 224)) == count_macs(model, (3, 224, 224))
    assert model.training
    assert count_macs(model, (224, 160)) < count_macs(model, 224)
