"""Whole-image and sliding-window inference, dataset evaluation (mIoU), mask colouring and overlays."""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .data import EvalTransform, SegmentationDataset, default_palette, read_image
from .errors import CropSizeError
from .heads import resize
from .metrics import ConfusionMeter, SegmentationMetrics

INFERENCE_MODES = ("whole", "slide")


def default_stride(crop_size: int) -> int:
    """Sliding-window stride used when none is given: 2/3 of the crop, rounded (mmseg's ADE20K configs use 341 for
    crop 512). The official InternViT recipes set theirs explicitly (322 for crop 504)."""
    return max(1, round(crop_size * 2 / 3))


def check_crop(crop_size: int, stride: int, patch_size: int) -> None:
    """Raise `CropSizeError` unless the crop is a positive multiple of the patch size and 0 < stride <= crop."""
    if crop_size <= 0 or crop_size % patch_size:
        raise CropSizeError(f"crop size {crop_size} is not a positive multiple of the patch size {patch_size}")
    if not 0 < stride <= crop_size:
        raise CropSizeError(f"stride {stride} must be in (0, crop size {crop_size}]")


def _logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Model logits at the input size; the input is zero-padded (bottom/right) to a multiple of the patch size."""
    patch = model.patch_size
    height, width = pixel_values.shape[-2:]
    pad_h, pad_w = (-height) % patch, (-width) % patch
    if pad_h or pad_w:
        pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))
    logits = model(pixel_values).logits
    return logits[..., :height, :width]


@torch.no_grad()
def whole_inference(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Logits [B, K, H, W] of the whole image in one pass."""
    return _logits(model, pixel_values).float()


@torch.no_grad()
def slide_inference(model: nn.Module, pixel_values: torch.Tensor, crop_size: int = 504,
                    stride: int | None = None) -> torch.Tensor:
    """mmseg sliding-window inference: logits of overlapping `crop_size` windows every `stride` pixels, averaged
    (`stride` None: `default_stride(crop_size)`)."""
    stride = stride or default_stride(crop_size)
    check_crop(crop_size, stride, model.patch_size)
    batch, _, height, width = pixel_values.shape
    rows = max(height - crop_size + stride - 1, 0) // stride + 1
    cols = max(width - crop_size + stride - 1, 0) // stride + 1
    total, count = None, pixel_values.new_zeros((1, 1, height, width))
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop_size, height), min(c * stride + crop_size, width)
            y1, x1 = max(y2 - crop_size, 0), max(x2 - crop_size, 0)
            logits = _logits(model, pixel_values[:, :, y1:y2, x1:x2]).float()
            if total is None:
                total = logits.new_zeros((batch, logits.shape[1], height, width))
            total[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
    return total / count


def predict_logits(model: nn.Module, pixel_values: torch.Tensor, mode: str = "slide", crop_size: int = 504,
                   stride: int | None = None) -> torch.Tensor:
    """Logits [B, K, H, W] by `mode` "whole" or "slide"."""
    if mode not in INFERENCE_MODES:
        raise ValueError(f"inference mode must be one of {INFERENCE_MODES}, got {mode!r}")
    if mode == "whole":
        return whole_inference(model, pixel_values)
    return slide_inference(model, pixel_values, crop_size, stride)


@torch.no_grad()
def segment_image(model: nn.Module, image: str | os.PathLike | Image.Image | torch.Tensor, mode: str = "slide",
                  crop_size: int | None = None, stride: int | None = None) -> torch.Tensor:
    """Class-id mask [H, W] (int64, original image size) of an image path, PIL image or uint8 tensor [3, H, W].
    `crop_size` defaults to the training crop, `stride` to `default_stride(crop_size)`."""
    if not isinstance(image, torch.Tensor):
        image = read_image(image)
    config = model.config
    crop_size = crop_size or config.crop_size
    transform = EvalTransform(crop_size, model.patch_size, config.mean, config.std)
    pixel_values, _ = transform(image)
    model.eval()
    logits = predict_logits(model, pixel_values[None].to(model.device), mode, crop_size, stride)
    return resize(logits, image.shape[-2:], config.align_corners).argmax(1)[0].cpu()


@torch.no_grad()
def evaluate(model: nn.Module, dataset: SegmentationDataset, mode: str = "slide", crop_size: int | None = None,
             stride: int | None = None, rank: int = 0, world_size: int = 1,
             progress: bool = True) -> SegmentationMetrics:
    """mIoU / per-class IoU / aAcc of `model` on `dataset` (images preprocessed by `EvalTransform`, predictions
    resized back to the original mask size). Under DDP each rank takes every `world_size`-th image."""
    from tqdm.auto import tqdm

    config = model.config
    crop_size = crop_size or config.crop_size
    if not isinstance(dataset.transform, EvalTransform):
        raise TypeError("evaluate() needs a dataset built with an EvalTransform")
    meter = ConfusionMeter(config.num_classes, config.ignore_index)
    was_training = model.training
    model.eval()
    indices = range(rank, len(dataset), world_size)
    for index in tqdm(indices, desc="eval", disable=not progress or rank != 0):
        sample = dataset[index]
        labels = sample["labels"]
        logits = predict_logits(model, sample["pixel_values"][None].to(model.device), mode, crop_size, stride)
        pred = resize(logits, labels.shape[-2:], config.align_corners).argmax(1)[0]
        meter.update(pred, labels)
    model.train(was_training)
    meter.all_reduce()
    return meter.compute()


def colorize(mask: torch.Tensor | np.ndarray, palette: Sequence[Sequence[int]] | None = None,
             num_classes: int | None = None, ignore_index: int = 255) -> Image.Image:
    """RGB image of a class-id mask; ids without a colour (and the ignore index) are black."""
    mask = torch.as_tensor(np.asarray(mask)).long()
    if palette is None:
        valid = mask[mask != ignore_index]
        palette = default_palette(num_classes or (int(valid.max()) + 1 if valid.numel() else 1))
    colours = torch.tensor(palette, dtype=torch.uint8)
    out = torch.zeros((*mask.shape, 3), dtype=torch.uint8)
    known = (mask >= 0) & (mask < len(colours)) & (mask != ignore_index)
    out[known] = colours[mask[known]]
    return Image.fromarray(out.numpy(), mode="RGB")


def overlay(image: Image.Image, mask: torch.Tensor | np.ndarray, palette: Sequence[Sequence[int]] | None = None,
            num_classes: int | None = None, alpha: float = 0.5) -> Image.Image:
    """The image blended with its coloured mask (`alpha` = weight of the mask colours)."""
    colour = colorize(mask, palette, num_classes)
    return Image.blend(image.convert("RGB").resize(colour.size), colour, alpha)
