"""The InternVL-C/G tokenizer contract: `summarize:` prefix, BOS + text + EOS, pad id 0, right padding, length 80.

EOS pooling takes the hidden state at `(ids > 0).sum(1) - 1`; a tokenizer that does not append EOS, pads with a
non-zero id or pads on the left would silently pool the wrong token, so such tokenizers are refused.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from internvl_fm.errors import TokenizerContractError

PREFIX = "summarize:"
MAX_LENGTH = 80
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file()


def validate_tokenizer(tokenizer: Any) -> None:
    """Raise TokenizerContractError unless `tokenizer` starts with BOS (when it has one), appends EOS, pads with id 0
    and pads on the right."""
    name = type(tokenizer).__name__
    if tokenizer.pad_token_id != 0:
        raise TokenizerContractError(f"{name} pads with id {tokenizer.pad_token_id}; InternVL EOS pooling needs pad id 0")
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise TokenizerContractError(f"{name} pads on the {tokenizer.padding_side}; InternVL EOS pooling needs right "
                                     "padding")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TokenizerContractError(f"{name} has no eos token; InternVL EOS pooling needs one")
    batch = tokenizer(["a", "a photo of a cat"], padding="longest", return_tensors="pt")["input_ids"]
    last = batch[torch.arange(2), (batch > 0).sum(1) - 1]
    if not bool((last == eos).all()):
        raise TokenizerContractError(f"{name} does not append the eos token (id {eos}) after the text: load it with "
                                     "add_eos_token=True")
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and not bool((batch[:, 0] == bos).all()):
        raise TokenizerContractError(f"{name} does not start a text with the bos token (id {bos}): InternVL text "
                                     "embeddings are BOS + text + EOS; load it with add_bos_token=True")
    if bool((batch[:, 0] == 0).any()):
        raise TokenizerContractError(f"{name} produced id 0 at the start of a text: id 0 must be padding only")


class InternVLTokenizer:
    """Wraps a transformers (Llama / sentencepiece) tokenizer with the InternVL-C/G text contract."""

    def __init__(self, tokenizer: Any, prefix: str = PREFIX, max_length: int = MAX_LENGTH):
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
        tokenizer.padding_side = "right"
        validate_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.prefix = prefix
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> "InternVLTokenizer":
        """Load the checkpoint's tokenizer with `add_eos_token=True` (as the model card does) and BOS (the official
        LlamaTokenizer's default: transformers 5 does not write `add_bos_token` when it saves a tokenizer, so a
        re-saved one would otherwise lose BOS once `add_eos_token` rebuilds its post-processor)."""
        from transformers import AutoTokenizer

        kwargs = {"add_bos_token": True, "add_eos_token": True, **kwargs}
        tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
        return cls(tokenizer)

    @property
    def prefix_length(self) -> int:
        """Number of tokens the prefix adds after BOS (MuLan drops them from the token states)."""
        return len(self.tokenizer(self.prefix, add_special_tokens=False)["input_ids"])

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def __call__(self, texts: Sequence[str] | str, padding: str = "max_length",
                 max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Token ids [N, L] (+ attention_mask) of `prefix + text`, right padded with 0."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be strings")
        batch = self.tokenizer([self.prefix + t for t in texts], padding=padding, truncation=True,
                               max_length=max_length or self.max_length, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": (batch["input_ids"] > 0).long()}

    def tokenize_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """Caption prompts: BOS + prompt, no EOS, no prefix (all prompts must tokenise to the same length)."""
        rows = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        if len({len(r) for r in rows}) > 1:
            raise ValueError("caption prompts of different token lengths; use one prompt per batch")
        return torch.tensor([[self.tokenizer.bos_token_id] + r for r in rows], dtype=torch.long)

    def batch_decode(self, ids: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(ids, **kwargs)

    def decode(self, ids: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(ids, **kwargs)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(str(folder))
