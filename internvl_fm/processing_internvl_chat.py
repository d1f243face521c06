"""``InternVLChatProcessor``: everything between a user's images / video / text and ``InternVLChatModel.generate``.

Images are decoded by the core :func:`internvl_fm.processing.load_image`, cut into tiles (+ thumbnail) by
:func:`internvl_fm.tiling.tile_pixels`, the conversation is rendered with the checkpoint's template, every ``<image>``
is expanded into ``<img><IMG_CONTEXT>*n</img>`` and the prompt is tokenized. The processor is built from a model
config and a tokenizer and holds the id of ``<IMG_CONTEXT>``; the model is never changed by a call.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from internvl_fm.chat_templates import (IMG_CONTEXT_TOKEN, build_chat_query, get_template, with_image_placeholder,
                                        with_image_placeholders)
from internvl_fm.errors import TokenizerContractError
from internvl_fm.processing import MAX_IMAGE_PIXELS, build_transform, load_image
from internvl_fm.tiling import tile_pixels

if TYPE_CHECKING:
    from internvl_fm.models.configuration_internvl_chat import InternVLChatConfig
    from internvl_fm.video import VideoClip

__all__ = ["InternVLChatProcessor", "ChatInputs", "load_image_tiles", "build_tile_transform"]

History = Sequence[Sequence[str]]


@dataclass
class ChatInputs:
    """A tokenized chat prompt: the question as stored in history, the full prompt, ids, the stop token, the image
    token id and (when the processor decoded the images) the pixels. ``question`` / ``query`` are lists for a batch."""

    question: str | list[str]
    query: str | list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    stop: str
    eos_token_id: int
    image_token_id: int | None = None
    pixel_values: torch.Tensor | None = None
    num_patches_list: list[int] = field(default_factory=list)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ChatInputs":
        """A copy with the ids on ``device`` and the pixels on ``device`` in ``dtype``."""
        pixels = self.pixel_values
        if pixels is not None:
            pixels = pixels.to(device=device, dtype=dtype or pixels.dtype)
        return replace(self, input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                       pixel_values=pixels)


def build_tile_transform(input_size: int = 448):
    """The model cards' ``build_transform``: ``Resize((S, S))`` bicubic, ``ToTensor``, ImageNet normalisation."""
    return build_transform(input_size, mode="retrieval")


def load_image_tiles(
    image: Any, max_num: int = 12, input_size: int = 448, min_num: int = 1, use_thumbnail: bool = True
) -> torch.Tensor:
    """The model cards' ``load_image``: an image (path, bytes, PIL) as its ``[n_tiles, 3, S, S]`` tile pixels."""
    return tile_pixels(load_image(image), input_size, min_num, max_num, use_thumbnail)


def _token_id(tokenizer: Any, token: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    return None if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None) else int(token_id)


class InternVLChatProcessor:
    """Dynamic tiling + thumbnail, video frames, template rendering, image-token expansion and tokenization of
    InternVL-Chat, with the settings of one checkpoint.

    ``processor(question, images=[...])`` (or ``pixel_values=`` already tiled) returns :class:`ChatInputs`;
    ``image_pixels`` / ``preprocess_images`` / ``load_video`` give pixels only; ``build_query`` the prompt string.
    ``image_token_id`` is the tokenizer's ``<IMG_CONTEXT>`` id (the config's ``img_context_token_id`` when there is
    no tokenizer; a tokenizer that disagrees with the config raises ``TokenizerContractError``).
    """

    def __init__(
        self,
        tokenizer: Any = None,
        *,
        template: str | None = None,
        num_image_token: int = 256,
        image_size: int = 448,
        min_dynamic_patch: int = 1,
        max_dynamic_patch: int = 12,
        use_thumbnail: bool = True,
        dynamic_image_size: bool = True,
        system_message: str | None = None,
        image_token_id: int | None = None,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ):
        if template is not None:
            get_template(template)  # unknown names fail here, listing the known ones
        if not 1 <= min_dynamic_patch <= max_dynamic_patch:
            raise ValueError(f"need 1 <= min_dynamic_patch <= max_dynamic_patch, got {min_dynamic_patch}, "
                             f"{max_dynamic_patch}")
        self.tokenizer = tokenizer
        self.template = template
        self.num_image_token = num_image_token
        self.image_size = image_size
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
        self.use_thumbnail = use_thumbnail
        self.dynamic_image_size = dynamic_image_size
        self.system_message = system_message
        self.max_image_pixels = max_image_pixels
        self.image_token_id = image_token_id
        if tokenizer is not None:
            found = _token_id(tokenizer, IMG_CONTEXT_TOKEN)
            if found is not None and image_token_id is not None and found != image_token_id:
                raise TokenizerContractError(
                    f"the tokenizer gives {IMG_CONTEXT_TOKEN} id {found} but the config says img_context_token_id "
                    f"{image_token_id}: use the checkpoint's own tokenizer")
            self.image_token_id = found
        self._transform = None

    @classmethod
    def from_config(cls, config: InternVLChatConfig, tokenizer: Any = None,
                    **overrides: Any) -> "InternVLChatProcessor":
        """The processor of a model config (template, tile size and count, thumbnail, system message, image token)."""
        settings = dict(
            template=config.template, num_image_token=config.num_image_token, image_size=config.image_size,
            min_dynamic_patch=config.min_dynamic_patch, max_dynamic_patch=config.max_dynamic_patch,
            use_thumbnail=config.use_thumbnail, dynamic_image_size=config.dynamic_image_size,
            system_message=config.system_message, image_token_id=config.img_context_token_id)
        settings.update(overrides)
        return cls(tokenizer, **settings)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, tokenizer: Any = None) -> "InternVLChatProcessor":
        """The processor of an InternVL-Chat checkpoint folder or hub id: its config.json and its tokenizer (when the
        folder has one and ``tokenizer`` is not given). Another kind of checkpoint raises ``ModelKindError``."""
        from internvl_fm.configuration_utils import check_config_dict
        from internvl_fm.loading import check_model_kind, read_config, resolve_checkpoint
        from internvl_fm.models.configuration_internvl_chat import InternVLChatConfig
        from internvl_fm.tokenization_internvl_chat import TOKENIZER_FILES, load_tokenizer

        folder = resolve_checkpoint(path)
        data = read_config(folder)
        check_config_dict(data, str(path))
        check_model_kind(path, data, ("InternVLChatModel",), "an InternVL-Chat model")
        if tokenizer is None and any((folder / name).is_file() for name in TOKENIZER_FILES):
            tokenizer = load_tokenizer(folder)
        return cls.from_config(InternVLChatConfig.from_dict(data), tokenizer)

    # ------------------------------------------------------------------------------------------------ images
    @property
    def transform(self):
        """The tile transform (``Resize((S, S))`` bicubic + ImageNet normalisation), built on first use."""
        if self._transform is None:
            self._transform = build_tile_transform(self.image_size)
        return self._transform

    def load_image(self, source: Any, max_pixels: int | None = None):
        """A path, bytes, file object or PIL image as an RGB PIL image (``ImageLoadError`` names what failed)."""
        return load_image(source, max_pixels or self.max_image_pixels)

    def image_pixels(self, image: Any, max_num: int | None = None) -> torch.Tensor:
        """``[n_tiles, 3, S, S]`` of one image: up to ``max_num`` (default: the config's) tiles + thumbnail."""
        return tile_pixels(self.load_image(image), self.image_size, self.min_dynamic_patch,
                           max_num or self.max_dynamic_patch, self.use_thumbnail, self.dynamic_image_size,
                           self.transform)

    def preprocess_images(self, images: Any, max_num: int | None = None) -> tuple[torch.Tensor | None, list[int]]:
        """``(pixel_values [sum(tiles), 3, S, S], tiles per image)`` of one image or a list; ``(None, [])`` for none."""
        if images is None:
            return None, []
        if not isinstance(images, (list, tuple)):
            images = [images]
        per_image = [self.image_pixels(image, max_num) for image in images]
        if not per_image:
            return None, []
        return torch.cat(per_image), [t.shape[0] for t in per_image]

    def load_video(self, path: str | os.PathLike, num_segments: int = 8, max_num: int = 1,
                   bound: Sequence[float] | None = None) -> VideoClip:
        """Frames picked by the official ``get_index``, each tiled (``max_num`` tiles, thumbnail); needs PyAV."""
        from internvl_fm.video import load_video

        return load_video(path, bound=bound, input_size=self.image_size, max_num=max_num, num_segments=num_segments)

    # ------------------------------------------------------------------------------------------------ text
    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError("this processor has no tokenizer: build it with one "
                             "(InternVLChatProcessor.from_config(config, tokenizer))")
        return self.tokenizer

    def _require_template(self) -> str:
        if self.template is None:
            raise ValueError("the config names no chat template (template: null); set config.template")
        return self.template

    def require_image_token_id(self) -> int:
        """The ``<IMG_CONTEXT>`` id, or ``TokenizerContractError`` when the tokenizer lacks the token."""
        if self.image_token_id is None:
            raise TokenizerContractError(f"the tokenizer has no {IMG_CONTEXT_TOKEN} token (add the InternVL special "
                                         "tokens)")
        return self.image_token_id

    def stop_token(self) -> tuple[str, int]:
        """``(token, id)`` that ends an answer: the template separator (``<|im_end|>``, ``<|end|>``...)."""
        template = self._require_template()
        stop = get_template(template).stop_token
        token_id = _token_id(self._require_tokenizer(), stop)
        if token_id is None:
            raise TokenizerContractError(f"the tokenizer has no {stop!r} token, which template {template!r} ends "
                                         "turns with")
        return stop, token_id

    def build_query(
        self,
        question: str,
        num_patches_list: Sequence[int] = (),
        history: History | None = None,
        system_message: str | None = None,
    ) -> tuple[str, str]:
        """``(question as stored in history, prompt string)`` exactly as the official ``chat()`` builds them.

        Without history, a question with images but no ``<image>`` gets ``"<image>\\n"`` prepended; every
        ``<image>`` (history included) is expanded in order with the tile counts of ``num_patches_list``.
        ``system_message=None`` uses the processor's (config's, else the template's default).
        """
        question = with_image_placeholder(question, has_images=bool(num_patches_list), history=history)
        system = system_message if system_message is not None else self.system_message
        query = build_chat_query(question, self._require_template(), list(num_patches_list), self.num_image_token,
                                 history=[tuple(turn) for turn in history or []], system=system)
        return question, query

    def tokenize(self, queries: str | Sequence[str], padding_side: str = "left") -> dict[str, torch.Tensor]:
        """``input_ids`` / ``attention_mask`` of prompts (a batch is padded on ``padding_side``; the tokenizer's own
        setting is left as it is)."""
        tokenizer = self._require_tokenizer()
        batch = tokenizer(queries if isinstance(queries, str) else list(queries), return_tensors="pt",
                          padding=not isinstance(queries, str), padding_side=padding_side)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def __call__(
        self,
        question: str,
        images: Any = None,
        *,
        pixel_values: torch.Tensor | None = None,
        num_patches_list: Sequence[int] | None = None,
        history: History | None = None,
        system_message: str | None = None,
        max_num: int | None = None,
    ) -> ChatInputs:
        """Tokenized inputs of one chat turn.

        ``images`` (PIL, paths or bytes; one or a list) are decoded and tiled here, and without history a question
        that holds no ``<image>`` gets one placeholder per image (``Image-1: <image>\\n...`` for several). Already
        tiled ``pixel_values`` follow the official ``chat()``: ``num_patches_list`` defaults to all tiles being one
        image, whose ``"<image>\\n"`` is prepended when the question has none and there is no history.
        """
        if images is not None and pixel_values is not None:
            raise ValueError("pass images or pixel_values, not both")
        if images is not None:
            if num_patches_list is not None:
                raise ValueError("num_patches_list comes from the images; pass it only with pixel_values")
            pixel_values, num_patches_list = self.preprocess_images(images, max_num)
            if history is None:
                question = with_image_placeholders(question, len(num_patches_list))
        elif pixel_values is not None:
            if num_patches_list is None:
                num_patches_list = [pixel_values.shape[0]]
            if sum(num_patches_list) != pixel_values.shape[0]:
                raise ValueError(f"num_patches_list {list(num_patches_list)} sums to {sum(num_patches_list)} but "
                                 f"pixel_values has {pixel_values.shape[0]} tiles")
        patches = list(num_patches_list or []) if pixel_values is not None else []
        image_token_id = self.require_image_token_id() if pixel_values is not None else self.image_token_id
        stop, eos_token_id = self.stop_token()
        question, query = self.build_query(question, patches, history, system_message)
        ids = self.tokenize(query)
        return ChatInputs(question=question, query=query, input_ids=ids["input_ids"],
                          attention_mask=ids["attention_mask"], stop=stop, eos_token_id=eos_token_id,
                          image_token_id=image_token_id, pixel_values=pixel_values, num_patches_list=patches)

    def batch(
        self,
        questions: Sequence[str],
        pixel_values: torch.Tensor | None = None,
        num_patches_list: Sequence[int] | None = None,
        system_message: str | None = None,
    ) -> ChatInputs:
        """Left-padded inputs of single-turn questions, ``num_patches_list[i]`` tiles for question ``i`` (the
        official ``batch_chat``; default one tile per question)."""
        if num_patches_list is None:
            if pixel_values is not None and pixel_values.shape[0] != len(questions):
                raise ValueError("pass num_patches_list: pixel_values tiles do not map one-to-one to questions")
            num_patches_list = [1 if pixel_values is not None else 0] * len(questions)
        if len(num_patches_list) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(num_patches_list)} entries in num_patches_list")
        if pixel_values is not None and sum(num_patches_list) != pixel_values.shape[0]:
            raise ValueError(f"num_patches_list sums to {sum(num_patches_list)} but pixel_values has "
                             f"{pixel_values.shape[0]} tiles")
        image_token_id = self.require_image_token_id() if pixel_values is not None else self.image_token_id
        stop, eos_token_id = self.stop_token()
        built = [self.build_query(q, [n] if pixel_values is not None else [], None, system_message)
                 for q, n in zip(questions, num_patches_list)]
        ids = self.tokenize([query for _, query in built], padding_side="left")
        return ChatInputs(question=[q for q, _ in built], query=[query for _, query in built],
                          input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], stop=stop,
                          eos_token_id=eos_token_id, image_token_id=image_token_id, pixel_values=pixel_values,
                          num_patches_list=list(num_patches_list))

    def decode(self, output_ids: torch.Tensor, stop: str | None = None) -> list[str]:
        """Answers of generated ids as the official ``chat()`` decodes them: special tokens skipped, cut at the stop
        token (default: the template's), stripped."""
        stop = stop if stop is not None else self.stop_token()[0]
        texts = self._require_tokenizer().batch_decode(output_ids, skip_special_tokens=True)
        return [t.split(stop)[0].strip() for t in texts]

    def __repr__(self) -> str:
        tokenizer = type(self.tokenizer).__name__ if self.tokenizer is not None else None
        return (f"InternVLChatProcessor(template={self.template!r}, image_size={self.image_size}, tiles="
                f"{self.min_dynamic_patch}..{self.max_dynamic_patch}, thumbnail={self.use_thumbnail}, "
                f"num_image_token={self.num_image_token}, image_token_id={self.image_token_id}, "
                f"tokenizer={tokenizer})")
