"""internvl-fm: InternVL vision-language foundation models on current PyTorch and transformers.

Public names are imported lazily (on first attribute access), so `import internvl_fm` and the CLI start fast.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# torchao (int8) registers pytree constants that torch 2.14 logs as deprecated whenever transformers imports it (in
# every process, DataLoader workers included): noise the user cannot act on, and it breaks one-line CLI errors.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

_EXPORTS = {
    "InternVLError": "internvl_fm.errors",
    "WeightLoadingError": "internvl_fm.errors",
    "CheckpointNotFoundError": "internvl_fm.errors",
    "ImageLoadError": "internvl_fm.errors",
    "ImageTooLargeError": "internvl_fm.errors",
    "ModelKindError": "internvl_fm.errors",
    "ConfigError": "internvl_fm.errors",
    "TokenizerContractError": "internvl_fm.errors",
    "load": "internvl_fm.loading",
    "InternVisionConfig": "internvl_fm.models.configuration_intern_vit",
    "InternVisionModel": "internvl_fm.models.modeling_intern_vit",
    "InternVLConfig": "internvl_fm.models.configuration_internvl",
    "InternVLModel": "internvl_fm.models.modeling_internvl",
    "InternVLTextModel": "internvl_fm.models.modeling_internvl",
    "TextEncoderOutput": "internvl_fm.models.modeling_internvl",
    "InternVLChatConfig": "internvl_fm.models.configuration_internvl_chat",
    "InternVLChatModel": "internvl_fm.models.modeling_internvl_chat",
    "InternVLImageProcessor": "internvl_fm.processing",
    "InternVLProcessor": "internvl_fm.processing",
    "InternVLChatProcessor": "internvl_fm.processing_internvl_chat",
    "build_transform": "internvl_fm.processing",
    "load_image": "internvl_fm.processing",
    "InternVLTokenizer": "internvl_fm.tokenization",
    "validate_tokenizer": "internvl_fm.tokenization",
}

__all__ = sorted([*_EXPORTS, "demo_model_path", "__version__"])


def demo_model_path() -> Path:
    """Folder of the tiny InternVL-C model that ships with the package (offline demos, examples, tests)."""
    return Path(__file__).resolve().parent / "assets" / "demo_model"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'internvl_fm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from internvl_fm.errors import (CheckpointNotFoundError, ConfigError, ImageLoadError, ImageTooLargeError,
                                    InternVLError, ModelKindError, TokenizerContractError, WeightLoadingError)
    from internvl_fm.loading import load
    from internvl_fm.models.configuration_internvl_chat import InternVLChatConfig
    from internvl_fm.models.configuration_intern_vit import InternVisionConfig
    from internvl_fm.models.modeling_intern_vit import InternVisionModel
    from internvl_fm.models.modeling_internvl_chat import InternVLChatModel
    from internvl_fm.models.configuration_internvl import InternVLConfig
    from internvl_fm.models.modeling_internvl import InternVLModel, InternVLTextModel, TextEncoderOutput
    from internvl_fm.processing import InternVLImageProcessor, InternVLProcessor, build_transform, load_image
    from internvl_fm.processing_internvl_chat import InternVLChatProcessor
    from internvl_fm.tokenization import InternVLTokenizer, validate_tokenizer
