"""Configuration of InternViT, the vision encoder of every InternVL model (6B and 300M styles)."""
from __future__ import annotations

import dataclasses
from typing import Any

from internvl_fm.configuration_utils import ConfigBase

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")


@dataclasses.dataclass
class InternVisionConfig(ConfigBase):
    """Configuration of InternViT (field names and defaults of the official `InternVisionConfig`)."""

    model_type = "intern_vit_6b"
    architecture = "InternVisionModel"

    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 224
    qkv_bias: bool = False
    hidden_size: int = 3200
    num_attention_heads: int = 25
    intermediate_size: int = 12800
    qk_normalization: bool = True
    num_hidden_layers: int = 48
    use_flash_attn: bool = True
    hidden_act: str = "gelu"
    norm_type: str = "rms_norm"
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    drop_path_rate: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 0.1

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.norm_type not in ("rms_norm", "layer_norm"):
            raise ValueError(f"norm_type must be 'rms_norm' or 'layer_norm', got {self.norm_type!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InternVisionConfig":
        """Accepts a vision config or a composite (InternVL / InternVL-Chat) config with a `vision_config` entry, in
        the official layout or transformers' `-hf` one (`internvl_vision`, converted)."""
        if isinstance(data, dict) and isinstance(data.get("vision_config"), dict):
            data = data["vision_config"]
        if isinstance(data, dict) and data.get("model_type") == "internvl_vision":
            from internvl_fm.convert import vision_config_from_hf

            data = vision_config_from_hf(data)
        return super().from_dict(data)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size
