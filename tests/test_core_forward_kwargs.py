"""QLLaMA forwards take the KV cache under both names transformers uses and refuse arguments they do not know.

transformers 5.24 hands the cache to `forward` as `cache=` (before: `past_key_values=`). A forward that swallowed
unknown keyword arguments ran every decode step without its cache on a one-token input: wrong captions, silently.
"""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from internvl_fm import InternVLModel


@pytest.fixture(scope="module")
def qllama(tiny_clip_path):
    return InternVLModel.from_pretrained(tiny_clip_path).qllama


def _step_logits(qllama, cache_kw: str) -> torch.Tensor:
    ids = torch.tensor([[5, 9, 13, 21, 7]])
    with torch.no_grad():
        cache = DynamicCache(config=qllama.config)
        qllama(input_ids=ids[:, :4], use_cache=True, **{cache_kw: cache})
        assert cache.get_seq_length() == 4
        return qllama(input_ids=ids[:, 4:], use_cache=True, **{cache_kw: cache}).logits[:, -1]


def test_cache_under_either_name_equals_the_full_forward(qllama):
    ids = torch.tensor([[5, 9, 13, 21, 7]])
    with torch.no_grad():
        full = qllama(input_ids=ids).logits[:, -1]
    for name in ("past_key_values", "cache"):
        torch.testing.assert_close(_step_logits(qllama, name), full, atol=1e-5, rtol=1e-4)


def test_unknown_keyword_arguments_raise(qllama):
    ids = torch.tensor([[5, 9]])
    with pytest.raises(TypeError, match="cache_params"):
        qllama(input_ids=ids, cache_params=None)
    with pytest.raises(TypeError):
        qllama.model(input_ids=ids, not_an_argument=1)
    with pytest.raises(ValueError, match="output_attentions"):
        qllama(input_ids=ids, output_attentions=True)


def test_cache_passed_twice_is_refused(qllama):
    ids = torch.tensor([[5, 9]])
    with pytest.raises(ValueError, match="once"):
        qllama(input_ids=ids, past_key_values=DynamicCache(config=qllama.config),
               cache=DynamicCache(config=qllama.config), use_cache=True)
