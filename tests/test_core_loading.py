"""Loading: round trips, sharded / .bin checkpoints, partial loads, and the errors for weights that do not fit."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from internvl_fm import (CheckpointNotFoundError, InternVisionModel, InternVLModel, InternVLTextModel,
                         WeightLoadingError)
from internvl_fm.loading import count_checkpoint_parameters, load_state_dict


pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture(scope="module")
def clip(tiny_clip_path):
    return InternVLModel.from_pretrained(tiny_clip_path).eval()


@pytest.fixture(scope="module")
def clip_inputs(golden):
    return load_file(str(golden / "internvl_c_g" / "inputs.safetensors"))


def _copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_save_load_round_trip_is_exact(clip, clip_inputs, tmp_path):
    clip.save_pretrained(tmp_path / "m")
    again = InternVLModel.from_pretrained(tmp_path / "m").eval()
    for (k, a), (k2, b) in zip(clip.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    pv, ids = clip_inputs["pixel_values"], clip_inputs["input_ids"]
    assert torch.equal(again.encode_image(pv, mode="InternVL-G"), clip.encode_image(pv, mode="InternVL-G"))
    assert torch.equal(again.encode_text(ids), clip.encode_text(ids))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == ["InternVLModel"] and config["model_type"] == "internvl"
    assert again.tokenizer is not None  # tokenizer files travel with the checkpoint


def test_sharded_save_and_bin_load(clip, clip_inputs, tmp_path):
    clip.save_pretrained(tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    sharded = InternVLModel.from_pretrained(tmp_path / "sharded")
    pv = clip_inputs["pixel_values"]
    assert torch.equal(sharded.encode_image(pv), clip.encode_image(pv))
    # .bin (torch.save of the state dict), read with weights_only=True
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(tmp_path / "sharded" / "config.json", binary / "config.json")
    torch.save(clip.state_dict(), binary / "pytorch_model.bin")
    assert torch.equal(InternVLModel.from_pretrained(binary).encode_image(pv), clip.encode_image(pv))
    assert count_checkpoint_parameters(tmp_path / "sharded") == sum(t.numel() for t in clip.state_dict().values())


def test_vision_only_and_text_only_loads_match_full_model(clip, clip_inputs, tiny_clip_path):
    pv, ids = clip_inputs["pixel_values"], clip_inputs["input_ids"]
    vit = InternVisionModel.from_pretrained(tiny_clip_path)  # vision tower of a full InternVL checkpoint
    assert torch.equal(vit(pv).last_hidden_state, clip.vision_model(pv).last_hidden_state)
    text = InternVLTextModel.from_pretrained(tiny_clip_path)
    assert not hasattr(text, "vision_model")
    assert torch.equal(text.encode_text(ids), clip.encode_text(ids))
    out = text(ids)
    assert out.last_hidden_state.shape == (*ids.shape, 64) and out.pooled_output.shape == (ids.shape[0], 32)
    assert torch.equal(out.pooled_output, clip.encode_text(ids))
    assert torch.equal(out.attention_mask, (ids > 0).long())


def test_text_encoder_prompts_drop_prefix(tiny_clip_path):
    text = InternVLTextModel.from_pretrained(tiny_clip_path)
    out = text.encode_prompts(["a red panda", "a cat"])
    n = text.tokenizer.prefix_length
    assert out.last_hidden_state.shape[1] == 80 + 3 - n
    full = text.encode_prompts(["a red panda", "a cat"], drop_prefix=False)
    assert torch.equal(out.last_hidden_state[:, 1:], full.last_hidden_state[:, 1 + n:])
    assert torch.equal(out.pooled_output, full.pooled_output)


def test_missing_unexpected_and_mismatched_keys_are_named(tiny_vit_path, tmp_path):
    sd = load_file(str(tiny_vit_path / "model.safetensors"))
    broken = dict(sd)
    del broken["encoder.layers.1.ls2"]
    broken["encoder.layers.9.extra"] = torch.zeros(1)
    broken["embeddings.position_embedding"] = torch.zeros(1, 3, 48)
    ckpt = tmp_path / "broken"
    ckpt.mkdir()
    shutil.copy(tiny_vit_path / "config.json", ckpt / "config.json")
    save_file(broken, str(ckpt / "model.safetensors"))
    with pytest.raises(WeightLoadingError) as err:
        InternVisionModel.from_pretrained(ckpt)
    msg = str(err.value)
    assert "encoder.layers.1.ls2" in msg and "encoder.layers.9.extra" in msg
    assert "embeddings.position_embedding" in msg and "(1, 3, 48)" in msg


def test_missing_checkpoint_and_weights(tmp_path, tiny_vit_path):
    with pytest.raises(CheckpointNotFoundError):
        InternVisionModel.from_pretrained(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(tiny_vit_path / "config.json", empty / "config.json")
    with pytest.raises(CheckpointNotFoundError, match="no weights"):
        InternVisionModel.from_pretrained(empty)


def test_dtype_and_partial_state_dict(tiny_clip_path, clip_inputs):
    vit = InternVisionModel.from_pretrained(tiny_clip_path, dtype="bfloat16")
    assert vit.dtype == torch.bfloat16
    out = vit(clip_inputs["pixel_values"]).last_hidden_state
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    sd = load_state_dict(tiny_clip_path, prefix="text_projection")
    assert list(sd) == ["text_projection"]


def test_meta_build_uses_no_memory_for_real_config():
    from internvl_fm import InternVisionConfig

    config = InternVisionConfig()  # InternViT-6B-224px defaults
    with torch.device("meta"):
        model = InternVisionModel(config)
    n = model.num_parameters()
    assert 5.8e9 < n < 6.0e9


def test_gradient_checkpointing_on_both_towers(tiny_clip_path):
    model = InternVLModel.from_pretrained(tiny_clip_path).train()
    ids, pv = torch.tensor([[1, 5, 6, 2, 0]]), torch.randn(1, 3, 28, 28)

    def grads():
        model.zero_grad()
        with torch.enable_grad():
            model(image=pv, text=ids, mode="InternVL-G")[0].sum().backward()
        return model.qllama.model.embed_tokens.weight.grad.clone(), model.query_tokens.grad.clone()

    plain = grads()
    model.gradient_checkpointing_enable()
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_saved_files_are_readable_by_others(clip, tmp_path):
    import os
    import stat

    clip.save_pretrained(tmp_path / "m")
    mode = os.stat(tmp_path / "m" / "model.safetensors").st_mode
    assert mode & stat.S_IRGRP and mode & stat.S_IROTH


def test_atomic_directory_replaces_only_on_success(tmp_path):
    from internvl_fm.loading import atomic_directory

    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("half-written")
            raise RuntimeError("crash while writing")
    assert (target / "a.txt").read_text() == "first"  # the old folder survives a failed write
    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folders left behind


def test_vision_tower_of_a_chat_checkpoint(golden):
    case = golden / "chat_internlm2_v2"
    vit = InternVisionModel.from_pretrained(case / "checkpoint")  # reads only the vision_model.* tensors
    x = load_file(str(case / "inputs.safetensors"))["pixel_values"]
    expected = load_file(str(case / "expected.safetensors"))["vision_hidden_states"]
    torch.testing.assert_close(torch.stack(vit(x, output_hidden_states=True).hidden_states), expected,
                               atol=1e-5, rtol=1e-4)


def test_torch_pickles_load_safely_in_both_formats_and_unwrapped(tmp_path):
    from internvl_fm.loading import torch_load_state_dict

    state = {"a.weight": torch.arange(6.0).view(2, 3)}
    torch.save(state, tmp_path / "zip.bin")
    torch.save({"state_dict": state}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    torch.save({"module": state}, tmp_path / "deepspeed.bin")
    for name in ("zip.bin", "legacy.bin", "deepspeed.bin"):
        loaded = torch_load_state_dict(tmp_path / name)
        assert torch.equal(loaded["a.weight"], state["a.weight"]), name


def test_a_saved_model_keeps_bos_and_its_text_embeddings(tmp_path):
    """transformers 5 does not write `add_bos_token` when it saves a tokenizer: a re-saved checkpoint must still
    tokenise BOS + text + EOS, so its text embeddings are the original's."""
    import internvl_fm
    from internvl_fm.models.modeling_internvl import InternVLModel

    model = InternVLModel.from_pretrained(internvl_fm.demo_model_path(), dtype=torch.float32)
    model.save_pretrained(tmp_path / "saved")
    again = InternVLModel.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    ids, ids_again = (m.tokenizer(["a red circle"], padding="longest")["input_ids"] for m in (model, again))
    assert ids.tolist() == ids_again.tolist() and ids[0, 0] == model.tokenizer.tokenizer.bos_token_id
    with torch.no_grad():
        torch.testing.assert_close(again.encode_text(ids_again), model.encode_text(ids), rtol=0, atol=0)


def test_a_tokenizer_without_bos_is_refused():
    from transformers import AutoTokenizer

    import internvl_fm
    from internvl_fm.errors import TokenizerContractError
    from internvl_fm.tokenization import InternVLTokenizer

    raw = AutoTokenizer.from_pretrained(str(internvl_fm.demo_model_path()), add_bos_token=False, add_eos_token=True)
    with pytest.raises(TokenizerContractError, match="bos token"):
        InternVLTokenizer(raw)
