"""Class activation map (paper Eq. 2): one score per cell of the final feature map."""

from __future__ import annotations

import torch

from anchornet.model import AnchorNet

__all__ = ["cam_from_features", "class_activation_map"]


def cam_from_features(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Eq. 2, ``M_n = sum_c w_{n,c} F_c``, for one class per image.

    Args:
        features: the final pre-pooling map ``F``, ``(B, C, rows, cols)``.
        weight: the classifier row ``w_n`` of each image's class, ``(B, C)``.

    Returns:
        ``(B, rows, cols)``; no ReLU, no upsampling, no scaling.
    """
    return torch.einsum("bc,bchw->bhw", weight, features)


def class_activation_map(
    model: AnchorNet, images: torch.Tensor, classes: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CAM of each image for its own top-1 class (or for ``classes`` when given).

    Because the head is global average pooling then a linear layer, the mean of the CAM over the grid plus
    the class bias equals that class's logit.

    Returns:
        ``(cam, logits)``: ``(B, rows, cols)`` and ``(B, num_classes)``.
    """
    features = model.forward_features(images)
    logits = model.forward_head(features)
    if classes is None:
        classes = logits.argmax(dim=1)
    return cam_from_features(features, model.classifier.weight[classes]), logits
