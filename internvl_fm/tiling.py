"""Dynamic high-resolution tiling of InternVL 1.5 / 2 / 2.5 (``dynamic_preprocess`` of the official code).

An image is resized to the ``cols x rows`` grid of ``image_size`` tiles whose aspect ratio is closest to the image's,
cut into tiles row-major, and (when there is more than one tile and ``use_thumbnail``) followed by a thumbnail of the
whole image.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["candidate_grids", "tile_grid", "dynamic_preprocess", "tile_pixels"]


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


def tile_pixels(
    image: Image.Image,
    image_size: int = 448,
    min_num: int = 1,
    max_num: int = 12,
    use_thumbnail: bool = True,
    dynamic: bool = True,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``[n_tiles, 3, S, S]`` pixels of one RGB image: its :func:`dynamic_preprocess` tiles (the whole image as one
    tile when ``dynamic`` is off, as the official code does without ``dynamic_image_size``) through ``transform``
    (default: the chat models' ``Resize((S, S))`` bicubic + ImageNet normalisation)."""
    if transform is None:
        from internvl_fm.processing import build_transform

        transform = build_transform(image_size, mode="retrieval")
    tiles = dynamic_preprocess(image, min_num, max_num, image_size, use_thumbnail) if dynamic else [image]
    return torch.stack([transform(tile) for tile in tiles])
