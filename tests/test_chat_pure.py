"""Pure parts of internvl_fm.chat against the official reference: tiling, frame sampling, templates, grounding."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from internvl_fm.chat import (UnknownTemplateError, build_chat_query, draw_boxes, dynamic_preprocess, ground,
                              parse_boxes, render_prompt, tile_grid, video_frame_indices)
from internvl_fm.chat_templates import TEMPLATES, expand_image_placeholders
from internvl_fm.chat import load_image


def _manifest(golden, name):
    return json.loads((golden / name / "manifest.json").read_text())


class _Recorder:
    """Stands in for a PIL image and records the resize / crop calls dynamic_preprocess makes."""

    def __init__(self, width, height, calls=None):
        self.size = (width, height)
        self.width, self.height = width, height
        self.calls = [] if calls is None else calls

    def resize(self, size):
        self.calls.append(("resize", tuple(size)))
        return _Recorder(*size, self.calls)

    def crop(self, box):
        self.calls.append(("crop", tuple(box)))
        return ("tile", tuple(box))


def test_tile_grid_and_crops_match_reference(golden):
    cases = _manifest(golden, "dynamic_preprocess")["cases"]
    assert len(cases) >= 20
    for c in cases:
        grid = tile_grid(c["width"], c["height"], c["min_num"], c["max_num"], c["image_size"])
        assert list(grid) == c["grid_cols_rows"], c
        rec = _Recorder(c["width"], c["height"])
        tiles = dynamic_preprocess(rec, min_num=c["min_num"], max_num=c["max_num"], image_size=c["image_size"],
                                   use_thumbnail=c["use_thumbnail"])
        assert rec.calls[0] == ("resize", tuple(c["resized_size_wh"]))
        crops = [box for kind, box in rec.calls if kind == "crop"]
        assert [list(b) for b in crops] == c["crop_boxes_ltrb"]
        assert len(tiles) == c["num_tiles"]
        thumb = rec.calls[-1] == ("resize", (c["image_size"], c["image_size"]))
        assert thumb == c["thumbnail_appended"]


def test_dynamic_preprocess_real_image_tiles():
    img = Image.new("RGB", (800, 600), (10, 200, 30))
    tiles = dynamic_preprocess(img, max_num=12, image_size=56, use_thumbnail=True)
    assert len(tiles) == 13 and all(t.size == (56, 56) for t in tiles)
    pixels = load_image(img, max_num=12, input_size=56)
    assert pixels.shape == (13, 3, 56, 56) and pixels.dtype == torch.float32
    # ImageNet normalisation of a constant green-ish image
    assert torch.allclose(pixels[0, 1].mean(), torch.tensor((200 / 255 - 0.456) / 0.224), atol=1e-2)


def test_tile_grid_rejects_bad_arguments():
    with pytest.raises(ValueError):
        tile_grid(0, 10)
    with pytest.raises(ValueError):
        tile_grid(10, 10, min_num=3, max_num=2)


def test_video_frame_indices_match_get_index(golden):
    cases = _manifest(golden, "get_index")["cases"]
    for c in cases:
        got = video_frame_indices(c["bound"], c["fps"], c["max_frame"], c["first_idx"], c["num_segments"])
        assert got == c["frame_indices"], c
    with pytest.raises(ValueError):
        video_frame_indices(None, 30.0, 10, num_segments=0)


def test_templates_render_exactly(golden):
    m = _manifest(golden, "conversation")
    turns = [tuple(t) for t in m["conv_turns"]]
    names = [n for n in m["templates"] if not n.startswith("_")]
    assert set(names) == set(TEMPLATES)
    for name in names:
        t = m["templates"][name]
        assert render_prompt(name, turns, system=m["conv_system"]) == t["prompt_with_system"], name
        assert render_prompt(name, turns) == t["prompt_default_system"], name
        assert TEMPLATES[name].stop_token == t["eos_token_for_chat"]


def test_build_chat_query_matches_model_chat(golden):
    q = _manifest(golden, "conversation")["templates"]["_model_chat"]
    got = build_chat_query(q["question"], template=q["template"], num_patches_list=q["num_patches_list"],
                           num_image_token=q["num_image_token"], history=q.get("history"))
    assert got == q["query"]


def test_build_chat_query_auto_prefix_and_history():
    query = build_chat_query("Describe.", "internlm2-chat", [2], 1)
    assert "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nDescribe.<|im_end|>" in query
    # with history no <image> is added to the new question; the history's <image> is expanded
    query = build_chat_query("And now?", "internlm2-chat", [1], 2, history=[("<image>\nWhat?", "A cat.")])
    assert query.count("<img>") == 1 and "<|im_start|>user\nAnd now?<|im_end|>" in query
    # multi-image: placeholders expanded in order with their own tile counts
    query = build_chat_query("Image-1: <image>\nImage-2: <image>\nSame?", "Hermes-2", [1, 3], 1)
    assert "Image-1: <img><IMG_CONTEXT></img>\nImage-2: <img>" + "<IMG_CONTEXT>" * 3 + "</img>" in query
    # no images: text untouched
    assert "<image>" not in build_chat_query("Hi", "phi3-chat", [], 256)


def test_system_override_and_unknown_template():
    assert render_prompt("internvl2_5", [("q", None)], system="S").startswith("<|im_start|>system\nS<|im_end|>\n")
    with pytest.raises(UnknownTemplateError) as err:
        render_prompt("vicuna", [("q", None)])
    assert "vicuna" in str(err.value) and "internlm2-chat" in str(err.value) and "phi3-chat" in str(err.value)


def test_too_few_placeholders_is_an_error():
    with pytest.raises(ValueError, match="fewer"):
        expand_image_placeholders("<image> only one", [1, 1], 4)


def test_grounding_parse_scale_and_draw():
    answer = ("<ref>the cat</ref><box>[[100, 200, 500, 1000]]</box> and "
              "<ref>two dogs</ref><box>[[0, 0, 250, 250], [750, 750, 1000, 1000]]</box> <box>[[10,10,20,20]]</box>")
    parsed = parse_boxes(answer)
    assert parsed[0] == ("the cat", (100.0, 200.0, 500.0, 1000.0))
    assert [p[0] for p in parsed] == ["the cat", "two dogs", "two dogs", None]
    boxes = ground(answer, width=400, height=200)
    assert boxes[0].box == (40.0, 40.0, 200.0, 200.0)
    assert boxes[2].box == (300.0, 150.0, 400.0, 200.0)
    img = Image.new("RGB", (400, 200), "white")
    out = draw_boxes(img, answer)
    assert out.size == img.size and img.getpixel((40, 100)) == (255, 255, 255)
    assert out.getpixel((40, 100)) != (255, 255, 255)  # left edge of the cat box is drawn
    assert parse_boxes("no boxes here") == []
