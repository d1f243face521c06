"""Image loading, the InternVL transforms (retrieval: resize to SxS; classification: resize short side + crop) and
``InternVLProcessor``, the InternVL-C/G image transform and tokenizer contract in one object."""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from internvl_fm.errors import ImageLoadError, ImageTooLargeError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MAX_IMAGE_PIXELS", "ImageTooLargeError", "load_image", "to_rgb",
           "build_transform", "InternVLImageProcessor", "InternVLProcessor"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit, enforced as an error
Mode = Literal["retrieval", "classification"]


def load_image(source: Any, max_pixels: int = MAX_IMAGE_PIXELS):
    """Open a path, bytes, file object or PIL image as an RGB PIL image; ImageLoadError names what failed
    (:class:`ImageTooLargeError` when it has more than ``max_pixels`` pixels)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        image, name = source, "<PIL image>"
    else:
        name = str(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"
        try:
            if isinstance(source, (str, os.PathLike)):
                path = Path(source)
                if not path.is_file():
                    raise ImageLoadError(name, "file not found")
                if path.stat().st_size == 0:
                    raise ImageLoadError(name, "empty file")
                fp: Any = path
            elif isinstance(source, (bytes, bytearray, memoryview)):
                if not len(source):
                    raise ImageLoadError(name, "empty bytes")
                fp = io.BytesIO(bytes(source))
            elif hasattr(source, "read"):
                fp = source
            else:
                raise ImageLoadError(name, f"unsupported image source type {type(source).__name__}")
            image = Image.open(fp)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLargeError(name, f"{width}x{height} pixels exceeds the limit of {max_pixels} "
                                               "(possible decompression bomb)")
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()
        except ImageLoadError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLargeError(name, f"{type(exc).__name__}: {exc}") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ImageLoadError(name, f"{type(exc).__name__}: {exc}") from exc
    try:
        return to_rgb(image)
    except (OSError, ValueError) as exc:
        raise ImageLoadError(name, f"cannot convert mode {image.mode} to RGB: {exc}") from exc


def to_rgb(image):
    """RGB view of any PIL mode (16-bit grey is scaled to 8 bits, transparency composited on white)."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray((array / peak * 255.0).clip(0, 255).astype("uint8")).convert("RGB")
    if image.mode in ("RGBA", "LA", "P", "PA") and ("transparency" in image.info or image.mode.endswith("A")):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def build_transform(image_size: int, mode: Mode = "retrieval", mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD):
    """torchvision transform: retrieval = Resize((S, S)) bicubic; classification = Resize(S) + CenterCrop(S)."""
    from torchvision import transforms as T

    if mode == "retrieval":
        resize = [T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC)]
    elif mode == "classification":
        resize = [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    else:
        raise ValueError(f"unknown transform mode {mode!r}; use 'retrieval' or 'classification'")
    return T.Compose([*resize, T.ToTensor(), T.Normalize(mean, std)])


class InternVLImageProcessor:
    """Callable that turns images (PIL, paths, bytes) into a normalised pixel tensor [N, 3, S, S]."""

    def __init__(self, image_size: int = 224, mode: Mode = "retrieval", max_pixels: int = MAX_IMAGE_PIXELS):
        self.image_size = image_size
        self.mode = mode
        self.max_pixels = max_pixels
        self.transform = build_transform(image_size, mode)

    def preprocess(self, image: Any) -> torch.Tensor:
        """One image -> [3, S, S]."""
        return self.transform(load_image(image, self.max_pixels))

    def __call__(self, images: Any) -> torch.Tensor:
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("no images given")
        return torch.stack([self.preprocess(img) for img in images])

    def __repr__(self) -> str:
        return f"InternVLImageProcessor(image_size={self.image_size}, mode={self.mode!r})"


class InternVLProcessor:
    """Everything InternVL-C/G need around the model, in one object: the image transform
    (:class:`InternVLImageProcessor`) and the text tokenizer contract
    (:class:`~internvl_fm.tokenization.InternVLTokenizer`).

    ``processor(text=..., images=...)`` returns a ``transformers.BatchFeature`` with ``pixel_values`` and / or
    ``input_ids`` + ``attention_mask``, ready for ``InternVLModel.forward`` / ``encode_image`` / ``encode_text``.
    """

    def __init__(self, image_processor: InternVLImageProcessor | None = None, tokenizer: Any = None):
        self.image_processor = image_processor if image_processor is not None else InternVLImageProcessor()
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, mode: Mode = "retrieval") -> "InternVLProcessor":
        """The processor of an InternVL-C/G checkpoint folder or hub id: its ``image_size`` (config.json), its
        tokenizer when the folder has one. Another kind of checkpoint raises ``ModelKindError``."""
        from internvl_fm.configuration_utils import check_config_dict
        from internvl_fm.loading import check_model_kind, read_config, resolve_checkpoint
        from internvl_fm.models.configuration_internvl import InternVLConfig
        from internvl_fm.tokenization import InternVLTokenizer, has_tokenizer_files

        folder = resolve_checkpoint(path)
        data = read_config(folder)
        check_config_dict(data, str(path))
        check_model_kind(path, data, ("InternVLModel",), "an InternVL-C/G model")
        config = InternVLConfig.from_dict(data)
        tokenizer = InternVLTokenizer.from_pretrained(folder) if has_tokenizer_files(folder) else None
        return cls(InternVLImageProcessor(config.image_size, mode=mode), tokenizer)

    @property
    def image_size(self) -> int:
        return self.image_processor.image_size

    @property
    def mode(self) -> Mode:
        return self.image_processor.mode

    def with_mode(self, mode: Mode) -> "InternVLProcessor":
        """The same processor with the ``retrieval`` (resize to SxS) or ``classification`` (resize + crop) transform."""
        image_processor = InternVLImageProcessor(self.image_size, mode, self.image_processor.max_pixels)
        return type(self)(image_processor, self.tokenizer)

    def __call__(self, text: str | Sequence[str] | None = None, images: Any = None, **tokenizer_kwargs: Any):
        """``pixel_values`` [N, 3, S, S] of ``images`` and ``input_ids`` / ``attention_mask`` of ``text``
        (``summarize:`` prefix, BOS + text + EOS, right-padded with 0; ``padding`` / ``max_length`` go to the
        tokenizer)."""
        from transformers import BatchFeature

        if text is None and images is None:
            raise ValueError("give text, images or both")
        data: dict[str, torch.Tensor] = {}
        if images is not None:
            data["pixel_values"] = self.image_processor(images)
        if text is not None:
            if self.tokenizer is None:
                raise ValueError("this processor has no tokenizer: load it from a folder with tokenizer files or pass "
                                 "tokenizer=InternVLTokenizer(...)")
            data.update(self.tokenizer(text, **tokenizer_kwargs))
        return BatchFeature(data)

    def batch_decode(self, ids: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(ids, **kwargs)

    def decode(self, ids: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(ids, **kwargs)

    def __repr__(self) -> str:
        inner = getattr(self.tokenizer, "tokenizer", self.tokenizer)  # InternVLTokenizer wraps a transformers one
        tokenizer = type(inner).__name__ if inner is not None else None
        return f"InternVLProcessor(image_processor={self.image_processor!r}, tokenizer={tokenizer})"
