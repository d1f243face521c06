"""The chat task: OpenAI-compatible server, CLI, grounding helpers, and the InternVL-Chat API in one place.

The model, its configuration and processor, tokenizer, tiling, video sampling and templates live in the core
(`internvl_fm.models`, `internvl_fm.processing_internvl_chat`, `internvl_fm.tiling`, ...) and are re-exported here so
`from internvl_fm.chat import InternVLChatModel` keeps working. `load_image(path, max_num=12)` and
`build_transform(input_size=448)` are the model cards' functions (in the core: `load_image_tiles`,
`build_tile_transform`; the core `internvl_fm.load_image` returns a PIL image). Pure helpers import eagerly; the model
and server load lazily so `from internvl_fm.chat import render_prompt` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from internvl_fm.chat_templates import (
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    TEMPLATES,
    ChatTemplate,
    UnknownTemplateError,
    build_chat_query,
    get_template,
    render_prompt,
)
from internvl_fm.processing_internvl_chat import (ChatInputs, InternVLChatProcessor, build_tile_transform,
                                                  load_image_tiles)
from internvl_fm.tiling import dynamic_preprocess, tile_grid
from internvl_fm.tokenization_internvl_chat import load_tokenizer
from internvl_fm.video import VideoClip, load_video, video_frame_indices, video_prompt_prefix

from .grounding import GroundedBox, draw_boxes, ground, parse_boxes, scale_box

load_image = load_image_tiles  # the model cards' name: an image as its [tiles, 3, S, S] pixels
build_transform = build_tile_transform  # the model cards' name

if TYPE_CHECKING:
    from internvl_fm.models.configuration_internvl_chat import InternVLChatConfig
    from internvl_fm.models.modeling_internvl_chat import InternVLChatModel

_LAZY = {
    "InternVLChatConfig": "internvl_fm.models.configuration_internvl_chat",
    "InternVLChatModel": "internvl_fm.models.modeling_internvl_chat",
    "create_app": ".server",
    "ServerSettings": ".server",
}

__all__ = [
    "InternVLChatConfig",
    "InternVLChatModel",
    "InternVLChatProcessor",
    "ChatInputs",
    "create_app",
    "ServerSettings",
    "tile_grid",
    "dynamic_preprocess",
    "build_transform",
    "load_image",
    "load_image_tiles",
    "video_frame_indices",
    "video_prompt_prefix",
    "load_video",
    "VideoClip",
    "render_prompt",
    "build_chat_query",
    "load_tokenizer",
    "get_template",
    "ChatTemplate",
    "TEMPLATES",
    "UnknownTemplateError",
    "IMG_START_TOKEN",
    "IMG_END_TOKEN",
    "IMG_CONTEXT_TOKEN",
    "GroundedBox",
    "parse_boxes",
    "scale_box",
    "ground",
    "draw_boxes",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
