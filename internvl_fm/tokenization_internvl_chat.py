"""Loading the tokenizer of an InternVL-Chat checkpoint without remote code."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from internvl_fm.errors import CheckpointNotFoundError, TokenizerContractError
from internvl_fm.loading import resolve_checkpoint

from internvl_fm.chat_templates import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN

__all__ = ["load_tokenizer", "find_tokenizer", "TOKENIZER_FILES"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# remote-code tokenizer classes -> the native transformers class that reads the same files
_NATIVE_TOKENIZERS = {"InternLM2Tokenizer": "LlamaTokenizer", "InternLM2TokenizerFast": "LlamaTokenizer"}


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a checkpoint folder; InternLM2's remote-code tokenizer is read as a native Llama tokenizer.

    Raises :class:`~internvl_fm.errors.TokenizerContractError` (a ``ValueError``) if the InternVL image tokens
    (``<img>``, ``</img>``, ``<IMG_CONTEXT>``) are missing; ``path`` is a folder or a hub id.
    """
    import transformers

    folder = resolve_checkpoint(path)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointNotFoundError(f"no tokenizer in {folder}: expected one of {', '.join(TOKENIZER_FILES)}")
    config_file = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    tokenizer_class = tokenizer_config.get("tokenizer_class") or ""
    kwargs = {}
    if tokenizer_class in _NATIVE_TOKENIZERS:
        # InternLM2Tokenizer's defaults: a BOS before every prompt, no EOS
        kwargs = {"add_bos_token": tokenizer_config.get("add_bos_token", True),
                  "add_eos_token": tokenizer_config.get("add_eos_token", False)}
    name = _NATIVE_TOKENIZERS.get(tokenizer_class, tokenizer_class)
    # the class named in tokenizer_config.json, directly: AutoTokenizer would consult config.json, whose
    # model_type (internvl_chat) transformers does not know
    cls = getattr(transformers, name, None) or getattr(transformers, name.removesuffix("Fast"), None)
    tokenizer = (cls or transformers.AutoTokenizer).from_pretrained(folder, **kwargs)
    unknown = tokenizer.unk_token_id
    missing = [t for t in (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
               if tokenizer.convert_tokens_to_ids(t) in (None, unknown)]
    if missing:
        raise TokenizerContractError(f"tokenizer in {folder} lacks the InternVL special tokens {missing}")
    return tokenizer


def find_tokenizer(folder: str | os.PathLike):
    """:func:`load_tokenizer` if ``folder`` holds tokenizer files, else ``None`` (a failure is a warning)."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return load_tokenizer(folder)
    except Exception as exc:  # the model is usable without it; say why it is absent
        warnings.warn(f"could not load the tokenizer of {folder}: {type(exc).__name__}: {exc}", stacklevel=2)
        return None
