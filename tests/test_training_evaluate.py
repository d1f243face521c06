"""Training-time evaluation on the demo model: retrieval recall as CLIP_benchmark computes it, zero-shot attribute
accuracy as the official per-class prompt loop gives it (both through the core `internvl_fm.evaluation`)."""
from __future__ import annotations

import pytest
import torch

from internvl_fm import InternVLModel, demo_model_path
from internvl_fm.evaluation import EvaluationInputError
from internvl_fm.training.data import TEMPLATES, SyntheticConfig, attribute_space, caption, generate_samples
from internvl_fm.training.evaluate import evaluate_retrieval, match_key, zero_shot_attribute_accuracy


@pytest.fixture(scope="module")
def model(one_thread):
    return InternVLModel.from_pretrained(demo_model_path())


@pytest.fixture(scope="module")
def held_out(model):
    samples = list(generate_samples(60, SyntheticConfig(image_size=model.image_size, seed=20261123)))
    records = [{"image": f"{s.index}.png", "text": s.text, "captions": s.captions, "attributes": s.attributes}
               for s in samples]
    return records, [s.image for s in samples]


def test_retrieval_recall_equals_clip_benchmark(model, held_out):
    from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k

    records, images = held_out
    records = [{k: v for k, v in r.items() if k != "attributes"} for r in records]  # relevant: its own image only
    metrics = evaluate_retrieval(model, records, images, ks=(1, 5, 10))
    image_emb = model.embed_images(images)
    owners = [i for i, r in enumerate(records) for _ in sorted(r["captions"])]
    text_emb = model.embed_texts([r["captions"][lang] for r in records for lang in sorted(r["captions"])])
    keys = [match_key(r, i) for i, r in enumerate(records)]
    positive = torch.tensor([[keys[o] == k for k in keys] for o in owners])  # [texts, images]
    scores = text_emb @ image_emb.t()
    for k in (1, 5, 10):  # CLIP_benchmark: a query counts when a positive is among its top k (float32 mean)
        t2i = (recall_at_k(scores, positive, k) > 0).float().mean().item()
        i2t = (recall_at_k(scores.t(), positive.t(), k) > 0).float().mean().item()
        assert metrics["t2i"][f"r@{k}"] == pytest.approx(t2i, abs=1e-6)
        assert metrics["i2t"][f"r@{k}"] == pytest.approx(i2t, abs=1e-6)
    assert metrics["num_queries"] == len(owners) and 0.0 < metrics["t2i"]["r@1"] < metrics["t2i"]["r@10"] <= 1.0
    hits = metrics["i2t"]["r@1"] * len(records)  # exact counts / N in float64
    assert hits == pytest.approx(round(hits), abs=1e-9)


@pytest.mark.parametrize("attribute", ["color", "shape"])
def test_zero_shot_attribute_accuracy_equals_the_per_class_prompt_loop(model, held_out, attribute):
    records, images = held_out
    languages = ("en", "zh")
    values = sorted({a[attribute] for a in attribute_space()})
    with torch.no_grad():  # the CLIP protocol, one class at a time: normalised prompt embeddings, mean, re-normalise
        columns = []
        for value in values:
            prompts = [caption(a, lang, t) for a in attribute_space() if a[attribute] == value
                       for lang in languages for t in range(len(TEMPLATES[lang]))]
            emb = model.embed_texts(prompts).mean(0)
            columns.append(emb / emb.norm())
        predicted = (model.embed_images(images) @ torch.stack(columns, dim=1)).argmax(1)
    truth = torch.tensor([values.index(r["attributes"][attribute]) for r in records])
    expected = int((predicted == truth).sum()) / len(records)
    assert zero_shot_attribute_accuracy(model, records, images, attribute, languages=languages) == expected
    assert expected > 1.5 / len(values)  # far from chance: the comparison is not between two constant answers


def test_bad_attribute_or_language_is_named(model, held_out):
    records, images = held_out
    with pytest.raises(EvaluationInputError, match="unknown attribute 'texture'"):
        zero_shot_attribute_accuracy(model, records, images, "texture")
    with pytest.raises(EvaluationInputError, match=r"languages must be some of en, zh, ja, es, fr; got \['en', 'de'\]"):
        zero_shot_attribute_accuracy(model, records, images, "color", languages=("en", "de"))
    with pytest.raises(ValueError, match=r"got \[\]"):
        zero_shot_attribute_accuracy(model, records, images, "color", languages=())
