"""internvl-fm: InternVL vision-language foundation models on current PyTorch and transformers."""
from internvl_fm.errors import (CheckpointNotFoundError, ImageLoadError, InternVLError, TokenizerContractError,
                                WeightLoadingError)
from internvl_fm.loading import load
from internvl_fm.models.intern_vit import InternVisionConfig, InternVisionModel
from internvl_fm.models.internvl import InternVLConfig, InternVLModel, InternVLTextModel, TextEncoderOutput
from internvl_fm.processing import InternVLImageProcessor, build_transform, load_image
from internvl_fm.tokenization import InternVLTokenizer, validate_tokenizer

__version__ = "0.1.0"

__all__ = [
    "CheckpointNotFoundError", "ImageLoadError", "InternVLError", "TokenizerContractError", "WeightLoadingError",
    "InternVisionConfig", "InternVisionModel", "InternVLConfig", "InternVLModel", "InternVLTextModel",
    "TextEncoderOutput", "InternVLImageProcessor", "InternVLTokenizer", "build_transform", "load", "load_image",
    "validate_tokenizer", "__version__",
]
