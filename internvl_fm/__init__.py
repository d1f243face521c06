"""internvl-fm: InternVL vision-language foundation models on current PyTorch and transformers."""
from internvl_fm.errors import (CheckpointNotFoundError, ImageLoadError, InternVLError, TokenizerContractError,
                                WeightLoadingError)
from internvl_fm.loading import load
from internvl_fm.models.intern_vit import InternVisionConfig, InternVisionModel

__version__ = "0.1.0"

__all__ = [
    "CheckpointNotFoundError", "ImageLoadError", "InternVLError", "TokenizerContractError", "WeightLoadingError",
    "InternVisionConfig", "InternVisionModel", "load", "__version__",
]
