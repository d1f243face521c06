"""`SegmentationConfig` and `SegmentationModel`: an InternViT backbone with a linear or UperNet decode head."""
from __future__ import annotations

import dataclasses
import os
import re

import torch
from torch import nn
from transformers.utils import ModelOutput

from internvl_fm.configuration_utils import ConfigBase
from internvl_fm.loading import PretrainedMixin, torch_load_state_dict
from internvl_fm.models.configuration_intern_vit import InternVisionConfig
from internvl_fm.models.modeling_intern_vit import InternVisionModel
from internvl_fm.processing import IMAGENET_MEAN, IMAGENET_STD

from .backbone import InternViTBackbone, load_vit
from .errors import SegmentationConfigError
from .heads import FCNHead, LinearHead, UperNetHead, resize, segmentation_loss

HEAD_TYPES = ("linear", "upernet")


@dataclasses.dataclass
class SegmentationConfig(ConfigBase):
    """Everything needed to rebuild a segmentation model (the ViT shape is in `vision_config`).

    Defaults are the official UperNet head-tuning recipe on InternViT-6B (ADE20K, crop 504).
    """

    model_type = "internvit_segmentation"
    architecture = "InternViTSegmentationModel"

    num_classes: int = 150
    vision_config: InternVisionConfig | dict | None = None
    head: str = "upernet"
    out_indices: list[int] = dataclasses.field(default_factory=lambda: [11, 23, 35, 47])
    with_pyramid: bool = True
    freeze_backbone: bool = True
    crop_size: int = 504
    bf16: bool = False
    channels: int = 1536
    pool_scales: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 3, 6])
    dropout_ratio: float = 0.1
    in_index: int = -1
    auxiliary_head: bool = True
    aux_in_index: int = 1
    aux_channels: int = 1536
    aux_num_convs: int = 1
    aux_loss_weight: float = 0.4
    ignore_index: int = 255
    align_corners: bool = False
    reduce_zero_label: bool = True
    class_names: list[str] | None = None
    palette: list[list[int]] | None = None
    mean: list[float] = dataclasses.field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = dataclasses.field(default_factory=lambda: list(IMAGENET_STD))

    def __post_init__(self) -> None:
        if isinstance(self.vision_config, dict):
            self.vision_config = InternVisionConfig.from_dict(self.vision_config)
        if self.head not in HEAD_TYPES:
            raise SegmentationConfigError(f"head must be one of {HEAD_TYPES}, got {self.head!r}")
        if self.num_classes < 1:
            raise SegmentationConfigError(f"num_classes must be >= 1, got {self.num_classes}")
        if not self.out_indices:
            raise SegmentationConfigError("out_indices is empty")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise SegmentationConfigError(f"{len(self.class_names)} class_names for {self.num_classes} classes")
        if self.palette is not None and len(self.palette) < self.num_classes:
            raise SegmentationConfigError(f"palette has {len(self.palette)} colours for {self.num_classes} classes")
        if self.head == "upernet" and self.auxiliary_head and not (
                -len(self.out_indices) <= self.aux_in_index < len(self.out_indices)):
            raise SegmentationConfigError(f"aux_in_index {self.aux_in_index} does not select one of the "
                                          f"{len(self.out_indices)} feature maps")


@dataclasses.dataclass
class SegmentationOutput(ModelOutput):
    """`logits` [B, K, H, W] at the input resolution; `loss` (decode + weighted auxiliary) when labels are given."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    aux_logits: torch.Tensor | None = None
    decode_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class SegmentationModel(PretrainedMixin, nn.Module):
    """InternViT backbone + decode head (+ auxiliary FCN head). Module names map 1:1 to the official mmseg models
    (`backbone.*` after `convert_official_state_dict`, `decode_head.*`, `auxiliary_head.*`)."""

    config_class = SegmentationConfig
    accepted_architectures = (SegmentationConfig.architecture,)
    model_kind = "a segmentation model (InternViT + decode head, written by `internvl-fm seg-train`)"

    def __init__(self, config: SegmentationConfig, vit: nn.Module | None = None):
        super().__init__()
        if vit is None:
            if config.vision_config is None:
                raise SegmentationConfigError("SegmentationConfig.vision_config is needed to build the backbone")
            vit = InternVisionModel(config.vision_config)
        config.vision_config = vit.config
        self.config = config
        self.backbone = InternViTBackbone(vit, config.out_indices, with_pyramid=config.with_pyramid,
                                          frozen=config.freeze_backbone, bf16=config.bf16)
        if vit.config.image_size != config.crop_size:
            self.backbone.resize_pos_embeddings(config.crop_size)
        width = self.backbone.embed_dim
        if config.head == "linear":
            self.decode_head = LinearHead(width, config.num_classes, in_index=config.in_index,
                                          dropout_ratio=config.dropout_ratio, align_corners=config.align_corners)
        else:
            self.decode_head = UperNetHead(self.backbone.out_channels, config.channels, config.num_classes,
                                           pool_scales=config.pool_scales, dropout_ratio=config.dropout_ratio,
                                           align_corners=config.align_corners)
        self.auxiliary_head = None
        if config.auxiliary_head and config.head == "upernet":
            self.auxiliary_head = FCNHead(width, config.aux_channels, config.num_classes,
                                          in_index=config.aux_in_index, num_convs=config.aux_num_convs,
                                          dropout_ratio=config.dropout_ratio, align_corners=config.align_corners)

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> SegmentationOutput:
        """Logits at the input size; with `labels` [B, H, W] (255 = ignore) also the training loss."""
        features = self.backbone(pixel_values)
        logits = self.decode_head(features)
        aux_logits = self.auxiliary_head(features) if self.auxiliary_head is not None and self.training else None
        out = SegmentationOutput(logits=resize(logits, pixel_values.shape[-2:], self.config.align_corners),
                                 aux_logits=aux_logits)
        if labels is not None:
            ignore = self.config.ignore_index
            out.decode_loss = segmentation_loss(logits, labels, ignore, self.config.align_corners)
            out.loss = out.decode_loss
            if aux_logits is not None:
                out.aux_loss = segmentation_loss(aux_logits, labels, ignore, self.config.align_corners)
                out.loss = out.loss + self.config.aux_loss_weight * out.aux_loss
        return out

    @classmethod
    def from_backbone_checkpoint(cls, config: SegmentationConfig, path: str | os.PathLike,
                                 drop_path_rate: float | None = None) -> SegmentationModel:
        """A new model (random heads) on the InternViT weights of `path` (standalone ViT or full InternVL)."""
        return cls(config, vit=load_vit(path, drop_path_rate))

    @classmethod
    def from_official_checkpoint(cls, config: SegmentationConfig, path: str | os.PathLike) -> SegmentationModel:
        """Load a released InternVL mmseg checkpoint (`.pth`, read by `internvl_fm.loading.torch_load_state_dict`:
        `weights_only=True`, the `state_dict` wrapper removed) into a model built from `config` (which must describe
        the same ViT, head and crop). Keys are renamed by `convert_official_state_dict`; missing / unexpected /
        mis-shaped keys raise `WeightLoadingError`."""
        from internvl_fm.loading import check_state_dict

        state = convert_official_state_dict(torch_load_state_dict(path))
        model = cls(config)
        expected = model.state_dict()
        state = {k: v.to(expected[k].dtype) if k in expected else v for k, v in state.items()}
        check_state_dict(model, state)
        model.load_state_dict(state)
        return model.eval()


# Official pure-PyTorch / mmseg key names of the ViT (spec 1.6) -> this package's names.
_OFFICIAL_VIT_KEYS = [
    (r"^backbone\.cls_token$", "backbone.vit.embeddings.class_embedding"),
    (r"^backbone\.pos_embed$", "backbone.vit.embeddings.position_embedding"),
    (r"^backbone\.patch_embed\.proj\.", "backbone.vit.embeddings.patch_embedding."),
    (r"^backbone\.blocks\.(\d+)\.ls([12])\.gamma$", r"backbone.vit.encoder.layers.\1.ls\2"),
    (r"^backbone\.blocks\.", "backbone.vit.encoder.layers."),
]


def convert_official_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of an official InternVL mmseg checkpoint (`state_dict` of the released `.pth`) -> `SegmentationModel`.

    `decode_head.*`, `auxiliary_head.*` and the pyramid (`backbone.up1/up2`) keep their names; the timm-style ViT
    keys are renamed. A `{'state_dict': ...}` or `{'module': ...}` wrapper is unwrapped.
    """
    for wrapper in ("state_dict", "module"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _OFFICIAL_VIT_KEYS:
            new = re.sub(pattern, repl, key)
            if new != key:
                key = new
                break
        out[key] = value
    return out
