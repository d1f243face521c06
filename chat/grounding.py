"""Grounding answers: ``<ref>name</ref><box>[[x1, y1, x2, y2], ...]</box>`` with coordinates normalised to 0-1000.

InternVL-Chat answers grounding prompts (e.g. ``Please provide the bounding box coordinate of the region this sentence
describes: <ref>the cat</ref>``) with boxes on a 0-1000 grid of the original image. These helpers parse such answers,
scale boxes to pixels and draw them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["GroundedBox", "parse_boxes", "scale_box", "ground", "draw_boxes", "GROUNDING_SCALE"]

GROUNDING_SCALE = 1000

_NUM = r"-?\d+(?:\.\d+)?"
_BOX = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")
_SPAN = re.compile(r"(?:<ref>(?P<ref>.*?)</ref>\s*)?<box>(?P<boxes>.*?)</box>", re.DOTALL)


@dataclass(frozen=True)
class GroundedBox:
    """A box in pixels of the original image (``x1, y1, x2, y2``), with its label and the raw 0-1000 box."""

    label: str | None
    box: tuple[float, float, float, float]
    normalized: tuple[float, float, float, float]


def parse_boxes(text: str) -> list[tuple[str | None, tuple[float, float, float, float]]]:
    """All ``(label, normalised box)`` pairs of an answer, in order; a ``<box>`` without ``<ref>`` has label None.

    One ``<box>`` may hold several ``[x1, y1, x2, y2]`` lists; each becomes one pair with the same label.
    """
    out = []
    for match in _SPAN.finditer(text):
        label = match.group("ref")
        label = label.strip() if label is not None else None
        for box in _BOX.finditer(match.group("boxes")):
            out.append((label, tuple(float(v) for v in box.groups())))
    return out


def scale_box(box: tuple[float, float, float, float], width: int, height: int,
              scale: int = GROUNDING_SCALE) -> tuple[float, float, float, float]:
    """Map a 0-``scale`` box to pixels of a ``width x height`` image (clamped to the image, corners ordered)."""
    x1, y1, x2, y2 = box
    x1, x2 = sorted((x1 / scale * width, x2 / scale * width))
    y1, y2 = sorted((y1 / scale * height, y2 / scale * height))
    clamp = lambda v, hi: min(max(v, 0.0), float(hi))  # noqa: E731
    return clamp(x1, width), clamp(y1, height), clamp(x2, width), clamp(y2, height)


def ground(text: str, width: int, height: int, scale: int = GROUNDING_SCALE) -> list[GroundedBox]:
    """Parse an answer and scale its boxes to a ``width x height`` image."""
    return [GroundedBox(label, scale_box(b, width, height, scale), b) for label, b in parse_boxes(text)]


_COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


def draw_boxes(image: Image.Image, boxes: list[GroundedBox] | str, width: int = 3) -> Image.Image:
    """Return a copy of ``image`` with the boxes (a list, or an answer string to parse) and labels drawn on it."""
    from PIL import ImageDraw

    if isinstance(boxes, str):
        boxes = ground(boxes, image.width, image.height)
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    colors: dict[str | None, str] = {}
    for item in boxes:
        color = colors.setdefault(item.label, _COLORS[len(colors) % len(_COLORS)])
        draw.rectangle(item.box, outline=color, width=width)
        if item.label:
            x, y = item.box[0], max(0.0, item.box[1] - 12)
            left, top, right, bottom = draw.textbbox((x, y), item.label)
            draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=color)
            draw.text((x, y), item.label, fill="white")
    return out
