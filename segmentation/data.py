"""Segmentation datasets (ADE20K layout or any image/mask folder pair) and the official mmseg-style pipelines.

Training pipeline (ade20k_504x504): random rescale (ratio 0.5-2.0 of a (4*crop, crop) scale, aspect kept) ->
random crop with `cat_max_ratio` -> horizontal flip -> photometric distortion -> normalise -> pad to the crop
(image 0, mask 255). Evaluation: resize so the short side is the crop size (long side at most 4*crop), then up to a
multiple of the patch size; masks stay at their original size.

All randomness comes from a `torch.Generator` seeded by (dataset seed, position of the sample in the training
stream, given by the core `ResumableSampler`), so a resumed run sees exactly the same augmented batches as an
uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from internvl_fm.processing import IMAGENET_MEAN, IMAGENET_STD
from internvl_fm.training.runtime import ResumableSampler  # noqa: F401  (the sampler of seg-train)

from .errors import LabelOutOfRangeError, MaskSizeMismatchError, SegmentationDataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")

ADE20K_CLASSES = tuple(n.replace("_", " ") for n in """
wall building sky floor tree ceiling road bed windowpane grass cabinet sidewalk person earth door table mountain plant
curtain chair car water painting sofa shelf house sea mirror rug field armchair seat fence desk rock wardrobe lamp
bathtub railing cushion base box column signboard chest_of_drawers counter sand sink skyscraper fireplace refrigerator
grandstand path stairs runway case pool_table pillow screen_door stairway river bridge bookcase blind coffee_table
toilet flower book hill bench countertop stove palm kitchen_island computer swivel_chair boat bar arcade_machine hovel
bus towel light truck tower chandelier awning streetlight booth television_receiver airplane dirt_track apparel pole
land bannister escalator ottoman bottle buffet poster stage van ship fountain conveyer_belt canopy washer plaything
swimming_pool stool barrel basket waterfall tent bag minibike cradle oven ball food step tank trade_name microwave pot
animal bicycle lake dishwasher screen blanket sculpture hood sconce vase traffic_light tray ashcan fan pier crt_screen
plate monitor bulletin_board shower radiator glass clock flag""".split())


def default_palette(num_classes: int, seed: int = 3) -> list[list[int]]:
    """A fixed, well-spread RGB colour per class."""
    gen = torch.Generator().manual_seed(seed)
    colours = torch.randint(0, 256, (num_classes, 3), generator=gen)
    return colours.tolist()


def read_image(source: str | os.PathLike | Image.Image) -> torch.Tensor:
    """An image (path or PIL image) as an RGB uint8 tensor [3, H, W]; `ImageLoadError` names a bad file."""
    from internvl_fm.processing import load_image

    array = np.asarray(load_image(source))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def read_mask(path: str | os.PathLike) -> torch.Tensor:
    """A single-channel label image (mode L, P or I) as an int64 tensor [H, W] of class ids."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise SegmentationDataError(f"mask {path} has mode {img.mode!r}; masks must be single-channel "
                                            f"label images (mode L, P or I) holding class ids")
            array = np.asarray(img)
    except SegmentationDataError:
        raise
    except (OSError, ValueError) as exc:
        raise SegmentationDataError(f"cannot read mask {path}: {exc}") from exc
    return torch.from_numpy(array.astype(np.int64))


def reduce_zero_label(mask: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """ADE20K convention: label 0 ("other") becomes ignore, every other label shifts down by one."""
    out = mask - 1
    out[(mask == 0) | (mask == ignore_index)] = ignore_index
    return out


# ----------------------------------------------------------------------------------------------- transforms


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high)."""
    return int(torch.randint(low, high, (), generator=gen))


def _resize_pair(image: torch.Tensor, mask: torch.Tensor | None, size: tuple[int, int]
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    if tuple(image.shape[-2:]) != size:
        image = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        image = image.clamp(0, 255)
        if mask is not None:
            mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image.float(), mask


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv `rescale` with keep_ratio: largest size with long side <= max(scale) and short side <= min(scale)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def photometric_distortion(image: torch.Tensor, gen: torch.Generator, brightness_delta: float = 32,
                           contrast_range: tuple[float, float] = (0.5, 1.5),
                           saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> torch.Tensor:
    """mmseg `PhotoMetricDistortion` on a float [3, H, W] image in [0, 255]; each step applied with p=0.5."""
    from torchvision.transforms import functional as TF

    def contrast(img: torch.Tensor) -> torch.Tensor:
        if _randint(gen, 0, 2):
            img = (img * _uniform(gen, *contrast_range)).clamp(0, 255)
        return img

    if _randint(gen, 0, 2):
        image = (image + _uniform(gen, -brightness_delta, brightness_delta)).clamp(0, 255)
    contrast_first = bool(_randint(gen, 0, 2))
    if contrast_first:
        image = contrast(image)
    if _randint(gen, 0, 2):
        image = TF.adjust_saturation(image / 255.0, _uniform(gen, *saturation_range)) * 255.0
    if _randint(gen, 0, 2):
        # hue shift of d OpenCV degrees (0..180) is d / 180 of a turn
        image = TF.adjust_hue(image / 255.0, _randint(gen, -hue_delta, hue_delta + 1) / 180.0) * 255.0
    if not contrast_first:
        image = contrast(image)
    return image


def normalize(image: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """[3, H, W] in [0, 255] -> normalised float (mean/std given on the [0, 1] scale)."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255.0
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255.0
    return (image.float() - mean_t) / std_t


@dataclasses.dataclass
class TrainTransform:
    """The official training augmentation; returns a normalised image and mask, both padded to `crop_size`."""

    crop_size: int = 504
    scale: tuple[int, int] | None = None  # default (4 * crop, crop), i.e. (2016, 504)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    ignore_index: int = 255

    def crop_box(self, height: int, width: int, gen: torch.Generator) -> tuple[int, int, int, int]:
        top = _randint(gen, 0, max(height - self.crop_size, 0) + 1)
        left = _randint(gen, 0, max(width - self.crop_size, 0) + 1)
        return top, min(top + self.crop_size, height), left, min(left + self.crop_size, width)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, gen: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.scale or (4 * self.crop_size, self.crop_size)
        ratio = _uniform(gen, *self.ratio_range)
        target = (int(scale[0] * ratio), int(scale[1] * ratio))
        image, mask = _resize_pair(image, mask, rescale_size(image.shape[1], image.shape[2], target))
        height, width = image.shape[1:]
        box = self.crop_box(height, width, gen)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                top, bottom, left, right = box
                labels, counts = mask[top:bottom, left:right].unique(return_counts=True)
                counts = counts[labels != self.ignore_index]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self.crop_box(height, width, gen)
        top, bottom, left, right = box
        image, mask = image[:, top:bottom, left:right], mask[top:bottom, left:right]
        if _uniform(gen, 0.0, 1.0) < self.flip_prob:
            image, mask = image.flip(-1), mask.flip(-1)
        if self.photometric:
            image = photometric_distortion(image, gen)
        image = normalize(image, self.mean, self.std)
        pad_h, pad_w = self.crop_size - image.shape[1], self.crop_size - image.shape[2]
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=self.ignore_index)
        return image.contiguous(), mask.contiguous()


def eval_size(height: int, width: int, crop_size: int, patch_size: int) -> tuple[int, int]:
    """Test-time size: short side -> crop size (long side <= 4*crop), then rounded up to a multiple of the patch."""
    h, w = rescale_size(height, width, (4 * crop_size, crop_size))
    return math.ceil(h / patch_size) * patch_size, math.ceil(w / patch_size) * patch_size


@dataclasses.dataclass
class EvalTransform:
    """Test-time preprocessing: resize (`eval_size`) + normalise; the mask is returned unchanged."""

    crop_size: int = 504
    patch_size: int = 14
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None,
                 gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        size = eval_size(image.shape[1], image.shape[2], self.crop_size, self.patch_size)
        resized, _ = _resize_pair(image, None, size)
        return normalize(resized, self.mean, self.std), mask


# ------------------------------------------------------------------------------------------------- datasets


def _files(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in suffixes}


class SegmentationDataset(Dataset):
    """Images and masks matched by file stem (sub-folders allowed). Masks hold class ids; 255 = ignore.

    `dataset[i]` or `dataset[(i, position)]` -> {"pixel_values", "labels", "index"}; `position` seeds the
    augmentation (see `ResumableSampler`). Errors name the file: a mask whose size differs from its image
    (`MaskSizeMismatchError`), labels outside [0, num_classes) other than 255 (`LabelOutOfRangeError`).
    """

    def __init__(self, image_dir: str | os.PathLike, mask_dir: str | os.PathLike, num_classes: int,
                 transform: TrainTransform | EvalTransform | None = None, reduce_zero_label: bool = False,
                 ignore_index: int = 255, seed: int = 0):
        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        for folder, what in ((self.image_dir, "image"), (self.mask_dir, "mask")):
            if not folder.is_dir():
                raise SegmentationDataError(f"{what} folder not found: {folder}")
        images = _files(self.image_dir, IMAGE_SUFFIXES)
        masks = _files(self.mask_dir, MASK_SUFFIXES)
        missing = sorted(set(images) - set(masks))
        if missing:
            raise SegmentationDataError(f"{len(missing)} image(s) in {self.image_dir} have no mask in "
                                        f"{self.mask_dir}: {missing[:5]}")
        if not images:
            raise SegmentationDataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {self.image_dir}")
        self.samples = [(images[k], masks[k]) for k in sorted(images)]
        self.num_classes = num_classes
        self.transform = transform
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index
        self.seed = seed

    @classmethod
    def ade20k(cls, root: str | os.PathLike, split: str = "training", **kwargs) -> SegmentationDataset:
        """ADEChallengeData2016 layout: `root/images/<split>/*.jpg` + `root/annotations/<split>/*.png`,
        150 classes, label 0 ignored (`reduce_zero_label`)."""
        root = Path(root)
        kwargs.setdefault("num_classes", len(ADE20K_CLASSES))
        kwargs.setdefault("reduce_zero_label", True)
        return cls(root / "images" / split, root / "annotations" / split, **kwargs)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw (uint8 image [3,H,W], int64 mask [H,W]) pair, validated."""
        image_path, mask_path = self.samples[index]
        image, mask = read_image(image_path), read_mask(mask_path)
        if tuple(mask.shape) != tuple(image.shape[1:]):
            raise MaskSizeMismatchError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image "
                                        f"{image_path} is {image.shape[2]}x{image.shape[1]} (width x height)")
        if self.reduce_zero_label:
            mask = reduce_zero_label(mask, self.ignore_index)
        bad = (mask != self.ignore_index) & ((mask < 0) | (mask >= self.num_classes))
        if bad.any():
            values = sorted(set(mask[bad].unique().tolist()))
            raise LabelOutOfRangeError(f"mask {mask_path} holds labels {values[:10]} outside [0, {self.num_classes})"
                                       f" (ignore index {self.ignore_index}"
                                       f"{', after reduce_zero_label' if self.reduce_zero_label else ''})")
        return image, mask

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor | int]:
        index, position = key if isinstance(key, tuple) else (key, key)
        image, mask = self.load(index)
        gen = torch.Generator().manual_seed((self.seed * 1_000_000_007 + position) % (2**63))
        if self.transform is not None:
            image, mask = self.transform(image, mask, gen)
        else:
            image = normalize(image)
        return {"pixel_values": image, "labels": mask, "index": index}
