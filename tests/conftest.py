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


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,900")


def headless_chromium(profile_dir: Path, browser_log: bool = False):
    """A selenium driver of Debian's headless Chromium with a fresh profile in `profile_dir` (skips the test when
    selenium, chromium or chromedriver is missing; CI installs them). `browser_log`: keep the console log."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("Debian chromium + chromium-driver are not installed here (CI installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    if browser_log:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
