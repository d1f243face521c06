"""Video loading with PyAV, and the `internvl-fm chat` / `serve-chat` command lines."""
from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_fm.chat import InternVLChatModel, video_frame_indices
from internvl_fm.chat.cli import chat_main, serve_main
from internvl_fm.chat.testing import save_tiny_chat_checkpoint
from internvl_fm.chat import load_image
from internvl_fm.video import load_video

GEN = dict(max_new_tokens=4, do_sample=False)


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    av = pytest.importorskip("av")
    path = tmp_path_factory.mktemp("video") / "ramp.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(20):  # frame i is a flat grey of level 12 * i
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 12 * i, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def test_load_video_samples_official_indices(video_path):
    clip = load_video(video_path, input_size=28, max_num=1, num_segments=4)
    assert clip.frame_indices == video_frame_indices(None, 10.0, 19, num_segments=4) == [2, 7, 12, 16]
    assert clip.pixel_values.shape == (4, 3, 28, 28) and clip.num_patches_list == [1, 1, 1, 1]
    levels = [(clip.pixel_values[i, 0].mean().item() * 0.229 + 0.485) * 255 for i in range(4)]
    assert levels == sorted(levels)
    assert all(abs(lv - 12 * idx) < 6 for lv, idx in zip(levels, clip.frame_indices))  # the right frames
    assert clip.prompt_prefix == "Frame1: <image>\nFrame2: <image>\nFrame3: <image>\nFrame4: <image>\n"
    # a time window in seconds and several tiles per frame (thumbnail appended)
    clip = load_video(video_path, bound=(0.5, 1.5), input_size=28, max_num=4, num_segments=2)
    assert clip.frame_indices == video_frame_indices((0.5, 1.5), 10.0, 19, num_segments=2)
    assert clip.num_patches_list == [5, 5] and clip.pixel_values.shape[0] == 10


def test_load_video_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_video(tmp_path / "missing.mp4")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = save_tiny_chat_checkpoint(tmp_path_factory.mktemp("ckpt"))
    image = tmp_path_factory.mktemp("img") / "cat.png"
    Image.new("RGB", (50, 30), (120, 60, 10)).save(image)
    return folder, image


def _model_args(folder):
    return [str(folder), "--dtype", "float32", "--device", "cpu", "--max-new-tokens", "4"]


def test_chat_cli_one_shot_matches_chat(checkpoint, capsys):
    folder, image = checkpoint
    assert chat_main(_model_args(folder) + ["-q", "what is in the picture ?", "-i", str(image), "--no-stream"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed
    model = InternVLChatModel.from_pretrained(folder)
    config = model.config
    pixels = load_image(image, max_num=config.max_dynamic_patch, input_size=config.image_size)
    assert printed == model.chat(model.tokenizer, pixels, "what is in the picture ?", dict(GEN))
    # streamed output prints the same answer
    assert chat_main(_model_args(folder) + ["-q", "what is in the picture ?", "-i", str(image)]) == 0
    assert capsys.readouterr().out.strip() == printed


def test_chat_cli_interactive(checkpoint, capsys, monkeypatch):
    folder, image = checkpoint
    monkeypatch.setattr(sys, "stdin", io.StringIO("what is in the picture ?\nhow many legs ?\n/reset\n/quit\n"))
    assert chat_main(_model_args(folder) + ["-i", str(image), "--no-stream"]) == 0
    out = capsys.readouterr()
    model = InternVLChatModel.from_pretrained(folder)
    pixels = load_image(image, max_num=model.config.max_dynamic_patch, input_size=model.config.image_size)
    first, history = model.chat(model.tokenizer, pixels, "what is in the picture ?", dict(GEN), return_history=True)
    second = model.chat(model.tokenizer, pixels, "how many legs ?", dict(GEN), history=history)
    assert first and second
    assert out.out.splitlines()[:2] == [first, second]


def test_chat_cli_rejects_image_and_video_together(checkpoint):
    folder, image = checkpoint
    with pytest.raises(SystemExit):
        chat_main(_model_args(folder) + ["-q", "x", "-i", str(image), "--video", "v.mp4"])


def test_serve_cli_binds_localhost_by_default(checkpoint, monkeypatch):
    folder, _ = checkpoint
    seen = {}

    def fake_serve(model, tokenizer, host, port, settings):
        seen.update(host=host, port=port, settings=settings, tokenizer=tokenizer)

    monkeypatch.setattr("internvl_fm.chat.server.serve", fake_serve)
    assert serve_main(_model_args(folder)[:-2] + ["--allowed-root", str(folder), "--max-images", "3"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8000 and seen["tokenizer"] is not None
    settings = seen["settings"]
    assert settings.model_name == folder.name and settings.max_images == 3 and not settings.allow_http
    assert settings.allowed_root == folder.resolve()
    assert torch.is_tensor(next(iter(InternVLChatModel.from_pretrained(folder).parameters())))


def test_boxes_out_draws_in_the_format_of_the_file_name(checkpoint, tmp_path, capsys):
    from internvl_fm.chat.cli import _save_boxes

    _, image = checkpoint
    _save_boxes("<ref>a cat</ref><box>[[0, 0, 500, 500]]</box>", str(image), str(tmp_path / "boxes.jpg"))
    with Image.open(tmp_path / "boxes.jpg") as drawn:
        assert drawn.format == "JPEG" and drawn.size == (50, 30)
    assert "drew 1 box" in capsys.readouterr().err
    _save_boxes("no box here", str(image), str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists() and "no <box>" in capsys.readouterr().err
