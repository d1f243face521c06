"""Typed errors raised by internvl-fm. Every error names the thing that is wrong."""
from __future__ import annotations


class InternVLError(Exception):
    """Base class of every error internvl-fm raises on purpose."""


class WeightLoadingError(InternVLError, KeyError):
    """Weights on disk do not fit the model: missing / unexpected keys or shape mismatches (all named)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class CheckpointNotFoundError(InternVLError, FileNotFoundError):
    """A checkpoint folder, hub id or weight file could not be found."""


class ImageLoadError(InternVLError, ValueError):
    """An image file could not be decoded (corrupt, truncated, empty, too large...). Names the file."""

    def __init__(self, source: object, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"cannot load image {source!s}: {reason}")


class ImageTooLargeError(ImageLoadError):
    """An image with more pixels than allowed (a possible decompression bomb); servers answer it with 413."""


class TokenizerContractError(InternVLError, ValueError):
    """A tokenizer that would break InternVL-C/G EOS pooling (no eos appended, pad id not 0, left padding...)."""


class ModelKindError(InternVLError, ValueError):
    """A checkpoint holds another kind of model than the one asked for (names both, and the command that fits)."""


class ConfigError(InternVLError, ValueError):
    """A config.json that cannot describe a model we can build (unknown layout, absurd sizes...). Names the field."""
