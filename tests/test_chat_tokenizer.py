"""Tokenizer-level end to end: a tiny tokenizer with the InternVL special tokens and a tiny random chat model."""
from __future__ import annotations

import pytest

from conftest import REALCONFIGS
import torch

from internvl_fm.chat import InternVLChatModel
from internvl_fm.chat.testing import tiny_chat_config, tiny_chat_model

GEN = dict(max_new_tokens=8, do_sample=False)
QUESTIONS = ["what is in the picture ?", "describe this image", "how many legs does the cat have ?"]


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_tokenizer):
    return tiny_chat_tokenizer


@pytest.fixture(scope="module")
def model(tiny_chat):
    return tiny_chat


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(0)
    return torch.randn(4, 3, 28, 28)


def test_chat_prompt_is_the_official_one(model, tokenizer, pixels):
    inputs = model.prepare_chat_inputs(tokenizer, pixels[:3], "what is in the picture ?")
    assert inputs.question == "<image>\nwhat is in the picture ?"
    assert inputs.query.startswith("<|im_start|>system\n")
    assert "<img>" + "<IMG_CONTEXT>" * 3 + "</img>\nwhat is in the picture ?<|im_end|><|im_start|>assistant\n" \
        in inputs.query
    ids = inputs.input_ids[0].tolist()
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")) == 3 * model.num_image_token
    assert model.img_context_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert inputs.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_chat_batch_chat_and_streaming_agree(model, tokenizer, pixels):
    spans = [(0, 1), (1, 3), (3, 4)]
    singles = [model.chat(tokenizer, pixels[a:b], q, dict(GEN)) for q, (a, b) in zip(QUESTIONS, spans)]
    assert any(singles), "the random model should say something"
    padding_side = tokenizer.padding_side
    batch = model.batch_chat(tokenizer, pixels, QUESTIONS, dict(GEN), num_patches_list=[1, 2, 1])
    assert batch == singles  # questions of different lengths: left padding must not change the answers
    assert tokenizer.padding_side == padding_side
    for q, (a, b), want in zip(QUESTIONS, spans, singles):
        pieces = list(model.stream_chat(tokenizer, pixels[a:b], q, dict(GEN)))
        assert "".join(pieces) == want
        if want.count(" ") >= 2:
            assert len(pieces) > 1  # really streamed, not one final chunk


def test_streamer_in_generation_config(model, tokenizer, pixels):
    from transformers import TextStreamer

    seen = []

    class Collect(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            seen.append(text)

    streamer = Collect(tokenizer, skip_prompt=True, skip_special_tokens=True)
    answer = model.chat(tokenizer, pixels[:1], QUESTIONS[0], {**GEN, "streamer": streamer})
    assert "".join(seen).strip() == answer


def test_multi_turn_history(model, tokenizer, pixels):
    answer, history = model.chat(tokenizer, pixels[:1], "what is in the picture ?", dict(GEN), return_history=True)
    assert history == [("<image>\nwhat is in the picture ?", answer)]
    inputs = model.prepare_chat_inputs(tokenizer, pixels[:1], "how many legs does it have ?", history=history)
    # the history turn keeps its image; the new question gets no extra <image>
    assert inputs.query.count("<img>") == 1
    assert f"<|im_start|>assistant\n{answer}<|im_end|><|im_start|>user\nhow many legs does it have ?" in inputs.query
    second, history = model.chat(tokenizer, pixels[:1], "how many legs does it have ?", dict(GEN), history=history,
                                 return_history=True)
    assert len(history) == 2 and history[1] == ("how many legs does it have ?", second)


def test_multi_image_combined_and_separate(model, tokenizer, pixels):
    context = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    combined = model.prepare_chat_inputs(tokenizer, pixels, "describe this image")
    assert combined.query.count("<img>") == 1
    assert combined.input_ids[0].tolist().count(context) == 4
    separate = model.prepare_chat_inputs(tokenizer, pixels, "Image-1: <image>\nImage-2: <image>\nsame ?",
                                         num_patches_list=[1, 3])
    assert separate.query.count("<img>") == 2
    assert "Image-2: <img>" + "<IMG_CONTEXT>" * 3 + "</img>" in separate.query
    answer = model.chat(tokenizer, pixels, "Image-1: <image>\nImage-2: <image>\nsame ?", dict(GEN),
                        num_patches_list=[1, 3])
    assert isinstance(answer, str)
    with pytest.raises(ValueError, match="sums to"):
        model.chat(tokenizer, pixels, "describe", dict(GEN), num_patches_list=[1, 1])


def test_text_only_chat(model, tokenizer):
    inputs = model.prepare_chat_inputs(tokenizer, None, "how many legs does it have ?")
    assert "<image>" not in inputs.query and "<img>" not in inputs.query
    assert isinstance(model.chat(tokenizer, None, "how many legs does it have ?", dict(GEN)), str)


@pytest.mark.parametrize("llm,template", [("internlm2", "internlm2-chat"), ("phi3", "phi3-chat"),
                                          ("llama", "internvl2_5")])
def test_other_llms_and_templates(tokenizer, pixels, llm, template):
    model = tiny_chat_model(tiny_chat_config(len(tokenizer), llm=llm, template=template), seed=1)
    answer = model.chat(tokenizer, pixels[:2], "describe this image", dict(GEN))
    assert "".join(model.stream_chat(tokenizer, pixels[:2], "describe this image", dict(GEN))) == answer


def test_qwen3_llm_builds_chats_and_round_trips(tokenizer, pixels, tmp_path):
    """Qwen3ForCausalLM llm_configs (InternVL 3.5 style) build natively; checked on a tiny random model only."""
    model = tiny_chat_model(tiny_chat_config(len(tokenizer), llm="qwen3", template="internvl2_5"), seed=2)
    assert type(model.language_model).__name__ == "Qwen3ForCausalLM"
    assert any(name.endswith("self_attn.q_norm.weight") for name, _ in model.named_parameters())
    answer = model.chat(tokenizer, pixels[:2], "describe this image", dict(GEN))
    model.tokenizer = tokenizer
    model.save_pretrained(tmp_path)
    model.tokenizer = None
    reloaded = InternVLChatModel.from_pretrained(tmp_path)
    assert reloaded.config.to_dict()["llm_config"]["architectures"] == ["Qwen3ForCausalLM"]
    assert reloaded.chat(reloaded.tokenizer, pixels[:2], "describe this image", dict(GEN)) == answer


def test_saved_model_carries_its_tokenizer(model, tokenizer, pixels, tmp_path):
    model.tokenizer = tokenizer
    try:
        model.save_pretrained(tmp_path)
    finally:
        model.tokenizer = None
    reloaded = InternVLChatModel.from_pretrained(tmp_path)
    assert reloaded.tokenizer is not None
    assert reloaded.chat(reloaded.tokenizer, pixels[:1], QUESTIONS[0], dict(GEN)) == \
        model.chat(tokenizer, pixels[:1], QUESTIONS[0], dict(GEN))


def test_missing_special_tokens_are_reported(model):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "a": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bare = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        model.chat(bare, torch.zeros(1, 3, 28, 28), "a", dict(GEN))


def test_internlm2_tokenizer_files_load_without_remote_code(golden, tmp_path):
    """An InternLM2Tokenizer folder (sentencepiece tokenizer.model) loads natively, BOS first, image tokens known."""
    import json
    import shutil

    from internvl_fm.tokenization_internvl_chat import load_tokenizer

    real = json.loads((REALCONFIGS / "InternVL2-2B" / "tokenizer_config.json").read_text())
    shutil.copy(golden / "internvl_c_g" / "checkpoint" / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": real["tokenizer_class"], "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "additional_special_tokens": real["additional_special_tokens"]}))
    tok = load_tokenizer(tmp_path)
    ids = tok("<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nEnglish caption:<|im_end|>").input_ids
    context = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert ids[0] == tok.bos_token_id == 1 and ids.count(context) == 2
    assert ids[1] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
