"""A tiny synthetic segmentation dataset (coloured shapes on noisy backgrounds, exact masks) for tests and demos."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from internvl_fm.loading import atomic_write

SHAPE_CLASSES = ("background", "circle", "square", "triangle")
SHAPE_COLOURS = ((0, 0, 0), (220, 40, 40), (40, 200, 60), (50, 80, 230))


def _shape_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    radius = rng.uniform(0.14, 0.24) * size
    cy, cx = rng.uniform(radius, size - radius, 2)
    if kind == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    if kind == "square":
        return (np.abs(yy - cy) <= radius * 0.85) & (np.abs(xx - cx) <= radius * 0.85)
    # upward triangle inscribed in the circle of `radius`
    top, base = cy - radius, cy + radius * 0.7
    half = (yy - top) / (base - top) * radius
    return (yy >= top) & (yy <= base) & (np.abs(xx - cx) <= half)


def make_shapes_dataset(root: str | os.PathLike, num_images: int = 16, size: int = 112, split: str = "training",
                        seed: int = 0, noise: float = 40.0) -> Path:
    """Write `root/images/<split>/*.png` and `root/annotations/<split>/*.png` (class ids 0..3, see SHAPE_CLASSES).

    Every image holds one to three shapes (later ones on top) in the colour of their class, with pixel noise on a
    noisy grey background. Returns `root`.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    image_dir, mask_dir = root / "images" / split, root / "annotations" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        image = rng.normal(128, noise, (size, size, 3))
        mask = np.zeros((size, size), dtype=np.uint8)
        for cls in rng.choice(np.arange(1, len(SHAPE_CLASSES)), size=rng.integers(1, 4), replace=False):
            region = _shape_mask(SHAPE_CLASSES[cls], size, rng)
            image[region] = np.array(SHAPE_COLOURS[cls]) + rng.normal(0, noise / 2, (int(region.sum()), 3))
            mask[region] = cls
        for folder, array, mode in ((image_dir, np.clip(image, 0, 255).astype(np.uint8), "RGB"),
                                    (mask_dir, mask, "L")):
            with atomic_write(folder / f"shapes_{i:05d}.png") as tmp:
                Image.fromarray(array, mode=mode).save(tmp, format="PNG")
    return root
