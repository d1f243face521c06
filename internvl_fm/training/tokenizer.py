"""Train a small sentencepiece tokenizer and write it in the official LlamaTokenizer layout.

The files are the ones an InternVL-14B-224px checkpoint ships (`tokenizer.model`, `tokenizer_config.json`,
`special_tokens_map.json`), with LLaMA's special ids: `<unk>` 0 (also used as padding by InternVL-C/G), `<s>` 1,
`</s>` 2.  Any loader that reads the official tokenizer reads this one.

    python -m internvl_fm.training.tokenizer OUT_DIR --data DATA --vocab-size 1000
    python -m internvl_fm.training.tokenizer OUT_DIR --synthetic      # the demo model's tokenizer
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path
from typing import Iterable

from internvl_fm.loading import atomic_write

TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
# Everything a checkpoint may carry for its tokenizer (sentencepiece or `tokenizers` layout).
ALL_TOKENIZER_FILES: tuple[str, ...] = TOKENIZER_FILES + ("tokenizer.json", "added_tokens.json")
TEXT_PREFIX = "summarize:"  # what InternVLTokenizer puts in front of every retrieval text

_SPECIAL = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def tokenizer_config(model_max_length: int = 80) -> dict:
    """The `tokenizer_config.json` of a LLaMA sentencepiece tokenizer (same fields as the official files)."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): {**_added_token(tok), "special": True}
                                 for i, tok in enumerate(("<unk>", "<s>", "</s>"))},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,
        "model_max_length": model_max_length,
        "pad_token": None,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1000,
                    model_type: str = "bpe", prefix: str = TEXT_PREFIX) -> Path:
    """Train a sentencepiece model on `texts` and write the three LlamaTokenizer files into `out_dir`.

    Each text is also seen with `prefix` in front (exactly as InternVLTokenizer feeds it to the model), so the
    prefix gets compact pieces.  Byte fallback is on: characters absent from `texts` still encode, never to `<unk>`.
    `vocab_size` is an upper bound; a small corpus yields fewer pieces.
    """
    import sentencepiece as spm

    corpus = [t for t in texts if t and t.strip()]
    if not corpus:
        raise ValueError("train_tokenizer got no non-empty texts")
    corpus = sorted(set(corpus))
    sentences = corpus + [prefix + t for t in corpus] if prefix else corpus
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True, hard_vocab_limit=False,
        num_threads=1, minloglevel=2,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "tokenizer.model") as tmp:
        Path(tmp).write_bytes(model.getvalue())
    for name, content in (("tokenizer_config.json", tokenizer_config()),
                          ("special_tokens_map.json", {k: _added_token(v) for k, v in _SPECIAL.items()})):
        with atomic_write(out / name) as tmp:
            Path(tmp).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy whichever tokenizer files exist in `src` into `dst` (atomically); returns their names."""
    copied = []
    for name in ALL_TOKENIZER_FILES:
        path = Path(src) / name
        if path.is_file():
            with atomic_write(Path(dst) / name) as tmp:
                Path(tmp).write_bytes(path.read_bytes())
            copied.append(name)
    return copied


def main(argv: list[str] | None = None) -> int:
    """Train a sentencepiece tokenizer on the captions of a dataset folder, or on the synthetic caption vocabulary."""
    from .data import iter_texts, read_metadata, tokenizer_corpus

    parser = argparse.ArgumentParser(prog="python -m internvl_fm.training.tokenizer", description=main.__doc__)
    parser.add_argument("out", help="folder for tokenizer.model + tokenizer_config.json + special_tokens_map.json")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="dataset folder with metadata.jsonl (or the .jsonl file)")
    source.add_argument("--synthetic", action="store_true",
                        help="the word-level corpus of the synthetic shapes captions (internvl_fm.training.data)")
    parser.add_argument("--vocab-size", type=int, default=1000)
    args = parser.parse_args(argv)
    texts = tokenizer_corpus() if args.synthetic else iter_texts(read_metadata(args.data))
    out = train_tokenizer(texts, args.out, vocab_size=args.vocab_size)
    print(f"wrote tokenizer to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
