"""The transformers-native `-hf` layout (`InternVLForConditionalGeneration`, `InternVLVisionModel`) <-> ours.

One table of key templates per model maps this package's module keys to the keys transformers writes; both
directions come from it. InternViT's fused `attn.qkv` is split into `q_proj` / `k_proj` / `v_proj` on export and
fused back while loading, as a stream: the fused tensor is filled part by part as the parts arrive (one layer's at a
time in storage order), never from a second copy of the model. Config maps: `vision_config_to_hf` / `vision_config_from_hf`, `chat_config_to_hf` / `chat_config_from_hf`;
fields with no transformers counterpart (template, tiling, ...) are kept as extra keys of the `-hf` config.json,
which transformers carries along unchanged.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from internvl_fm.errors import ConfigError, WeightLoadingError

__all__ = ["KeyMap", "VISION_KEYS", "CHAT_KEYS", "vision_to_transformers", "chat_to_transformers",
           "normalize_hf_chat_keys", "vision_config_to_hf", "vision_config_from_hf", "chat_config_to_hf",
           "chat_config_from_hf", "HF_ARCHITECTURES"]

# transformers architecture -> ours (for model-kind checks and `internvl_fm.loading.load`)
HF_ARCHITECTURES = {"InternVLForConditionalGeneration": "InternVLChatModel", "InternVLVisionModel": "InternVisionModel",
                    "InternVLModel": "transformers.InternVLModel"}

Entry = tuple[str, "str | tuple[str, ...]"]


def _compile(template: str) -> re.Pattern:
    """`encoder.layers.{i}.mlp.{p}` -> a regex with named groups (`{i}`: a number, `{p}`: the rest)."""
    parts = re.split(r"\{(\w+)\}", template)
    groups = {"i": r"\d+", "p": r".+"}
    return re.compile("".join(re.escape(s) if n % 2 == 0 else f"(?P<{s}>{groups[s]})" for n, s in enumerate(parts)))


class KeyMap:
    """Renames between our keys and transformers' keys, from `(ours, theirs)` templates; `theirs` may be a tuple: our
    tensor is then split into equal parts along dim 0 (and fused back when loading)."""

    def __init__(self, entries: Iterable[Entry]):
        self.entries = [(ours, (theirs,) if isinstance(theirs, str) else tuple(theirs)) for ours, theirs in entries]
        self._ours = [(_compile(ours), theirs) for ours, theirs in self.entries]
        self._theirs = [(_compile(t), ours, slot, theirs)
                        for ours, theirs in self.entries for slot, t in enumerate(theirs)]

    def to_hf(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our keys -> transformers keys (fused tensors split: views, no copy). A key with no -hf name (a module
        transformers' class does not have, e.g. an adapter) raises LayoutError naming it."""
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            for pattern, theirs in self._ours:
                match = pattern.fullmatch(key)
                if match:
                    parts = value.chunk(len(theirs), dim=0) if len(theirs) > 1 else (value,)
                    out.update({t.format(**match.groupdict()): part for t, part in zip(theirs, parts)})
                    break
            else:
                from internvl_fm.loading import LayoutError

                raise LayoutError(f"{key!r} has no transformers -hf name: it cannot be written in the -hf layout")
        return out

    def from_hf(self, items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """(transformers key, tensor) pairs -> (our key, tensor), lazily. A fused tensor is allocated when its first
        part arrives and each part is copied in and dropped, so at most the fused tensors being filled (one layer's,
        in storage order) are held; keys no template knows pass through unchanged (the loader names them
        unexpected). Parts whose siblings never come raise WeightLoadingError naming the missing keys."""
        pending: dict[str, tuple[torch.Tensor, set[int]]] = {}  # fused tensor being filled, slots still empty
        names: dict[str, tuple[str, ...]] = {}
        for key, value in items:
            for pattern, ours, slot, theirs in self._theirs:
                match = pattern.fullmatch(key)
                if match:
                    break
            else:
                yield key, value
                continue
            fields = match.groupdict()
            target = ours.format(**fields)
            if len(theirs) == 1:
                yield target, value
                continue
            if target not in pending:  # the fused tensor is allocated once; each part is copied in as it arrives
                fused = value.new_empty((value.shape[0] * len(theirs), *value.shape[1:]))
                pending[target] = fused, set(range(len(theirs)))
                names[target] = tuple(t.format(**fields) for t in theirs)
            fused, empty = pending[target]
            if slot not in empty or fused.shape != (value.shape[0] * len(theirs), *value.shape[1:]):
                raise WeightLoadingError(f"{key}: shape {list(value.shape)} does not fit the other parts of "
                                         f"{target} (or the key is stored twice)")
            fused.narrow(0, slot * value.shape[0], value.shape[0]).copy_(value)
            empty.discard(slot)
            del value
            if not empty:
                del pending[target], names[target]
                yield target, fused
        if pending:
            missing = [names[t][i] for t, (_, empty) in pending.items() for i in sorted(empty)]
            raise WeightLoadingError(f"the -hf checkpoint lacks {len(missing)} tensors needed to rebuild fused "
                                     f"projections: {', '.join(missing[:12])}")


# InternViT, relative to the vision tower: ours (the official names) -> transformers InternVLVisionModel
_VISION_ENTRIES: tuple[Entry, ...] = (
    ("embeddings.class_embedding", "embeddings.cls_token"),
    ("embeddings.position_embedding", "embeddings.position_embeddings"),
    ("embeddings.patch_embedding.{p}", "embeddings.patch_embeddings.projection.{p}"),
    ("encoder.layers.{i}.attn.qkv.{p}", ("encoder.layer.{i}.attention.q_proj.{p}",
                                         "encoder.layer.{i}.attention.k_proj.{p}",
                                         "encoder.layer.{i}.attention.v_proj.{p}")),
    ("encoder.layers.{i}.attn.proj.{p}", "encoder.layer.{i}.attention.projection_layer.{p}"),
    ("encoder.layers.{i}.attn.q_norm.{p}", "encoder.layer.{i}.attention.q_norm.{p}"),
    ("encoder.layers.{i}.attn.k_norm.{p}", "encoder.layer.{i}.attention.k_norm.{p}"),
    ("encoder.layers.{i}.norm1.{p}", "encoder.layer.{i}.layernorm_before.{p}"),
    ("encoder.layers.{i}.norm2.{p}", "encoder.layer.{i}.layernorm_after.{p}"),
    ("encoder.layers.{i}.ls1", "encoder.layer.{i}.lambda_1"),
    ("encoder.layers.{i}.ls2", "encoder.layer.{i}.lambda_2"),
    ("encoder.layers.{i}.mlp.{p}", "encoder.layer.{i}.mlp.{p}"),
)


def _prefixed(entries: Iterable[Entry], ours: str, theirs: str) -> list[Entry]:
    return [(ours + o, theirs + t if isinstance(t, str) else tuple(theirs + x for x in t)) for o, t in entries]


VISION_KEYS = KeyMap(_VISION_ENTRIES)
# InternVL-Chat: ours -> the keys transformers' save_pretrained writes (and the hub -hf repos hold). The language
# model keeps its transformers names (InternLM2 LLMs are Llama modules here, as in the -hf repos).
CHAT_KEYS = KeyMap([
    *_prefixed(_VISION_ENTRIES, "vision_model.", "vision_tower."),
    ("mlp1.0.{p}", "multi_modal_projector.layer_norm.{p}"),
    ("mlp1.1.{p}", "multi_modal_projector.linear_1.{p}"),
    ("mlp1.3.{p}", "multi_modal_projector.linear_2.{p}"),
    ("language_model.{p}", "language_model.{p}"),
])
# transformers' in-memory names (`InternVLForConditionalGeneration().state_dict()`) -> the on-disk names above
_HF_MEMORY_PREFIXES = (("model.vision_tower.", "vision_tower."),
                       ("model.multi_modal_projector.", "multi_modal_projector."),
                       ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."))


def vision_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official InternViT keys -> transformers `InternVLVisionModel` keys (fused qkv split into q/k/v)."""
    return VISION_KEYS.to_hf(state_dict)


def chat_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`InternVLChatModel` module keys -> the keys of a transformers `InternVLForConditionalGeneration` checkpoint."""
    return CHAT_KEYS.to_hf(state_dict)


def normalize_hf_chat_keys(items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Accept both -hf key spellings: `model.language_model.*` / `lm_head.*` (transformers v5 module names) are read
    as the on-disk `language_model.model.*` / `language_model.lm_head.*`."""
    for key, value in items:
        for memory, disk in _HF_MEMORY_PREFIXES:
            if key.startswith(memory):
                key = disk + key[len(memory):]
                break
        yield key, value


# ---------------------------------------------------------------------------------------------------- configs
_VISION_RENAMES = (("qkv_bias", "attention_bias"), ("qk_normalization", "use_qk_norm"),
                   ("initializer_factor", "layer_scale_init_value"), ("dropout", "projection_dropout"))
# transformers-only vision fields: the values InternViT implements (anything else cannot be built here)
_VISION_FIXED = {"use_mean_pooling": True, "use_mask_token": False, "use_absolute_position_embeddings": True}
_CHAT_RENAMES = (("select_layer", "vision_feature_layer"), ("img_context_token_id", "image_token_id"))
_CHAT_FIXED = {"projector_hidden_act": "gelu", "vision_feature_select_strategy": "default"}
# neither written into nor read from the other layout
_NOT_CARRIED = {"model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "auto_map",
                "_name_or_path", "_commit_hash"}
_CHAT_NOT_CARRIED = _NOT_CARRIED | {"hidden_size", "tie_word_embeddings", "ps_version", "image_seq_length",
                                    "text_config", "llm_config", "vision_config"}
# what an -hf repo of InternVL 2.5 / 3 / 3.5 means where its config.json does not say (the official configs' values)
_HUB_DEFAULTS = {"template": "internvl2_5", "dynamic_image_size": True, "use_thumbnail": True,
                 "min_dynamic_patch": 1, "max_dynamic_patch": 12}
# transformers' InternVLVisionConfig defaults (official names), for -hf configs that leave a field out
_HF_VISION_DEFAULTS = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "qkv_bias": False,
                       "qk_normalization": False, "intermediate_size": 4096, "norm_type": "layer_norm",
                       "layer_norm_eps": 1e-6, "image_size": 448, "patch_size": 14, "initializer_factor": 0.1}
_QK_NORM_EPS = 1e-6  # transformers' InternVLVisionAttention builds its q/k RMSNorms with the default eps


def _square(value: Any, name: str, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"{where}: {name} {list(value)} is not square; InternViT needs square sizes")
        value = value[0]
    return value


def _check_fixed(data: dict[str, Any], fixed: dict[str, Any], where: str) -> None:
    for key, value in fixed.items():
        if key in data and data[key] != value:
            raise ConfigError(f"{where}: {key} = {data[key]!r} is not supported (internvl-fm builds {key} = "
                              f"{value!r} only)")


def _check_qk_norm_eps(official: dict[str, Any], where: str) -> None:
    if official.get("qk_normalization") and official.get("layer_norm_eps", _QK_NORM_EPS) != _QK_NORM_EPS:
        raise ConfigError(f"{where}: q/k normalization with layer_norm_eps {official['layer_norm_eps']} has no -hf "
                          f"equivalent (transformers' InternVLVisionModel uses eps {_QK_NORM_EPS} there)")


def vision_config_to_hf(official: dict[str, Any]) -> dict[str, Any]:
    """An official InternViT config dict -> a transformers `InternVLVisionConfig` dict (model_type
    `internvl_vision`); official fields transformers lacks are kept as extra keys."""
    _check_qk_norm_eps(official, "vision_config")
    out = {k: v for k, v in official.items() if k not in _NOT_CARRIED}
    if "torch_dtype" in official:
        out["dtype"] = official["torch_dtype"]
    for ours, theirs in _VISION_RENAMES:
        if ours in out:
            out[theirs] = out.pop(ours)
    for key in ("image_size", "patch_size"):
        if key in out:
            out[key] = [out[key], out[key]]
    out.update(_VISION_FIXED, hidden_dropout_prob=0.0, model_type="internvl_vision")
    return out


def vision_config_from_hf(hf: dict[str, Any], where: str = "vision_config") -> dict[str, Any]:
    """A transformers `InternVLVisionConfig` dict -> an official InternViT config dict (ConfigError for settings
    InternViT cannot build: a final layernorm, a mask token, no position embeddings, non-square sizes, q/k norm
    with another eps)."""
    _check_fixed(hf, _VISION_FIXED, where)
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (InternViT uses 'gelu')")
    out = {k: v for k, v in hf.items() if k not in _NOT_CARRIED and k not in _VISION_FIXED
           and k != "hidden_dropout_prob"}
    for ours, theirs in _VISION_RENAMES:
        if theirs in out:
            out[ours] = out.pop(theirs)
    out = {**_HF_VISION_DEFAULTS, **out}
    for key in ("image_size", "patch_size"):
        out[key] = _square(out[key], key, where)
    _check_qk_norm_eps(out, where)
    for key in ("torch_dtype", "dtype"):
        if key in hf:
            out["torch_dtype"] = hf[key]
    out["model_type"] = "intern_vit_6b"
    return out


def chat_config_to_hf(config: Any, image_token_id: int | None = None) -> dict[str, Any]:
    """An `InternVLChatConfig` -> a transformers `InternVLConfig` dict (`InternVLForConditionalGeneration`).

    `image_token_id` defaults to the config's `img_context_token_id`. Template, tiling and system message travel as
    extra keys, so loading the folder back gives the same config; `ps_version` v1 has no -hf equivalent
    (ConfigError)."""
    from internvl_fm.models.chat_llm import llm_config_to_hf

    if config.ps_version != "v2":
        raise ConfigError(f"ps_version {config.ps_version!r} has no -hf equivalent (transformers' InternVL shuffles "
                          "pixels as ps_version 'v2')")
    token_id = image_token_id if image_token_id is not None else config.img_context_token_id
    if token_id is None:
        raise ConfigError("the -hf layout needs the <IMG_CONTEXT> token id: attach the tokenizer or set "
                          "config.img_context_token_id")
    official = config.to_dict()
    out = {k: v for k, v in official.items() if k not in _CHAT_NOT_CARRIED}
    for ours, theirs in _CHAT_RENAMES:
        out.pop(ours, None)
    out.update(
        architectures=["InternVLForConditionalGeneration"], model_type="internvl",
        vision_config=vision_config_to_hf(official["vision_config"]), text_config=llm_config_to_hf(config.llm_config),
        vision_feature_layer=config.select_layer, image_token_id=int(token_id), image_seq_length=config.num_image_token,
        downsample_ratio=config.downsample_ratio, tie_word_embeddings=False, **_CHAT_FIXED)
    if "torch_dtype" in official:
        out["dtype"] = official["torch_dtype"]
    return out


def chat_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """A transformers `InternVLConfig` dict -> an official `internvl_chat` config dict (ConfigError for what
    InternVL-Chat cannot build: several feature layers, the CLS token kept, another projector activation).

    Keys the -hf config lacks take the values of the official InternVL 2.5 / 3 / 3.5 configs: template
    `internvl2_5`, 1..12 tiles plus a thumbnail, `ps_version` v2, tiles of the vision tower's image size."""
    from internvl_fm.models.chat_llm import llm_config_from_hf

    if not isinstance(hf.get("text_config"), dict) or not isinstance(hf.get("vision_config"), dict):
        raise ConfigError(f"{where}: a transformers -hf InternVL config needs text_config and vision_config "
                          "(a vision-only folder loads with InternVisionModel)")
    _check_fixed(hf, _CHAT_FIXED, where)
    layer = hf.get("vision_feature_layer", -1)
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ConfigError(f"{where}: vision_feature_layer {layer!r} is not supported (one layer index only)")
    token_id, vocab_size = hf.get("image_token_id"), hf["text_config"].get("vocab_size")
    if isinstance(token_id, int) and isinstance(vocab_size, int) and not 0 <= token_id < vocab_size:
        raise ConfigError(f"{where}: image_token_id {token_id} is outside the text model's {vocab_size}-token "
                          "vocabulary")
    vision = vision_config_from_hf(hf["vision_config"], f"{where}: vision_config")
    out = {**_HUB_DEFAULTS, "force_image_size": vision["image_size"]}
    out.update({k: v for k, v in hf.items() if k not in _CHAT_NOT_CARRIED and k not in _CHAT_FIXED
                and k not in {theirs for _, theirs in _CHAT_RENAMES}})
    out.update(vision_config=vision, llm_config=llm_config_from_hf(hf["text_config"]), select_layer=layer,
               ps_version="v2", model_type="internvl_chat", architectures=["InternVLChatModel"])
    if "image_token_id" in hf:
        out["img_context_token_id"] = hf["image_token_id"]
    dtype = hf.get("dtype", hf.get("torch_dtype"))
    if dtype is not None:
        out["torch_dtype"] = dtype
    return out
