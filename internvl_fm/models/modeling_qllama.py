"""QLLaMA: LLaMA decoder blocks with cross-attention from learned query tokens to InternViT features.

Faithful to the InternVL-14B-224px reference: cross-attention sub-blocks in layers `idx % cross_attention_frequency
== 0`, applied to the first `num_query_token` positions only and only when the step carries them (prefill); rotary
base 10000 whatever `rope_theta` says; RMSNorm as the reference computes it; queries bidirectional when
`use_zero_attention_mask`. Generation runs through transformers' GenerationMixin with a DynamicCache (greedy,
sampling and beam search, all generation kwargs).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

ROPE_BASE = 10000.0  # the reference QLLaMA rotary embedding ignores rope_theta


class QLlamaRMSNorm(nn.Module):
    """The reference LlamaRMSNorm: variance in float32, cast to the weight dtype for half weights."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, 1, T, head_dim] for integer positions (computed in float32, rotate_half layout)."""
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class QLlamaSelfAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = config.hidden_size // self.num_heads
        bias = bool(getattr(config, "attention_bias", False))
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, hidden_states: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, past_key_values: Cache | None) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos_sin
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class QLlamaCrossAttention(nn.Module):
    """Query tokens attend to ViT tokens (incl. CLS): no rotary, no mask; width of k/v from the vision config."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        hidden, vision = config.hidden_size, config.vision_hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(vision, hidden, bias=False)
        self.v_proj = nn.Linear(vision, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.norm1 = QLlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.norm2 = QLlamaRMSNorm(vision, eps=config.rms_norm_eps)

    def forward(self, queries: torch.Tensor, vision_states: torch.Tensor) -> torch.Tensor:
        batch, nq, _ = queries.shape
        queries = self.norm1(queries)
        vision_states = self.norm2(vision_states)
        q = self.q_proj(queries).view(batch, nq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(vision_states).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(vision_states).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(batch, nq, -1))


class QLlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class QLlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.num_query_token = config.num_query_token
        self.self_attn = QLlamaSelfAttention(config, layer_idx)
        if layer_idx % config.cross_attention_frequency == 0:
            self.cross_attn = QLlamaCrossAttention(config)
        else:
            self.cross_attn = None
        self.mlp = QLlamaMLP(config)
        self.input_layernorm = QLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = QLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, past_key_values: Cache | None,
                vision_hidden_states: torch.Tensor | None) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), cos_sin, attention_mask,
                                                       past_key_values)
        nq = self.num_query_token
        if self.cross_attn is not None and vision_hidden_states is not None and hidden_states.size(1) >= nq:
            queries, text = hidden_states[:, :nq], hidden_states[:, nq:]
            queries = queries + self.cross_attn(queries, vision_hidden_states)
            hidden_states = torch.cat([queries, text], dim=1)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def build_attention_mask(attention_mask: torch.Tensor | None, batch: int, q_len: int, past_len: int,
                         dtype: torch.dtype, device: torch.device, causal: bool,
                         zero_query_block: int = 0) -> torch.Tensor | None:
    """Additive mask [B, 1, q_len, past_len + q_len] (0 = attend, finfo.min = blocked), None if nothing is blocked.

    `zero_query_block` > 0 un-blocks the top-left block of that size (bidirectional query tokens in prefill).
    """
    kv_len = past_len + q_len
    blocked = torch.zeros(batch, 1, q_len, kv_len, dtype=torch.bool, device=device)
    if causal:
        rows = torch.arange(past_len, kv_len, device=device)[:, None]
        cols = torch.arange(kv_len, device=device)[None, :]
        blocked |= (cols > rows)[None, None]
    if attention_mask is not None:
        if attention_mask.shape != (batch, kv_len):
            raise ValueError(f"attention_mask must have shape {(batch, kv_len)}, got {tuple(attention_mask.shape)}")
        blocked |= (attention_mask == 0)[:, None, None, :]
    if zero_query_block:
        nq = max(0, min(zero_query_block - past_len, q_len))
        blocked[:, :, :nq, :zero_query_block] = False
    if not blocked.any():
        return None
    return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(blocked, torch.finfo(dtype).min)


class QLlamaPreTrainedModel(PreTrainedModel):
    config_class = LlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QLlamaDecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, QLlamaRMSNorm):
            nn.init.ones_(module.weight)


# transformers >= 5.24 names the cache field of model outputs `cache` (the old name still works, with a deprecation
# message on every step); older releases `past_key_values`.
OUTPUT_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) \
    else "past_key_values"


def _one_cache(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    """The KV cache passed under either name (`past_key_values`, or `cache` as transformers >= 5.24 passes it)."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("pass the KV cache once: as past_key_values or as cache, not both")
    return past_key_values if past_key_values is not None else cache


class QLlamaModel(QLlamaPreTrainedModel):
    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(QLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = QLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                vision_hidden_states: torch.Tensor | None = None, use_zero_attention_mask: bool = False,
                causal: bool = True, cache: Cache | None = None) -> BaseModelOutputWithPast:
        """Decoder forward. `attention_mask` is 2-D over past + current tokens; `causal=False` makes every token
        see every other (used for the InternVL-G query tokens). `cache` is the name transformers >= 5.24 gives the
        KV cache (`past_key_values` before)."""
        past_key_values = _one_cache(past_key_values, cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seq, _ = inputs_embeds.shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = attention_mask.long().cumsum(-1) - 1
                position_ids = position_ids.masked_fill(attention_mask == 0, 1)[:, -seq:]
            else:
                position_ids = torch.arange(past_len, past_len + seq, device=inputs_embeds.device)[None].expand(batch, -1)
        zero_block = self.config.num_query_token if use_zero_attention_mask else 0
        mask = build_attention_mask(attention_mask, batch, seq, past_len, inputs_embeds.dtype, inputs_embeds.device,
                                    causal=causal, zero_query_block=zero_block)
        cos_sin = rotary_cos_sin(position_ids, self.layers[0].self_attn.head_dim, inputs_embeds.dtype)
        if vision_hidden_states is not None:
            vision_hidden_states = vision_hidden_states.to(inputs_embeds.dtype)
        hidden_states = inputs_embeds
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden_states = torch.utils.checkpoint.checkpoint(layer, hidden_states, cos_sin, mask, past_key_values,
                                                                  vision_hidden_states, use_reentrant=False)
            else:
                hidden_states = layer(hidden_states, cos_sin, mask, past_key_values, vision_hidden_states)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states,
                                       **{OUTPUT_CACHE_FIELD: past_key_values if use_cache else None})


class QLlamaForCausalLM(QLlamaPreTrainedModel, GenerationMixin):
    """QLLaMA with its LM head (captioning); `generate` accepts `vision_hidden_states` and
    `use_zero_attention_mask` as model kwargs."""

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.model = QLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, vision_hidden_states: torch.Tensor | None = None,
                use_zero_attention_mask: bool = False, logits_to_keep: int = 0, cache: Cache | None = None,
                return_dict: bool = True, output_attentions: bool = False,
                output_hidden_states: bool = False) -> CausalLMOutputWithPast:
        """Logits (and the loss when `labels` are given). The arguments `generate` passes are named here: anything
        else raises a TypeError instead of being dropped silently."""
        if not return_dict or output_attentions or output_hidden_states:
            raise ValueError("QLlamaForCausalLM returns a CausalLMOutputWithPast only: return_dict=False, "
                             "output_attentions and output_hidden_states are not supported")
        past_key_values = _one_cache(past_key_values, cache)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             vision_hidden_states=vision_hidden_states,
                             use_zero_attention_mask=use_zero_attention_mask)
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{OUTPUT_CACHE_FIELD: getattr(outputs, OUTPUT_CACHE_FIELD)})
