"""Decode heads: the official linear probe (BatchNorm + 1x1 conv), UperNet (PPM + FPN) and the auxiliary FCN head.

Module names follow mmseg 0.x (`conv_seg`, `psp_modules`, `bottleneck`, `lateral_convs`, `fpn_convs`,
`fpn_bottleneck`, `convs`, ConvModule's `conv` / `bn`), so the released head checkpoints load with the keys they
have. Every head takes the list of backbone feature maps and returns logits at the resolution of the map it reads
(UperNet: the finest level).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def resize(x: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize of a [B, C, H, W] tensor (no-op when the size already matches)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


class ConvModule(nn.Sequential):
    """conv (no bias) -> BatchNorm -> ReLU, with mmcv's `ConvModule` child names (`conv`, `bn`, `activate`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, padding: int = 0,
                 dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")


class DecodeHead(nn.Module):
    """Base of the heads: dropout + `conv_seg` classifier (initialised N(0, 0.01) as mmseg)."""

    def __init__(self, channels: int, num_classes: int, dropout_ratio: float, align_corners: bool = False):
        super().__init__()
        self.channels = channels
        self.num_classes = num_classes
        self.align_corners = align_corners
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, feats: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(feats))


class LinearHead(DecodeHead):
    """The official linear probe (`FCNHead(num_convs=0, with_norm=True)`): BatchNorm over the features, 1x1 conv."""

    def __init__(self, in_channels: int, num_classes: int, in_index: int = -1, dropout_ratio: float = 0.0,
                 align_corners: bool = False):
        super().__init__(in_channels, num_classes, dropout_ratio, align_corners)
        self.in_index = in_index
        self.norm = nn.BatchNorm2d(in_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.cls_seg(self.norm(features[self.in_index]))


class PPM(nn.ModuleList):
    """Pyramid pooling module: adaptive average pools at `pool_scales`, 1x1 ConvModule, upsampled back."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int, align_corners: bool = False):
        super().__init__(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels, channels, 1))
                         for s in pool_scales)
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [resize(stage(x), x.shape[2:], self.align_corners) for stage in self]


class UperNetHead(DecodeHead):
    """UperNet (Unified Perceptual Parsing): PPM on the coarsest map + FPN top-down fusion of all levels."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout_ratio: float = 0.1, align_corners: bool = False):
        super().__init__(channels, num_classes, dropout_ratio, align_corners)
        self.in_channels = list(in_channels)
        self.psp_modules = PPM(pool_scales, self.in_channels[-1], channels, align_corners)
        self.bottleneck = ConvModule(self.in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in self.in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in self.in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(self.in_channels) * channels, channels, 3, padding=1)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.in_channels):
            raise ValueError(f"UperNetHead expects {len(self.in_channels)} feature maps, got {len(features)}")
        laterals = [conv(features[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(features[-1]))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:], self.align_corners)
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)] + [laterals[-1]]
        outs = [resize(o, outs[0].shape[2:], self.align_corners) for o in outs]
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(DecodeHead):
    """Auxiliary FCN head (mmseg `FCNHead`, concat_input=False): `num_convs` 3x3 ConvModules then `conv_seg`."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, in_index: int = 1, num_convs: int = 1,
                 kernel_size: int = 3, dropout_ratio: float = 0.1, align_corners: bool = False):
        super().__init__(channels, num_classes, dropout_ratio, align_corners)
        if num_convs < 1:
            raise ValueError("FCNHead needs num_convs >= 1 (use LinearHead for a head without convs)")
        self.in_index = in_index
        pad = kernel_size // 2
        self.convs = nn.Sequential(*(ConvModule(in_channels if i == 0 else channels, channels, kernel_size, pad)
                                     for i in range(num_convs)))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.cls_seg(self.convs(features[self.in_index]))


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255,
                      align_corners: bool = False) -> torch.Tensor:
    """Pixel-wise cross-entropy with logits resized (bilinear) to the label size; `ignore_index` pixels skipped."""
    logits = resize(logits.float(), labels.shape[-2:], align_corners)
    if not (labels != ignore_index).any():  # an all-ignored batch: zero loss that keeps the graph
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index)


def convert_hf_upernet_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of transformers' `UperNetHead` -> this `UperNetHead` (`batch_norm`->`bn`, `classifier`->`conv_seg`)."""
    out = {}
    for key, value in state_dict.items():
        key = key.replace(".batch_norm.", ".bn.")
        if key.startswith("classifier."):
            key = "conv_seg." + key[len("classifier."):]
        out[key] = value
    return out
