"""InternViT's fused oneDNN CPU path runs only when its private `torch.ops.mkldnn` ops exist and work (probed once,
cached); otherwise the plain path runs silently, with the same outputs (golden fixtures)."""
import json
import logging
import types

import pytest
import torch
from safetensors.torch import load_file

from internvl_fm import InternVisionModel
from internvl_fm.models import modeling_intern_vit as intern_vit


pytestmark = pytest.mark.usefixtures("no_grad")

CASES = ("internvit_6b", "internvit_300m")


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    """Each test starts with an empty probe cache (the process-wide one is restored afterwards)."""
    monkeypatch.setattr(intern_vit, "_ONEDNN_OPS_WORK", {})


def _case(golden, name, dtype=torch.float32):
    d = golden / name
    tol = json.loads((d / "manifest.json").read_text())["tolerances"]
    model = InternVisionModel.from_pretrained(d / "checkpoint", dtype=dtype).eval()
    return model, load_file(str(d / "inputs.safetensors")), load_file(str(d / "expected.safetensors")), tol


def _fused_ran(model: InternVisionModel) -> bool:
    """The weights are packed in place once the fused path has run (eval mode)."""
    return all(layer._packed is not None for layer in model.encoder.layers)


def _require_fused(dtype: torch.dtype) -> None:
    if not intern_vit._onednn_ops_work(dtype):
        pytest.skip(f"the fused oneDNN ops do not work for {dtype} in this torch build")


def _force_plain(monkeypatch, dtype: torch.dtype) -> None:
    monkeypatch.setitem(intern_vit._ONEDNN_OPS_WORK, dtype, False)


def _assert_matches_golden(model, x, e, tol):
    out = model(x["pixel_values"], output_hidden_states=True)
    torch.testing.assert_close(out.last_hidden_state, e["last_hidden_state"], **tol)
    torch.testing.assert_close(out.pooler_output, e["pooler_output"], **tol)
    torch.testing.assert_close(torch.stack(out.hidden_states), e["hidden_states"], **tol)
    torch.testing.assert_close(model(x["alt_pixel_values"]).last_hidden_state, e["alt_last_hidden_state"], **tol)


def test_probe_accepts_this_torch_build():
    """Where oneDNN and the ops are present the probe must pass, or the fast path would be lost silently."""
    mkldnn = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_linear_pointwise")
            and hasattr(mkldnn, "_reorder_linear_weight")):
        pytest.skip("this torch build has no oneDNN linear ops")
    assert intern_vit._onednn_ops_work(torch.float32)
    if mkldnn._is_mkldnn_bf16_supported():
        assert intern_vit._onednn_ops_work(torch.bfloat16)
    assert set(intern_vit._ONEDNN_OPS_WORK) >= {torch.float32}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype,atol", [pytest.param(torch.float32, 1e-5, id="float32"),
                                        pytest.param(torch.bfloat16, 5e-2, id="bfloat16")])
def test_plain_path_matches_fused_path(golden, monkeypatch, name, dtype, atol):
    _require_fused(dtype)
    model, x, _, _ = _case(golden, name, dtype)
    pixels = x["pixel_values"].to(dtype)
    fused = model(pixels, output_hidden_states=True)
    assert _fused_ran(model)
    model.release_inference_cache()
    _force_plain(monkeypatch, dtype)
    plain = model(pixels, output_hidden_states=True)
    assert not _fused_ran(model)
    torch.testing.assert_close(torch.stack(plain.hidden_states).float(), torch.stack(fused.hidden_states).float(),
                               atol=atol, rtol=atol)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("path", ["fused", "plain"])
def test_both_paths_match_golden(golden, monkeypatch, name, path):
    model, x, e, tol = _case(golden, name)
    if path == "fused":
        _require_fused(torch.float32)
    else:
        _force_plain(monkeypatch, torch.float32)
    _assert_matches_golden(model, x, e, tol)
    assert _fused_ran(model) == (path == "fused")


class _Linear:
    """Stand-in for `torch.ops.mkldnn._linear_pointwise` that is broken in a given way and counts its calls."""

    def __init__(self, broken: str):
        self.broken, self.calls = broken, 0
        real = torch.ops.mkldnn._linear_pointwise
        self._default, self._binary = real.default, real.binary

    def _run(self, op, *args):
        self.calls += 1
        if self.broken == "raises":
            raise RuntimeError("mkldnn_linear_pointwise: unsupported on this CPU")
        return op(*args) * 1.5  # "wrong": runs, but gives other numbers

    def __call__(self, *args):
        return self._run(self._default, *args)

    def binary(self, *args):
        return self._run(self._binary, *args)


@pytest.mark.parametrize("breakage", ["missing-op", "op-raises", "wrong-result", "no-mkldnn"])
def test_broken_ops_select_the_plain_path(golden, monkeypatch, caplog, breakage):
    model, x, e, tol = _case(golden, "internvit_6b")
    reorder = torch.ops.mkldnn._reorder_linear_weight
    linear = None
    if breakage == "missing-op":  # a torch release that renamed / dropped the private op
        monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace(_reorder_linear_weight=reorder))
    elif breakage == "no-mkldnn":
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    else:
        linear = _Linear("raises" if breakage == "op-raises" else "wrong")
        monkeypatch.setattr(torch.ops, "mkldnn",
                            types.SimpleNamespace(_reorder_linear_weight=reorder, _linear_pointwise=linear))
    with caplog.at_level(logging.DEBUG, logger=intern_vit.__name__):
        _assert_matches_golden(model, x, e, tol)  # no error, reference outputs
        _assert_matches_golden(model, x, e, tol)
    assert not _fused_ran(model)
    assert intern_vit._ONEDNN_OPS_WORK == {torch.float32: False}
    records = [r for r in caplog.records if r.name == intern_vit.__name__]
    assert len(records) == 1 and records[0].levelno == logging.DEBUG  # probed once, one debug line, no warning
    assert "plain path" in records[0].getMessage()
    if breakage == "missing-op":
        assert "_linear_pointwise" in records[0].getMessage()
    if linear is not None:
        assert 1 <= linear.calls <= 3  # only the probe's calls: the layers never used the broken op
