"""AnchorNet: padding-free patch proposals and early-exit image classification (Yang, An, Xu, ICME 2022).

The pure PyTorch library: the model, its exact receptive field, the class activation map, patch selection
and cropping. It never imports Ray.
"""

from anchornet.cam import cam_from_features, class_activation_map
from anchornet.layers import MBConv, SqueezeExcite
from anchornet.macs import count_macs
from anchornet.model import TABLE1, AnchorNet, MBConvConfig, anchornet_test
from anchornet.patches import PatchSelection, crop_patches, random_patches, select_patches
from anchornet.receptive_field import ReceptiveField, receptive_field_of

__all__ = [
    "TABLE1",
    "AnchorNet",
    "MBConv",
    "MBConvConfig",
    "PatchSelection",
    "ReceptiveField",
    "SqueezeExcite",
    "anchornet_test",
    "cam_from_features",
    "class_activation_map",
    "count_macs",
    "crop_patches",
    "random_patches",
    "receptive_field_of",
    "select_patches",
]
