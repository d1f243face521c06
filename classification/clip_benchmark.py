"""Let upstream CLIP_benchmark evaluate internvl-fm models, without forking it.

CLIP_benchmark needs a loader returning `(model, transform, tokenizer)` where `model.encode_image(pixels)` and
`model.encode_text(tokens)` give raw embeddings, `transform` maps one PIL image to a tensor and
`tokenizer(texts)` returns a LongTensor. `register_clip_benchmark()` adds `load_internvl_fm` to its model table:

    from internvl_fm.classification.clip_benchmark import register_clip_benchmark
    register_clip_benchmark()          # then: clip_benchmark eval --model_type internvl_fm
                                       #        --model InternVL-C --pretrained /path/to/InternVL-14B-224px ...
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from internvl_fm.evaluation import tokenize_prompts

from .errors import ClassificationError
from .zeroshot import resolve_mode

MODEL_TYPE = "internvl_fm"


class ClipBenchmarkModel(nn.Module):
    """`encode_image` / `encode_text` facade over an `InternVLModel` in a fixed mode (raw, unnormalised)."""

    def __init__(self, model: nn.Module, mode: str = "InternVL-C"):
        super().__init__()
        self.model = model
        self.mode = resolve_mode(mode)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images.to(device=self.model.device, dtype=self.model.dtype), mode=self.mode)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids.to(self.model.text_projection.device))


class ClipBenchmarkTokenizer:
    """`texts -> LongTensor [N, max_length]` under the InternVL contract (official padding to max_length)."""

    def __init__(self, tokenizer: Any):
        if tokenizer is None:
            raise ClassificationError("the checkpoint has no tokenizer files; CLIP_benchmark needs a tokenizer")
        self.tokenizer = tokenizer

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        return tokenize_prompts(self.tokenizer, [texts] if isinstance(texts, str) else texts)


def load_internvl_fm(model_name: str = "InternVL-C", pretrained: str | os.PathLike = "OpenGVLab/InternVL-14B-224px",
                     cache_dir: str | None = None, device: str | torch.device = "cpu",
                     dtype: torch.dtype | str | None = None
                     ) -> tuple[ClipBenchmarkModel, Callable[[Any], torch.Tensor], ClipBenchmarkTokenizer]:
    """CLIP_benchmark loader: `model_name` picks the mode, `pretrained` is the checkpoint folder or hub id.

    `cache_dir` is accepted for signature compatibility (hub downloads use the Hugging Face cache). The image
    transform is the classification one (resize short side + center crop), as in the paper's evaluation.
    """
    from internvl_fm.models.modeling_internvl import InternVLModel
    from internvl_fm.processing import build_transform

    mode = resolve_mode(model_name)
    model = InternVLModel.from_pretrained(pretrained, dtype=dtype, device=device)
    transform = build_transform(model.image_size, "classification")
    return ClipBenchmarkModel(model, mode).eval(), transform, ClipBenchmarkTokenizer(model.tokenizer)


def register_clip_benchmark(model_type: str = MODEL_TYPE) -> None:
    """Add `load_internvl_fm` to `clip_benchmark.models.TYPE2FUNC` / `MODEL_TYPES` (in place, idempotent)."""
    try:
        import clip_benchmark.models as cb_models
    except ImportError as err:
        raise ClassificationError("clip_benchmark is not installed: pip install 'internvl-fm[eval]'") from err
    cb_models.TYPE2FUNC[model_type] = load_internvl_fm
    if model_type not in cb_models.MODEL_TYPES:
        cb_models.MODEL_TYPES.append(model_type)  # the list object is shared with clip_benchmark.cli's choices
