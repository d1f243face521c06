"""Bad input gets a clear, typed error; the convenience API (embed_*, caption, beam search) works end to end."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_fm import (ImageLoadError, InternVisionModel, InternVLImageProcessor, InternVLModel,
                         InternVLTokenizer, TokenizerContractError, load_image)


pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture(scope="module")
def clip(tiny_clip_path):
    return InternVLModel.from_pretrained(tiny_clip_path).eval()


def test_pixel_tensor_rank_and_channels(tiny_vit_path):
    vit = InternVisionModel.from_pretrained(tiny_vit_path)
    with pytest.raises(ValueError, match=r"\[batch, 3, height, width\]"):
        vit(torch.zeros(3, 56, 56))
    with pytest.raises(ValueError, match="got \\(1, 4, 56, 56\\)"):
        vit(torch.zeros(1, 4, 56, 56))
    with pytest.raises(TypeError):
        vit(np.zeros((1, 3, 56, 56)))


def test_unreadable_images_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not an image at all")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buf.getvalue()[:60])
    for path in (corrupt, empty, truncated, tmp_path / "missing.png"):
        with pytest.raises(ImageLoadError) as err:
            load_image(path)
        assert path.name in str(err.value)
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(_big_png(tmp_path), max_pixels=1000)


def _big_png(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (100, 100)).save(path)
    return path


def test_odd_modes_become_rgb(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    assert load_image(cmyk).mode == "RGB"
    grey16 = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    rgb = load_image(grey16)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255)


def test_processor_modes():
    image = Image.new("RGB", (60, 30), "blue")
    assert InternVLImageProcessor(28, "retrieval")([image]).shape == (1, 3, 28, 28)
    assert InternVLImageProcessor(28, "classification")(image).shape == (1, 3, 28, 28)
    with pytest.raises(ValueError, match="unknown transform mode"):
        InternVLImageProcessor(28, "nope")


def test_tokenizer_that_breaks_eos_pooling_is_refused(tiny_clip_path):
    from transformers import AutoTokenizer

    no_eos = AutoTokenizer.from_pretrained(str(tiny_clip_path))  # add_eos_token defaults to False
    with pytest.raises(TokenizerContractError, match="eos"):
        InternVLTokenizer(no_eos)
    left = AutoTokenizer.from_pretrained(str(tiny_clip_path), add_eos_token=True)
    left.pad_token_id = 0
    wrapped = InternVLTokenizer(left)  # the wrapper forces right padding
    assert wrapped.tokenizer.padding_side == "right"
    bad_pad = AutoTokenizer.from_pretrained(str(tiny_clip_path), add_eos_token=True)
    bad_pad.pad_token_id = 2
    with pytest.raises(TokenizerContractError, match="pad"):
        InternVLTokenizer(bad_pad)


def test_embed_helpers_are_normalised_and_batched(clip, tmp_path):
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "green", "blue")]
    path = tmp_path / "x.png"
    images[0].save(path)
    emb = clip.embed_images(images + [path], batch_size=2)
    assert emb.shape == (4, 32) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(emb[0], emb[3])
    g = clip.embed_images(images, mode="InternVL-G")
    assert not torch.allclose(g, emb[:3])
    txt = clip.embed_texts(["a red square", "a cat", "一只猫"], batch_size=2)
    assert txt.shape == (3, 32)
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    # dynamic ("longest") padding gives the same embedding as padding to 80 (EOS pooling + causal attention)
    ids80 = clip.tokenizer(["a red square"])["input_ids"]
    torch.testing.assert_close(torch.nn.functional.normalize(clip.encode_text(ids80), dim=-1)[0], txt[0])
    with pytest.raises(ValueError, match="unknown mode"):
        clip.embed_images(images, mode="InternVL-X")


def test_beam_search_and_caption(clip):
    pv = torch.randn(2, 3, 28, 28)
    ids = clip.tokenizer.tokenize_prompt(["English caption:"] * 2)
    greedy = clip.generate(pixel_values=pv, input_ids=ids, max_new_tokens=5, min_new_tokens=5)
    beams = clip.generate(pixel_values=pv, input_ids=ids, max_new_tokens=5, min_new_tokens=5, num_beams=3)
    assert greedy.shape == (2, 5) and beams.shape[0] == 2 and beams.shape[1] <= 5
    caps = clip.caption([Image.new("RGB", (28, 28), "red")], max_new_tokens=4)
    assert len(caps) == 1 and isinstance(caps[0], str)


def test_gradient_checkpointing_matches(tiny_vit_path):
    vit = InternVisionModel.from_pretrained(tiny_vit_path).train()
    x = torch.randn(1, 3, 56, 56)
    with torch.enable_grad():
        vit.zero_grad()
        vit(x).pooler_output.sum().backward()
        ref = vit.embeddings.patch_embedding.weight.grad.clone()
        vit.zero_grad()
        vit.gradient_checkpointing_enable()
        vit(x).pooler_output.sum().backward()
    torch.testing.assert_close(vit.embeddings.patch_embedding.weight.grad, ref)


def test_eager_and_sdpa_agree_and_intermediates(tiny_vit_path):
    vit = InternVisionModel.from_pretrained(tiny_vit_path)
    x = torch.randn(2, 3, 56, 56)
    ref = vit(x, output_hidden_states=True)
    vit.set_attn_implementation("eager")
    torch.testing.assert_close(vit(x).last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-4)
    feats = vit.forward_intermediates(x, [0, -1])
    torch.testing.assert_close(feats[0], ref.hidden_states[1], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown attention"):
        vit.set_attn_implementation("magic")
    with pytest.raises(ValueError, match="out of range"):
        vit.forward_intermediates(x, [5])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_fused_cpu_inference_path_matches_autograd_path(tiny_vit_6b_path, dtype, tol):
    vit = InternVisionModel.from_pretrained(tiny_vit_6b_path, dtype=dtype)
    x = torch.randn(2, 3, 56, 56, dtype=dtype)
    with torch.enable_grad():
        ref = vit(x).last_hidden_state.detach()  # plain path (autograd on)
    fused = vit(x).last_hidden_state  # no grad: oneDNN fused path with the layer scale folded in
    torch.testing.assert_close(fused.float(), ref.float(), atol=tol, rtol=tol)
    with torch.no_grad():  # the folded-weight cache follows parameter updates
        vit.encoder.layers[0].ls2.mul_(2)
    with torch.enable_grad():
        ref2 = vit(x).last_hidden_state.detach()
    torch.testing.assert_close(vit(x).last_hidden_state.float(), ref2.float(), atol=tol, rtol=tol)
    assert not torch.allclose(ref2.float(), ref.float(), atol=tol)


def test_wrapped_linear_layers_are_called_not_bypassed(tiny_vit_path):
    vit = InternVisionModel.from_pretrained(tiny_vit_path)
    x = torch.randn(1, 3, 56, 56)
    ref = vit(x).last_hidden_state

    class Doubled(torch.nn.Module):  # stands in for a LoRA / quantised wrapper around nn.Linear
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, h):
            return self.inner(h) * 2

    layer = vit.encoder.layers[0]
    layer.attn.qkv = Doubled(layer.attn.qkv)
    assert not layer._fusable
    with torch.enable_grad():
        slow = vit(x).last_hidden_state.detach()
    fast = vit(x).last_hidden_state
    torch.testing.assert_close(fast, slow)
    assert not torch.allclose(fast, ref)
