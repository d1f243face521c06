"""InternVL-14B-224px architecture: InternViT + QLLaMA -> InternVL-C (contrastive) and InternVL-G (generative).

Method names follow the official remote code (`encode_image`, `encode_text`, `forward(image=, text=, mode=)`,
`generate`), so switching from `trust_remote_code` is a one-import change.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from internvl_fm.loading import PretrainedMixin
from internvl_fm.models.configuration_internvl import MODES, InternVLConfig, Mode
from internvl_fm.models.configuration_qllama import build_qllama_config
from internvl_fm.models.modeling_intern_vit import InternVisionModel
from internvl_fm.models.modeling_qllama import QLlamaForCausalLM
from internvl_fm.processing import InternVLImageProcessor, InternVLProcessor


class CrossAttention(nn.Module):
    """Attention with separate q/k/v weights and separate biases (keys `q`, `k`, `v`, `q_bias`, ...)."""

    def __init__(self, dim: int, num_heads: int, out_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.k_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, nq, _ = x.shape
        q = F.linear(x, self.q.weight, self.q_bias).view(batch, nq, self.num_heads, -1).transpose(1, 2)
        k = F.linear(k, self.k.weight, self.k_bias).view(batch, k.shape[1], self.num_heads, -1).transpose(1, 2)
        v = F.linear(v, self.v.weight, self.v_bias).view(batch, v.shape[1], self.num_heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, nq, -1))


class AttentionPoolingBlock(nn.Module):
    """`clip_projector`: attention pooling with the mean token as the single query, then a projection."""

    def __init__(self, dim: int, num_heads: int, out_dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm1_q = nn.LayerNorm(dim, eps=eps)
        self.norm1_k = nn.LayerNorm(dim, eps=eps)
        self.norm1_v = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = CrossAttention(dim, num_heads, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = x.mean(1, keepdim=True)
        out = self.cross_attn(self.norm1_q(query), k=self.norm1_k(x), v=self.norm1_v(x))
        return out.squeeze(1)


@dataclasses.dataclass
class TextEncoderOutput(ModelOutput):
    """Text-encoder outputs for diffusion models: token states, pooled (projected EOS) embedding and the mask."""

    last_hidden_state: torch.Tensor | None = None
    pooled_output: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None


def _new_qllama(config: InternVLConfig) -> QLlamaForCausalLM:
    return QLlamaForCausalLM(build_qllama_config(config.qllama_config, config.vision_config.hidden_size,
                                                 config.num_query_token, config.cross_attention_frequency))


def eos_pool(hidden_states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The hidden state at index `(ids > 0).sum(1) - 1` of each row (the EOS of a right-padded, pad-0 batch)."""
    index = (input_ids > 0).sum(1) - 1
    if (index < 0).any():
        raise ValueError("a text row is all padding (id 0); every text needs at least its BOS/EOS tokens")
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), index]


class TextTowerMixin:
    """The text side shared by InternVLModel and InternVLTextModel: QLLaMA causal pass + EOS pooling."""

    qllama: QLlamaForCausalLM
    text_projection: nn.Parameter
    tokenizer: Any

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed QLLaMA hidden states of text tokens (causal, no query tokens, no vision)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = input_ids > 0
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
        out = self.qllama.model(input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=positions)
        return out.last_hidden_state

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) text embeddings: EOS-pooled QLLaMA state @ text_projection."""
        hidden = self.get_text_features(input_ids, input_ids > 0)
        return eos_pool(hidden, input_ids) @ self.text_projection

    def encode_text_tokens(self, input_ids: torch.Tensor) -> TextEncoderOutput:
        """Token-level hidden states + pooled embedding + mask (the text-encoder API for diffusion models)."""
        mask = input_ids > 0
        hidden = self.get_text_features(input_ids, mask)
        return TextEncoderOutput(last_hidden_state=hidden, pooled_output=eos_pool(hidden, input_ids) @ self.text_projection,
                                 attention_mask=mask.long())

    def _tied_weights(self) -> dict[str, str]:
        if self.config.tie_word_embeddings:
            return {"qllama.lm_head.weight": "qllama.model.embed_tokens.weight"}
        return {}

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer attached: load it from a folder with tokenizer files or set "
                             "model.tokenizer = InternVLTokenizer(...)")
        return self.tokenizer

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str] | str, mode: Mode = "InternVL-C", batch_size: int = 64) -> torch.Tensor:
        """L2-normalised float32 text embeddings [N, D] (the same for both modes: C and G share the text tower)."""
        _check_mode(mode)
        texts = [texts] if isinstance(texts, str) else list(texts)
        tokenizer = self._require_tokenizer()
        device = self.text_projection.device
        chunks = []
        for start in range(0, len(texts), batch_size):
            ids = tokenizer(texts[start:start + batch_size], padding="longest")["input_ids"].to(device)
            chunks.append(F.normalize(self.encode_text(ids).float(), dim=-1))
        if not chunks:
            return torch.empty(0, self.text_projection.shape[1])
        return torch.cat(chunks).cpu()

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], drop_prefix: bool = True) -> TextEncoderOutput:
        """Diffusion text encoding of raw prompts (MuLan protocol): `summarize:` prefix, padding to max_length + 3;
        with `drop_prefix` the prefix tokens after BOS are removed from the token states and the mask."""
        tokenizer = self._require_tokenizer()
        batch = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.max_length + 3)
        ids = batch["input_ids"].to(self.text_projection.device)
        out = self.encode_text_tokens(ids)
        if drop_prefix:
            n = tokenizer.prefix_length
            keep = lambda t: torch.cat([t[:, :1], t[:, 1 + n:]], dim=1)  # noqa: E731
            out = TextEncoderOutput(last_hidden_state=keep(out.last_hidden_state), pooled_output=out.pooled_output,
                                    attention_mask=keep(out.attention_mask))
        return out

    def _after_load(self, folder: Path, load_tokenizer: bool) -> None:
        """Attach the tokenizer stored with the checkpoint (None when it has none or it is not wanted)."""
        from internvl_fm.tokenization import InternVLTokenizer, has_tokenizer_files

        wanted = load_tokenizer and has_tokenizer_files(folder)
        self.tokenizer = InternVLTokenizer.from_pretrained(folder) if wanted else None


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")


class InternVLModel(TextTowerMixin, PretrainedMixin, nn.Module):
    """InternVL-C / InternVL-G: contrastive and generative image-text embeddings, captioning, text encoder."""

    config_class = InternVLConfig
    accepted_architectures = ("InternVLModel",)
    model_kind = "an InternVL-C/G model"
    ignore_on_load = (r"rotary_emb\.inv_freq$",)
    # quantization="int8": the linears of the ViT blocks and of the QLLaMA layers (projectors, heads and embeddings
    # keep the model dtype)
    quantizable_modules = (r"^vision_model\.encoder\.layers\.\d+\.", r"^qllama\.model\.layers\.\d+\.")

    def __init__(self, config: InternVLConfig):
        super().__init__()
        self.config = config
        self.vision_model = InternVisionModel(config.vision_config)
        self.qllama = _new_qllama(config)
        hidden = config.hidden_size
        vision_width = config.vision_config.hidden_size
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_token, hidden))
        self.text_projection = nn.Parameter(torch.empty(hidden, config.clip_embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.clip_projector = AttentionPoolingBlock(vision_width, config.attn_pool_num_heads, config.clip_embed_dim)
        self.clip_projector2 = AttentionPoolingBlock(hidden, config.attn_pool_num_heads, config.clip_embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        # the image transform and the tokenizer (attached by from_pretrained) in one object
        self.processor = InternVLProcessor(InternVLImageProcessor(config.image_size, mode="retrieval"))

    # ----------------------------------------------------------------------------------------------- properties
    @property
    def tokenizer(self) -> Any:
        """The InternVLTokenizer of the checkpoint (``None`` when the folder has none): ``processor.tokenizer``."""
        return self.processor.tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        self.processor.tokenizer = tokenizer

    @property
    def image_processor(self) -> InternVLImageProcessor:
        """The image transform: ``processor.image_processor``."""
        return self.processor.image_processor

    @image_processor.setter
    def image_processor(self, image_processor: InternVLImageProcessor) -> None:
        self.processor.image_processor = image_processor

    @property
    def embed_dim(self) -> int:
        return self.config.clip_embed_dim

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_model.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_model.device

    def gradient_checkpointing_enable(self) -> None:
        """Recompute activations in the backward pass of both towers (training memory / compute trade)."""
        self.vision_model.gradient_checkpointing_enable()
        self.qllama.model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.vision_model.gradient_checkpointing_disable()
        self.qllama.model.gradient_checkpointing = False

    # ------------------------------------------------------------------------------------------------- image side
    def get_image_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ViT last_hidden_state, QLLaMA query-token states): the query tokens attend bidirectionally."""
        backbone = self.vision_model(pixel_values).last_hidden_state
        queries = self.query_tokens.expand(backbone.shape[0], -1, -1)
        out = self.qllama.model(inputs_embeds=queries, vision_hidden_states=backbone, causal=False)
        return backbone, out.last_hidden_state

    def encode_image(self, pixel_values: torch.Tensor, mode: Mode = "InternVL-C") -> torch.Tensor:
        """Raw image embeddings. C: clip_projector(ViT). G: normalize(C) + normalize(clip_projector2(QLLaMA))."""
        _check_mode(mode)
        if mode == "InternVL-C":
            return self.clip_projector(self.vision_model(pixel_values).last_hidden_state)
        backbone, queries = self.get_image_features(pixel_values)
        return F.normalize(self.clip_projector(backbone), dim=-1) + F.normalize(self.clip_projector2(queries), dim=-1)

    def forward(self, image: torch.Tensor, text: torch.Tensor, mode: Mode = "InternVL-C"
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image [N_img, N_txt], logits_per_text) = exp(logit_scale) * cosine similarities."""
        image_embeds = F.normalize(self.encode_image(image, mode=mode), dim=-1)
        text_embeds = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_embeds @ text_embeds.t()
        return logits_per_image, logits_per_image.t()

    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **generate_kwargs: Any) -> torch.Tensor:
        """Caption token ids (new tokens only). Prompt e.g. "English caption:" tokenised without EOS."""
        vision = self.vision_model(pixel_values).last_hidden_state
        batch = vision.shape[0]
        if input_ids.shape[0] != batch:
            raise ValueError(f"{input_ids.shape[0]} prompts for {batch} images")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        queries = self.query_tokens.expand(batch, -1, -1)
        inputs_embeds = torch.cat([queries, self.qllama.get_input_embeddings()(input_ids)], dim=1)
        mask = torch.cat([attention_mask.new_ones(batch, queries.shape[1]), attention_mask], dim=1)
        generate_kwargs.setdefault("max_new_tokens", 30)
        return self.qllama.generate(inputs_embeds=inputs_embeds, attention_mask=mask, vision_hidden_states=vision,
                                    use_zero_attention_mask=True, **generate_kwargs)

    @torch.no_grad()
    def caption(self, images: Sequence[Any], prompt: str = "English caption:", **generate_kwargs: Any) -> list[str]:
        """Captions for PIL images / paths (greedy by default; pass num_beams=5, min_new_tokens=8 like the card)."""
        tokenizer = self._require_tokenizer()
        pixel_values = self._pixels(images)
        ids = tokenizer.tokenize_prompt([prompt] * pixel_values.shape[0]).to(self.device)
        out = self.generate(pixel_values, ids, torch.ones_like(ids), **generate_kwargs)
        return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]

    # ------------------------------------------------------------------------------------------ convenience API
    def _pixels(self, images: Any) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            pixel_values = images
        else:
            pixel_values = self.image_processor(list(images) if not isinstance(images, (str, os.PathLike)) else [images])
        return pixel_values.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def embed_images(self, images: Any, mode: Mode = "InternVL-C", batch_size: int = 32) -> torch.Tensor:
        """L2-normalised float32 image embeddings [N, D] from PIL images, paths or a pre-processed tensor."""
        _check_mode(mode)
        items = images if isinstance(images, torch.Tensor) else (
            [images] if isinstance(images, (str, os.PathLike)) or hasattr(images, "convert") else list(images))
        chunks = [F.normalize(self.encode_image(self._pixels(items[i:i + batch_size]), mode=mode).float(), dim=-1)
                  for i in range(0, len(items), batch_size)]
        if not chunks:
            return torch.empty(0, self.embed_dim)
        return torch.cat(chunks).cpu()


class InternVLTextModel(TextTowerMixin, PretrainedMixin, nn.Module):
    """Only the text side of InternVL-C/G (QLLaMA + text_projection): a text encoder that never builds the ViT."""

    config_class = InternVLConfig
    accepted_architectures = ("InternVLModel",)
    model_kind = "an InternVL-C/G text encoder"
    quantizable_modules = (r"^qllama\.model\.layers\.\d+\.",)  # quantization="int8": the QLLaMA layers

    def __init__(self, config: InternVLConfig):
        super().__init__()
        self.config = config
        self.qllama = _new_qllama(config)
        self.text_projection = nn.Parameter(torch.empty(config.hidden_size, config.clip_embed_dim))
        self.tokenizer = None

    @classmethod
    def _select_keys(cls, model: nn.Module, stored: list[str]) -> tuple[str, list[str]]:
        return "", [k for k in stored if k.startswith("qllama.") or k == "text_projection"]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TextEncoderOutput:
        """Token states [B, T, H], pooled projected EOS embedding [B, D] and the mask."""
        if attention_mask is not None and not torch.equal(attention_mask.bool(), input_ids > 0):
            raise ValueError("InternVL text encoding requires attention_mask == (input_ids > 0) (pad id 0)")
        return self.encode_text_tokens(input_ids)
