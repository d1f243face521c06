"""`index build --quantization int8`: the index remembers the setting and every reader loads its model quantised
(unless told otherwise); results stay those of the full-precision model."""
from __future__ import annotations

import json

import pytest

from internvl_fm import demo_model_path
from internvl_fm.cli import main
from internvl_fm.quantization import is_quantized
from internvl_fm.retrieval import SearchIndex
from test_retrieval_common import make_images

pytest.importorskip("torchao")


def test_int8_index_is_remembered_and_searches_like_bf16(tmp_path, capsys):
    make_images(tmp_path / "photos", 12)
    base = ["index", "build", str(tmp_path / "photos"), "--model", str(demo_model_path()), "--dtype", "bfloat16",
            "--num-workers", "0", "--quiet"]
    assert main(base + [str(tmp_path / "int8"), "--quantization", "int8"]) == 0
    assert main(base + [str(tmp_path / "bf16")]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "int8" / "index.json").read_text())["model"]["quantization"] == "int8"
    int8, bf16 = SearchIndex.load(tmp_path / "int8"), SearchIndex.load(tmp_path / "bf16")
    hits8, hits16 = int8.search_text("a red square", k=3), bf16.search_text("a red square", k=3)
    assert is_quantized(int8.model) and not is_quantized(bf16.model)
    assert [h.image_path for h in hits8][:1] == [h.image_path for h in hits16][:1]
    override = SearchIndex.load(tmp_path / "int8", quantization="none")
    override.search_text("a red square", k=1)
    assert not is_quantized(override.model)
