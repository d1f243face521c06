"""``InternVLChatConfig``: the official ``internvl_chat`` config.json, read and written unchanged."""
from __future__ import annotations

import dataclasses
from typing import Any

from internvl_fm.configuration_utils import ConfigBase, check_config_dict, is_transformers_hf_layout
from internvl_fm.errors import ConfigError
from internvl_fm.models.configuration_intern_vit import InternVisionConfig

from internvl_fm.models.chat_llm import build_llm_config, export_llm_config
from internvl_fm.chat_templates import get_template

__all__ = ["InternVLChatConfig"]

PS_VERSIONS = ("v1", "v2")


@dataclasses.dataclass
class InternVLChatConfig(ConfigBase):
    """Configuration of InternVL-Chat (field names and defaults of the official ``InternVLChatConfig``).

    ``vision_config`` is the core :class:`~internvl_fm.models.configuration_intern_vit.InternVisionConfig`; ``llm_config`` is a
    transformers config (``LlamaConfig`` for InternLM2 checkpoints, whose ``architectures`` keeps the official name).
    ``system_message=None`` means the template's default system message (configs that carry ``null`` included).
    ``img_context_token_id`` is the id of ``<IMG_CONTEXT>`` for checkpoints that name it (official configs do not:
    then the tokenizer's id is used, see :class:`~internvl_fm.processing_internvl_chat.InternVLChatProcessor`).
    """

    model_type = "internvl_chat"
    architecture = "InternVLChatModel"

    vision_config: InternVisionConfig = dataclasses.field(default_factory=InternVisionConfig)
    llm_config: Any = None
    use_backbone_lora: int = 0
    use_llm_lora: int = 0
    pad2square: bool = False
    select_layer: int = -1
    force_image_size: int | None = None
    downsample_ratio: float = 0.5
    template: str | None = None
    dynamic_image_size: bool = False
    use_thumbnail: bool = False
    ps_version: str = "v1"
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    system_message: str | None = None
    img_context_token_id: int | None = None
    # the llm_config dict as read from disk: keys transformers does not model are written back from it
    llm_source: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.vision_config, dict):
            self.vision_config = InternVisionConfig.from_dict(self.vision_config)
        if self.llm_config is None:
            self.llm_config = {"architectures": ["LlamaForCausalLM"]}
        if isinstance(self.llm_config, dict):
            self.llm_source = dict(self.llm_config)
            self.llm_config = build_llm_config(self.llm_config)
        self.llm_config.tie_word_embeddings = False
        if self.ps_version not in PS_VERSIONS:
            raise ConfigError(f"ps_version must be one of {PS_VERSIONS}, got {self.ps_version!r}")
        inverse = 1 / self.downsample_ratio if self.downsample_ratio > 0 else 0.0
        if not 0 < self.downsample_ratio <= 1 or abs(inverse - round(inverse)) > 1e-6:
            raise ConfigError(f"downsample_ratio must be 1/k for an integer k, got {self.downsample_ratio}")
        token_id, vocab_size = self.img_context_token_id, getattr(self.llm_config, "vocab_size", None)
        if token_id is not None and (not isinstance(token_id, int) or isinstance(token_id, bool)
                                     or not 0 <= token_id < (vocab_size or 2**31)):
            raise ConfigError(f"img_context_token_id {self.img_context_token_id!r} is not a token id of the "
                              f"{vocab_size}-token vocabulary")
        if self.template is not None:
            get_template(self.template)  # unknown names fail here, listing the known ones
        depth = self.vision_config.num_hidden_layers
        if not -(depth + 1) <= self.select_layer <= depth:  # an index into the L+1 hidden states
            raise ConfigError(f"select_layer {self.select_layer} is out of range for a {depth}-layer vision tower")

    @classmethod
    def field_names(cls) -> set[str]:
        return super().field_names() - {"llm_source"}

    @property
    def hidden_size(self) -> int:
        """Hidden size of the language model."""
        return self.llm_config.hidden_size

    @property
    def image_size(self) -> int:
        """Tile size: ``force_image_size`` or the vision tower's ``image_size``."""
        return self.force_image_size or self.vision_config.image_size

    @property
    def num_image_token(self) -> int:
        """Tokens per tile after pixel shuffle: ``(image_size // patch) ** 2 * downsample_ratio ** 2``."""
        return int((self.image_size // self.vision_config.patch_size) ** 2 * (self.downsample_ratio ** 2))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("llm_source", None)
        out["llm_config"] = export_llm_config(self.llm_config, self.llm_source)
        out["hidden_size"] = self.hidden_size
        out["tie_word_embeddings"] = False
        if self.system_message is None and "system_message" not in self.extra:
            out.pop("system_message", None)
        if self.img_context_token_id is None:
            out.pop("img_context_token_id", None)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InternVLChatConfig":
        """Build from an official config dict (``hidden_size`` / ``tie_word_embeddings`` are derived, not read) or a
        transformers-native ``-hf`` one (``InternVLForConditionalGeneration``: converted by
        :func:`internvl_fm.convert.chat_config_from_hf`). An absurd size, or an ``-hf`` setting InternVL-Chat cannot
        build, raises :class:`~internvl_fm.errors.ConfigError`.
        """
        check_config_dict(data, "this config")
        if is_transformers_hf_layout(data):
            from internvl_fm.convert import chat_config_from_hf

            data = chat_config_from_hf(data, "this config")
        data = {k: v for k, v in data.items() if k not in ("hidden_size", "tie_word_embeddings")}
        return super().from_dict(data)
