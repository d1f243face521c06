"""Every model with its configuration, transformers-style: `configuration_<name>.py` holds the config dataclass,
`modeling_<name>.py` the nn.Module(s); all load and save through `internvl_fm.loading.PretrainedMixin`.

| model | configuration | modeling |
|---|---|---|
| InternViT (6B / 300M) | configuration_intern_vit | modeling_intern_vit |
| QLLaMA | configuration_qllama | modeling_qllama |
| InternVL-C / InternVL-G | configuration_internvl | modeling_internvl |
| InternVL-Chat | configuration_internvl_chat | modeling_internvl_chat (+ chat_llm: LLM builders, InternLM2 <-> Llama) |
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "InternVisionConfig": "configuration_intern_vit",
    "InternVisionModel": "modeling_intern_vit",
    "build_qllama_config": "configuration_qllama",
    "QLlamaForCausalLM": "modeling_qllama",
    "MODES": "configuration_internvl",
    "InternVLConfig": "configuration_internvl",
    "InternVLModel": "modeling_internvl",
    "InternVLTextModel": "modeling_internvl",
    "TextEncoderOutput": "modeling_internvl",
    "InternVLChatConfig": "configuration_internvl_chat",
    "InternVLChatModel": "modeling_internvl_chat",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
