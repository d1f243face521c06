"""Configuration of QLLaMA: a transformers LlamaConfig built from the `qllama_config` of an InternVL config."""
from __future__ import annotations

from typing import Any

from transformers import LlamaConfig


def build_qllama_config(qllama_config: dict[str, Any], vision_hidden_size: int, num_query_token: int,
                        cross_attention_frequency: int) -> LlamaConfig:
    """A transformers LlamaConfig carrying the QLLaMA extras (query tokens, cross-attention width/frequency)."""
    data = {k: v for k, v in qllama_config.items() if k not in ("architectures", "model_type", "transformers_version")}
    config = LlamaConfig(**data)
    config.num_query_token = num_query_token
    config.cross_attention_frequency = cross_attention_frequency
    config.vision_hidden_size = vision_hidden_size
    config.tie_word_embeddings = False  # tying is decided by the top-level InternVL config
    return config
