"""Dynamic high-resolution tiling of InternVL 1.5 / 2 / 2.5 (``dynamic_preprocess`` of the official code).

An image is resized to the ``cols x rows`` grid of ``image_size`` tiles whose aspect ratio is closest to the image's,
cut into tiles row-major, and (when there is more than one tile and ``use_thumbnail``) followed by a thumbnail of the
whole image.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["candidate_grids", "tile_grid", "dynamic_preprocess", "build_transform", "load_image"]

def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All ``(cols, rows)`` with ``min_num <= cols*rows <= max_num``, in the official scan order."""
    if min_num < 1 or max_num < min_num:
        raise ValueError(f"need 1 <= min_num <= max_num, got min_num={min_num}, max_num={max_num}")
    # Built exactly as the reference does (a set of int tuples, then a stable sort by area): set iteration order of
    # small int tuples is deterministic, and it decides exact ties between grids of the same area.
    ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
        if min_num <= i * j <= max_num)
    return sorted(ratios, key=lambda r: r[0] * r[1])


def tile_grid(width: int, height: int, min_num: int = 1, max_num: int = 12, image_size: int = 448) -> tuple[int, int]:
    """The ``(cols, rows)`` tile grid ``dynamic_preprocess`` picks for a ``width x height`` image.

    The closest aspect ratio wins; on an exact tie a larger grid replaces the current one only when the image has more
    than half the pixels of that grid (``width*height > 0.5 * image_size**2 * cols * rows``).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in candidate_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def dynamic_preprocess(
    image: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448, use_thumbnail: bool = False
) -> list[Image.Image]:
    """Cut ``image`` into ``image_size`` tiles (row-major), plus a final thumbnail when asked and more than one tile."""
    cols, rows = tile_grid(image.width, image.height, min_num, max_num, image_size)
    resized = image.resize((image_size * cols, image_size * rows))
    tiles = []
    for k in range(cols * rows):
        left, top = (k % cols) * image_size, (k // cols) * image_size
        tiles.append(resized.crop((left, top, left + image_size, top + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def build_transform(input_size: int = 448) -> Callable[[Image.Image], torch.Tensor]:
    """Tile transform of the chat models: ``Resize((S, S), bicubic)``, ``ToTensor``, ImageNet normalisation.

    This is the core's "retrieval" transform (:func:`internvl_fm.processing.build_transform`).
    """
    from internvl_fm.processing import build_transform as core_build_transform

    return core_build_transform(input_size, mode="retrieval")


def load_image(
    image: str | os.PathLike | Image.Image,
    max_num: int = 12,
    input_size: int = 448,
    min_num: int = 1,
    use_thumbnail: bool = True,
) -> torch.Tensor:
    """Load an image (path or PIL) and return its tiles as a ``[n_tiles, 3, S, S]`` float tensor (model-card recipe)."""
    from internvl_fm.processing import load_image as core_load_image

    img = core_load_image(image)  # RGB; ImageLoadError names a missing / corrupt file
    transform = build_transform(input_size)
    tiles = dynamic_preprocess(img, min_num=min_num, max_num=max_num, image_size=input_size,
                               use_thumbnail=use_thumbnail)
    return torch.stack([transform(t) for t in tiles])
