"""Evaluation shared by every task: retrieval recall@k, nearest-neighbour recall of an approximate index, top-k
accuracy, and zero-shot classifier weights (the CLIP_benchmark protocol the InternVL paper uses).

Two recalls, two meanings, two names:
- `retrieval_recall_at_k`: fraction of queries with at least one relevant item among their top k (image-text
  retrieval, as CLIP_benchmark reports it).
- `neighbor_recall_at_k`: fraction of the exact top-k neighbours an approximate index also returns (index quality).
Ratios are counts divided in float64, so they equal CLIP_benchmark's numbers exactly.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from internvl_fm.errors import InternVLError

Padding = Literal["dynamic", "max_length"]


class EvaluationInputError(InternVLError, ValueError):
    """Inputs of a metric that do not fit together (shapes, label ids, batch sizes). Names both sides."""


def retrieval_recall_at_k(similarity: torch.Tensor, relevant: torch.Tensor,
                          ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """{"r@k": fraction of query rows with a relevant column among their k most similar} for `similarity` and the
    boolean `relevant`, both [queries, items]."""
    if similarity.shape != relevant.shape:
        raise EvaluationInputError(f"similarity {tuple(similarity.shape)} and relevant {tuple(relevant.shape)} "
                                   "differ in shape")
    if similarity.shape[0] == 0:
        return {f"r@{k}": 0.0 for k in ks}
    order = similarity.argsort(dim=1, descending=True, stable=True)
    hits = torch.gather(relevant.bool(), 1, order)
    return {f"r@{k}": int(hits[:, :k].any(dim=1).sum()) / hits.shape[0] for k in ks}


def neighbor_recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k ids (`truth`, -1 = none) that the approximate top-k (`found`) contains."""
    hits = [len(set(f[:k]) & set(t[:k]) - {-1}) / max(1, len(set(t[:k]) - {-1})) for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else 1.0


def check_logits_targets(logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Raise EvaluationInputError unless `logits` is [N, C] and `targets` is [N] with ids in [0, C)."""
    if logits.ndim != 2:
        raise EvaluationInputError(f"logits must be [N, num_classes], got shape {tuple(logits.shape)}")
    if targets.ndim != 1 or targets.shape[0] != logits.shape[0]:
        raise EvaluationInputError(f"targets must be [N] with N = {logits.shape[0]} (rows of logits), got shape "
                                   f"{tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
        raise EvaluationInputError(f"target ids must lie in [0, {logits.shape[1]}); got range "
                                   f"[{int(targets.min())}, {int(targets.max())}]")


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, topk: Sequence[int] = (1, 5)) -> list[float]:
    """Fraction of rows whose target is among the k highest logits, for each k (hit counts / N in float64, as
    CLIP_benchmark computes them). NaN for an empty set."""
    check_logits_targets(logits, targets)
    if targets.numel() == 0:
        return [float("nan")] * len(topk)
    kmax = min(max(topk), logits.shape[1])
    hits = logits.topk(kmax, dim=1).indices.eq(targets.view(-1, 1))
    return [int(hits[:, :min(k, kmax)].any(dim=1).sum()) / targets.shape[0] for k in topk]


@torch.no_grad()
def embed_token_ids(model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 256,
                    padding: Padding = "dynamic", progress: bool = False,
                    desc: str = "text prompts") -> torch.Tensor:
    """L2-normalised float32 text embeddings [N, D] of right-padded (pad id 0) token ids, in input order.

    `padding="dynamic"`: prompts are sorted by length and each batch is cut to its longest prompt (exact for EOS
    pooling under causal attention, a fraction of the compute). `"max_length"`: the official protocol, every row at
    full width, in input order.
    """
    from tqdm.auto import tqdm

    if padding not in ("dynamic", "max_length"):
        raise EvaluationInputError(f"padding must be 'dynamic' or 'max_length', got {padding!r}")
    if batch_size < 1:
        raise EvaluationInputError(f"batch_size must be >= 1, got {batch_size}")
    device = model.text_projection.device
    n = input_ids.shape[0]
    lengths = (input_ids > 0).sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True) if padding == "dynamic" else torch.arange(n)
    out = torch.empty(n, model.text_projection.shape[1], dtype=torch.float32)
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="batch"):
        idx = order[start:start + batch_size]
        ids = input_ids[idx]
        if padding == "dynamic":
            ids = ids[:, :int(lengths[idx].max())]
        out[idx] = F.normalize(model.encode_text(ids.to(device)).float(), dim=-1).cpu()
    return out


def tokenize_prompts(tokenizer: Any, texts: Sequence[str], *, chunk_size: int = 4096) -> torch.Tensor:
    """Token ids [N, max_length] of `texts` under the InternVL contract (every row padded to max_length)."""
    chunks = [tokenizer(list(texts[i:i + chunk_size]), padding="max_length")["input_ids"]
              for i in range(0, len(texts), chunk_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, 0, dtype=torch.long)


@torch.no_grad()
def class_prompt_weights(model: nn.Module, prompts_per_class: Sequence[Sequence[str]], *, tokenizer: Any = None,
                         batch_size: int = 256, padding: Padding = "dynamic", progress: bool = False) -> torch.Tensor:
    """Zero-shot classifier weights [D, C] (float32): for each class, the mean of its L2-normalised prompt
    embeddings, re-normalised. Every class needs the same number of prompts; all are encoded in shared batches."""
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise EvaluationInputError("the model has no tokenizer: pass tokenizer=InternVLTokenizer(...)")
    counts = {len(p) for p in prompts_per_class}
    if len(counts) != 1 or 0 in counts:
        raise EvaluationInputError(f"every class needs the same, non-zero number of prompts; got {sorted(counts)}")
    per_class = counts.pop()
    texts = [text for prompts in prompts_per_class for text in prompts]
    emb = embed_token_ids(model, tokenize_prompts(tokenizer, texts), batch_size=batch_size, padding=padding,
                          progress=progress,
                          desc=f"zero-shot weights ({len(prompts_per_class)} classes x {per_class} prompts)")
    emb = emb.view(len(prompts_per_class), per_class, -1).mean(dim=1)
    return F.normalize(emb, dim=-1).t().contiguous()


def zeroshot_classifier_weights(model: nn.Module, classnames: Sequence[str], templates: Sequence[str],
                                **kwargs: Any) -> torch.Tensor:
    """Zero-shot classifier weights [D, C] for `classnames` under the prompt `templates` (`{c}` is the class
    name): the CLIP_benchmark / InternVL protocol. Keyword arguments go to `class_prompt_weights`."""
    return class_prompt_weights(model, [[tpl.format(c=name) for tpl in templates] for name in classnames], **kwargs)
