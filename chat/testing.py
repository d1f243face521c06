"""Tiny random InternVL-Chat models and tokenizers for tests, examples and benchmarks (no download needed)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from internvl_fm.models.configuration_internvl_chat import InternVLChatConfig
from internvl_fm.chat_templates import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN

__all__ = ["SPECIAL_TOKENS", "TINY_IMG_CONTEXT_ID", "tiny_tokenizer", "tiny_chat_config", "tiny_chat_model",
           "save_tiny_chat_checkpoint"]

SPECIAL_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>",
    IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
)
TINY_IMG_CONTEXT_ID = 4 + SPECIAL_TOKENS.index(IMG_CONTEXT_TOKEN)  # its id in tiny_tokenizer()
DEFAULT_WORDS = (
    "a", "the", "cat", "dog", "red", "panda", "photo", "of", "is", "in", "on", "what", "picture", "image", "describe",
    "how", "many", "legs", "does", "it", "have", "system", "user", "assistant", "yes", "no", "two", "four", "tree",
    "sky", "blue", "green", "river", "boat", "night", "and", "with", "there", "are", "this", "that", "frame",
    "Frame1", "Frame2", "Image", "1", "2", ":", "?", ".", ",", "!", "-",
)


def tiny_tokenizer(words: Sequence[str] = DEFAULT_WORDS):
    """A word-level ``PreTrainedTokenizerFast`` with the InternVL and template special tokens.

    Ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3, then the special tokens, then ``words``. Prepends ``<s>``
    like the InternLM2 / Llama tokenizers.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    base = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate([*base, *SPECIAL_TOKENS, *dict.fromkeys(words)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return tokenizer


def tiny_chat_config(
    vocab_size: int,
    llm: str = "qwen2",
    template: str = "Hermes-2",
    vision_hidden: int = 32,
    llm_hidden: int = 64,
    llm_layers: int = 2,
    image_size: int = 28,
    **overrides: Any,
) -> InternVLChatConfig:
    """An ``InternVLChatConfig`` with a tiny InternViT (2 layers) and a tiny LLM (``qwen2``, ``llama``,
    ``internlm2``, ``phi3`` or ``qwen3``); ``image_size`` 28 gives one visual token per tile. It names the
    ``<IMG_CONTEXT>`` id of :func:`tiny_tokenizer` (``img_context_token_id``), so ``forward`` / ``generate`` work
    without a tokenizer attached."""
    archs = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "internlm2": "InternLM2ForCausalLM",
             "phi3": "Phi3ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    if llm not in archs:
        raise ValueError(f"unknown tiny LLM {llm!r}; use one of {sorted(archs)}")
    llm_config: dict[str, Any] = {
        "architectures": [archs[llm]], "vocab_size": vocab_size, "hidden_size": llm_hidden,
        "intermediate_size": 2 * llm_hidden, "num_hidden_layers": llm_layers, "num_attention_heads": 4,
        "num_key_value_heads": 2 if llm != "phi3" else 4, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "hidden_act": "silu",
    }
    if llm == "qwen3":  # Qwen3Config's head_dim defaults to 128, not hidden_size / heads
        llm_config["head_dim"] = llm_hidden // 4
    vision_config = {
        "hidden_size": vision_hidden, "num_attention_heads": 2, "intermediate_size": 2 * vision_hidden,
        "num_hidden_layers": 2, "image_size": image_size, "patch_size": 14, "qkv_bias": True,
        "qk_normalization": False, "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "use_flash_attn": False,
    }
    fields = dict(vision_config=vision_config, llm_config=llm_config, template=template, ps_version="v2",
                  select_layer=-1, downsample_ratio=0.5, force_image_size=image_size, dynamic_image_size=True,
                  use_thumbnail=True, max_dynamic_patch=4, img_context_token_id=TINY_IMG_CONTEXT_ID)
    fields.update(overrides)
    return InternVLChatConfig(**fields)


@torch.no_grad()
def tiny_chat_model(config: InternVLChatConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                    words_only: bool = True):
    """A randomly initialised :class:`InternVLChatModel` (deterministic for a seed), in eval mode.

    ``words_only`` zeroes the LM head rows of the ids :func:`tiny_tokenizer` gives its special tokens, so greedy
    answers are words (never empty, never stopped early by the template's stop token).
    """
    from internvl_fm.models.modeling_internvl_chat import InternVLChatModel

    torch.manual_seed(seed)
    model = InternVLChatModel(config)
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.ndim == 1 and ("norm" in name or name.endswith(("ls1", "ls2")) or "mlp1.0.weight" in name):
            param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
        elif param.ndim == 1:
            param.copy_(0.05 * torch.randn(param.shape, generator=generator))
        else:
            fan_in = param[0].numel() if param.ndim > 1 else 1
            param.copy_(torch.randn(param.shape, generator=generator) / fan_in ** 0.5)
    if words_only:
        model.language_model.get_output_embeddings().weight[:4 + len(SPECIAL_TOKENS)] = 0.0
    return model.to(dtype).eval()


def save_tiny_chat_checkpoint(folder: str | os.PathLike, llm: str = "qwen2", seed: int = 0) -> Path:
    """Write a tiny random chat model with its tokenizer to ``folder`` in the official layout (for the CLI, the
    server and examples: ``internvl-fm chat FOLDER -q "describe this image"``). Returns the folder."""
    tokenizer = tiny_tokenizer()
    model = tiny_chat_model(tiny_chat_config(len(tokenizer), llm=llm), seed=seed)
    model.tokenizer = tokenizer
    return model.save_pretrained(folder)
