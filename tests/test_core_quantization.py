"""int8 (torchao) through `from_pretrained(..., quantization=...)`: which layers, quality against bfloat16, the fused
CPU path skipping quantised layers, errors, saving, and the `--quantization` option."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import internvl_fm
from internvl_fm.models.configuration_intern_vit import InternVisionConfig
from internvl_fm.models.modeling_intern_vit import InternVisionModel
from internvl_fm.models.modeling_internvl import InternVLModel, InternVLTextModel
from internvl_fm.quantization import Int8Linear, QuantizationError, is_quantized

pytest.importorskip("torchao")

DEMO = internvl_fm.demo_model_path()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=-1).min().item()


def _linears(model: nn.Module, kind: type) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is kind]


@pytest.fixture(scope="module")
def demo_pair():
    return (InternVLModel.from_pretrained(DEMO, dtype="bfloat16"),
            InternVLModel.from_pretrained(DEMO, dtype="bfloat16", quantization="int8"))


def test_int8_replaces_the_block_linears_only(demo_pair):
    ref, model = demo_pair
    quantized = _linears(model, Int8Linear)
    assert quantized and all(n.startswith(("vision_model.encoder.layers.", "qllama.model.layers.")) for n in quantized)
    assert set(quantized) == {n for n in _linears(ref, nn.Linear)
                              if n.startswith(("vision_model.encoder.layers.", "qllama.model.layers."))}
    assert type(model.qllama.lm_head) is nn.Linear and type(model.clip_projector.cross_attn.q) is nn.Linear
    assert model.vision_model.encoder.layers[0].mlp.fc1.weight.qdata.dtype == torch.int8
    assert is_quantized(model) and not is_quantized(ref)


@torch.no_grad()
def test_demo_embeddings_match_bf16(demo_pair):
    ref, model = demo_pair
    torch.manual_seed(0)
    pixels = torch.randn(4, 3, ref.image_size, ref.image_size)
    for mode in ("InternVL-C", "InternVL-G"):
        assert _cosine(model.encode_image(pixels, mode=mode), ref.encode_image(pixels, mode=mode)) >= 0.999, mode
    texts = ["a red circle on the left", "ein blauer Stern", "一个绿色的三角形", "a yellow square at the bottom"]
    assert _cosine(model.embed_texts(texts), ref.embed_texts(texts)) >= 0.999


def test_demo_zero_shot_predictions_unchanged(demo_pair):
    from internvl_fm.evaluation import class_prompt_weights
    from internvl_fm.training.data import SyntheticConfig, attribute_space, caption, generate_samples

    ref, model = demo_pair
    images = [s.image for s in generate_samples(60, SyntheticConfig(image_size=ref.image_size, seed=20261122))]
    space = attribute_space()
    values = sorted({a["color"] for a in space})
    prompts = [[caption(a, "en", 0) for a in space if a["color"] == v] for v in values]
    with torch.no_grad():
        predictions = [(m.embed_images(images) @ class_prompt_weights(m, prompts)).argmax(-1) for m in (ref, model)]
    assert torch.equal(predictions[0], predictions[1])


@torch.no_grad()
def test_realistic_width_random_weights_embeddings_match_bf16(tmp_path):
    """InternViT-300M shape (1024 wide, 16 heads, MLP 4096), 3 blocks, 224 px."""
    config = InternVisionConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=3,
                                image_size=224, patch_size=14, qkv_bias=True, qk_normalization=False,
                                norm_type="layer_norm", initializer_factor=0.1)
    torch.manual_seed(0)
    InternVisionModel(config).init_weights().save_pretrained(tmp_path)
    ref = InternVisionModel.from_pretrained(tmp_path, dtype="bfloat16")
    model = InternVisionModel.from_pretrained(tmp_path, dtype="bfloat16", quantization="int8")
    assert len(_linears(model, Int8Linear)) == 12
    pixels = torch.randn(2, 3, 224, 224)
    out, expected = model(pixels), ref(pixels)
    assert _cosine(out.pooler_output, expected.pooler_output) >= 0.999
    assert _cosine(out.last_hidden_state.mean(1), expected.last_hidden_state.mean(1)) >= 0.999


@torch.no_grad()
def test_fused_cpu_path_is_skipped_for_quantized_layers(tiny_vit_path):
    model = InternVisionModel.from_pretrained(tiny_vit_path, dtype="bfloat16", quantization="int8")
    layer = model.encoder.layers[0]
    assert not layer._fusable
    x = torch.randn(2, 5, model.config.hidden_size, dtype=torch.bfloat16)
    no_grad = layer(x)
    with torch.enable_grad():
        plain = layer(x)  # autograd on: always the plain path (SDPA instead of the eager no-grad attention)
    torch.testing.assert_close(no_grad, plain.detach(), atol=2e-2, rtol=2e-2)
    assert model(torch.randn(1, 3, 224, 224)).pooler_output.isfinite().all()


@torch.no_grad()
def test_text_model_int8(demo_pair):
    ref = demo_pair[0]
    model = InternVLTextModel.from_pretrained(DEMO, dtype="bfloat16", quantization="int8")
    quantized = _linears(model, Int8Linear)
    assert quantized and all(n.startswith("qllama.model.layers.") for n in quantized)
    ids = ref.tokenizer(["a red circle", "a green triangle on the right"], padding="longest")["input_ids"]
    assert _cosine(model.encode_text(ids), ref.encode_text(ids)) >= 0.999


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
@torch.no_grad()
def test_chat_model_int8(tmp_path, llm):
    from internvl_fm.chat.testing import save_tiny_chat_checkpoint
    from internvl_fm.models.modeling_internvl_chat import InternVLChatModel

    folder = save_tiny_chat_checkpoint(tmp_path / llm, llm=llm)
    ref = InternVLChatModel.from_pretrained(folder, dtype="bfloat16")
    model = InternVLChatModel.from_pretrained(folder, dtype="bfloat16", quantization="int8")
    quantized = _linears(model, Int8Linear)
    assert any(n.startswith("vision_model.encoder.layers.") for n in quantized)
    assert any(n.startswith("language_model.model.layers.") for n in quantized)
    assert all(n.startswith(("vision_model.encoder.layers.", "language_model.model.layers.")) for n in quantized)
    assert type(model.language_model.lm_head) is nn.Linear and type(model.mlp1[1]) is nn.Linear
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    logits, expected = model.language_model(input_ids=ids).logits, ref.language_model(input_ids=ids).logits
    assert _cosine(logits[0], expected[0]) >= 0.99
    pixels = torch.randn(1, 3, 28, 28, dtype=torch.bfloat16)
    assert _cosine(model.extract_feature(pixels), ref.extract_feature(pixels)) >= 0.99
    answer = model.chat(model.tokenizer, pixels, "<image>\ndescribe", {"max_new_tokens": 4, "do_sample": False})
    assert isinstance(answer, str) and answer


def test_load_in_8bit_and_int8_together_are_refused(tmp_path):
    from internvl_fm.models.modeling_internvl_chat import InternVLChatModel

    with pytest.raises(ValueError, match="pick one"):
        InternVLChatModel.from_pretrained(tmp_path, load_in_8bit=True, quantization="int8")


def test_unknown_or_unsupported_schemes_fail_before_loading(tiny_vit_path, monkeypatch):
    from internvl_fm import loading

    read = []
    monkeypatch.setattr(loading.WeightFiles, "stream", lambda *a, **k: read.append(1) or iter(()))
    with pytest.raises(QuantizationError, match="unknown quantization 'int4'.*int8"):
        InternVisionModel.from_pretrained(tiny_vit_path, quantization="int4")
    assert read == []


def test_saving_a_quantized_model_says_to_requantize_on_load(demo_pair, tmp_path):
    with pytest.raises(QuantizationError, match="load it with quantization='int8'"):
        demo_pair[1].save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_requantize_on_load_round_trip(demo_pair, tmp_path):
    """The documented way to keep an int8 model: save the full-precision one, quantise when loading."""
    ref, model = demo_pair
    ref.save_pretrained(tmp_path / "bf16")
    again = InternVLModel.from_pretrained(tmp_path / "bf16", quantization="int8")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        if hasattr(a, "qdata"):
            assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale), name
        else:
            assert torch.equal(a, b), name


def test_quantization_option_reaches_from_pretrained(monkeypatch, capsys, tmp_path):
    from internvl_fm.classification import cli as classification_cli

    seen = {}
    real = InternVLModel.from_pretrained.__func__

    def spy(cls, path, **kwargs):
        seen.update(kwargs)
        return real(cls, path, **kwargs)

    monkeypatch.setattr(InternVLModel, "from_pretrained", classmethod(spy))
    from internvl_fm.training.data import SyntheticConfig, generate_samples

    image = tmp_path / "x.png"
    next(iter(generate_samples(1, SyntheticConfig(image_size=64, seed=3)))).image.save(image)
    classification_cli.classify_main([str(image), "--model", str(DEMO), "--labels", "red,blue", "--dtype",
                                      "bfloat16", "--quantization", "int8", "--device", "cpu"])
    assert seen["quantization"] == "int8"
    out = capsys.readouterr().out
    assert "red" in out and "blue" in out


def test_decode_rows_use_the_int8_kernel_and_match_torchao(monkeypatch):
    """A few rows (decoding) go through torch's int8 weight-only kernel; many rows through torchao's path; both give
    the dequantised product (bias included)."""
    from internvl_fm import quantization
    from internvl_fm.quantization import quantize_linear

    torch.manual_seed(0)
    linear = nn.Linear(256, 96).to(torch.bfloat16)
    reference = linear.weight.detach().float().clone(), linear.bias.detach().float().clone()
    layer = quantize_linear(linear, "int8")
    dequantized = layer.weight.dequantize().float()
    assert (dequantized - reference[0]).abs().max() <= reference[0].abs().max() / 127  # per-channel int8 step

    calls = []
    kernel = quantization._int8pack_linear
    monkeypatch.setattr(quantization, "_int8pack_linear", lambda *a: calls.append(a[0].shape) or kernel(*a))
    with torch.no_grad():
        for shape in [(1, 256), (2, 1, 256), (4, 256), (64, 256)]:
            x = torch.randn(shape, dtype=torch.bfloat16)
            expected = x.float() @ dequantized.T + reference[1]
            out = layer(x)
            assert out.shape == (*shape[:-1], 96) and out.dtype == torch.bfloat16
            torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
    assert calls == [(1, 256), (2, 1, 256), (4, 256)]  # 64 rows: torchao's path
