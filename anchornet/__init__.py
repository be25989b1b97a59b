"""AnchorNet: padding-free patch proposals and early-exit image classification (Yang, An, Xu, ICME 2022).

The pure PyTorch library: the model, its exact receptive field, the class activation map, patch selection
and cropping. It never imports Ray.
"""

from anchornet.cam import cam_from_features, class_activation_map
from anchornet.checkpoint import CheckpointError, ModelCard, load_checkpoint, save_checkpoint
from anchornet.classifiers import (
    Classifier,
    WeightsUnavailableError,
    build_classifier,
    class_labels,
    classifier_names,
)
from anchornet.early_exit import (
    EarlyExitClassifier,
    EarlyExitResult,
    ExitThresholds,
    accumulated_confidence,
    confidence_log_odds,
    cumulative_step_macs,
)
from anchornet.fusion import fold_batchnorm, fold_normalize, prepare_classifier_for_inference, prepare_for_inference
from anchornet.layers import MBConv, SqueezeExcite
from anchornet.macs import count_macs
from anchornet.model import TABLE1, AnchorNet, MBConvConfig, anchornet_test
from anchornet.patches import PatchSelection, crop_patches, random_patches, select_patches
from anchornet.preprocessing import ImageDecodeError, Preprocessing, decode_image
from anchornet.receptive_field import ReceptiveField, receptive_field_of
from anchornet.thresholds import (
    BudgetPoint,
    StepTable,
    anytime_accuracy,
    anytime_macs,
    budgeted_search,
    collect_step_table,
    evaluate_thresholds,
    fit_thresholds,
    load_thresholds,
    save_thresholds,
)

__all__ = [
    "TABLE1",
    "AnchorNet",
    "BudgetPoint",
    "CheckpointError",
    "Classifier",
    "EarlyExitClassifier",
    "EarlyExitResult",
    "ExitThresholds",
    "ImageDecodeError",
    "MBConv",
    "MBConvConfig",
    "ModelCard",
    "PatchSelection",
    "Preprocessing",
    "ReceptiveField",
    "SqueezeExcite",
    "StepTable",
    "WeightsUnavailableError",
    "accumulated_confidence",
    "anchornet_test",
    "anytime_accuracy",
    "anytime_macs",
    "budgeted_search",
    "build_classifier",
    "cam_from_features",
    "class_activation_map",
    "class_labels",
    "classifier_names",
    "collect_step_table",
    "confidence_log_odds",
    "count_macs",
    "crop_patches",
    "cumulative_step_macs",
    "decode_image",
    "evaluate_thresholds",
    "fit_thresholds",
    "fold_batchnorm",
    "fold_normalize",
    "load_checkpoint",
    "load_thresholds",
    "prepare_classifier_for_inference",
    "prepare_for_inference",
    "random_patches",
    "receptive_field_of",
    "save_checkpoint",
    "save_thresholds",
    "select_patches",
]
