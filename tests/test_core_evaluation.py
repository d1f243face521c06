"""The core evaluation module against CLIP_benchmark's own metric code (the numbers users compare with)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from internvl_fm import InternVLModel
from internvl_fm.evaluation import (EvaluationInputError, class_prompt_weights, embed_token_ids,
                                    neighbor_recall_at_k, retrieval_recall_at_k, tokenize_prompts, topk_accuracy,
                                    zeroshot_classifier_weights)


def test_topk_accuracy_equals_clip_benchmark_exactly(monkeypatch):
    from clip_benchmark.metrics import zeroshot_classification
    from clip_benchmark.metrics.zeroshot_classification import accuracy

    # CLIP_benchmark calls float() on a 1-element array, which numpy 2 refuses: give its module a float that takes it
    monkeypatch.setattr(zeroshot_classification, "float", lambda x: float(np.asarray(x).reshape(-1)[0]),
                        raising=False)

    gen = torch.Generator().manual_seed(0)
    for n, c in ((1000, 10), (997, 37), (3, 5)):
        logits = torch.randn(n, c, generator=gen)
        targets = torch.randint(0, c, (n,), generator=gen)
        ours = topk_accuracy(logits, targets, (1, 5))
        theirs = accuracy(logits, targets, topk=(1, 5))
        assert ours == theirs  # bit for bit


def test_retrieval_recall_matches_clip_benchmark():
    from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k

    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(50, 20, generator=gen)
    positive = torch.zeros(50, 20, dtype=torch.bool)
    positive[torch.arange(50), torch.arange(50) % 20] = True
    positive[::3, 7] = True
    ours = retrieval_recall_at_k(scores, positive, ks=(1, 5, 10))
    for k in (1, 5, 10):
        theirs = (recall_at_k(scores, positive, k) > 0).float().mean().item()
        assert ours[f"r@{k}"] == pytest.approx(theirs, abs=1e-7)


def test_neighbor_recall_counts_found_true_neighbours():
    truth = np.array([[1, 2, 3], [4, 5, -1]])
    found = np.array([[3, 9, 1], [5, 4, 8]])
    assert neighbor_recall_at_k(found, truth, 3) == pytest.approx((2 / 3 + 1.0) / 2)
    assert neighbor_recall_at_k(found[:0], truth[:0], 3) == 1.0


def test_bad_shapes_are_named():
    with pytest.raises(EvaluationInputError, match="targets must be"):
        topk_accuracy(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(EvaluationInputError, match="target ids"):
        topk_accuracy(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(EvaluationInputError, match="differ in shape"):
        retrieval_recall_at_k(torch.zeros(2, 3), torch.zeros(3, 2))


@pytest.fixture(scope="module")
def demo_model():
    from internvl_fm import demo_model_path

    return InternVLModel.from_pretrained(demo_model_path())


def test_zeroshot_weights_follow_the_official_protocol(demo_model):
    classnames, templates = ["red", "green", "blue"], ["a {c} shape.", "a photo of something {c}."]
    weights = zeroshot_classifier_weights(demo_model, classnames, templates)
    with torch.no_grad():  # the official loop: pad to max_length, one class at a time
        expected = []
        for name in classnames:
            ids = demo_model.tokenizer([t.format(c=name) for t in templates], padding="max_length")["input_ids"]
            emb = torch.nn.functional.normalize(demo_model.encode_text(ids).float(), dim=-1).mean(0)
            expected.append(emb / emb.norm())
    torch.testing.assert_close(weights, torch.stack(expected, dim=1), atol=2e-6, rtol=1e-5)
    assert weights.shape == (demo_model.text_projection.shape[1], 3)


def test_dynamic_padding_equals_full_padding(demo_model):
    ids = tokenize_prompts(demo_model.tokenizer, ["a red circle", "a small blue square on the left", "green"])
    dynamic = embed_token_ids(demo_model, ids, batch_size=2, padding="dynamic")
    full = embed_token_ids(demo_model, ids, batch_size=2, padding="max_length")
    torch.testing.assert_close(dynamic, full, atol=2e-6, rtol=1e-5)
    with pytest.raises(EvaluationInputError, match="same, non-zero number"):
        class_prompt_weights(demo_model, [["a"], ["b", "c"]])
