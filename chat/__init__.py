"""InternVL-Chat (InternVL 1.5 / 2 / 2.5, Mini-InternVL) on the shared InternViT and transformers' LLMs.

Pure helpers (tiling, video sampling, templates, grounding) import eagerly; the model, server and CLI load lazily so
that ``from internvl_fm.chat import render_prompt`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .grounding import GroundedBox, draw_boxes, ground, parse_boxes, scale_box
from .templates import (
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
from .tiling import build_transform, dynamic_preprocess, load_image, tile_grid
from .tokenizer import load_tokenizer
from .video import VideoClip, load_video, video_frame_indices, video_prompt_prefix

if TYPE_CHECKING:
    from .configuration import InternVLChatConfig
    from .modeling import InternVLChatModel

_LAZY = {
    "InternVLChatConfig": ".configuration",
    "InternVLChatModel": ".modeling",
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
