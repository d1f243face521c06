"""Golden parity: every tensor and id of internvit_6b, internvit_300m and internvl_c_g, through the public API."""
import json

import pytest
import torch
from safetensors.torch import load_file

import internvl_fm
from internvl_fm import InternVisionModel, InternVLModel


pytestmark = pytest.mark.usefixtures("no_grad")


def _case(golden, name):
    d = golden / name
    m = json.loads((d / "manifest.json").read_text())
    return d, m, load_file(str(d / "inputs.safetensors")), load_file(str(d / "expected.safetensors"))


def _tol(manifest, key):
    tol = manifest["tolerances"]
    if "default" in tol:
        tol = tol["logits"] if "logit" in key else tol["default"]
    return dict(atol=tol["atol"], rtol=tol["rtol"])


@pytest.mark.parametrize("name", ["internvit_6b", "internvit_300m"])
def test_internvit_matches_reference(golden, name):
    d, m, x, e = _case(golden, name)
    model = InternVisionModel.from_pretrained(d / "checkpoint").float().eval()
    out = model(x["pixel_values"], output_hidden_states=True)
    torch.testing.assert_close(out.last_hidden_state, e["last_hidden_state"], **_tol(m, "h"))
    torch.testing.assert_close(out.pooler_output, e["pooler_output"], **_tol(m, "h"))
    torch.testing.assert_close(torch.stack(out.hidden_states), e["hidden_states"], **_tol(m, "h"))
    torch.testing.assert_close(model.embeddings(x["pixel_values"]), e["embeddings"], **_tol(m, "h"))
    alt = model(x["alt_pixel_values"])  # other (non-square for 300m) resolution: interpolated position embeddings
    torch.testing.assert_close(alt.last_hidden_state, e["alt_last_hidden_state"], **_tol(m, "h"))
    torch.testing.assert_close(alt.pooler_output, e["alt_pooler_output"], **_tol(m, "h"))
    torch.testing.assert_close(model.embeddings(x["alt_pixel_values"]), e["alt_embeddings"], **_tol(m, "h"))


@pytest.fixture(scope="module")
def clip_case(golden):
    d, m, x, e = _case(golden, "internvl_c_g")
    return InternVLModel.from_pretrained(d / "checkpoint").float().eval(), m, x, e


def test_internvl_c_embeddings_and_logits(clip_case):
    model, m, x, e = clip_case
    pv, ids = x["pixel_values"], x["input_ids"]
    torch.testing.assert_close(model.vision_model(pv).last_hidden_state, e["vision_last_hidden_state"], **_tol(m, "h"))
    torch.testing.assert_close(model.encode_image(pv, mode="InternVL-C"), e["C_image_embeds_raw"], **_tol(m, "e"))
    torch.testing.assert_close(model.encode_text(ids), e["C_text_embeds_raw"], **_tol(m, "e"))
    torch.testing.assert_close(torch.nn.functional.normalize(model.encode_text(ids), dim=-1), e["C_text_embeds"],
                               **_tol(m, "e"))
    hidden = model.get_text_features(ids)
    mask = ids > 0  # pad rows are fully masked in the reference: compare real tokens only
    torch.testing.assert_close(hidden[mask], e["text_last_hidden_state"][mask], **_tol(m, "h"))
    lpi, lpt = model(image=pv, text=ids, mode="InternVL-C")
    torch.testing.assert_close(lpi, e["C_logits_per_image"], **_tol(m, "logits"))
    torch.testing.assert_close(lpt, e["C_logits_per_text"], **_tol(m, "logits"))


def test_internvl_g_embeddings_and_logits(clip_case):
    model, m, x, e = clip_case
    pv, ids = x["pixel_values"], x["input_ids"]
    backbone, queries = model.get_image_features(pv)
    torch.testing.assert_close(backbone, e["G_backbone_embeds"], **_tol(m, "h"))
    torch.testing.assert_close(queries, e["G_query_hidden_state"], **_tol(m, "h"))
    torch.testing.assert_close(model.encode_image(pv, mode="InternVL-G"), e["G_image_embeds_raw"], **_tol(m, "e"))
    torch.testing.assert_close(model.encode_text(ids), e["G_text_embeds_raw"], **_tol(m, "e"))
    lpi, lpt = model(image=pv, text=ids, mode="InternVL-G")
    torch.testing.assert_close(lpi, e["G_logits_per_image"], **_tol(m, "logits"))
    torch.testing.assert_close(lpt, e["G_logits_per_text"], **_tol(m, "logits"))


def test_caption_first_step_logits_and_ids(clip_case):
    model, m, x, e = clip_case
    pv, ids, mask = x["pixel_values"], x["caption_input_ids"], x["caption_attention_mask"]
    vision = model.vision_model(pv).last_hidden_state
    embeds = torch.cat([model.query_tokens.expand(2, -1, -1), model.qllama.get_input_embeddings()(ids)], 1)
    full_mask = torch.cat([torch.ones(2, 96, dtype=mask.dtype), mask], 1)
    logits = model.qllama(inputs_embeds=embeds, attention_mask=full_mask, vision_hidden_states=vision,
                          use_zero_attention_mask=True).logits[:, 96:]
    torch.testing.assert_close(logits, e["caption_first_step_logits"], **_tol(m, "logits"))
    gen = model.generate(pixel_values=pv, input_ids=ids, attention_mask=mask, num_beams=1, do_sample=False,
                         max_new_tokens=8, min_new_tokens=8)
    assert gen.tolist() == e["caption_ids"][:, 1:].tolist()  # new tokens only: no prompt, no leading BOS


def test_tokenizer_reproduces_fixture_ids(clip_case, tiny_clip_path):
    model, m, x, _ = clip_case
    texts = [t.removeprefix("summarize:") for t in m["texts"]]
    ids = model.tokenizer(texts, max_length=16)["input_ids"]
    assert ids.tolist() == x["input_ids"].tolist()
    assert model.tokenizer.tokenize_prompt([m["caption"]["prompt"]]).tolist() == [m["caption"]["prompt_input_ids"]]


def test_top_level_load_picks_class(golden):
    assert isinstance(internvl_fm.load(golden / "internvit_6b" / "checkpoint"), InternVisionModel)
    assert isinstance(internvl_fm.load(golden / "internvl_c_g" / "checkpoint"), InternVLModel)
