"""``InternVLChatModel``: InternViT + pixel-shuffle MLP projector + a transformers causal LM.

Module attributes, state-dict keys and methods follow the official remote code
(``internvl_chat/internvl/model/internvl_chat/modeling_internvl_chat.py``) so the published checkpoints load unchanged
and scripts written against the model cards keep working.
"""
from __future__ import annotations

import functools
import inspect
import math
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from internvl_fm.convert import CHAT_KEYS, chat_config_to_hf, chat_to_transformers, normalize_hf_chat_keys
from internvl_fm.loading import PretrainedMixin, atomic_write
from internvl_fm.models.modeling_intern_vit import InternVisionModel
from internvl_fm.models.modeling_qllama import OUTPUT_CACHE_FIELD

from internvl_fm.models.configuration_internvl_chat import InternVLChatConfig
from internvl_fm.models.chat_llm import build_language_model, convert_llm_state_dict, export_llm_state_dict
from internvl_fm.chat_templates import IMG_CONTEXT_TOKEN, IMAGE_PLACEHOLDER, get_template
from internvl_fm.processing_internvl_chat import ChatInputs, InternVLChatProcessor

__all__ = ["InternVLChatModel", "ChatInputs", "split_device_map"]

_LLM_PREFIX = "language_model."
_UNSET = object()


def _pixel_shuffle(x: torch.Tensor, scale_factor: float, ps_version: str) -> torch.Tensor:
    """Space-to-depth on ``[N, h, w, C]`` -> ``[N, h*s, w*s, C/s^2]`` with the reference view/permute order.

    ``v1`` leaves the grid transposed (kept for InternVL-Chat-V1-2 style checkpoints); ``v2`` transposes it back.
    """
    n, w, h, c = x.shape
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    if ps_version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


def split_device_map(num_llm_layers: int, num_gpus: int | None = None) -> dict[str, int]:
    """The model cards' ``split_model`` device map for several GPUs.

    GPU 0 holds the vision tower, the projector, the embeddings, the final norm / LM head, the last decoder layer and
    about half its share of the other decoder layers; the remaining layers are spread evenly over the other GPUs.
    """
    num_gpus = torch.cuda.device_count() if num_gpus is None else num_gpus
    if num_gpus < 1:
        raise RuntimeError("device_map='auto' needs at least one CUDA device")
    per_gpu = math.ceil(num_llm_layers / (num_gpus - 0.5))
    counts = [per_gpu] * num_gpus
    counts[0] = math.ceil(per_gpu * 0.5)
    device_map: dict[str, int] = {}
    layer = 0
    for gpu, count in enumerate(counts):
        for _ in range(count):
            if layer < num_llm_layers:
                device_map[f"language_model.model.layers.{layer}"] = gpu
            layer += 1
    for name in ("vision_model", "mlp1", "language_model.model.embed_tokens", "language_model.model.norm",
                 "language_model.model.rotary_emb", "language_model.lm_head"):
        device_map[name] = 0
    device_map[f"language_model.model.layers.{num_llm_layers - 1}"] = 0
    return device_map


class InternVLChatModel(PretrainedMixin, nn.Module):
    """InternVL-Chat multimodal LLM (InternVL 1.5 / 2 / 2.5, Mini-InternVL).

    ``vision_model`` (core InternViT), ``mlp1`` (LayerNorm -> Linear -> GELU -> Linear projector) and
    ``language_model`` (a transformers ``*ForCausalLM``). Image tiles become ``num_image_token`` embeddings each,
    spliced into the prompt at the ``<IMG_CONTEXT>`` positions.

    ``processor`` (:class:`~internvl_fm.processing_internvl_chat.InternVLChatProcessor`, built from the config and
    ``tokenizer``) turns images, video and text into inputs; :meth:`chat`, :meth:`batch_chat` and :meth:`stream_chat`
    use it and leave the model as it was. ``img_context_token_id`` reads the processor's ``<IMG_CONTEXT>`` id; set it
    by hand only for a tokenizer-free checkpoint before calling :meth:`forward` / :meth:`generate` directly.
    """

    config_class = InternVLChatConfig
    accepted_architectures = ("InternVLChatModel",)  # and transformers' InternVLForConditionalGeneration (-hf)
    layouts = ("original", "hf")
    model_kind = "an InternVL-Chat model"
    # quantization="int8" (torchao): the linears of the ViT blocks and of the LLM decoder layers; "bnb-int8"
    # (load_in_8bit, CUDA): the LLM decoder's linears through bitsandbytes
    quantizable_modules = (r"^vision_model\.encoder\.layers\.\d+\.", r"^language_model\.model\.layers\.\d+\.")

    def __init__(self, config: InternVLChatConfig, vision_model: nn.Module | None = None,
                 language_model: nn.Module | None = None):
        super().__init__()
        self.config = config
        vision_config = config.vision_config
        self.patch_size = vision_config.patch_size
        self.select_layer = config.select_layer
        self.template = config.template
        self.num_image_token = config.num_image_token
        self.downsample_ratio = config.downsample_ratio
        self.ps_version = config.ps_version
        self.system_message = config.system_message
        if self.system_message is None and config.template is not None:
            self.system_message = get_template(config.template).system_message

        self.vision_model = vision_model if vision_model is not None else InternVisionModel(vision_config)
        self.language_model = language_model if language_model is not None else build_language_model(config.llm_config)
        vit_hidden = vision_config.hidden_size
        llm_hidden = config.llm_config.hidden_size
        merged = vit_hidden * int(round(1 / self.downsample_ratio)) ** 2
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(merged), nn.Linear(merged, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))
        self._img_context_token_id: Any = _UNSET
        self.tokenizer = None  # also builds self.processor
        self.name_or_path: str | None = None

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.vision_model.embeddings.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_model.embeddings.patch_embedding.weight.dtype

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer (``None`` when the folder has none); setting it rebuilds :attr:`processor`."""
        return self.processor.tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        self.processor = InternVLChatProcessor.from_config(self.config, tokenizer)

    @property
    def img_context_token_id(self) -> int | None:
        """Id of ``<IMG_CONTEXT>``, where :meth:`forward` / :meth:`generate` splice the visual tokens: the processor's
        (tokenizer, else config), unless set by hand as official scripts do (``model.img_context_token_id = ...``)."""
        if self._img_context_token_id is _UNSET:
            return self.processor.image_token_id
        return self._img_context_token_id

    @img_context_token_id.setter
    def img_context_token_id(self, token_id: int | None) -> None:
        self._img_context_token_id = token_id

    def get_processor(self, tokenizer: Any = None) -> InternVLChatProcessor:
        """:attr:`processor`, or (for another ``tokenizer``) a processor of this config with that tokenizer."""
        if (tokenizer is None or tokenizer is self.processor.tokenizer) and self.processor.template == self.template:
            return self.processor
        return InternVLChatProcessor.from_config(self.config, tokenizer, template=self.template)

    def num_parameters(self) -> int:
        """Number of parameters (works on the meta device)."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------------------------------ vision side
    def pixel_shuffle(self, x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
        """Pixel shuffle of ``[N, h, w, C]`` features, ``ps_version`` of the config."""
        return _pixel_shuffle(x, scale_factor, self.ps_version)

    def _vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.select_layer == -1:
            return self.vision_model(pixel_values=pixel_values).last_hidden_state
        depth = self.config.vision_config.num_hidden_layers
        index = self.select_layer % (depth + 1)  # index into [embeddings, block_0, ..., block_{L-1}]
        if index == 0:
            return self.vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[0]
        # block index-1 is the last one needed: stop there instead of running the whole tower
        return self.vision_model.forward_intermediates(pixel_values, [index - 1])[0]

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[tiles, 3, S, S]`` -> ``[tiles, num_image_token, llm_hidden]`` visual tokens for the LLM."""
        vit_embeds = self._vision_features(pixel_values.to(self.dtype))[:, 1:, :]
        h = w = int(vit_embeds.shape[1] ** 0.5)
        if h * w != vit_embeds.shape[1]:
            raise ValueError(f"extract_feature needs square tiles; got {vit_embeds.shape[1]} patches per tile")
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], h, w, -1)
        vit_embeds = self.pixel_shuffle(vit_embeds, scale_factor=self.downsample_ratio)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1])
        return self.mlp1(vit_embeds)

    # ------------------------------------------------------------------------------------------------ splice
    def _embed_with_images(self, input_ids: torch.Tensor, vit_embeds: torch.Tensor | None,
                           image_token_id: int | None = None) -> torch.Tensor:
        embeddings = self.language_model.get_input_embeddings()
        input_embeds = embeddings(input_ids.to(embeddings.weight.device))
        if vit_embeds is None:
            return input_embeds
        token_id = image_token_id if image_token_id is not None else self.img_context_token_id
        if token_id is None:
            raise ValueError("img_context_token_id is not set: this model has no tokenizer and its config names no "
                             "img_context_token_id; pass image_token_id=tokenizer.convert_tokens_to_ids("
                             "'<IMG_CONTEXT>') or set model.img_context_token_id before forward()/generate()")
        batch, seq, hidden = input_embeds.shape
        input_embeds = input_embeds.reshape(batch * seq, hidden).clone()
        selected = input_ids.reshape(batch * seq).to(input_embeds.device) == token_id
        vit_embeds = vit_embeds.reshape(-1, hidden).to(device=input_embeds.device, dtype=input_embeds.dtype)
        num_slots = int(selected.sum())
        if num_slots != vit_embeds.shape[0]:
            raise ValueError(
                f"the prompt has {num_slots} {IMG_CONTEXT_TOKEN} tokens (id {token_id}) but the "
                f"images give {vit_embeds.shape[0]} visual tokens ({self.num_image_token} per tile); "
                "check num_patches_list")
        input_embeds[selected] = input_embeds[selected] * 0.0 + vit_embeds
        return input_embeds.reshape(batch, seq, hidden)

    def forward(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        image_flags: torch.Tensor | None = None,
        past_key_values: Any = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = True,
        cache: Any = None,
        image_token_id: int | None = None,
    ) -> CausalLMOutputWithPast:
        """Logits (and the shifted cross-entropy loss when ``labels`` are given; ``-100`` is ignored).

        ``image_flags`` ``[tiles, 1]`` marks real tiles (1) and dummy tiles of text-only samples (0); default all 1.
        The KV cache may be passed as ``past_key_values`` or ``cache`` (its name from transformers 5.24 on); it is
        handed to the language model under the name its ``forward`` takes. ``return_dict=False`` returns the
        output's tuple (``(loss, logits, ...)``, ``None`` fields left out). ``image_token_id`` defaults to
        :attr:`img_context_token_id`. Unknown keyword arguments raise.
        """
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the KV cache once: cache= or past_key_values=, not both")
        cache = cache if cache is not None else past_key_values
        vit_embeds = None
        if pixel_values is not None:
            vit_embeds = self.extract_feature(pixel_values)
            if image_flags is not None:
                vit_embeds = vit_embeds[image_flags.reshape(-1).to(vit_embeds.device) == 1]
        input_embeds = self._embed_with_images(input_ids, vit_embeds, image_token_id)
        outputs = self.language_model(
            inputs_embeds=input_embeds, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=use_cache, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=True, **{_cache_argument(type(self.language_model)): cache})
        logits = outputs.logits
        loss = None
        if labels is not None:
            shift_logits = logits[..., :-1, :].contiguous().float()
            shift_labels = labels[..., 1:].contiguous().to(shift_logits.device)
            loss = nn.functional.cross_entropy(shift_logits.view(-1, shift_logits.shape[-1]), shift_labels.view(-1),
                                               ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions, **{OUTPUT_CACHE_FIELD: _output_cache(outputs)})
        return out if return_dict is not False else out.to_tuple()

    @torch.inference_mode()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
        generation_config: Any = None,
        output_hidden_states: bool | None = None,
        image_token_id: int | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Generate from a prompt with images; returns only the NEW token ids ``[batch, new_tokens]``.

        ``visual_features`` (output of :meth:`extract_feature`) skips the vision tower; ``image_token_id`` defaults
        to :attr:`img_context_token_id`. Other keyword arguments go to
        the language model's ``generate`` (``max_new_tokens``, ``do_sample``, ``eos_token_id``, ``streamer``...).
        """
        if input_ids is None:
            raise ValueError("generate() needs input_ids")
        vit_embeds = None
        if pixel_values is not None or visual_features is not None:
            vit_embeds = visual_features if visual_features is not None else self.extract_feature(pixel_values)
        input_embeds = self._embed_with_images(input_ids, vit_embeds, image_token_id)
        if attention_mask is not None:
            attention_mask = attention_mask.to(input_embeds.device)
        generate_kwargs.setdefault("use_cache", True)
        return self.language_model.generate(
            inputs_embeds=input_embeds, attention_mask=attention_mask, generation_config=generation_config,
            output_hidden_states=output_hidden_states, **generate_kwargs)

    # ------------------------------------------------------------------------------------------------ chat
    def decode_response(self, tokenizer, output_ids: torch.Tensor, stop: str) -> list[str]:
        """Decode generated ids like the official chat(): skip special tokens, cut at the stop string, strip."""
        return self.get_processor(tokenizer).decode(output_ids, stop)

    def prepare_chat_inputs(
        self,
        tokenizer,
        pixel_values: torch.Tensor | None,
        question: str,
        history: Sequence[tuple[str, str]] | None = None,
        num_patches_list: Sequence[int] | None = None,
        system_message: str | None = None,
    ) -> ChatInputs:
        """The prompt of one chat turn, built exactly as the official ``chat()`` and tokenized (ids on the model's
        device). ``system_message=None`` uses :attr:`system_message`. See :meth:`chat` for the placeholder rules."""
        inputs = self.get_processor(tokenizer)(
            question, pixel_values=pixel_values, num_patches_list=num_patches_list, history=history,
            system_message=system_message if system_message is not None else self.system_message)
        return inputs.to(self.device)

    def _generate_answer(self, inputs: ChatInputs, pixel_values: torch.Tensor | None,
                         generation_config: dict[str, Any]) -> torch.Tensor:
        return self.generate(pixel_values=pixel_values, input_ids=inputs.input_ids,
                             attention_mask=inputs.attention_mask, image_token_id=inputs.image_token_id,
                             **{**generation_config, "eos_token_id": inputs.eos_token_id})

    def chat(
        self,
        tokenizer,
        pixel_values: torch.Tensor | None,
        question: str,
        generation_config: dict[str, Any],
        history: list[tuple[str, str]] | None = None,
        return_history: bool = False,
        num_patches_list: Sequence[int] | None = None,
        verbose: bool = False,
        system_message: str | None = None,
    ) -> str | tuple[str, list[tuple[str, str]]]:
        """One chat turn, as the official ``chat()``.

        Without history and without ``<image>`` in the question, ``"<image>\\n"`` is prepended when images are given;
        every ``<image>`` (earlier turns included) is expanded in order with the tile counts of ``num_patches_list``
        (default: all tiles are one image). A ``streamer`` in ``generation_config`` receives the tokens as they are
        generated (see also :meth:`stream_chat`). ``system_message`` replaces :attr:`system_message` for this call.
        """
        inputs = self.prepare_chat_inputs(tokenizer, pixel_values, question, history, num_patches_list,
                                          system_message)
        output_ids = self._generate_answer(inputs, pixel_values, generation_config)
        response = self.decode_response(tokenizer, output_ids, inputs.stop)[0]
        history = [*(history or []), (inputs.question, response)]
        if verbose:
            shown = inputs.query.replace(IMG_CONTEXT_TOKEN, "").replace("<img></img>", IMAGE_PLACEHOLDER)
            print(shown, response)
        return (response, history) if return_history else response

    def batch_chat(
        self,
        tokenizer,
        pixel_values: torch.Tensor | None,
        questions: Sequence[str],
        generation_config: dict[str, Any],
        num_patches_list: Sequence[int] | None = None,
        history: Any = None,
        return_history: bool = False,
        image_counts: Sequence[int] | None = None,
        system_message: str | None = None,
    ) -> list[str]:
        """Single-turn answers for several questions at once (one image per question, left-padded batch).

        ``num_patches_list[i]`` tiles of ``pixel_values`` belong to question ``i``. The tokenizer is left as it was
        (the official code leaves its padding side at ``"left"``).
        """
        if history is not None or return_history:
            raise NotImplementedError("batch_chat() answers single-turn questions; use chat() for multi-turn history")
        if image_counts is not None:
            num_patches_list = image_counts
        inputs = self.get_processor(tokenizer).batch(
            questions, pixel_values, num_patches_list,
            system_message=system_message if system_message is not None else self.system_message).to(self.device)
        output_ids = self._generate_answer(inputs, pixel_values, generation_config)
        return self.decode_response(tokenizer, output_ids, inputs.stop)

    def stream_chat(
        self,
        tokenizer,
        pixel_values: torch.Tensor | None,
        question: str,
        generation_config: dict[str, Any],
        history: list[tuple[str, str]] | None = None,
        num_patches_list: Sequence[int] | None = None,
        timeout: float | None = None,
        system_message: str | None = None,
    ) -> Iterator[str]:
        """Like :meth:`chat` but yields the answer piece by piece; ``"".join(pieces) == chat(...)``."""
        inputs = self.prepare_chat_inputs(tokenizer, pixel_values, question, history, num_patches_list,
                                          system_message)
        yield from self.stream_generate(tokenizer, pixel_values, inputs, generation_config, timeout=timeout)

    def stream_generate(
        self,
        tokenizer,
        pixel_values: torch.Tensor | None,
        inputs: ChatInputs,
        generation_config: dict[str, Any],
        timeout: float | None = None,
        on_finish: Any = None,
    ) -> Iterator[str]:
        """Stream the answer to prepared inputs (:meth:`prepare_chat_inputs`) as text pieces.

        Generation runs in a background thread feeding a ``TextIteratorStreamer``; an error there is re-raised here.
        ``on_finish(output_ids)`` is called with the generated ids once generation ends.
        """
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                output_ids = self._generate_answer(inputs, pixel_values, {**generation_config, "streamer": streamer})
                if on_finish is not None:
                    on_finish(output_ids)
            except BaseException as exc:  # surfaced to the consumer below
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, name="internvl-chat-generate", daemon=True)
        thread.start()
        yield from _trim_stream(streamer, inputs.stop)
        thread.join()
        if failure:
            raise failure[0]

    # ------------------------------------------------------------------------------------------------ weights
    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict with the official checkpoint key names (InternLM2 LLMs fused back into ``wqkv``)."""
        state = self.state_dict()
        llm = {k[len(_LLM_PREFIX):]: v for k, v in state.items() if k.startswith(_LLM_PREFIX)}
        out = {k: v for k, v in state.items() if not k.startswith(_LLM_PREFIX)}
        out.update({_LLM_PREFIX + k: v for k, v in export_llm_state_dict(llm, self.config.llm_config).items()})
        return out

    official_state_dict = checkpoint_state_dict  # the name earlier releases used

    # transformers' InternVLForConditionalGeneration layout (`save_pretrained(folder, layout="hf")`, -hf folders)
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict under the keys transformers' ``save_pretrained`` writes for InternVLForConditionalGeneration
        (the LLM keeps its transformers names; an InternLM2 LLM is the Llama model it is loaded as)."""
        return chat_to_transformers(self.state_dict())

    def hf_config_dict(self) -> dict[str, Any]:
        """The -hf config.json (``image_token_id``: the ``<IMG_CONTEXT>`` id of the config or the tokenizer)."""
        return chat_config_to_hf(self.config, image_token_id=self.img_context_token_id)

    def convert_hf_state_dict(self, items: Iterable[tuple[str, torch.Tensor]]
                              ) -> Iterator[tuple[str, torch.Tensor]]:
        """-hf keys (either spelling: ``language_model.model.*`` or ``model.language_model.*``) -> module keys."""
        return CHAT_KEYS.from_hf(normalize_hf_chat_keys(items))

    def _prepare_load(self, stored_keys: list[str], layout: str) -> None:
        # an -hf checkpoint with tied word embeddings stores no LM head: it is the input embedding (as transformers)
        self._lm_head_is_embedding = layout == "hf" and not any(k.endswith("lm_head.weight") for k in stored_keys)

    def _tied_weights(self) -> dict[str, str]:
        if getattr(self, "_lm_head_is_embedding", False):
            return {"language_model.lm_head.weight": "language_model.model.embed_tokens.weight"}
        return {}

    def convert_checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Official checkpoint keys -> this module's keys (InternLM2 LLMs converted to the Llama layout)."""
        llm = {k[len(_LLM_PREFIX):]: v for k, v in state.items() if k.startswith(_LLM_PREFIX)}
        out = {k: v for k, v in state.items() if not k.startswith(_LLM_PREFIX)}
        out.update({_LLM_PREFIX + k: v for k, v in convert_llm_state_dict(llm, self.config.llm_config).items()})
        return out

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        device_map: str | dict[str, Any] | None = None,
        load_in_8bit: bool = False,
        attn_implementation: str = "sdpa",
        config: InternVLChatConfig | None = None,
        load_tokenizer: bool = True,
        check_finite: bool = False,
        quantization: str | None = None,
    ) -> "InternVLChatModel":
        """Load an official InternVL-Chat checkpoint folder or hub id (no remote code).

        The model is built on the meta device and the checkpoint tensors are assigned in place. ``dtype`` (e.g.
        ``"bfloat16"``) casts floating weights, ``None`` keeps the stored dtype. ``device_map="auto"`` splits the model
        over all visible GPUs as the model cards do (:func:`split_device_map`; needs ``accelerate``), a dict maps
        module names to devices. ``load_in_8bit`` quantises the LLM's linear layers with bitsandbytes (CUDA only);
        ``quantization="int8"`` quantises the ViT blocks and the LLM decoder layers with torchao (CPU or GPU), layer
        by layer while loading (see :mod:`internvl_fm.quantization`).
        """
        if load_in_8bit:
            if quantization not in (None, "none", "bnb-int8"):
                raise ValueError(f"load_in_8bit (bitsandbytes) and quantization={quantization!r} both quantise: "
                                 "pick one")
            _check_8bit_support(device)
            quantization = "bnb-int8"
        config = config if config is not None else cls.config_from_checkpoint(path)
        config.llm_config._attn_implementation = attn_implementation
        return super().from_pretrained(path, dtype=dtype, device=device, config=config, device_map=device_map,
                                       quantization=quantization,
                                       load_tokenizer=load_tokenizer, check_finite=check_finite)

    def _after_load(self, folder: Path, load_tokenizer: bool) -> None:
        if load_tokenizer:
            from internvl_fm.tokenization_internvl_chat import find_tokenizer

            self.tokenizer = find_tokenizer(folder)

    def _auto_device_map(self) -> dict[str, Any]:
        return split_device_map(self.config.llm_config.num_hidden_layers)

    def _quantize(self, quantization: str, device: torch.device) -> None:
        """``bnb-int8``: swap the LLM decoder's ``nn.Linear`` layers for bitsandbytes int8 layers (quantised on
        ``.to(cuda)``); torchao schemes as every model (``PretrainedMixin._quantize``)."""
        if quantization != "bnb-int8":
            return super()._quantize(quantization, device)
        _check_8bit_support(device)
        import bitsandbytes as bnb

        decoder = self.language_model.get_decoder()
        for parent in list(decoder.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                                has_fp16_weights=False, threshold=6.0)
                    layer.weight = bnb.nn.Int8Params(child.weight.data.to(torch.float16), requires_grad=False,
                                                     has_fp16_weights=False)
                    if child.bias is not None:
                        layer.bias = nn.Parameter(child.bias.data.to(torch.float16), requires_grad=False)
                    setattr(parent, name, layer)

    def _save_extra(self, folder: Path) -> None:
        import json

        self.config.llm_config.dtype = self.dtype
        with atomic_write(folder / "generation_config.json") as tmp:
            Path(tmp).write_text(json.dumps({"_from_model_config": True}, indent=2) + "\n")




@functools.lru_cache(maxsize=None)
def _cache_argument(model_class: type) -> str:
    """The name under which ``model_class.forward`` takes the KV cache (``cache`` or ``past_key_values``)."""
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(outputs: Any) -> Any:
    return getattr(outputs, OUTPUT_CACHE_FIELD, None)


def _check_8bit_support(device: torch.device | str | None) -> None:
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        raise RuntimeError("load_in_8bit needs a CUDA device (bitsandbytes int8 kernels)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ImportError("load_in_8bit needs the bitsandbytes package: pip install bitsandbytes") from exc


def _trim_stream(pieces: Iterator[str], stop: str) -> Iterator[str]:
    """Re-chunk streamed text so that the pieces join to ``full_text.split(stop)[0].strip()`` (what chat() returns).

    Leading whitespace is dropped, trailing whitespace and a possible beginning of ``stop`` are held back until more
    text shows whether they belong to the answer.
    """
    buffer = ""
    started = False
    done = False
    for piece in pieces:
        buffer += piece
        cut = buffer.find(stop) if stop else -1
        if cut >= 0:
            buffer, done = buffer[:cut], True
        if not started:
            buffer = buffer.lstrip()
            started = bool(buffer)
        keep = len(buffer)
        if not done and stop:
            for n in range(min(len(stop) - 1, len(buffer)), 0, -1):
                if buffer.endswith(stop[:n]):
                    keep -= n
                    break
        keep = len(buffer[:keep].rstrip())
        out, buffer = buffer[:keep], buffer[keep:]
        if out:
            yield out
        if done:
            for _ in pieces:  # drain the rest, so the generating thread never blocks on the queue
                pass
            return
    if buffer.strip():
        yield buffer.rstrip()
