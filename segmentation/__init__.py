"""Semantic segmentation on InternViT: linear / UperNet heads, training recipes, whole / sliding inference, mIoU.

Plain PyTorch re-creation of the official mmseg 0.x recipes (linear probing, head tuning, full tuning on ADE20K).
`mmseg_bridge` (optional, never imported here) registers the modules in mmsegmentation's registry.
"""
from .backbone import InternViTBackbone, LayerNorm2d
from .data import (ADE20K_CLASSES, EvalTransform, ResumableSampler, SegmentationDataset, TrainTransform,
                   default_palette, read_image, read_mask)
from .errors import (CropSizeError, LabelOutOfRangeError, MaskSizeMismatchError, SegmentationConfigError,
                     SegmentationDataError, SegmentationError)
from .heads import FCNHead, LinearHead, UperNetHead, convert_hf_upernet_state_dict, segmentation_loss
from .infer import (colorize, default_stride, evaluate, overlay, predict_logits, segment_image, slide_inference,
                    whole_inference)
from .metrics import ConfusionMeter, SegmentationMetrics, confusion_matrix, metrics_from_confusion
from .modeling import SegmentationConfig, SegmentationModel, SegmentationOutput, convert_official_state_dict
from .synthetic import make_shapes_dataset
from .train import TrainConfig, TrainResult, load_train_config, train

__all__ = [
    "ADE20K_CLASSES", "ConfusionMeter", "CropSizeError", "EvalTransform", "FCNHead", "InternViTBackbone",
    "LabelOutOfRangeError", "LayerNorm2d", "LinearHead", "MaskSizeMismatchError", "ResumableSampler",
    "SegmentationConfig", "SegmentationConfigError", "SegmentationDataError", "SegmentationDataset",
    "SegmentationError", "SegmentationMetrics", "SegmentationModel", "SegmentationOutput", "TrainConfig",
    "TrainResult", "TrainTransform", "UperNetHead", "colorize", "confusion_matrix", "convert_hf_upernet_state_dict",
    "convert_official_state_dict", "default_palette", "default_stride", "evaluate", "load_train_config",
    "make_shapes_dataset", "metrics_from_confusion", "overlay", "predict_logits", "read_image", "read_mask",
    "segment_image", "segmentation_loss", "slide_inference", "train", "whole_inference",
]
