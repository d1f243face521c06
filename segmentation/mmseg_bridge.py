"""Optional mmsegmentation (1.x) bridge: registers the InternViT backbone and the linear probe head in mmseg's
`MODELS` registry, so existing mmseg configs can use them. Never imported by the package; import it yourself::

    import internvl_fm.segmentation.mmseg_bridge as bridge
    bridge.register()
    model = dict(type="EncoderDecoder",
                 backbone=dict(type="InternViTSegBackbone", pretrained="OpenGVLab/InternViT-6B-224px",
                               out_indices=[11, 23, 35, 47], with_pyramid=True, frozen=True, img_size=504),
                 decode_head=dict(type="UPerHead", in_channels=[3200] * 4, in_index=[0, 1, 2, 3], channels=1536,
                                  num_classes=150, ...))

Parameter names equal those of `SegmentationModel` (`backbone.vit.*`, `backbone.up1.*`, `decode_head.*`), so a
checkpoint trained with `internvl-fm seg-train` loads with `load_from` and vice versa. mmseg's own `UPerHead` and
`FCNHead` already have the key names of this package's heads.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .backbone import InternViTBackbone, load_vit

_REGISTERED: dict[str, type] = {}


def register() -> dict[str, type]:
    """Register `InternViTSegBackbone` and `InternViTLinearHead` in `mmseg.registry.MODELS` (idempotent)."""
    if _REGISTERED:
        return dict(_REGISTERED)
    try:
        from mmseg.models.decode_heads.decode_head import BaseDecodeHead
        from mmseg.registry import MODELS
    except ImportError as exc:
        raise ImportError("the mmseg bridge needs mmsegmentation 1.x and mmcv (pip install 'internvl-fm[mmseg]')"
                          ) from exc

    class InternViTSegBackbone(InternViTBackbone):
        """mmseg backbone: feature maps (tuple) of InternViT at `out_indices`, optional simple pyramid."""

        def __init__(self, pretrained: str | None = None, vision_config: dict[str, Any] | None = None,
                     out_indices: Sequence[int] = (-1,), with_pyramid: bool = False, frozen: bool = True,
                     bf16: bool = False, img_size: int | None = None, drop_path_rate: float = 0.0,
                     init_cfg: Any = None):
            from internvl_fm.models.configuration_intern_vit import InternVisionConfig
            from internvl_fm.models.modeling_intern_vit import InternVisionModel

            if pretrained is not None:
                vit = load_vit(pretrained, drop_path_rate)
            elif vision_config is not None:
                vit = InternVisionModel(InternVisionConfig.from_dict({**vision_config,
                                                                     "drop_path_rate": drop_path_rate}))
                vit.init_weights()
            else:
                raise ValueError("InternViTSegBackbone needs `pretrained` (a checkpoint) or `vision_config`")
            super().__init__(vit, out_indices, with_pyramid=with_pyramid, frozen=frozen, bf16=bf16)
            if img_size is not None:
                self.resize_pos_embeddings(img_size)
            self.is_init = True  # weights are in place: mmengine must not re-initialise the ViT

        def init_weights(self) -> None:
            """Weights come from `pretrained` (or the random init at construction)."""

        def forward(self, pixel_values):  # mmseg expects a tuple
            return tuple(super().forward(pixel_values))

    class InternViTLinearHead(BaseDecodeHead):
        """The official linear probe: BatchNorm over the selected feature map, then `conv_seg` (1x1)."""

        def __init__(self, **kwargs: Any):
            kwargs.setdefault("channels", kwargs.get("in_channels"))
            kwargs.setdefault("dropout_ratio", 0.0)
            super().__init__(**kwargs)
            self.norm = nn.BatchNorm2d(self.in_channels)

        def forward(self, inputs):
            return self.cls_seg(self.norm(self._transform_inputs(inputs)))

    for cls in (InternViTSegBackbone, InternViTLinearHead):
        MODELS.register_module(name=cls.__name__, module=cls, force=True)
        _REGISTERED[cls.__name__] = cls
    return dict(_REGISTERED)
