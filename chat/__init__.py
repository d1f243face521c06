"""The chat task: OpenAI-compatible server, CLI, grounding helpers, and the InternVL-Chat API in one place.

The model, its configuration, tokenizer, tiling, video sampling and templates live in the core (`internvl_fm.models`,
`internvl_fm.tiling`, ...) and are re-exported here so `from internvl_fm.chat import InternVLChatModel` keeps working.
Pure helpers import eagerly; the model and server load lazily so `from internvl_fm.chat import render_prompt` stays
cheap.
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
from internvl_fm.tiling import build_transform, dynamic_preprocess, load_image, tile_grid
from internvl_fm.tokenization_internvl_chat import load_tokenizer
from internvl_fm.video import VideoClip, load_video, video_frame_indices, video_prompt_prefix

from .grounding import GroundedBox, draw_boxes, ground, parse_boxes, scale_box

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
    "create_app",
    "ServerSettings",
    "tile_grid",
    "dynamic_preprocess",
    "build_transform",
    "load_image",
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
