"""Typed errors of the segmentation package. Each one names the offending input."""
from __future__ import annotations

from internvl_fm.errors import InternVLError


class SegmentationError(InternVLError):
    """Base class of the errors raised on purpose by `internvl_fm.segmentation`."""


class SegmentationDataError(SegmentationError, ValueError):
    """A dataset that cannot be used: missing folders, unmatched images and masks, unreadable masks."""


class MaskSizeMismatchError(SegmentationDataError):
    """A mask whose height/width differs from its image."""


class LabelOutOfRangeError(SegmentationDataError):
    """A mask holding class ids outside [0, num_classes) other than the ignore index."""


class CropSizeError(SegmentationError, ValueError):
    """A crop / stride that does not fit the backbone (not divisible by the patch size, stride > crop...)."""


class SegmentationConfigError(SegmentationError, ValueError):
    """A training / model config with unknown keys or inconsistent values."""
