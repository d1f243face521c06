"""InternVLProcessor: the InternVL-C/G image transform and tokenizer contract in one object."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from internvl_fm import InternVLModel
from internvl_fm.errors import CheckpointNotFoundError, ModelKindError
from internvl_fm.processing import InternVLImageProcessor, InternVLProcessor, build_transform
from internvl_fm.tokenization import InternVLTokenizer


@pytest.fixture(scope="module")
def clip_model(tiny_clip_path):
    return InternVLModel.from_pretrained(tiny_clip_path)


@pytest.fixture(scope="module")
def image():
    return Image.radial_gradient("L").convert("RGB").resize((96, 64))


def test_from_pretrained_matches_the_models_transform_and_tokenizer(tiny_clip_path, clip_model, image):
    processor = InternVLProcessor.from_pretrained(tiny_clip_path)
    assert processor.image_size == clip_model.image_size and processor.mode == "retrieval"
    assert isinstance(processor.tokenizer, InternVLTokenizer)
    both = processor(text=["a photo of a cat", "a dog"], images=[image, image.rotate(90)])
    assert set(both) == {"pixel_values", "input_ids", "attention_mask"}
    assert torch.equal(both["pixel_values"], clip_model.image_processor([image, image.rotate(90)]))
    want = clip_model.tokenizer(["a photo of a cat", "a dog"])
    assert torch.equal(both["input_ids"], want["input_ids"]) and torch.equal(both["attention_mask"],
                                                                             want["attention_mask"])
    # the tokenizer contract: summarize: prefix, EOS appended, right padding with id 0, length 80
    assert both["input_ids"].shape == (2, 80) and both["input_ids"][1, -1] == 0
    longest = processor(text="a dog", padding="longest")["input_ids"]
    assert longest.shape[1] < 80 and longest[0, -1] == processor.tokenizer.tokenizer.eos_token_id
    with torch.no_grad():
        embeds = clip_model.encode_text(both["input_ids"])
        assert torch.allclose(embeds, clip_model.encode_text(want["input_ids"]))
    assert processor.batch_decode(want["input_ids"], skip_special_tokens=True)[0].endswith("a photo of a cat")


def test_modes_and_single_parts(tiny_clip_path, image):
    processor = InternVLProcessor.from_pretrained(tiny_clip_path)
    size = processor.image_size
    classification = processor.with_mode("classification")
    assert classification.mode == "classification" and classification.tokenizer is processor.tokenizer
    pixels = classification(images=image)["pixel_values"]
    assert torch.equal(pixels[0], build_transform(size, "classification")(image))
    assert not torch.equal(pixels, processor(images=image)["pixel_values"])  # centre crop vs squash on 96x64
    assert set(processor(images=image)) == {"pixel_values"} and set(processor(text="a")) == {"input_ids",
                                                                                            "attention_mask"}
    with pytest.raises(ValueError, match="text, images"):
        processor()
    with pytest.raises(ValueError, match="no tokenizer"):
        InternVLProcessor(InternVLImageProcessor(size))(text="a cat")
    assert InternVLProcessor().image_size == 224


def test_from_pretrained_names_wrong_or_missing_folders(tmp_path, golden):
    with pytest.raises(ModelKindError, match="InternVL-Chat"):
        InternVLProcessor.from_pretrained(golden / "chat_qwen2_v2" / "checkpoint")
    with pytest.raises(CheckpointNotFoundError, match="nowhere"):
        InternVLProcessor.from_pretrained(tmp_path / "nowhere")
