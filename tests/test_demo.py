"""The shipped tiny InternVL-C and `internvl-fm demo`: multilingual retrieval quality, zero-shot, offline demo run."""
from __future__ import annotations

import json
import time

import pytest
import torch

from internvl_fm.retrieval.demo import DEMO_MODEL, main, run_demo
from internvl_fm.models.modeling_internvl import InternVLModel
from internvl_fm.training.data import LANGUAGES, SyntheticConfig, generate_samples

HELD_OUT_SEED = 20261122  # never used for training (train seed 0, validation seed 1)


@pytest.fixture(scope="module")
def model():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield InternVLModel.from_pretrained(DEMO_MODEL)
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def held_out(model):
    samples = list(generate_samples(300, SyntheticConfig(image_size=model.image_size, seed=HELD_OUT_SEED)))
    records = [{"image": f"{s.index}.png", "text": s.text, "captions": s.captions, "attributes": s.attributes}
               for s in samples]
    return records, [s.image for s in samples]


def test_shipped_model_is_a_small_official_format_checkpoint():
    cfg = json.loads((DEMO_MODEL / "config.json").read_text())
    assert cfg["architectures"] == ["InternVLModel"] and cfg["model_type"] == "internvl"
    for name in ("model.safetensors", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (DEMO_MODEL / name).is_file(), name
    assert (DEMO_MODEL / "model.safetensors").stat().st_size < 10 * 2**20
    tok_cfg = json.loads((DEMO_MODEL / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "LlamaTokenizer"


def test_text_to_image_recall_at_5_per_language(model, held_out):
    from internvl_fm.training.evaluate import evaluate_retrieval

    records, images = held_out
    metrics = evaluate_retrieval(model, records, images, ks=(1, 5))
    per_language = {lang: m["t2i"]["r@5"] for lang, m in metrics["per_language"].items()}
    assert set(per_language) == set(LANGUAGES)
    assert min(per_language.values()) >= 0.9, per_language
    assert metrics["t2i"]["r@1"] >= 0.8, metrics["t2i"]


@pytest.mark.parametrize("attribute,chance,minimum", [("color", 1 / 6, 0.85), ("shape", 1 / 4, 0.55),
                                                      ("position", 1 / 5, 0.85)])
def test_zero_shot_attribute_classification_far_above_chance(model, held_out, attribute, chance, minimum):
    from internvl_fm.training.evaluate import zero_shot_attribute_accuracy

    records, images = held_out
    accuracy = zero_shot_attribute_accuracy(model, records, images, attribute, languages=("en", "zh"))
    assert accuracy >= minimum and accuracy > 2 * chance, accuracy


def test_demo_runs_offline_and_writes_a_gallery(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert main(["--seed", "3", "--num-images", "200", "--queries", "20", "--output", str(tmp_path),
                 "--threads", "1"]) == 0
    assert time.perf_counter() - start < 60
    out = capsys.readouterr().out
    for name in ("English", "Chinese", "Japanese", "Spanish", "French"):
        assert name in out
    assert "recall@5" in out and "score" in out
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert page.count("<figure") >= 5 * 5 and "data:image/png;base64," in page
    assert all(f"<b>{lang}</b>" in page for lang in LANGUAGES)


def test_run_demo_is_reproducible_for_a_seed():
    a, _, _ = run_demo(num_images=60, queries_per_language=5, seed=11)
    b, _, _ = run_demo(num_images=60, queries_per_language=5, seed=11)
    assert [q.text for q in a.queries] == [q.text for q in b.queries]
    assert [q.hits for q in a.queries] == [q.hits for q in b.queries]
    assert a.recall == b.recall and 0.0 <= a.recall["all"]["r@5"] <= 1.0


def test_demo_hits_come_from_a_retrieval_index_and_recall_from_its_hits(model):
    result, images, attributes = run_demo(num_images=40, queries_per_language=6, seed=5, top_k=3,
                                          languages=("en", "zh"))
    assert result.index_kind == "ImageIndex, faiss Flat (exact)"
    image_emb = model.embed_images(images)
    for lang in ("en", "zh"):
        queries = [q for q in result.queries if q.lang == lang]
        exact = (model.embed_texts([q.text for q in queries]) @ image_emb.t()).topk(3, dim=1)
        assert [q.hits for q in queries] == exact.indices.tolist()  # row id i is gallery image i
        assert all(q.scores == pytest.approx(s, abs=1e-4) for q, s in zip(queries, exact.values.tolist()))
        assert all(q.relevant == [attributes[i] == q.attributes for i in q.hits] for q in queries)
        assert result.recall[lang]["r@1"] == pytest.approx(sum(q.relevant[0] for q in queries) / len(queries))
        assert result.recall[lang]["r@1"] <= result.recall[lang]["r@5"]  # r@5 from 5 hits although 3 are shown
