"""Video input for InternVL-Chat: the official frame sampler and a PyAV loader that yields per-frame tiles."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from internvl_fm.tiling import tile_pixels

__all__ = ["video_frame_indices", "VideoClip", "sample_frames", "load_video", "video_prompt_prefix"]


def video_frame_indices(
    bound: Sequence[float] | None, fps: float, max_frame: int, first_idx: int = 0, num_segments: int = 32
) -> list[int]:
    """Indices of ``num_segments`` frames, one in the middle of each equal segment (the official ``get_index``).

    ``bound`` is ``(start_s, end_s)`` in seconds or ``None`` for the whole video; ``max_frame`` is the last frame index
    (``num_frames - 1``). Python ``round`` and ``np.round`` (both half-to-even) and ``int`` truncation as in the
    reference; no further clamping.
    """
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    start, end = (bound[0], bound[1]) if bound else (-100000, 100000)
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + seg_size / 2 + np.round(seg_size * idx)) for idx in range(num_segments)]


def video_prompt_prefix(num_frames: int) -> str:
    """``Frame1: <image>\\nFrame2: <image>\\n...`` as in the model-card video example."""
    return "".join(f"Frame{i + 1}: <image>\n" for i in range(num_frames))


@dataclass
class VideoClip:
    """Sampled frames as model input: ``pixel_values`` ``[sum(num_patches_list), 3, S, S]`` and tiles per frame."""

    pixel_values: torch.Tensor
    num_patches_list: list[int]
    frame_indices: list[int]
    fps: float

    @property
    def prompt_prefix(self) -> str:
        return video_prompt_prefix(len(self.num_patches_list))


def _decode_frames(path: str, wanted: Sequence[int]):
    """Decode the frames at ``wanted`` indices (repeats allowed) in one sequential pass; returns PIL images."""
    import av

    wanted_set = set(wanted)
    found = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted_set:
                found[index] = frame.to_image().convert("RGB")
                if len(found) == len(wanted_set):
                    break
    missing = sorted(wanted_set - found.keys())
    if missing:
        raise ValueError(f"video {path} has no frames {missing[:5]} (decoded {len(found)} of {len(wanted_set)})")
    return [found[i] for i in wanted]


def _probe(path: str) -> tuple[int, float]:
    """Frame count and average fps of the first video stream (counts by demuxing when the header has no count)."""
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        num_frames = int(stream.frames or 0)
        if num_frames <= 0:
            num_frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
    if num_frames <= 0 or fps <= 0:
        raise ValueError(f"cannot read frame count / fps of video {path}")
    return num_frames, fps


def sample_frames(
    path: str | os.PathLike, bound: Sequence[float] | None = None, num_segments: int = 32
) -> tuple[list, list[int], float]:
    """``(frames as RGB PIL images, their indices, fps)``: ``num_segments`` frames picked by
    :func:`video_frame_indices`. Needs PyAV (``pip install av``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    num_frames, fps = _probe(path)
    indices = video_frame_indices(bound, fps, num_frames - 1, first_idx=0, num_segments=num_segments)
    return _decode_frames(path, indices), indices, fps


def load_video(
    path: str | os.PathLike,
    bound: Sequence[float] | None = None,
    input_size: int = 448,
    max_num: int = 1,
    num_segments: int = 32,
) -> VideoClip:
    """Sample ``num_segments`` frames (:func:`sample_frames`) and tile each (``max_num`` tiles, thumbnail).

    Mirrors the model-card ``load_video`` (which uses decord); :meth:`InternVLChatProcessor.load_video
    <internvl_fm.processing_internvl_chat.InternVLChatProcessor.load_video>` does the same with a model's settings.
    """
    frames, indices, fps = sample_frames(path, bound, num_segments)
    from internvl_fm.processing import build_transform

    transform = build_transform(input_size, mode="retrieval")
    per_frame = [tile_pixels(frame, input_size, max_num=max_num, use_thumbnail=True, transform=transform)
                 for frame in frames]
    return VideoClip(pixel_values=torch.cat(per_frame), num_patches_list=[t.shape[0] for t in per_frame],
                     frame_indices=indices, fps=fps)
