"""Shared fixtures: paths of the golden fixtures (made by the official reference code) and tiny checkpoints."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
GOLDEN = Path(os.environ.get("INTERNVL_GOLDEN", FIXTURES / "golden"))
REALCONFIGS = FIXTURES / "realconfigs"

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def golden() -> Path:
    if not GOLDEN.is_dir():
        pytest.fail(f"golden fixtures not found at {GOLDEN} (set INTERNVL_GOLDEN)")
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_clip_path(golden) -> Path:
    return golden / "internvl_c_g" / "checkpoint"


@pytest.fixture(scope="session")
def tiny_vit_path(golden) -> Path:
    return golden / "internvit_300m" / "checkpoint"


@pytest.fixture(scope="session")
def tiny_vit_6b_path(golden) -> Path:
    return golden / "internvit_6b" / "checkpoint"


@pytest.fixture
def no_grad():
    """Run a test without autograd (inference paths)."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Small convolutions / tiny models on a shared 2-core machine run fastest (and reproducibly) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def spy_on_writes(monkeypatch, obj) -> list[str]:
    """Record the name of every attribute assigned on `obj` (through its class's __setattr__) from now on."""
    writes: list[str] = []
    original = type(obj).__setattr__

    def record(self, name, value):
        if self is obj:
            writes.append(name)
        original(self, name, value)

    monkeypatch.setattr(type(obj), "__setattr__", record)
    return writes


@pytest.fixture(scope="module")
def tiny_chat_tokenizer():
    """The tiny chat tokenizer of internvl_fm.chat.testing (InternVL special tokens included)."""
    from internvl_fm.chat.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_chat(tiny_chat_tokenizer):
    """A tiny random InternVL-Chat model matching `tiny_chat_tokenizer` (seed 0)."""
    from internvl_fm.chat.testing import tiny_chat_config, tiny_chat_model

    return tiny_chat_model(tiny_chat_config(len(tiny_chat_tokenizer)), seed=0)
