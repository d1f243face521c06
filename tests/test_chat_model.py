"""InternVLChatModel: golden parity with the official code, real configs on meta, official layout in and out."""
from __future__ import annotations

import copy
import json

import pytest

from conftest import REALCONFIGS
import torch
from safetensors.torch import load_file, save_file

from internvl_fm.chat import InternVLChatConfig, InternVLChatModel
from internvl_fm.models.chat_llm import UnsupportedLLMError, internlm2_to_llama, llama_to_internlm2
from internvl_fm.models.modeling_internvl_chat import split_device_map
from internvl_fm.chat.testing import tiny_chat_config, tiny_chat_model
from internvl_fm.errors import WeightLoadingError

CASES = ["chat_internlm2_v2", "chat_qwen2_v2", "chat_phi3_v2"]
REAL_2B = "InternVL2-2B"


@pytest.fixture(scope="module")
def loaded(golden):
    """Each golden chat checkpoint loaded once."""
    cache = {}

    def get(case):
        if case not in cache:
            model = InternVLChatModel.from_pretrained(golden / case / "checkpoint").float().eval()
            manifest = json.loads((golden / case / "manifest.json").read_text())
            model.img_context_token_id = manifest["special_token_ids"]["IMG_CONTEXT"]
            cache[case] = (model, manifest, load_file(golden / case / "inputs.safetensors"),
                           load_file(golden / case / "expected.safetensors"))
        return cache[case]

    return get


def _tol(manifest, key):
    t = manifest["tolerances"]["logits" if "logit" in key else "default"]
    return dict(atol=t["atol"], rtol=t["rtol"])


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_golden_parity(loaded, case):
    model, m, x, e = loaded(case)
    pv = x["pixel_values"]
    hs = model.vision_model(pv, output_hidden_states=True).hidden_states
    torch.testing.assert_close(torch.stack(list(hs)), e["vision_hidden_states"], **_tol(m, "h"))
    torch.testing.assert_close(model.extract_feature(pv), e["vit_embeds"], **_tol(m, "h"))
    out = model(pixel_values=pv, input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                image_flags=x["image_flags"])
    torch.testing.assert_close(out.logits, e["logits"], **_tol(m, "logits"))
    # a meta-device build must re-create the rotary inv_freq correctly: text-only logits depend on it
    text = model.language_model(input_ids=x["text_input_ids"]).logits
    torch.testing.assert_close(text, e["text_only_logits"], **_tol(m, "logits"))
    gen = model.generate(pixel_values=pv, input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                         max_new_tokens=8, do_sample=False, num_beams=1,
                         eos_token_id=m["special_token_ids"]["EOS_TEMPLATE_SEP"])
    assert gen.tolist() == e["generated_ids"][:, 1:].tolist()  # new tokens only, no leading BOS


def test_generate_from_precomputed_features_and_needs_context_id(loaded):
    model, m, x, e = loaded("chat_qwen2_v2")
    feats = model.extract_feature(x["pixel_values"])
    gen = model.generate(input_ids=x["input_ids"], attention_mask=x["attention_mask"], visual_features=feats,
                         max_new_tokens=8, do_sample=False, eos_token_id=m["special_token_ids"]["EOS_TEMPLATE_SEP"])
    assert gen.tolist() == e["generated_ids"][:, 1:].tolist()
    fresh = copy.copy(model)
    fresh.img_context_token_id = None
    with pytest.raises(ValueError, match="img_context_token_id"):
        fresh.generate(pixel_values=x["pixel_values"], input_ids=x["input_ids"], max_new_tokens=2)
    # wrong number of <IMG_CONTEXT> slots for the tiles given
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        model(pixel_values=x["pixel_values"][:1], input_ids=x["input_ids"])


def test_forward_loss_and_image_flags(loaded):
    model, m, x, e = loaded("chat_internlm2_v2")
    labels = x["input_ids"].clone()
    labels[:, :8] = -100
    out = model(pixel_values=x["pixel_values"], input_ids=x["input_ids"], labels=labels)
    shift = torch.nn.functional.cross_entropy(e["logits"][0, :-1], labels[0, 1:], ignore_index=-100)
    assert torch.allclose(out.loss, shift, atol=1e-4)
    # a dummy tile flagged 0 is dropped: the 2-tile prompt still fits with a third, flagged-out tile
    pv3 = torch.cat([x["pixel_values"], torch.zeros_like(x["pixel_values"][:1])])
    flags = torch.tensor([[1], [1], [0]])
    out3 = model(pixel_values=pv3, input_ids=x["input_ids"], image_flags=flags)
    torch.testing.assert_close(out3.logits, e["logits"], **_tol(m, "logits"))


@pytest.mark.parametrize("name", ["past_key_values", "cache"])
@torch.no_grad()
def test_forward_kv_cache_under_both_names(loaded, name):
    """The cache reaches the LLM whichever name it is passed under (transformers >= 5.24 calls it `cache`): a
    one-token step on the cache of an image prompt gives the logits of the whole prompt, no FutureWarning."""
    import warnings

    model, m, x, e = loaded("chat_qwen2_v2")
    ids, pv = x["input_ids"], x["pixel_values"]
    prefix = model(pv, ids[:, :-1], use_cache=True)
    cache = prefix.cache if "cache" in type(prefix).__dataclass_fields__ else prefix.past_key_values
    assert cache is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        step = model(None, ids[:, -1:], use_cache=True, **{name: cache})
    assert step.logits.shape[1] == 1
    torch.testing.assert_close(step.logits[:, -1], e["logits"][:, -1], **_tol(m, "logits"))
    with pytest.raises(ValueError, match="once"):
        model(None, ids[:, -1:], past_key_values=cache, cache=cache)


def test_unknown_keyword_arguments_raise_and_return_dict_is_honoured(loaded):
    model, m, x, e = loaded("chat_qwen2_v2")
    with pytest.raises(TypeError, match="cache_position_typo"):
        model(x["pixel_values"], x["input_ids"], cache_position_typo=0)
    with torch.no_grad():  # return_dict=False is honoured, not ignored
        as_tuple = model(x["pixel_values"], x["input_ids"], return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], e["logits"], **_tol(m, "logits"))
    with pytest.raises(ValueError, match="max_new_tokenz"):  # transformers' generate refuses unused model kwargs
        model.generate(pixel_values=x["pixel_values"], input_ids=x["input_ids"], max_new_tokenz=2)


def test_real_internvl2_2b_config_on_meta(golden):
    path = REALCONFIGS / REAL_2B
    config = InternVLChatConfig.from_pretrained(path)
    assert config.num_image_token == 256 and config.template == "internlm2-chat" and config.ps_version == "v2"
    with torch.device("meta"):
        model = InternVLChatModel(config)
    assert model.num_parameters() == 2_205_754_368
    assert sum(p.numel() for p in model.vision_model.parameters()) == 304_012_288
    assert sum(p.numel() for p in model.mlp1.parameters()) == 12_595_200
    keys = model.official_state_dict().keys()
    assert "language_model.model.layers.23.attention.wqkv.weight" in keys
    assert "language_model.output.weight" in keys and "language_model.model.tok_embeddings.weight" in keys
    # the llm_config round-trips in the official InternLM2 layout
    raw = json.loads((path / "config.json").read_text())
    assert config.to_dict()["llm_config"] == raw["llm_config"]


def _vit(hidden, heads, inter, layers, six_b):
    return {"hidden_size": hidden, "num_attention_heads": heads, "intermediate_size": inter,
            "num_hidden_layers": layers, "image_size": 448, "patch_size": 14, "qkv_bias": not six_b,
            "qk_normalization": six_b, "norm_type": "rms_norm" if six_b else "layer_norm", "layer_norm_eps": 1e-6}


def _vit_params(v):
    d, i, L = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    per = (3 * d * d + (3 * d if v["qkv_bias"] else 0) + d * d + d + 2 * d * i + i + d + 2 * d
           + (2 * d if v["qk_normalization"] else 0) + (2 * d if v["norm_type"] == "rms_norm" else 4 * d))
    return d + (d * 3 * 14 * 14 + d) + ((448 // 14) ** 2 + 1) * d + L * per


def _llm_params(c, qkv_bias=False):
    h, i, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    attn = h * h + 2 * h * kv + h * h + ((h + 2 * kv) if qkv_bias else 0)
    return 2 * V * h + h + L * (attn + 3 * h * i + 2 * h)


FAMILY = {
    # InternVL2-1B: InternViT-300M + Qwen2-0.5B-Instruct (q/k/v biases), Hermes-2
    "InternVL2-1B": (_vit(1024, 16, 4096, 24, False),
                     {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
                      "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                      "vocab_size": 151655, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                      "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 21,
                      "rms_norm_eps": 1e-6, "tie_word_embeddings": True}, "Hermes-2", True, 938_158_976),
    # InternVL2-4B: InternViT-300M + Phi-3-mini-128k (LongRoPE, called "su" in its config), phi3-chat
    "InternVL2-4B": (_vit(1024, 16, 4096, 24, False),
                     {"architectures": ["Phi3ForCausalLM"], "hidden_size": 3072, "intermediate_size": 8192,
                      "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                      "vocab_size": 32020, "max_position_embeddings": 131072,
                      "original_max_position_embeddings": 4096, "rope_theta": 10000.0, "sliding_window": 262144,
                      "rope_scaling": {"type": "su", "short_factor": [1.0] * 48, "long_factor": [1.5] * 48},
                      "rms_norm_eps": 1e-5}, "phi3-chat", False, None),
    # InternVL2-26B: InternViT-6B-448px-V1-5 (45 layers) + internlm2-chat-20b, dynamic NTK x3
    "InternVL2-26B": (_vit(3200, 25, 12800, 45, True),
                      {"architectures": ["InternLM2ForCausalLM"], "hidden_size": 6144, "intermediate_size": 16384,
                       "num_hidden_layers": 48, "num_attention_heads": 48, "num_key_value_heads": 8,
                       "vocab_size": 92553, "max_position_embeddings": 32768, "rope_theta": 1000000,
                       "rope_scaling": {"type": "dynamic", "factor": 3.0}, "bias": False, "rms_norm_eps": 1e-5},
                      "internlm2-chat", False, None),
}


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_family_configs_build_on_meta(name):
    vit, llm, template, qkv_bias, known_total = FAMILY[name]
    config = InternVLChatConfig.from_dict({
        "architectures": ["InternVLChatModel"], "vision_config": vit, "llm_config": llm, "template": template,
        "force_image_size": 448, "downsample_ratio": 0.5, "ps_version": "v2", "select_layer": -1,
        "dynamic_image_size": True, "use_thumbnail": True, "max_dynamic_patch": 12, "system_message": None})
    with torch.device("meta"):
        model = InternVLChatModel(config)
    d = vit["hidden_size"] * 4
    mlp1 = 2 * d + d * llm["hidden_size"] + llm["hidden_size"] + llm["hidden_size"] ** 2 + llm["hidden_size"]
    expected = _vit_params(vit) + mlp1 + _llm_params(llm, qkv_bias)
    assert model.num_parameters() == expected
    if known_total is not None:
        assert expected == known_total
    assert config.num_image_token == 256
    # the official llm_config spelling survives a round trip (e.g. Phi-3's "su" rope scaling, InternLM2 "dynamic")
    written = config.to_dict()["llm_config"]
    assert written["architectures"] == llm["architectures"] and written.get("rope_scaling") == llm.get("rope_scaling")
    # "system_message": null falls back to the template's default message
    assert model.system_message and model.system_message != "None"


def test_unsupported_llm_lists_the_supported_ones():
    with pytest.raises(UnsupportedLLMError, match="Qwen2ForCausalLM"):
        InternVLChatConfig.from_dict({"vision_config": {}, "llm_config": {"architectures": ["GPT2LMHeadModel"]}})


def test_internlm2_wqkv_round_trip():
    torch.manual_seed(0)
    config = tiny_chat_config(64, llm="internlm2").llm_config  # 4 heads, 2 kv heads, head_dim 16
    kv, g, d, h = 2, 2, 16, 64
    wqkv = torch.randn(kv * (g + 2) * d, h)
    llama = internlm2_to_llama({"model.layers.0.attention.wqkv.weight": wqkv}, config)
    blocks = wqkv.view(kv, g + 2, d, h)
    # q head j of kv group i is row block i*g + j; k / v follow the q heads of their group
    assert torch.equal(llama["model.layers.0.self_attn.q_proj.weight"].view(kv * g, d, h)[3], blocks[1, 1])
    assert torch.equal(llama["model.layers.0.self_attn.k_proj.weight"].view(kv, d, h)[1], blocks[1, 2])
    assert torch.equal(llama["model.layers.0.self_attn.v_proj.weight"].view(kv, d, h)[0], blocks[0, 3])
    back = llama_to_internlm2(llama, config)
    assert torch.equal(back["model.layers.0.attention.wqkv.weight"], wqkv)


def test_save_pretrained_writes_the_official_layout(golden, tmp_path, loaded):
    src = golden / "chat_internlm2_v2" / "checkpoint"
    model, m, x, e = loaded("chat_internlm2_v2")
    model.save_pretrained(tmp_path)
    original, saved = load_file(src / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in original)
    raw = json.loads((src / "config.json").read_text())
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["llm_config"]["architectures"] == ["InternLM2ForCausalLM"]
    for key in ("template", "ps_version", "downsample_ratio", "force_image_size", "select_layer"):
        assert written[key] == raw[key]
    reloaded = InternVLChatModel.from_pretrained(tmp_path)
    reloaded.img_context_token_id = model.img_context_token_id
    with torch.no_grad():
        logits = reloaded(x["pixel_values"], x["input_ids"]).logits
    torch.testing.assert_close(logits, e["logits"], **_tol(m, "logits"))


def test_missing_and_unexpected_keys_are_named(golden, tmp_path):
    src = golden / "chat_qwen2_v2" / "checkpoint"
    state = load_file(src / "model.safetensors")
    del state["mlp1.3.bias"]
    state["language_model.extra_head.weight"] = torch.zeros(2)
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(WeightLoadingError) as err:
        InternVLChatModel.from_pretrained(tmp_path)
    assert "mlp1.3.bias" in str(err.value) and "language_model.extra_head.weight" in str(err.value)


def test_dtype_bf16_load(golden, loaded):
    model = InternVLChatModel.from_pretrained(golden / "chat_phi3_v2" / "checkpoint", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.language_model.lm_head.weight.dtype == torch.bfloat16
    ref, m, x, e = loaded("chat_phi3_v2")
    model.img_context_token_id = ref.img_context_token_id
    with torch.no_grad():
        logits = model(x["pixel_values"], x["input_ids"]).logits.float()
    assert (logits - e["logits"]).abs().max() < 0.1 * e["logits"].abs().max()


def test_pixel_shuffle_versions_and_select_layer():
    torch.manual_seed(0)
    x = torch.arange(4 * 4 * 2, dtype=torch.float32).view(1, 4, 4, 2)
    cfg = tiny_chat_config(40)
    model = InternVLChatModel(cfg)
    v2 = model.pixel_shuffle(x)
    # v2 cell (0, 1) concatenates [x[0,2], x[0,3], x[1,2], x[1,3]]
    assert torch.equal(v2[0, 0, 1], torch.cat([x[0, 0, 2], x[0, 0, 3], x[0, 1, 2], x[0, 1, 3]]))
    model.ps_version = "v1"
    assert torch.equal(model.pixel_shuffle(x), v2.transpose(1, 2))
    # select_layer -2 = output of the first of two blocks (hidden_states[-2]); only that block runs
    model = tiny_chat_model(tiny_chat_config(40, select_layer=-2, image_size=56))
    pv = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        hs = model.vision_model(pv, output_hidden_states=True).hidden_states[-2][:, 1:]
        want = model.mlp1(model.pixel_shuffle(hs.reshape(2, 4, 4, -1)).reshape(2, 4, -1))
        torch.testing.assert_close(model.extract_feature(pv), want)


def test_split_device_map_follows_the_model_cards():
    dm = split_device_map(24, num_gpus=2)
    assert dm["vision_model"] == 0 and dm["mlp1"] == 0 and dm["language_model.lm_head"] == 0
    assert dm["language_model.model.layers.23"] == 0
    on_gpu0 = [k for k, v in dm.items() if k.startswith("language_model.model.layers.") and v == 0]
    assert len(on_gpu0) == 9  # ceil(ceil(24 / 1.5) / 2) = 8 first layers + the last one
    assert dm["language_model.model.layers.8"] == 1


def test_device_map_dispatch_on_cpu(golden, loaded):
    pytest.importorskip("accelerate")
    ref, m, x, e = loaded("chat_qwen2_v2")
    model = InternVLChatModel.from_pretrained(golden / "chat_qwen2_v2" / "checkpoint",
                                              device_map={"vision_model": "cpu", "mlp1": "cpu",
                                                          "language_model": "cpu"})
    model.img_context_token_id = ref.img_context_token_id
    gen = model.generate(pixel_values=x["pixel_values"], input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                         max_new_tokens=8, do_sample=False, eos_token_id=m["special_token_ids"]["EOS_TEMPLATE_SEP"])
    assert gen.tolist() == e["generated_ids"][:, 1:].tolist()


def test_load_in_8bit_needs_cuda(golden):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only error path")
    with pytest.raises(RuntimeError, match="CUDA"):
        InternVLChatModel.from_pretrained(golden / "chat_qwen2_v2" / "checkpoint", load_in_8bit=True)
