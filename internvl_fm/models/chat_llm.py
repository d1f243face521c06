"""The language model of InternVL-Chat, built from transformers' native classes (no remote code).

``llm_config["architectures"][0]`` picks the class: Llama, Qwen2, Phi3 and Qwen3 checkpoints load natively (the
official repo ships copies of these classes with the same key names; Qwen3 is checked on tiny random models only);
InternLM2 checkpoints are converted at load time to the Llama layout (fused ``wqkv`` split per key/value group,
renamed modules) and converted back on save, so the files on disk always keep the official InternLM2 layout.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from internvl_fm.errors import ConfigError

__all__ = [
    "SUPPORTED_LLM_ARCHITECTURES",
    "UnsupportedLLMError",
    "build_llm_config",
    "export_llm_config",
    "build_language_model",
    "llm_architecture",
    "internlm2_to_llama",
    "llama_to_internlm2",
    "convert_llm_state_dict",
    "export_llm_state_dict",
    "llm_config_to_hf",
    "llm_config_from_hf",
]

INTERNLM2 = "InternLM2ForCausalLM"

# official architecture -> (transformers config class, transformers model class)
_NATIVE: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("LlamaConfig", "LlamaForCausalLM"),
    INTERNLM2: ("LlamaConfig", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("Qwen2Config", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("Qwen3Config", "Qwen3ForCausalLM"),
    "Phi3ForCausalLM": ("Phi3Config", "Phi3ForCausalLM"),
}
SUPPORTED_LLM_ARCHITECTURES = tuple(_NATIVE)

# Keys of old (<= 4.4x) configs that only steer remote code or generation; not part of the architecture.
_DROP_KEYS = {
    "auto_map", "_commit_hash", "transformers_version", "attn_implementation", "_attn_implementation",
    "torch_dtype", "dtype", "model_type", "bad_words_ids", "begin_suppress_tokens", "diversity_penalty", "do_sample",
    "early_stopping", "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "forced_bos_token_id",
    "forced_eos_token_id", "length_penalty", "max_length", "min_length", "no_repeat_ngram_size", "num_beam_groups",
    "num_beams", "num_return_sequences", "output_scores", "remove_invalid_values", "repetition_penalty",
    "return_dict_in_generate", "suppress_tokens", "temperature", "top_k", "top_p", "typical_p",
}

# InternLM2 config field -> Llama config field (identical meaning).
_INTERNLM2_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache",
    "pad_token_id", "bos_token_id", "eos_token_id", "rope_theta", "rope_scaling",
)


class UnsupportedLLMError(ConfigError):
    """``llm_config.architectures`` names a language model this package cannot build."""


def llm_architecture(llm_dict: dict[str, Any]) -> str:
    """The official architecture name of an ``llm_config`` dict (``architectures[0]``)."""
    archs = llm_dict.get("architectures") or []
    if not archs:
        raise UnsupportedLLMError("llm_config has no 'architectures' entry; cannot tell which LLM to build "
                                  f"(supported: {', '.join(SUPPORTED_LLM_ARCHITECTURES)})")
    if archs[0] not in _NATIVE:
        raise UnsupportedLLMError(f"unsupported LLM architecture {archs[0]!r}; supported: "
                                  f"{', '.join(SUPPORTED_LLM_ARCHITECTURES)}")
    return archs[0]


def _transformers_attr(name: str):
    import transformers

    return getattr(transformers, name)


def _legacy_rope_fixups(arch: str, kwargs: dict[str, Any]) -> None:
    scaling = kwargs.get("rope_scaling")
    if not isinstance(scaling, dict):
        return
    scaling = dict(scaling)
    kind = scaling.get("rope_type", scaling.get("type"))
    if arch == "Phi3ForCausalLM" and kind in ("su", "yarn", "longrope"):
        # Phi-3 128k repo code calls it "su"; transformers wants "longrope" with the original context length inside.
        if kind == "su":
            scaling["type"] = scaling["rope_type"] = "longrope"
        if "original_max_position_embeddings" in kwargs:
            scaling.setdefault("original_max_position_embeddings", kwargs["original_max_position_embeddings"])
    kwargs["rope_scaling"] = scaling


def build_llm_config(llm_dict: dict[str, Any], attn_implementation: str = "sdpa"):
    """A transformers config for an official ``llm_config`` dict (InternLM2 -> ``LlamaConfig``).

    ``architectures`` keeps the official name, so :func:`export_llm_config` can write the official layout back.
    Word embeddings are never tied (``InternVLChatConfig`` forces ``tie_word_embeddings=False``).
    """
    arch = llm_architecture(llm_dict)
    kwargs = {k: v for k, v in llm_dict.items() if k not in _DROP_KEYS}
    if arch == INTERNLM2:
        kwargs = {k: llm_dict[k] for k in _INTERNLM2_FIELDS if k in llm_dict}
        kwargs["attention_bias"] = bool(llm_dict.get("bias", False))
        kwargs["mlp_bias"] = False
        kwargs["_name_or_path"] = llm_dict.get("_name_or_path", "")
    _legacy_rope_fixups(arch, kwargs)
    kwargs["tie_word_embeddings"] = False
    kwargs["architectures"] = [arch]
    config = _transformers_attr(_NATIVE[arch][0])(**kwargs)
    config._attn_implementation = attn_implementation
    return config


def _legacy_rope(out: dict[str, Any]) -> None:
    """transformers 5 ``rope_parameters`` -> the ``rope_theta`` / ``rope_scaling`` keys of the official configs."""
    params = out.pop("rope_parameters", None)
    if not isinstance(params, dict):
        return
    params = dict(params)
    out["rope_theta"] = params.pop("rope_theta", out.get("rope_theta", 10000.0))
    kind = params.pop("rope_type", "default")
    params.pop("type", None)
    if out.get("architectures", [None])[0] == "Phi3ForCausalLM":
        params.pop("partial_rotary_factor", None)
        params.pop("original_max_position_embeddings", None)
    out["rope_scaling"] = None if kind == "default" else {"type": kind, **params}


def export_llm_config(config, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The official ``llm_config`` dict for a transformers config made by :func:`build_llm_config`.

    ``source`` (the dict the config was read from) contributes the keys transformers does not model (``auto_map``,
    ``_name_or_path``...), so a load / save round trip keeps the file's content.
    """
    arch = (config.architectures or [type(config).__name__.replace("Config", "ForCausalLM")])[0]
    dtype = getattr(config, "dtype", None)
    if arch == INTERNLM2:
        cfg = config.to_dict()
        _legacy_rope(cfg)
        out = {k: cfg[k] for k in _INTERNLM2_FIELDS if k in cfg}
        out.update(bias=bool(config.attention_bias), model_type="internlm2", architectures=[INTERNLM2])
    else:
        out = config.to_dict()
        _legacy_rope(out)
        out.pop("dtype", None)
        out.pop("transformers_version", None)
    out["tie_word_embeddings"] = False
    stored = (source or {}).get("rope_scaling")
    if isinstance(stored, dict) and isinstance(out.get("rope_scaling"), dict):
        # keep the file's spelling ("su" for Phi-3 128k, "type" vs "rope_type") when the parameters are the same
        fields = ("factor", "short_factor", "long_factor")
        if all(stored.get(f) == out["rope_scaling"].get(f) for f in fields):
            out["rope_scaling"] = stored
    merged = {k: v for k, v in (source or {}).items() if k not in ("rope_parameters",)}
    # values transformers normalised away (e.g. Qwen2's unused sliding_window -> None) keep the file's value
    merged.update({k: v for k, v in out.items() if v is not None or k not in merged})
    if dtype is not None:
        merged["torch_dtype"] = str(dtype).removeprefix("torch.")
    return merged


# transformers model_type of an -hf text_config -> the architecture we build
_HF_TEXT_MODELS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                   "phi3": "Phi3ForCausalLM"}


def llm_config_to_hf(config) -> dict[str, Any]:
    """The transformers ``text_config`` dict of a config from :func:`build_llm_config` (an InternLM2 LLM is the
    Llama model it is loaded as; ``architectures`` keeps the official name, as transformers' converter does)."""
    out = config.to_dict()
    for key in ("dtype", "torch_dtype", "transformers_version", "_name_or_path"):
        out.pop(key, None)
    out["tie_word_embeddings"] = False
    return out


def llm_config_from_hf(text: dict[str, Any]) -> dict[str, Any]:
    """An -hf ``text_config`` dict -> an official ``llm_config`` dict; the class follows ``model_type`` (as in
    transformers), a Llama text model named ``InternLM2ForCausalLM`` becomes the official InternLM2 config again."""
    model_type = text.get("model_type", "qwen2")  # InternVLConfig's default text model
    if model_type not in _HF_TEXT_MODELS:
        raise UnsupportedLLMError(f"unsupported -hf text model_type {model_type!r}; supported: "
                                  f"{', '.join(sorted(_HF_TEXT_MODELS))}")
    if model_type == "llama" and (text.get("architectures") or [None])[0] == INTERNLM2:
        config = build_llm_config({**text, "architectures": ["LlamaForCausalLM"]})
        config.architectures = [INTERNLM2]
        return export_llm_config(config)
    return {**text, "architectures": [_HF_TEXT_MODELS[model_type]]}


def build_language_model(config):
    """Instantiate the transformers causal LM for a config from :func:`build_llm_config`."""
    arch = (config.architectures or ["LlamaForCausalLM"])[0]
    model_cls = _transformers_attr(_NATIVE.get(arch, ("", type(config).__name__.replace("Config", "ForCausalLM")))[1])
    return model_cls(config)


# --------------------------------------------------------------------------------------------------------------------
# InternLM2 <-> Llama weights

_INTERNLM2_RENAMES = (
    (r"^model\.tok_embeddings\.", "model.embed_tokens."),
    (r"\.attention\.wo\.", ".self_attn.o_proj."),
    (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
    (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
    (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
    (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"^output\.", "lm_head."),
)
_LLAMA_RENAMES = (
    (r"^model\.embed_tokens\.", "model.tok_embeddings."),
    (r"\.self_attn\.o_proj\.", ".attention.wo."),
    (r"\.mlp\.gate_proj\.", ".feed_forward.w1."),
    (r"\.mlp\.up_proj\.", ".feed_forward.w3."),
    (r"\.mlp\.down_proj\.", ".feed_forward.w2."),
    (r"\.input_layernorm\.", ".attention_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"^lm_head\.", "output."),
)
_WQKV = re.compile(r"^(model\.layers\.\d+)\.attention\.wqkv\.(weight|bias)$")
_QKV = re.compile(r"^(model\.layers\.\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def _rename(key: str, rules: tuple[tuple[str, str], ...]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _gqa_shape(config) -> tuple[int, int, int]:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, heads // kv_heads, head_dim


def internlm2_to_llama(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """InternLM2 LLM keys (no ``language_model.`` prefix) -> transformers Llama keys.

    ``wqkv`` rows are laid out per key/value group as ``[q_0 .. q_{g-1}, k, v]`` (each ``head_dim`` rows), so
    ``q = W[:, :g]``, ``k = W[:, g]``, ``v = W[:, g+1]`` after viewing it as ``[kv_heads, g+2, head_dim, ...]``.
    """
    kv_heads, groups, head_dim = _gqa_shape(config)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        match = _WQKV.match(key)
        if match is None:
            out[_rename(key, _INTERNLM2_RENAMES)] = tensor
            continue
        layer, kind = match.groups()
        fused = tensor.reshape(kv_heads, groups + 2, head_dim, *tensor.shape[1:])
        rest = tensor.shape[1:]
        out[f"{layer}.self_attn.q_proj.{kind}"] = fused[:, :groups].reshape(-1, *rest)
        out[f"{layer}.self_attn.k_proj.{kind}"] = fused[:, groups].reshape(-1, *rest)
        out[f"{layer}.self_attn.v_proj.{kind}"] = fused[:, groups + 1].reshape(-1, *rest)
    return out


def llama_to_internlm2(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Inverse of :func:`internlm2_to_llama`: fuse q/k/v back into per-group ``wqkv`` and restore InternLM2 names."""
    kv_heads, groups, head_dim = _gqa_shape(config)
    out: dict[str, torch.Tensor] = {}
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = _QKV.match(key)
        if match is None:
            out[_rename(key, _LLAMA_RENAMES)] = tensor
            continue
        layer, which, kind = match.groups()
        parts = pending.setdefault((layer, kind), {})
        parts[which] = tensor
        if len(parts) == 3:
            rest = parts["q"].shape[1:]
            q = parts["q"].reshape(kv_heads, groups, head_dim, *rest)
            k = parts["k"].reshape(kv_heads, 1, head_dim, *rest)
            v = parts["v"].reshape(kv_heads, 1, head_dim, *rest)
            out[f"{layer}.attention.wqkv.{kind}"] = torch.cat([q, k, v], dim=1).reshape(-1, *rest)
            del pending[(layer, kind)]
    if pending:
        raise ValueError(f"incomplete q/k/v projections, cannot fuse wqkv for {sorted(pending)}")
    return out


def convert_llm_state_dict(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Checkpoint LLM keys -> keys of the module :func:`build_language_model` builds (identity unless InternLM2)."""
    if (config.architectures or [None])[0] == INTERNLM2:
        return internlm2_to_llama(state_dict, config)
    return {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}


def export_llm_state_dict(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Module LLM keys -> official checkpoint keys (identity unless InternLM2)."""
    if (config.architectures or [None])[0] == INTERNLM2:
        return llama_to_internlm2(state_dict, config)
    return dict(state_dict)
