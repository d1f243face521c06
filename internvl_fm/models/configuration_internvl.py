"""Configuration of InternVL-14B-224px (InternVL-C / InternVL-G): InternViT + QLLaMA, official field names."""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from internvl_fm.configuration_utils import ConfigBase
from internvl_fm.models.configuration_intern_vit import InternVisionConfig

Mode = Literal["InternVL-C", "InternVL-G"]
MODES = ("InternVL-C", "InternVL-G")


@dataclasses.dataclass
class InternVLConfig(ConfigBase):
    """Configuration of InternVL-C/G (field names of the official `InternVLConfig`)."""

    model_type = "internvl"
    architecture = "InternVLModel"

    vision_config: InternVisionConfig = dataclasses.field(default_factory=InternVisionConfig)
    qllama_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    clip_embed_dim: int = 768
    attn_pool_num_heads: int = 16
    num_query_token: int = 96
    label_smoothing: float = 0.0
    cross_attention_frequency: int = 2
    use_backbone_lora: int = 0
    use_qllama_lora: int = 0
    force_image_size: int | None = None
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.vision_config, dict):
            self.vision_config = InternVisionConfig.from_dict(self.vision_config)
        if self.force_image_size and self.force_image_size != self.vision_config.image_size:
            # The reference resizes the position embedding at init; the checkpoint stores the resized one.
            self.vision_config.image_size = self.force_image_size

    @property
    def hidden_size(self) -> int:
        return int(self.qllama_config.get("hidden_size", 4096))

    @property
    def image_size(self) -> int:
        return self.force_image_size or self.vision_config.image_size

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["hidden_size"] = self.hidden_size
        return out
