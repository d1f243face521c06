"""Streaming loads: keys and shapes checked from the file headers before any tensor is read, tensors read one at a
time and cast as read (the loading peak stays near the final weights), int8 applied layer by layer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from internvl_fm import loading
from internvl_fm.errors import WeightLoadingError
from internvl_fm.loading import WeightFiles
from internvl_fm.models.configuration_intern_vit import InternVisionConfig
from internvl_fm.models.modeling_intern_vit import InternVisionModel

# ~340 MB in float32 (85M parameters: a ViT-B-wide InternViT), three shards
BIG = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, image_size=224,
           patch_size=14, qkv_bias=True, qk_normalization=False, norm_type="layer_norm")


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big_vit")
    torch.manual_seed(0)
    model = InternVisionModel(InternVisionConfig(**BIG)).eval()
    model.save_pretrained(folder, max_shard_bytes=120 * 2**20)
    assert len(list(folder.glob("model-*-of-*.safetensors"))) == 3
    return folder


_PEAK_SCRIPT = textwrap.dedent("""
    import gc, json, re, sys
    from internvl_fm.models.modeling_intern_vit import InternVisionModel

    def status(field):  # bytes
        return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

    big, tiny, quantization = sys.argv[1], sys.argv[2], None if sys.argv[3] == "none" else sys.argv[3]
    # warm up: lazy imports and first-call code pages are the baseline, not the load
    InternVisionModel.from_pretrained(tiny, dtype="bfloat16", quantization=quantization)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak RSS (VmHWM) to the current RSS
        fh.write("5")
    before = status("VmRSS")
    model = InternVisionModel.from_pretrained(big, dtype="bfloat16", quantization=quantization)
    peak = status("VmHWM") - before

    def nbytes(t):
        parts = [getattr(t, name) for name in t.__tensor_flatten__()[0]] if hasattr(t, "__tensor_flatten__") else [t]
        return sum(p.numel() * p.element_size() for p in parts)

    weights = sum(nbytes(t) for t in model.state_dict().values())
    print(json.dumps({"peak": peak, "weights": weights, "dtype": str(model.dtype)}))
""")


def _load_peak(folder, tiny, quantization: str = "none") -> dict:
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(folder), str(tiny), quantization],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bf16_load_of_an_fp32_checkpoint_peaks_near_the_final_weights(big_checkpoint, tiny_vit_path):
    stored = sum(f.stat().st_size for f in big_checkpoint.glob("*.safetensors"))
    result = _load_peak(big_checkpoint, tiny_vit_path)
    assert result["dtype"] == "torch.bfloat16"
    assert result["weights"] == pytest.approx(stored / 2, rel=0.01)  # the checkpoint is float32
    ratio = result["peak"] / result["weights"]
    print(f"bf16 load peak / bf16 weights = {ratio:.3f}")
    assert ratio <= 1.1, result


def test_int8_load_never_holds_the_bf16_model(big_checkpoint, tiny_vit_path):
    result = _load_peak(big_checkpoint, tiny_vit_path, "int8")
    bf16_bytes = sum(f.stat().st_size for f in big_checkpoint.glob("*.safetensors")) / 2
    print(f"int8 load peak / bf16 weights = {result['peak'] / bf16_bytes:.3f}, "
          f"/ int8 weights = {result['peak'] / result['weights']:.3f}")
    assert result["weights"] < 0.6 * bf16_bytes
    # int8 weights + the quantisation temporaries of one layer (torchao works in float32): measured 0.71-0.77
    assert result["peak"] <= 0.85 * bf16_bytes, result


def test_streamed_cast_equals_casting_the_stored_tensors(tiny_vit_path, monkeypatch):
    monkeypatch.setattr(loading, "_READ_CHUNK_BYTES", 96)  # many chunks per tensor, a partial last one
    files = WeightFiles(tiny_vit_path)
    from safetensors.torch import load_file

    stored = load_file(tiny_vit_path / "model.safetensors")
    streamed = dict(files.stream(dtype=torch.bfloat16))
    assert streamed.keys() == stored.keys()
    for key, value in stored.items():
        assert streamed[key].dtype == (torch.bfloat16 if value.is_floating_point() else value.dtype)
        assert torch.equal(streamed[key], value.to(streamed[key].dtype)), key
    assert all(torch.equal(v, stored[k]) for k, v in files.stream())


def test_sharded_fp32_load_as_bf16_matches_cast_model(big_checkpoint):
    full = InternVisionModel.from_pretrained(big_checkpoint)
    half = InternVisionModel.from_pretrained(big_checkpoint, dtype=torch.bfloat16)
    ref = full.state_dict()
    for key, value in half.state_dict().items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, ref[key].to(torch.bfloat16)), key


def _copy_with(src, dst, edit):
    """A copy of the checkpoint `src` whose tensors pass through `edit(dict) -> dict`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    save_file(edit(load_file(src / "model.safetensors")), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _no_tensor_read(monkeypatch):
    reads = []
    real = loading._read_safetensors_tensor
    monkeypatch.setattr(loading, "_read_safetensors_tensor", lambda *a, **k: reads.append(a) or real(*a, **k))
    return reads


@pytest.mark.parametrize("edit,named", [
    (lambda sd: {k: v for k, v in sd.items() if k != "encoder.layers.0.mlp.fc1.bias"},
     r"missing keys \(1\): encoder\.layers\.0\.mlp\.fc1\.bias"),
    (lambda sd: {**sd, "encoder.layers.0.extra": torch.zeros(2)}, r"unexpected keys \(1\): encoder\.layers\.0\.extra"),
    (lambda sd: {**sd, "encoder.layers.1.ls1": torch.zeros(5)}, r"shape mismatches \(1\): encoder\.layers\.1\.ls1"),
])
def test_key_problems_are_named_before_any_tensor_is_read(tiny_vit_path, tmp_path, monkeypatch, edit, named):
    folder = _copy_with(tiny_vit_path, tmp_path / "ckpt", edit)
    reads = _no_tensor_read(monkeypatch)
    with pytest.raises(WeightLoadingError, match=named):
        InternVisionModel.from_pretrained(folder, dtype="bfloat16")
    assert reads == []


def test_truncated_file_is_named(tiny_vit_path, tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_vit_path, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(WeightLoadingError, match="model.safetensors.*(truncated|ends before)"):
        InternVisionModel.from_pretrained(folder)


def test_not_a_safetensors_file_is_named(tiny_vit_path, tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_vit_path, folder)
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(WeightLoadingError, match="not a readable safetensors file"):
        InternVisionModel.from_pretrained(folder)


@pytest.mark.parametrize("llm", ["internlm2", "qwen2"])
def test_chat_layouts_stream_tensor_by_tensor(tmp_path, llm):
    """InternLM2's fused wqkv converts key by key, so chat checkpoints stream too (and load exactly)."""
    from internvl_fm.chat.testing import save_tiny_chat_checkpoint
    from internvl_fm.models.modeling_internvl_chat import InternVLChatModel

    folder = save_tiny_chat_checkpoint(tmp_path / llm, llm=llm)
    with torch.device("meta"):
        meta = InternVLChatModel(InternVLChatModel.config_from_checkpoint(folder))
    files = WeightFiles(folder)
    prefix, keys = meta._select_keys(meta, files.keys())
    assert meta._check_checkpoint(files, prefix, keys, torch.bfloat16) is True
    model = InternVLChatModel.from_pretrained(folder, dtype=torch.bfloat16, load_tokenizer=False)
    stored = loading.load_state_dict(folder, dtype=torch.bfloat16)
    written = model.checkpoint_state_dict()
    assert written.keys() == stored.keys()
    assert all(torch.equal(written[k], stored[k]) for k in stored)


def test_whole_dict_conversions_still_load(tiny_vit_path):
    """A layout conversion that needs several tensors at once (here: it drops a key unless it sees its partner)
    falls back to converting the whole state dict."""
    class Paired(InternVisionModel):
        def convert_checkpoint_state_dict(self, state):
            if "encoder.layers.0.ls1" in state and "encoder.layers.0.ls2" not in state:
                raise KeyError("needs ls2 too")
            return state

    model = Paired.from_pretrained(tiny_vit_path)
    ref = InternVisionModel.from_pretrained(tiny_vit_path)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
