"""Zero-shot classification with InternVL-C / InternVL-G (the CLIP_benchmark protocol used by the paper).

Classifier weights, per class: format every template with the classname, tokenize with the InternVL contract
(`summarize:` prefix, EOS, pad 0, right padding, max_length 80), `encode_text` (EOS-pooled @ text_projection),
L2-normalise each, average over templates, re-normalise; columns of W [D, C]. Images: `encode_image` in the
chosen mode, L2-normalised; `logits = 100 * image @ W` (fixed 100, not `logit_scale`).

Speed: the official code pads every prompt to 80 tokens. With EOS pooling under a causal mask and right padding,
a token's hidden state never depends on what follows it, so sorting all prompts by length and padding each batch
only to its own longest prompt (`padding="dynamic"`, the default) gives the same weights for a fraction of the
compute (`benchmarks/bench_zeroshot.py`). The weights come from the core, `internvl_fm.evaluation`
(`zeroshot_classifier_weights`, public here as `build_zeroshot_weights`).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from internvl_fm.evaluation import Padding, zeroshot_classifier_weights as build_zeroshot_weights  # public name here
from internvl_fm.models.configuration_internvl import MODES

from ._utils import hash_json, load_tensors, module_fingerprint, save_tensors
from .errors import ClassificationError, FeatureDimError
from .evaluate import EvaluationResult, classification_metrics
from .prompts import imagenet_classnames, normalize_language, validate_labels, validate_templates, zeroshot_templates

ZEROSHOT_LOGIT_SCALE = 100.0
_MODE_ALIASES = {m.lower().replace("-", "_"): m for m in MODES} | {"c": "InternVL-C", "g": "InternVL-G"}


@dataclass
class ZeroShotPrediction:
    """The `top_k` labels of one image (or clip), best first, with their softmax probabilities over all classes and
    the raw cosine similarities (image . class embedding; the only informative score when there is one class)."""

    labels: list[str]
    probs: list[float]
    indices: list[int]
    cosines: list[float] = field(default_factory=list)

    def __iter__(self):
        return iter(zip(self.labels, self.probs))


def resolve_mode(mode: str) -> str:
    """`InternVL-C` / `InternVL-G` from a mode name (case-insensitive; `internvl_c`, `c`, `g` too): the one mode
    check of this package, at its boundary (classifier construction, the CLIP_benchmark loader)."""
    key = str(mode).strip().lower().replace("-", "_")
    resolved = _MODE_ALIASES.get(key)
    if resolved is None:
        raise ClassificationError(f"unknown mode {mode!r}; use one of {MODES}")
    return resolved


def _text_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256(model.text_projection.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(module_fingerprint(model.qllama).encode() if hasattr(model, "qllama") else b"")
    return h.hexdigest()[:16]


class ZeroShotClassifier(nn.Module):
    """A text-built linear classifier on top of an InternVL-C/G model.

    Build it with `ZeroShotClassifier.from_classnames(model, ["cat", "dog"])` (English templates by default) or
    `from_classnames(model, language="zh")` for ImageNet-1K in Chinese; then `predict(images, top_k=5)`.
    """

    def __init__(self, model: nn.Module, weights: torch.Tensor, classnames: Sequence[str], *,
                 mode: str = "InternVL-C", templates: Sequence[str] | None = None, language: str | None = None):
        super().__init__()
        classnames = list(classnames)
        if weights.ndim != 2 or weights.shape[1] != len(classnames):
            raise FeatureDimError(f"weights must be [embed_dim, {len(classnames)}] for {len(classnames)} classes, "
                                  f"got {tuple(weights.shape)}")
        embed_dim = model.text_projection.shape[1]
        if weights.shape[0] != embed_dim:
            raise FeatureDimError(f"weights have embedding width {weights.shape[0]}, the model {embed_dim}")
        self.model = model
        self.register_buffer("weights", weights.float().contiguous(), persistent=False)
        self.classnames = classnames
        self.mode = resolve_mode(mode)
        self.templates = list(templates) if templates is not None else None
        self.language = language
        self.image_processor = None

    # ------------------------------------------------------------------------------------------------ building
    @classmethod
    def from_classnames(
        cls,
        model: nn.Module,
        classnames: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        language: str = "en",
        *,
        mode: str = "InternVL-C",
        batch_size: int = 256,
        padding: Padding = "dynamic",
        cache_dir: str | os.PathLike | None = None,
        allow_duplicates: bool | None = None,
        progress: bool = True,
    ) -> ZeroShotClassifier:
        """Build the classifier (official protocol). Missing `classnames` = ImageNet-1K in `language`; missing
        `templates` = the bundled templates of `language`. Duplicate labels are refused except for the bundled
        ImageNet lists (which contain a few, as upstream). With `cache_dir` the weights are stored as safetensors
        keyed by model text weights + classnames + templates and reused on the next call."""
        language = normalize_language(language)
        bundled = classnames is None
        classnames = imagenet_classnames(language) if bundled else classnames
        classnames = validate_labels(classnames, allow_duplicates=bundled if allow_duplicates is None
                                     else allow_duplicates)
        templates = validate_templates(zeroshot_templates(language) if templates is None else templates)
        mode = resolve_mode(mode)  # before the weights are built (minutes for ImageNet)
        cache_file = None
        if cache_dir is not None:
            max_length = getattr(getattr(model, "tokenizer", None), "max_length", None)
            key = hash_json({"model": _text_fingerprint(model), "classnames": classnames, "templates": templates,
                             "max_length": max_length})
            cache_file = Path(cache_dir) / f"zeroshot-{key}.safetensors"
            if cache_file.is_file():
                return cls.load(cache_file, model, mode=mode)
        weights = build_zeroshot_weights(model, classnames, templates, batch_size=batch_size, padding=padding,
                                         progress=progress)
        clf = cls(model, weights, classnames, mode=mode, templates=templates, language=language)
        if cache_file is not None:
            clf.save(cache_file)
        return clf

    def save(self, path: str | os.PathLike) -> Path:
        """Write the weights [D, C] plus classnames / templates / language to a safetensors file (atomic)."""
        return save_tensors({"weights": self.weights}, path, {"classnames": self.classnames,
                                                              "templates": self.templates,
                                                              "language": self.language})

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, *, mode: str = "InternVL-C") -> ZeroShotClassifier:
        """Load weights saved by `save` and attach them to `model` (checked against its embedding width)."""
        tensors, meta = load_tensors(path)
        return cls(model, tensors["weights"], meta["classnames"], mode=mode, templates=meta.get("templates"),
                   language=meta.get("language"))

    # ----------------------------------------------------------------------------------------------- inference
    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def _processor(self):
        if self.image_processor is None:
            from internvl_fm.processing import InternVLImageProcessor

            self.image_processor = InternVLImageProcessor(self.model.image_size, mode="classification")
        return self.image_processor

    def _pixels(self, images: Any) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return images if images.ndim == 4 else images.unsqueeze(0)
        if isinstance(images, (str, os.PathLike)) or hasattr(images, "convert"):
            images = [images]
        images = list(images)
        if not images:
            raise ClassificationError("no images given")
        return self._processor()(images)

    @torch.no_grad()
    def embed_images(self, images: Any, *, batch_size: int = 32) -> torch.Tensor:
        """L2-normalised image embeddings [N, D] in this classifier's mode (classification transform:
        resize short side + center crop). `images`: PIL images, paths, or a pre-processed [N,3,S,S] tensor."""
        if isinstance(images, torch.Tensor):
            return self.model.embed_images(self._pixels(images), mode=self.mode, batch_size=batch_size)
        items = [images] if isinstance(images, (str, os.PathLike)) or hasattr(images, "convert") else list(images)
        if not items:
            raise ClassificationError("no images given")
        return torch.cat([self.model.embed_images(self._pixels(items[i:i + batch_size]), mode=self.mode,
                                                  batch_size=batch_size)
                          for i in range(0, len(items), batch_size)])

    def logits(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """`100 * normalize(image_embeds) @ W` -> [N, C]."""
        if image_embeds.ndim != 2 or image_embeds.shape[1] != self.weights.shape[0]:
            raise FeatureDimError(f"image embeddings must be [N, {self.weights.shape[0]}], "
                                  f"got {tuple(image_embeds.shape)}")
        emb = F.normalize(image_embeds.float(), dim=-1).to(self.weights.device)
        return ZEROSHOT_LOGIT_SCALE * emb @ self.weights

    def forward(self, images: Any) -> torch.Tensor:
        return self.logits(self.embed_images(images))

    def predict_proba(self, images: Any) -> torch.Tensor:
        """Softmax over all classes [N, C]."""
        return self.forward(images).softmax(dim=-1)

    def _top(self, logits: torch.Tensor, top_k: int) -> list[ZeroShotPrediction]:
        if top_k < 1:
            raise ClassificationError(f"top_k must be >= 1, got {top_k}")
        values, indices = logits.softmax(dim=-1).topk(min(top_k, self.num_classes), dim=-1)
        cosines = logits.gather(-1, indices) / ZEROSHOT_LOGIT_SCALE
        return [ZeroShotPrediction([self.classnames[i] for i in idx.tolist()], val.tolist(), idx.tolist(),
                                   cos.tolist()) for val, idx, cos in zip(values, indices, cosines)]

    def predict(self, images: Any, top_k: int = 5) -> list[ZeroShotPrediction]:
        """The `top_k` labels and probabilities of each image, best first."""
        return self._top(self.forward(images), top_k)

    # --------------------------------------------------------------------------------------------------- video
    @torch.no_grad()
    def embed_video(self, video: Any, num_frames: int = 8, *, batch_size: int = 32) -> torch.Tensor:
        """One clip embedding [D]: mean of the L2-normalised embeddings of `num_frames` uniformly sampled frames,
        re-normalised (paper: N = 1 or 8). `video`: a file path (decoded with PyAV), a list of PIL frames or a
        [T,3,S,S] tensor of pre-processed frames."""
        frames = sample_video_frames(video, num_frames)
        return F.normalize(self.embed_images(frames, batch_size=batch_size).mean(dim=0), dim=-1)

    def predict_video(self, video: Any, num_frames: int = 8, top_k: int = 5) -> ZeroShotPrediction:
        """Top-k labels of a clip from the average of its sampled frame embeddings."""
        return self._top(self.logits(self.embed_video(video, num_frames)[None]), top_k)[0]


@torch.no_grad()
def evaluate_zeroshot(classifier: ZeroShotClassifier, dataset: Any, *, batch_size: int = 32,
                      progress: bool = True) -> EvaluationResult:
    """Zero-shot top-1 / top-5 / mean per-class recall of `classifier` on a dataset of `(image, label)` items
    (labels index `classifier.classnames`)."""
    from .sources import image_loader

    loader = image_loader(dataset, classifier._processor(), batch_size=batch_size)
    logits, targets = [], []
    for pixels, labels in tqdm(loader, desc="zero-shot eval", disable=not progress, unit="batch"):
        emb = classifier.model.embed_images(pixels, mode=classifier.mode, batch_size=batch_size)
        logits.append(classifier.logits(emb).cpu())
        targets.append(labels)
    if not logits:
        raise ClassificationError("the dataset is empty")
    logits_t, targets_t = torch.cat(logits), torch.cat(targets)
    return EvaluationResult(classification_metrics(logits_t, targets_t), logits_t, targets_t,
                            list(classifier.classnames))


def sample_frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """Middle frame of each of `num_frames` equal segments (1 frame -> the central frame)."""
    if total_frames < 1:
        raise ClassificationError("the video has no frames")
    if num_frames < 1:
        raise ClassificationError(f"num_frames must be >= 1, got {num_frames}")
    seg = total_frames / num_frames
    return [min(total_frames - 1, int(seg / 2 + seg * i)) for i in range(num_frames)]


def read_video_frames(path: str | os.PathLike, num_frames: int) -> list:
    """Decode `num_frames` uniformly sampled RGB frames (PIL) of a video file with PyAV."""
    try:
        import av
    except ImportError as err:  # optional dependency (extra "video")
        raise ClassificationError("reading video files needs PyAV: pip install 'internvl-fm[video]'") from err
    path = Path(path)
    if not path.is_file():
        raise ClassificationError(f"video {path} not found")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        total = int(stream.frames or 0)
        if total > 0:  # frame count known: keep only the sampled frames while decoding
            wanted = sample_frame_indices(total, num_frames)
            kept: dict[int, Any] = {}
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    kept[i] = frame.to_image()
                if i >= wanted[-1]:
                    break
            if len(kept) == len(set(wanted)):
                return [kept[i].convert("RGB") for i in wanted]
            container.seek(0)
        frames = [frame.to_image() for frame in container.decode(stream)]
    if not frames:
        raise ClassificationError(f"video {path} has no decodable frames")
    return [frames[i].convert("RGB") for i in sample_frame_indices(len(frames), num_frames)]


def sample_video_frames(video: Any, num_frames: int) -> Any:
    """`num_frames` frames of a path / frame list / [T,3,S,S] tensor, sampled uniformly."""
    if isinstance(video, (str, os.PathLike)):
        return read_video_frames(video, num_frames)
    if isinstance(video, torch.Tensor):
        if video.ndim != 4:
            raise FeatureDimError(f"a video tensor must be [T, 3, S, S], got {tuple(video.shape)}")
        return video[sample_frame_indices(video.shape[0], num_frames)]
    frames = list(video)
    return [frames[i] for i in sample_frame_indices(len(frames), num_frames)]
