"""InternVLChatProcessor: golden tiling through the processor, prompt and image-token expansion, tokenization, and
calls that leave the model as it was."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import spy_on_writes
from internvl_fm.chat import InternVLChatModel, load_image
from internvl_fm.chat.testing import (TINY_IMG_CONTEXT_ID, save_tiny_chat_checkpoint, tiny_chat_config,
                                      tiny_chat_model)
from internvl_fm.chat_templates import build_chat_query
from internvl_fm.errors import ImageLoadError, ModelKindError, TokenizerContractError
from internvl_fm.errors import ImageTooLargeError
from internvl_fm.processing import build_transform
from internvl_fm.processing import load_image as load_pil
from internvl_fm.processing_internvl_chat import InternVLChatProcessor

GEN = dict(max_new_tokens=6, do_sample=False)


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_tokenizer):
    return tiny_chat_tokenizer


@pytest.fixture(scope="module")
def model(tiny_chat):
    return tiny_chat


@pytest.fixture(scope="module")
def processor(model, tokenizer):
    return InternVLChatProcessor.from_config(model.config, tokenizer)


def test_processor_tiles_match_the_golden_dynamic_preprocess_cases(golden):
    """Pixels from the processor == the official crops (golden grid, boxes, order) and thumbnail, transformed."""
    cases = json.loads((golden / "dynamic_preprocess" / "manifest.json").read_text())["cases"]
    for i, c in enumerate(cases):
        size = c["image_size"]
        processor = InternVLChatProcessor(image_size=size, min_dynamic_patch=c["min_num"],
                                          max_dynamic_patch=c["max_num"], use_thumbnail=c["use_thumbnail"])
        image = _noise(c["width"], c["height"], seed=i)
        transform = build_transform(size, mode="retrieval")
        resized = image.resize(tuple(c["resized_size_wh"]))
        want = [transform(resized.crop(tuple(box))) for box in c["crop_boxes_ltrb"]]
        if c["thumbnail_appended"]:
            want.append(transform(image.resize((size, size))))
        got = processor.image_pixels(image)
        assert got.shape == (c["num_tiles"], 3, size, size), c
        assert torch.equal(got, torch.stack(want)), c


def test_images_are_decoded_by_the_core_loader(processor, tmp_path):
    rgba = Image.new("RGBA", (60, 40), (200, 10, 10, 0))  # fully transparent: composited on white by the core
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    rgba.save(tmp_path / "a.png")
    from_bytes = processor.image_pixels(buffer.getvalue())
    assert torch.equal(from_bytes, processor.image_pixels(tmp_path / "a.png"))
    assert torch.equal(from_bytes, processor.image_pixels(load_pil(buffer.getvalue())))
    white = (1.0 - 0.485) / 0.229
    assert torch.allclose(from_bytes[:, 0], torch.full_like(from_bytes[:, 0], white), atol=1e-5)
    with pytest.raises(ImageTooLargeError):
        processor.load_image(buffer.getvalue(), max_pixels=100)
    with pytest.raises(ImageLoadError, match="missing.png"):
        processor.image_pixels(tmp_path / "missing.png")
    # the model-card load_image of internvl_fm.chat is the same tiling with the config's settings
    assert torch.equal(load_image(buffer.getvalue(), max_num=processor.max_dynamic_patch,
                                  input_size=processor.image_size), from_bytes)


def test_config_settings_reach_the_processor(tokenizer):
    config = tiny_chat_config(len(tokenizer), max_dynamic_patch=2, use_thumbnail=False, template="phi3-chat",
                              system_message="be brief")
    processor = InternVLChatProcessor.from_config(config, tokenizer)
    assert (processor.template, processor.max_dynamic_patch, processor.use_thumbnail, processor.image_size,
            processor.num_image_token) == ("phi3-chat", 2, False, 28, config.num_image_token)
    assert processor.image_pixels(_noise(90, 30)).shape[0] == 2  # 2x1 grid, no thumbnail
    assert processor.image_pixels(_noise(90, 30), max_num=4).shape[0] == 3  # a per-call cap: 3x1
    assert processor.build_query("hi")[1].startswith("<|system|>\nbe brief<|end|>")
    single = InternVLChatProcessor.from_config(tiny_chat_config(len(tokenizer), dynamic_image_size=False), tokenizer)
    assert single.image_pixels(_noise(90, 30)).shape == (1, 3, 28, 28)  # no dynamic tiling: the whole image


def test_prompt_and_image_token_expansion(processor, tokenizer):
    images = [_noise(60, 30, 1), _noise(30, 30, 2)]
    inputs = processor("what is in the picture ?", images=images)
    counts = [processor.image_pixels(image).shape[0] for image in images]
    assert inputs.num_patches_list == counts == [3, 1]  # 2x1 + thumbnail; 1x1 (no thumbnail for one tile)
    assert torch.equal(inputs.pixel_values, torch.cat([processor.image_pixels(image) for image in images]))
    n = processor.num_image_token
    span = lambda tiles: "<img>" + "<IMG_CONTEXT>" * (n * tiles) + "</img>"  # noqa: E731
    assert inputs.question == "Image-1: <image>\nImage-2: <image>\nwhat is in the picture ?"
    assert f"<|im_start|>user\nImage-1: {span(3)}\nImage-2: {span(1)}\nwhat is in the picture ?<|im_end|>" \
        in inputs.query
    assert inputs.query == build_chat_query(inputs.question, "Hermes-2", counts, n)
    ids = inputs.input_ids[0].tolist()
    assert inputs.image_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == TINY_IMG_CONTEXT_ID
    assert ids.count(inputs.image_token_id) == n * sum(counts) and ids[0] == tokenizer.bos_token_id
    assert inputs.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>") and inputs.stop == "<|im_end|>"
    # one image: the official "<image>\n" prefix; a question that places its own <image> is kept
    one = processor("describe this image", images=images[0])
    assert one.question == "<image>\ndescribe this image" and one.num_patches_list == [3]
    own = processor("this <image> is ?", images=images[0])
    assert own.question == "this <image> is ?" and f"this {span(3)} is ?" in own.query
    # already tiled pixels follow the official chat(): all tiles are one image unless num_patches_list says more
    tiled = processor("describe this image", pixel_values=inputs.pixel_values)
    assert tiled.query.count("<img>") == 1 and tiled.num_patches_list == [4]
    with pytest.raises(ValueError, match="sums to"):
        processor("describe", pixel_values=inputs.pixel_values, num_patches_list=[1, 1])
    with pytest.raises(ValueError, match="not both"):
        processor("describe", images=images, pixel_values=inputs.pixel_values)


def test_golden_model_chat_query_through_the_processor(golden, tokenizer):
    q = json.loads((golden / "conversation" / "manifest.json").read_text())["templates"]["_model_chat"]
    processor = InternVLChatProcessor(tokenizer, template=q["template"], num_image_token=q["num_image_token"])
    tiles = sum(q["num_patches_list"])
    inputs = processor(q["question"], pixel_values=torch.zeros(tiles, 3, 28, 28),
                       num_patches_list=q["num_patches_list"], history=q.get("history"))
    assert inputs.query == q["query"]
    assert inputs.input_ids[0].tolist().count(TINY_IMG_CONTEXT_ID) == q["num_image_token"] * tiles


def test_batch_is_left_padded_without_touching_the_tokenizer(processor, tokenizer):
    pixels = torch.zeros(3, 3, 28, 28)
    side = tokenizer.padding_side
    batch = processor.batch(["describe this image", "what is in the picture ?"], pixels, [1, 2])
    assert tokenizer.padding_side == side
    assert batch.question == ["<image>\ndescribe this image", "<image>\nwhat is in the picture ?"]
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[:, -1].all()  # padded on the left
    singles = [processor(q, pixel_values=pixels[a:b]) for q, (a, b) in
               zip(["describe this image", "what is in the picture ?"], [(0, 1), (1, 3)])]
    for row, single in enumerate(singles):
        length = single.input_ids.shape[1]
        assert batch.input_ids[row, -length:].tolist() == single.input_ids[0].tolist()


def test_text_only_and_missing_tokens(processor, tokenizer):
    text = processor("how many legs does it have ?")
    assert text.pixel_values is None and "<img>" not in text.query and "<image>" not in text.query
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "a": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bare = InternVLChatProcessor(PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>"),
                                 template="Hermes-2", image_size=28)
    assert bare.image_token_id is None
    with pytest.raises(TokenizerContractError, match="IMG_CONTEXT"):
        bare("a", images=_noise(28, 28))
    with pytest.raises(TokenizerContractError, match="<\\|im_end\\|>"):
        bare("a")
    with pytest.raises(ValueError, match="no tokenizer"):
        InternVLChatProcessor(template="Hermes-2")("a")


def _state(model):
    return {"vars": {k: v for k, v in vars(model).items()}, "config": model.config.to_dict(),
            "system_message": model.system_message, "img_context_token_id": model.img_context_token_id,
            "weights": {k: v.clone() for k, v in model.state_dict().items()}, "training": model.training}


def _assert_same_state(before, after):
    assert after["vars"].keys() == before["vars"].keys()
    assert all(after["vars"][k] is v for k, v in before["vars"].items())  # no attribute replaced
    assert {k: v for k, v in after.items() if k != "weights" and k != "vars"} == \
        {k: v for k, v in before.items() if k != "weights" and k != "vars"}
    assert all(torch.equal(after["weights"][k], v) for k, v in before["weights"].items())


def test_chat_calls_leave_the_model_unchanged(tokenizer, monkeypatch):
    """chat / batch_chat / stream_chat with a tokenizer the model does not hold and a config without an image token
    id: nothing of the model is set (the official code sets img_context_token_id), the id travels with the call."""
    config = tiny_chat_config(len(tokenizer), img_context_token_id=None)  # like official configs: no id
    model = tiny_chat_model(config, seed=0)
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    before = _state(model)
    side = tokenizer.padding_side
    assert before["img_context_token_id"] is None and model.tokenizer is None
    writes = spy_on_writes(monkeypatch, model)
    answer = model.chat(tokenizer, pixels, "what is in the picture ?", dict(GEN), system_message="be brief")
    model.batch_chat(tokenizer, pixels, ["describe this image", "what is in the picture ?"], dict(GEN),
                     num_patches_list=[1, 2])
    assert "".join(model.stream_chat(tokenizer, pixels, "what is in the picture ?", dict(GEN),
                                     system_message="be brief")) == answer
    assert writes == []
    _assert_same_state(before, _state(model))
    assert tokenizer.padding_side == side
    # forward / generate without a tokenizer need the id: explicitly, or set by hand as official scripts do
    inputs = model.prepare_chat_inputs(tokenizer, pixels, "describe this image")
    with pytest.raises(ValueError, match="img_context_token_id"):
        model(pixels, inputs.input_ids)
    with torch.no_grad():
        logits = model(pixels, inputs.input_ids, image_token_id=inputs.image_token_id).logits
    monkeypatch.undo()
    model.img_context_token_id = TINY_IMG_CONTEXT_ID
    with torch.no_grad():
        assert torch.equal(model(pixels, inputs.input_ids).logits, logits)


def test_system_message_is_passed_through_the_call(model, tokenizer, processor):
    default = model.prepare_chat_inputs(tokenizer, None, "hi")
    custom = model.prepare_chat_inputs(tokenizer, None, "hi", system_message="you are a test")
    assert custom.query.startswith("<|im_start|>system\nyou are a test<|im_end|>")
    assert default.query.startswith(f"<|im_start|>system\n{model.system_message}<|im_end|>")
    assert processor("hi", system_message="you are a test").query == custom.query


def test_model_processor_and_from_pretrained(tmp_path, tokenizer, golden):
    folder = save_tiny_chat_checkpoint(tmp_path / "ckpt")
    model = InternVLChatModel.from_pretrained(folder)
    processor = InternVLChatProcessor.from_pretrained(folder)
    assert model.processor.tokenizer is model.tokenizer and model.get_processor() is model.processor
    assert model.img_context_token_id == processor.image_token_id == TINY_IMG_CONTEXT_ID
    image = _noise(50, 30)
    a = processor("what is in the picture ?", images=image)
    b = model.processor("what is in the picture ?", images=image)
    assert a.query == b.query and torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values,
                                                                                          b.pixel_values)
    # what the processor makes is what chat() answers from
    assert model.chat(model.tokenizer, a.pixel_values, "what is in the picture ?", dict(GEN)) == \
        processor.decode(model.generate(pixel_values=a.pixel_values, input_ids=a.input_ids,
                                        attention_mask=a.attention_mask, image_token_id=a.image_token_id,
                                        eos_token_id=a.eos_token_id, **GEN))[0]
    # setting the tokenizer rebuilds the processor; a tokenizer that disagrees with the config's id is refused
    model.tokenizer = None
    assert model.processor.tokenizer is None and model.img_context_token_id == TINY_IMG_CONTEXT_ID
    config = tiny_chat_config(len(tokenizer), img_context_token_id=TINY_IMG_CONTEXT_ID + 1)
    with pytest.raises(TokenizerContractError, match="img_context_token_id"):
        InternVLChatProcessor.from_config(config, tokenizer)
    with pytest.raises(ModelKindError):
        InternVLChatProcessor.from_pretrained(golden / "internvl_c_g" / "checkpoint")
