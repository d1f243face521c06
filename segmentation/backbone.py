"""InternViT as a dense-prediction backbone: 2-D feature maps at `out_indices`, optional simple feature pyramid."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch
from torch import nn

from .errors import CropSizeError

# The official pyramid (ViTDet / BEiT style): x4, x2, x1, x0.5 of the patch grid.
PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a [B, C, H, W] map, computed in float32 (the official `channels_first` LN)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return (self.weight.float()[:, None, None] * x + self.bias.float()[:, None, None]).to(dtype)


def _init_deconv(module: nn.Module) -> None:
    if isinstance(module, nn.ConvTranspose2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        nn.init.normal_(module.weight, std=(2.0 / fan_out) ** 0.5)
        nn.init.zeros_(module.bias)


class InternViTBackbone(nn.Module):
    """Feature maps [B, C, H/p, W/p] of an `InternVisionModel` at `out_indices` (CLS dropped).

    With `with_pyramid=True` (4 indices), the maps go through the official simple pyramid: `up1` = ConvT(2,2) ->
    LayerNorm2d -> GELU -> ConvT(2,2) (x4), `up2` = ConvT(2,2) (x2), `up3` = identity, `up4` = MaxPool(2) (x0.5).
    A frozen backbone runs under `no_grad` and stays in eval mode; the pyramid always trains. `bf16=True` runs the
    ViT (and pyramid) under bfloat16 autocast; the returned maps are always float32.
    """

    def __init__(self, vit: nn.Module, out_indices: Sequence[int] = (-1,), with_pyramid: bool = False,
                 frozen: bool = True, bf16: bool = False):
        super().__init__()
        self.vit = vit
        depth = vit.config.num_hidden_layers
        self.out_indices = [int(i) for i in out_indices]
        for i in self.out_indices:
            if not -depth <= i < depth:
                raise ValueError(f"out_index {i} out of range for a backbone with {depth} layers")
        self.embed_dim = vit.config.hidden_size
        self.patch_size = vit.config.patch_size
        self.num_layers = depth
        self.with_pyramid = with_pyramid
        self.bf16 = bf16
        if with_pyramid:
            if len(self.out_indices) != 4:
                raise ValueError(f"the feature pyramid needs exactly 4 out_indices, got {self.out_indices}")
            d = self.embed_dim
            self.up1 = nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2), LayerNorm2d(d), nn.GELU(),
                                     nn.ConvTranspose2d(d, d, 2, 2))
            self.up2 = nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2))
            self.up3 = nn.Identity()
            self.up4 = nn.MaxPool2d(kernel_size=2, stride=2)
            self.apply(_init_deconv)
        self.frozen = False
        if frozen:
            self.freeze()
            if bf16:  # a frozen ViT is only read: keep its weights in bf16 as the official recipe does
                self.vit.to(torch.bfloat16)

    @property
    def out_channels(self) -> list[int]:
        return [self.embed_dim] * len(self.out_indices)

    @property
    def out_strides(self) -> list[float]:
        if self.with_pyramid:
            return [self.patch_size / s for s in PYRAMID_SCALES]
        return [float(self.patch_size)] * len(self.out_indices)

    def freeze(self) -> None:
        """Stop gradients into the ViT (the pyramid stays trainable) and keep it in eval mode."""
        self.frozen = True
        self.vit.requires_grad_(False)
        self.vit.eval()

    def train(self, mode: bool = True) -> InternViTBackbone:
        super().train(mode)
        if self.frozen:
            self.vit.eval()
        return self

    def resize_pos_embeddings(self, image_size: int) -> None:
        """Resize the stored position embedding once for the training crop (bicubic, CLS kept)."""
        if image_size % self.patch_size:
            raise CropSizeError(f"crop size {image_size} is not divisible by the patch size {self.patch_size}")
        self.vit.resize_pos_embeddings(image_size)

    def _autocast(self, device: torch.device):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        batch, _, height, width = pixel_values.shape
        h, w = height // self.patch_size, width // self.patch_size
        grad = torch.is_grad_enabled() and not self.frozen
        with self._autocast(pixel_values.device), torch.set_grad_enabled(grad):
            tokens = self.vit.forward_intermediates(pixel_values, self.out_indices)
        maps = [t[:, 1:].transpose(1, 2).reshape(batch, self.embed_dim, h, w) for t in tokens]
        if not self.with_pyramid:
            return [m.float() for m in maps]
        with self._autocast(pixel_values.device):
            maps = [self.up1(maps[0]), self.up2(maps[1]), self.up3(maps[2]), self.up4(maps[3])]
        return [m.float() for m in maps]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, out_indices: Sequence[int] = (-1,), with_pyramid: bool = False,
                        frozen: bool = True, bf16: bool = False, image_size: int | None = None,
                        drop_path_rate: float | None = None) -> InternViTBackbone:
        """Wrap a standalone InternViT checkpoint or the vision tower (`vision_model.*`) of a full InternVL one."""
        backbone = cls(load_vit(path, drop_path_rate), out_indices, with_pyramid=with_pyramid, frozen=frozen,
                       bf16=bf16)
        if image_size is not None:
            backbone.resize_pos_embeddings(image_size)
        return backbone


def load_vit(path: str | os.PathLike, drop_path_rate: float | None = None) -> nn.Module:
    """`InternVisionModel` from a standalone InternViT folder or the vision tower of a full InternVL checkpoint
    (hub ids allowed), optionally with a new stochastic-depth rate for fine-tuning."""
    from internvl_fm.models.configuration_intern_vit import InternVisionConfig
    from internvl_fm.models.modeling_intern_vit import InternVisionModel

    config = InternVisionConfig.from_pretrained(path)
    if drop_path_rate is not None:
        config.drop_path_rate = drop_path_rate
    return InternVisionModel.from_pretrained(path, config=config)
