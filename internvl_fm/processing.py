"""Image loading and the InternVL transforms (retrieval: resize to SxS; classification: resize short side + crop)."""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from internvl_fm.errors import ImageLoadError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit, enforced as an error
Mode = Literal["retrieval", "classification"]


def load_image(source: Any, max_pixels: int = MAX_IMAGE_PIXELS):
    """Open a path, bytes, file object or PIL image as an RGB PIL image; ImageLoadError names what failed."""
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
                raise ImageLoadError(name, f"{width}x{height} pixels exceeds the limit of {max_pixels} "
                                           "(possible decompression bomb)")
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()
        except ImageLoadError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as exc:
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
