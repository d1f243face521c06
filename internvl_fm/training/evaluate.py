"""Retrieval recall and zero-shot attribute classification for image-text sets with attribute metadata.

A retrieved item is relevant when it shares the query's match key: the generated attributes for the synthetic set
(every attribute must match), or the record itself for ordinary image-text pairs.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch

from internvl_fm.evaluation import EvaluationInputError, class_prompt_weights, retrieval_recall_at_k, topk_accuracy


def match_key(record: dict, index: int) -> str:
    """The key that decides relevance: the sorted attributes when the record has them, else the record index."""
    attributes = record.get("attributes")
    if isinstance(attributes, dict) and attributes:
        return json.dumps(attributes, sort_keys=True)
    return f"#{index}"


def _load_images(data_dir: Path, records: list[dict]) -> list[Any]:
    from internvl_fm.processing import load_image

    return [load_image(data_dir / r["image"]) for r in records]


def _texts_by_language(records: list[dict]) -> dict[str, list[tuple[int, str]]]:
    """lang -> [(record index, caption)]: every caption of every record, or the plain "text" under "all"."""
    by_lang: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for i, rec in enumerate(records):
        caps = rec.get("captions")
        if isinstance(caps, dict) and caps:
            for lang, text in caps.items():
                by_lang[lang].append((i, text))
        else:
            by_lang[rec.get("lang", "all")].append((i, rec["text"]))
    return dict(by_lang)


@torch.no_grad()
def evaluate_retrieval(model: Any, records: list[dict], images: Any, ks: Sequence[int] = (1, 5, 10),
                       batch_size: int = 128) -> dict[str, Any]:
    """Text->image and image->text recall@k, overall and per language.

    `images` are the gallery images (PIL images, paths or a pixel tensor) in the order of `records`; every caption
    of every record is a query.  Returns {"t2i": {"r@1": ...}, "i2t": {...}, "per_language": {lang: {"t2i":
    {...}}}, "num_images": N, "num_queries": Q}.
    """
    was_training = model.training
    model.eval()
    try:
        image_emb = model.embed_images(images, batch_size=batch_size)
        keys = [match_key(r, i) for i, r in enumerate(records)]
        key_ids = {k: n for n, k in enumerate(dict.fromkeys(keys))}
        image_keys = torch.tensor([key_ids[k] for k in keys])
        per_language: dict[str, dict[str, dict[str, float]]] = {}
        all_sims, all_rel, all_text_keys, all_text_emb = [], [], [], []
        for lang, items in sorted(_texts_by_language(records).items()):
            text_emb = model.embed_texts([t for _, t in items], batch_size=batch_size)
            text_keys = image_keys[torch.tensor([i for i, _ in items])]
            sims = text_emb @ image_emb.t()
            relevant = text_keys[:, None] == image_keys[None, :]
            per_language[lang] = {"t2i": retrieval_recall_at_k(sims, relevant, ks)}
            all_sims.append(sims)
            all_rel.append(relevant)
            all_text_keys.append(text_keys)
            all_text_emb.append(text_emb)
        text_emb = torch.cat(all_text_emb)
        text_keys = torch.cat(all_text_keys)
        i2t = retrieval_recall_at_k(image_emb @ text_emb.t(), image_keys[:, None] == text_keys[None, :], ks)
        return {"t2i": retrieval_recall_at_k(torch.cat(all_sims), torch.cat(all_rel), ks), "i2t": i2t,
                "per_language": per_language, "num_images": len(records), "num_queries": int(text_keys.numel())}
    finally:
        model.train(was_training)


@torch.no_grad()
def zero_shot_attribute_accuracy(model: Any, records: list[dict], images: Any, attribute: str,
                                 languages: Sequence[str] = ("en",), batch_size: int = 128) -> float:
    """Zero-shot classification accuracy of one generated attribute (e.g. "color" or "shape").

    Class embeddings follow the CLIP protocol (`internvl_fm.evaluation.class_prompt_weights`): for each class value,
    captions over all values of the other attributes (the prompt ensemble) are embedded, L2-normalised, averaged and
    re-normalised; each image takes the closest class.
    """
    from .data import LANGUAGES, TEMPLATES, attribute_space, caption

    space = attribute_space()
    if attribute not in space[0]:
        raise EvaluationInputError(f"unknown attribute {attribute!r}; choose one of {sorted(space[0])}")
    if not languages or any(lang not in TEMPLATES for lang in languages):
        raise EvaluationInputError(f"languages must be some of {', '.join(LANGUAGES)}; got {list(languages)}")
    values = sorted({a[attribute] for a in space})
    prompts = [[caption(a, lang, t) for a in space if a[attribute] == value
                for lang in languages for t in range(len(TEMPLATES[lang]))] for value in values]
    was_training = model.training
    model.eval()
    try:
        weights = class_prompt_weights(model, prompts, batch_size=batch_size)
        logits = model.embed_images(images, batch_size=batch_size) @ weights
        truth = torch.tensor([values.index(r["attributes"][attribute]) for r in records])
        return topk_accuracy(logits, truth, (1,))[0]
    finally:
        model.train(was_training)


def load_eval_set(data_dir: str | Path, limit: int | None = None) -> tuple[list[dict], list[Any]]:
    """Records and PIL images of a dataset folder (the first `limit` records)."""
    from .data import read_metadata

    data_dir = Path(data_dir)
    records = read_metadata(data_dir)[:limit]
    return records, _load_images(data_dir, records)
