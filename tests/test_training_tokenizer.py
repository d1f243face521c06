"""The tiny sentencepiece tokenizer: official LlamaTokenizer layout, LLaMA special ids, InternVL contract."""
from __future__ import annotations

import json

import pytest

from internvl_fm.training import data as D
from internvl_fm.training.tokenizer import TOKENIZER_FILES, copy_tokenizer_files, train_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_tokenizer(D.tokenizer_corpus(), tmp_path_factory.mktemp("tok"), vocab_size=1000)


def test_files_and_special_ids(tok_dir):
    import sentencepiece as spm

    assert all((tok_dir / name).is_file() for name in TOKENIZER_FILES)
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "LlamaTokenizer" and cfg["bos_token"] == "<s>" and cfg["eos_token"] == "</s>"


def test_llama_tokenizer_reads_it_and_round_trips_all_languages(tok_dir):
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(str(tok_dir))
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    attrs = {"shape": "triangle", "color": "orange", "size": "large", "position": "bottom"}
    for lang in D.LANGUAGES:
        text = D.caption(attrs, lang, 1)
        ids = tok(text)["input_ids"]
        assert ids[0] == 1 and 0 not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_cjk_attribute_words_stay_separate_pieces(tok_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    pieces = [p.lstrip("\u2581") for p in sp.encode("summarize:左边有一个小红色圆形", out_type=str)]
    assert "红色" in pieces and "圆形" in pieces and "左边" in pieces
    assert sp.encode("Ω", out_type=int)[0] != 0  # unseen characters fall back to bytes, not <unk>


def test_internvl_tokenizer_contract(tok_dir):
    from internvl_fm.tokenization import InternVLTokenizer

    tok = InternVLTokenizer.from_pretrained(tok_dir)
    batch = tok(["a small red circle on the left", "左側に大きい紫の星"], padding="longest")["input_ids"]
    lengths = (batch > 0).sum(1)
    assert batch[0, 0] == 1 and all(batch[i, lengths[i] - 1] == 2 for i in range(2))
    assert (batch[1, lengths[1]:] == 0).all()


def test_copy_tokenizer_files(tok_dir, tmp_path):
    assert set(copy_tokenizer_files(tok_dir, tmp_path)) == set(TOKENIZER_FILES)
    assert (tmp_path / "tokenizer.model").read_bytes() == (tok_dir / "tokenizer.model").read_bytes()


def test_empty_corpus_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no non-empty texts"):
        train_tokenizer(["", "  "], tmp_path)
