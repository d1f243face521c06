"""transformers' native `-hf` layout, both ways, checked against transformers itself: InternVLChatModel <->
InternVLForConditionalGeneration and InternVisionModel <-> InternVLVisionModel (keys, configs, outputs, round trips)."""
from __future__ import annotations

import json
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig,
                          InternVLVisionModel)

from internvl_fm import loading
from internvl_fm.chat.testing import tiny_chat_config, tiny_chat_model, tiny_tokenizer
from internvl_fm.cli import main
from internvl_fm.convert import CHAT_KEYS, VISION_KEYS
from internvl_fm.errors import ConfigError, InternVLError, ModelKindError, WeightLoadingError
from internvl_fm.loading import LayoutError, WeightFiles
from internvl_fm.models.configuration_internvl_chat import InternVLChatConfig
from internvl_fm.models.modeling_intern_vit import InternVisionModel
from internvl_fm.models.modeling_internvl import InternVLModel
from internvl_fm.models.modeling_internvl_chat import InternVLChatModel
from internvl_fm.processing_internvl_chat import InternVLChatProcessor

TOL = 1e-5  # fp32
GOLDEN_CHATS = ["chat_qwen2_v2", "chat_internlm2_v2", "chat_phi3_v2"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere (transformers initialises cls token / position embeddings to zeros, norms to ones)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            fan_in = param[0].numel() if param.ndim > 1 else 1
            param.copy_(torch.randn(param.shape, generator=generator) / fan_in ** 0.5 + (param.ndim == 1) * 0.5)
    return model.eval()


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _config_values(config: InternVLChatConfig) -> dict:
    """What defines the model and its prompts: every config field, the LLM as transformers sees it (dtype aside)."""
    out = config.to_dict()
    out.pop("torch_dtype", None)
    out["vision_config"].pop("torch_dtype", None)
    out["llm_config"] = {k: v for k, v in config.llm_config.to_dict().items() if k != "dtype"}
    return out


def _chat_inputs(model: InternVLChatModel, tiles: int = 2, seed: int = 0):
    size = model.config.image_size
    pixels = torch.randn(tiles, 3, size, size, generator=torch.Generator().manual_seed(seed))
    token = model.img_context_token_id
    ids = torch.tensor([[1, 5, 6, *[token] * (tiles * model.num_image_token), 7, 8, 9]])
    return pixels, ids


def _hf_logits(folder, pixels, ids):
    theirs, info = InternVLForConditionalGeneration.from_pretrained(folder, output_loading_info=True,
                                                                    attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return theirs.eval()(pixel_values=pixels, input_ids=ids).logits


# ---------------------------------------------------------------------------------------------------- InternViT
@pytest.mark.parametrize("name", ["internvit_6b", "internvit_300m"])  # rms norm + qk norm / layer norm + qkv bias
def test_internvit_exports_what_transformers_loads(golden, name, tmp_path):
    ours = InternVisionModel.from_pretrained(golden / name / "checkpoint")
    ours.save_pretrained(tmp_path / "hf", layout="hf", max_shard_bytes=40_000)  # several shards: q/k/v split apart
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    theirs, info = InternVLVisionModel.from_pretrained(tmp_path / "hf", output_loading_info=True,
                                                       attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert theirs.config.use_qk_norm == ours.config.qk_normalization
    assert theirs.config.norm_type == ours.config.norm_type
    pixels = torch.randn(2, 3, ours.config.image_size, ours.config.image_size,
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(pixels).last_hidden_state
        got = theirs.eval()(pixels).last_hidden_state
    assert (got - expected).abs().max() <= TOL

    back = InternVisionModel.from_pretrained(tmp_path / "hf")  # -hf -> ours -> original: the golden files again
    assert back.config == ours.config and back.config.to_dict() == ours.config.to_dict()
    back.save_pretrained(tmp_path / "original")
    assert _same_weights(load_file(tmp_path / "original" / "model.safetensors"),
                         load_file(golden / name / "checkpoint" / "model.safetensors"))


@pytest.mark.parametrize("qk_norm", [True, False])
def test_transformers_vision_model_loads_as_internvit(tmp_path, qk_norm):
    config = InternVLVisionConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                  image_size=28, patch_size=14, use_qk_norm=qk_norm, attention_bias=not qk_norm,
                                  norm_type="rms_norm" if qk_norm else "layer_norm", layer_scale_init_value=0.3)
    theirs = _randomize(InternVLVisionModel(config))
    theirs.save_pretrained(tmp_path)
    ours = InternVisionModel.from_pretrained(tmp_path)
    assert (ours.config.qk_normalization, ours.config.qkv_bias) == (qk_norm, not qk_norm)
    assert ours.config.initializer_factor == 0.3 and ours.config.image_size == 28
    pixels = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(1))  # interpolated positions
    with torch.no_grad():
        assert (ours(pixels).last_hidden_state - theirs(pixels).last_hidden_state).abs().max() <= TOL
    expected = {k: v for k, v in theirs.state_dict().items()}
    assert _same_weights(ours.hf_state_dict(), expected)


def test_vision_tower_of_an_hf_chat_folder(golden, tmp_path):
    chat = InternVLChatModel.from_pretrained(golden / "chat_qwen2_v2" / "checkpoint")
    chat.img_context_token_id = 510
    chat.save_pretrained(tmp_path, layout="hf")
    vit = InternVisionModel.from_pretrained(tmp_path)
    assert _same_weights(vit.state_dict(), chat.vision_model.state_dict())


# ---------------------------------------------------------------------------------------------------- InternVL-Chat
@pytest.mark.parametrize("case", GOLDEN_CHATS)  # the reference checkpoints: Qwen2, InternLM2 (as Llama), Phi3
def test_golden_chat_exports_what_transformers_loads_and_round_trips(golden, case, tmp_path):
    folder = golden / case / "checkpoint"
    ours = InternVLChatModel.from_pretrained(folder, attn_implementation="eager")
    ours.img_context_token_id = json.loads((golden / case / "manifest.json").read_text())["special_token_ids"][
        "IMG_CONTEXT"]
    ours.save_pretrained(tmp_path / "hf", layout="hf")
    written = load_file(tmp_path / "hf" / "model.safetensors")
    assert {k.split(".")[0] for k in written} == {"vision_tower", "multi_modal_projector", "language_model"}
    assert "language_model.lm_head.weight" in written  # what transformers' own save_pretrained writes
    pixels, ids = _chat_inputs(ours)
    with torch.no_grad():
        expected = ours(pixel_values=pixels, input_ids=ids).logits
    assert (_hf_logits(tmp_path / "hf", pixels, ids) - expected).abs().max() <= TOL

    back = InternVLChatModel.from_pretrained(tmp_path / "hf")
    assert _same_weights(back.state_dict(), ours.state_dict())
    # the same config, plus the image token id the -hf config names (the golden folders have no tokenizer)
    expected = {**_config_values(InternVLChatConfig.from_pretrained(folder)), "img_context_token_id": 510}
    assert _config_values(back.config) == expected
    back.save_pretrained(tmp_path / "original")  # original -> hf -> original: the official files, bit for bit
    assert _same_weights(load_file(tmp_path / "original" / "model.safetensors"),
                         load_file(folder / "model.safetensors"))
    again = InternVLChatConfig.from_pretrained(tmp_path / "original")
    assert _config_values(again) == expected
    assert again.llm_config.architectures == ours.config.llm_config.architectures  # InternLM2 stays InternLM2


@pytest.mark.parametrize("llm,select_layer", [("qwen3", -1), ("llama", -2), ("qwen2", 1)])
def test_text_models_and_feature_layers_match_transformers(llm, select_layer, tmp_path):
    tokenizer = tiny_tokenizer()
    ours = tiny_chat_model(tiny_chat_config(len(tokenizer), llm=llm, select_layer=select_layer, image_size=56,
                                            template="internvl2_5"))
    ours.save_pretrained(tmp_path, layout="hf")
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["vision_feature_layer"] == select_layer and hf_config["text_config"]["model_type"] == llm
    pixels, ids = _chat_inputs(ours)
    with torch.no_grad():
        expected = ours(pixel_values=pixels, input_ids=ids).logits
    assert (_hf_logits(tmp_path, pixels, ids) - expected).abs().max() <= TOL
    back = InternVLChatModel.from_pretrained(tmp_path)
    assert back.config.select_layer == select_layer and _config_values(back.config) == _config_values(ours.config)


@pytest.mark.parametrize("spelling", ["save_pretrained", "module_names"])
def test_transformers_chat_model_loads_as_internvl_chat(tmp_path, spelling):
    """A model made by transformers: its own save_pretrained (tied embeddings: no LM head stored), or a bare
    `state_dict()` under transformers' module names (`model.language_model.*`, `lm_head.*`)."""
    tied = spelling == "save_pretrained"
    text = dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=28,
                  patch_size=14, attention_bias=True)
    config = InternVLConfig(text_config=text, vision_config=vision, image_token_id=60, tie_word_embeddings=tied)
    theirs = _randomize(InternVLForConditionalGeneration(config))
    if tied:
        theirs.tie_weights()
        theirs.save_pretrained(tmp_path)
        assert "language_model.lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    else:
        config.save_pretrained(tmp_path)
        save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, tmp_path / "model.safetensors",
                  metadata={"format": "pt"})
    ours = InternVLChatModel.from_pretrained(tmp_path)
    assert ours.config.ps_version == "v2" and ours.config.template == "internvl2_5"  # the InternVL 2.5 / 3 values
    assert ours.img_context_token_id == 60 and ours.num_image_token == 1
    assert (ours.language_model.lm_head.weight is ours.language_model.model.embed_tokens.weight) == tied
    ids = torch.tensor([[1, 2, 60, 60, 3]])
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs(pixel_values=pixels, input_ids=ids).logits
        assert (ours(pixel_values=pixels, input_ids=ids).logits - expected).abs().max() <= TOL


def test_chat_on_an_hf_folder_says_what_the_original_says(tmp_path):
    """End to end: the tokenizer of an -hf folder (as the hub -hf repos write it: image tokens named in
    extra_special_tokens, a processor class, a chat template file) and the same answer as the original layout."""
    from PIL import Image

    tokenizer = tiny_tokenizer()
    model = tiny_chat_model(tiny_chat_config(len(tokenizer), template="internvl2_5", image_size=28))
    model.tokenizer = tokenizer
    model.save_pretrained(tmp_path / "original")
    model.save_pretrained(tmp_path / "hf", layout="hf")
    tokenizer_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    tokenizer_config.update(processor_class="InternVLProcessor", extra_special_tokens={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"})
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (tmp_path / "hf" / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    image = Image.linear_gradient("L").convert("RGB").resize((70, 42))
    answers = []
    for layout in ("original", "hf"):
        loaded = InternVLChatModel.from_pretrained(tmp_path / layout)
        assert loaded.tokenizer is not None
        pixels = loaded.processor.image_pixels(image)
        answers.append(loaded.chat(loaded.tokenizer, pixels, "describe this image",
                                   {"max_new_tokens": 6, "do_sample": False}))
    assert answers[0] and answers[0] == answers[1]
    processor = InternVLChatProcessor.from_pretrained(tmp_path / "hf")
    assert processor.image_token_id == model.img_context_token_id and processor.template == "internvl2_5"


def test_chat_cli_on_an_hf_folder(tmp_path, capsys):
    tokenizer = tiny_tokenizer()
    model = tiny_chat_model(tiny_chat_config(len(tokenizer), template="internvl2_5"))
    model.tokenizer = tokenizer
    model.save_pretrained(tmp_path, layout="hf")
    assert main(["chat", str(tmp_path), "--device", "cpu", "-q", "what is this", "--max-new-tokens", "3",
                 "--no-stream"]) == 0
    answer = model.chat(tokenizer, None, "what is this", {"max_new_tokens": 3})
    assert answer and answer in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- streaming
def test_fused_qkv_is_built_as_its_parts_stream_in():
    """The three parts of one layer's qkv are held only until the last one arrives (never the whole model)."""
    ours = {f"encoder.layers.{i}.attn.qkv.weight": torch.randn(12, 4) for i in range(3)}
    hf = VISION_KEYS.to_hf(ours)
    consumed = []

    def feed():
        for key, value in hf.items():
            consumed.append(key)
            yield key, value

    seen = {}
    for key, value in VISION_KEYS.from_hf(feed()):
        seen[key] = len(consumed)
        assert torch.equal(value, ours[key])
    assert seen == {f"encoder.layers.{i}.attn.qkv.weight": 3 * (i + 1) for i in range(3)}


def test_hf_folders_stream_tensor_by_tensor(golden, tmp_path, monkeypatch):
    """While an -hf folder loads (q/k/v split over several shards), no tensor read earlier is still held when the
    next one is read, beyond the one just handed on: parts are copied into their fused tensor and dropped, never
    gathered into a second copy of the model."""
    source = InternVisionModel.from_pretrained(golden / "internvit_6b" / "checkpoint")
    source.save_pretrained(tmp_path, layout="hf", max_shard_bytes=40_000)
    alive, held, stream = weakref.WeakSet(), [], WeightFiles.stream

    def watched(self, keys=None, dtype=None):
        for key, tensor in stream(self, keys, dtype):
            held.append(sum(t.numel() * t.element_size() for t in alive))  # read before and not yet released
            alive.add(tensor)
            yield key, tensor

    monkeypatch.setattr(WeightFiles, "stream", watched)
    model = InternVisionModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and _same_weights(model.state_dict(), source.to(torch.bfloat16).state_dict())
    stored = VISION_KEYS.to_hf(source.state_dict())
    assert len(held) == len(stored) and max(held) <= max(t.numel() for t in stored.values()) * 2  # bf16


def test_a_missing_projection_part_is_named(golden, tmp_path):
    InternVisionModel.from_pretrained(golden / "internvit_300m" / "checkpoint").save_pretrained(tmp_path, layout="hf")
    state = load_file(tmp_path / "model.safetensors")
    del state["encoder.layer.1.attention.v_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightLoadingError, match=r"encoder\.layer\.1\.attention\.v_proj\.weight"):
        InternVisionModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------- errors
def test_unknown_layouts_name_the_valid_ones(golden, tmp_path):
    vit = InternVisionModel.from_pretrained(golden / "internvit_300m" / "checkpoint")
    with pytest.raises(LayoutError, match="'original', 'hf'") as err:
        vit.save_pretrained(tmp_path / "x", layout="gguf")
    assert isinstance(err.value, ValueError) and isinstance(err.value, InternVLError) and "gguf" in str(err.value)
    clip = InternVLModel.from_pretrained(golden / "internvl_c_g" / "checkpoint")
    with pytest.raises(LayoutError, match="valid: 'original'$"):
        clip.save_pretrained(tmp_path / "y", layout="hf")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_hf_folders_name_their_kind(golden, tmp_path):
    chat = InternVLChatModel.from_pretrained(golden / "chat_qwen2_v2" / "checkpoint")
    chat.img_context_token_id = 510
    chat.save_pretrained(tmp_path / "chat", layout="hf")
    chat.vision_model.save_pretrained(tmp_path / "vit", layout="hf")
    assert isinstance(loading.load(tmp_path / "chat"), InternVLChatModel)
    assert isinstance(loading.load(tmp_path / "vit"), InternVisionModel)
    with pytest.raises(ModelKindError, match="InternVL-Chat"):
        InternVLModel.from_pretrained(tmp_path / "chat")
    with pytest.raises(ModelKindError, match="InternViT"):
        InternVLChatModel.from_pretrained(tmp_path / "vit")


def _hf_config(**changes) -> dict:
    config = InternVLConfig(text_config=dict(model_type="qwen2", vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=64),
                            vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               intermediate_size=64, image_size=28), image_token_id=60).to_dict()
    for key, value in changes.items():
        if key.startswith("vision__"):
            config["vision_config"][key[len("vision__"):]] = value
        else:
            config[key] = value
    return config


@pytest.mark.parametrize("changes,named", [
    ({"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy"),
    ({"vision_feature_layer": [-1, -2]}, "vision_feature_layer"),
    ({"projector_hidden_act": "relu"}, "projector_hidden_act"),
    ({"vision__use_mean_pooling": False}, "use_mean_pooling"),
    ({"vision__image_size": [28, 42]}, "not square"),
    ({"image_token_id": 640}, "image_token_id 640"),
])
def test_hf_settings_internvl_cannot_build_are_config_errors(changes, named):
    assert InternVLChatConfig.from_dict(_hf_config()).img_context_token_id == 60
    with pytest.raises(ConfigError, match=named):
        InternVLChatConfig.from_dict(_hf_config(**changes))


def test_configs_without_an_hf_equivalent_are_refused_before_writing(tmp_path):
    model = tiny_chat_model(tiny_chat_config(100, ps_version="v1"))
    with pytest.raises(ConfigError, match="ps_version"):
        model.save_pretrained(tmp_path / "v1", layout="hf")
    assert not (tmp_path / "v1").exists()


def test_key_maps_invert():
    state = tiny_chat_model(tiny_chat_config(100, llm="qwen2")).state_dict()
    hf = CHAT_KEYS.to_hf(state)
    assert not any(".qkv." in k or k.startswith("mlp1.") or k.startswith("vision_model.") for k in hf)
    assert _same_weights(dict(CHAT_KEYS.from_hf(hf.items())), state)
