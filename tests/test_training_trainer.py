"""Contrastive training: learning on a tiny run, exact resume, official-format checkpoints, frozen towers, LoRA."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from internvl_fm.models.configuration_internvl import InternVLConfig

from internvl_fm.models.modeling_internvl import InternVLModel
from internvl_fm.models.configuration_intern_vit import InternVisionConfig
from internvl_fm.training import data as D
from internvl_fm.training.tokenizer import train_tokenizer
from internvl_fm.training.trainer import (ContrastiveTrainer, StepBatchSampler, TrainingArguments, TrainingError,
                                          checkpoint_dirs, export_state_dict, load_model, merged_lora,
                                          train_clip)

EASY = D.SyntheticConfig(image_size=28, shapes=("circle", "square"), colors=("red", "green", "blue"),
                         sizes=("large",), positions=("center",))

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(vocab_size: int) -> InternVLConfig:
    vision = InternVisionConfig.from_dict(dict(
        image_size=28, patch_size=14, hidden_size=32, num_attention_heads=2, intermediate_size=64,
        num_hidden_layers=1, qk_normalization=True, qkv_bias=False, norm_type="rms_norm", use_flash_attn=False))
    qllama = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
                  num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=128, rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return InternVLConfig(vision_config=vision, qllama_config=qllama, clip_embed_dim=16, attn_pool_num_heads=2,
                          num_query_token=96)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    tok = train_tokenizer(D.tokenizer_corpus(), root / "tok", vocab_size=1000)
    cfg_dir = root / "cfg"
    tiny_config(1000).save_pretrained(cfg_dir)
    D.write_dataset(root / "train", 96, EASY, progress=False)
    D.write_dataset(root / "val", 24, D.SyntheticConfig(**{**EASY.__dict__, "seed": 99}), progress=False)
    return {"root": root, "tok": tok, "config": cfg_dir / "config.json", "train": root / "train", "val": root / "val"}


def _args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), max_steps=6, batch_size=16, learning_rate=2e-3, warmup_steps=2,
                logging_steps=1, save_steps=3, save_total_limit=None, progress=False, seed=0, cache_images=True)
    return TrainingArguments(**{**base, **kw})


def test_sampler_is_a_function_of_step_and_shards_ranks():
    full = StepBatchSampler(10, 4, seed=1, max_steps=5)
    resumed = StepBatchSampler(10, 4, seed=1, max_steps=5, start_step=3)
    assert list(full)[3:] == list(resumed)
    rank0 = StepBatchSampler(10, 2, seed=1, max_steps=5, rank=0, world_size=2)
    rank1 = StepBatchSampler(10, 2, seed=1, max_steps=5, rank=1, world_size=2)
    assert [a + b for a, b in zip(rank0, rank1)] == list(full)
    epochs = [e for batch in full for e, _ in batch]
    assert sorted(i for batch in list(full)[:2] for _, i in batch[:]) [:8] == sorted(
        i for batch in list(full)[:2] for _, i in batch)[:8] and epochs[0] == 0 and epochs[-1] == 1


def test_loss_decreases_and_recall_rises(setup):
    from internvl_fm.training.evaluate import evaluate_retrieval, load_eval_set

    torch.manual_seed(0)
    model, tok_dir = load_model(setup["config"], setup["tok"], seed=0)
    records, images = load_eval_set(setup["val"])
    before = evaluate_retrieval(model, records, images)["t2i"]["r@1"]
    args = _args(setup["root"] / "learn", max_steps=150, save_steps=0, eval_steps=50, learning_rate=2e-3)
    history = ContrastiveTrainer(model, args, setup["train"], setup["val"], tok_dir).train()
    losses = [h["loss"] for h in history if "loss" in h]
    after = history[-1]["eval"]["t2i"]["r@1"]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert after > before + 0.25 and after >= 0.6
    log = [json.loads(line) for line in (setup["root"] / "learn" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 150 and "eval" in log[-1] and set(log[-1]["eval"]["per_language"]) == set(D.LANGUAGES)


def test_resume_reproduces_the_next_steps_exactly(setup):
    full, resumed = setup["root"] / "full", setup["root"] / "resumed"
    h_full = train_clip(setup["config"], setup["train"], _args(full), tokenizer=setup["tok"])
    assert [p.name for p in checkpoint_dirs(full)] == ["checkpoint-3", "checkpoint-6"]
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    h_res = train_clip(setup["config"], setup["train"], _args(resumed), tokenizer=setup["tok"])
    steps = lambda h: [(e["step"], e["loss"]) for e in h if "loss" in e]  # noqa: E731
    assert steps(h_res) == steps(h_full)[3:]
    a = InternVLModel.from_pretrained(full)
    b = InternVLModel.from_pretrained(resumed)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_checkpoints_are_official_format_and_load_everywhere(setup):
    from internvl_fm.loading import load

    ckpt = setup["root"] / "full" / "checkpoint-6"
    if not ckpt.exists():
        pytest.skip("needs the resume test's run")  # pragma: no cover - ordering guard
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["architectures"] == ["InternVLModel"] and cfg["model_type"] == "internvl"
    assert (ckpt / "tokenizer.model").is_file() and (ckpt / "training_state.pt").is_file()
    model = load(ckpt)
    assert isinstance(model, InternVLModel) and model.tokenizer is not None
    fresh = InternVLModel(InternVLConfig.from_pretrained(ckpt))
    assert set(model.state_dict()) == set(fresh.state_dict())
    emb = model.embed_texts(["a large red circle in the center", "中间有一个大红色圆形"])
    assert emb.shape == (2, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(2))


def test_frozen_vision_tower_does_not_change(setup):
    model, tok_dir = load_model(setup["config"], setup["tok"], seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = _args(setup["root"] / "frozen", max_steps=2, save_steps=0, freeze_vision=True)
    ContrastiveTrainer(model, args, setup["train"], tokenizer_dir=tok_dir).train()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("vision_model."))
    assert not torch.equal(before["clip_projector.cross_attn.proj.weight"], after["clip_projector.cross_attn.proj.weight"])
    assert not torch.equal(before["text_projection"], after["text_projection"])
    assert torch.equal(before["query_tokens"], after["query_tokens"])  # InternVL-G only: never trained here


def test_lora_checkpoint_is_merged_into_official_keys(setup):
    pytest.importorskip("peft")
    model, tok_dir = load_model(setup["config"], setup["tok"], seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    out = setup["root"] / "lora"
    args = _args(out, max_steps=3, save_steps=0, lora_vision_rank=4, lora_text_rank=4, learning_rate=1e-2)
    trainer = ContrastiveTrainer(model, args, setup["train"], tokenizer_dir=tok_dir)
    trainer.train()
    assert any(".lora_A." in k for k in model.state_dict())
    exported = export_state_dict(model)
    assert set(exported) == set(base)
    for key in ("vision_model.encoder.layers.0.mlp.fc1.weight", "qllama.model.layers.1.self_attn.q_proj.weight"):
        assert not torch.equal(exported[key], base[key]), key  # the adapter is merged in
    assert torch.equal(exported["vision_model.embeddings.patch_embedding.weight"],
                       base["vision_model.embeddings.patch_embedding.weight"])  # not a LoRA target, frozen
    reloaded = InternVLModel.from_pretrained(out)
    pixels, ids = torch.randn(2, 3, 28, 28), torch.tensor([[1, 5, 9, 2], [1, 7, 2, 0]])
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), merged_lora(model):
        torch.testing.assert_close(reloaded.encode_image(pixels), model.encode_image(pixels), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(reloaded.encode_text(ids), model.encode_text(ids), atol=1e-5, rtol=1e-4)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # unmerged exactly


def test_errors_name_the_problem(setup, tmp_path):
    with pytest.raises(ValueError, match="exclude each other"):
        TrainingArguments(output_dir="x", freeze_vision=True, lora_vision_rank=4)
    with pytest.raises(TrainingError, match="no tokenizer files"):
        load_model(setup["config"], tmp_path)
    small = tmp_path / "small"
    InternVLConfig(**{**tiny_config(100).__dict__}).save_pretrained(small)
    with pytest.raises(TrainingError, match="vocab_size is 100"):
        load_model(small / "config.json", setup["tok"])


@pytest.mark.slow
def test_torchrun_ddp_matches_a_single_process_on_the_same_global_batch(setup):
    """2 ranks x batch 8 see the same global batch as 1 process x batch 16 and gather features for the loss."""
    import os
    import subprocess
    import sys

    common = ["train-clip", str(setup["train"]), "--model", str(setup["config"]), "--tokenizer", str(setup["tok"]),
              "--steps", "1", "--log-steps", "1", "--threads", "1", "--no-progress", "--save-steps", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp_out, single_out = setup["root"] / "ddp", setup["root"] / "single"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
                    "-m", "internvl_fm.cli", *common, "--batch-size", "8", "--output", str(ddp_out)],
                   check=True, env=env, capture_output=True, timeout=240)
    train_clip(setup["config"], setup["train"], _args(single_out, max_steps=1, batch_size=16, warmup_steps=50,
                                                       learning_rate=5e-4, cache_images=False, save_steps=0),
               tokenizer=setup["tok"])
    ddp = json.loads((ddp_out / "log.jsonl").read_text().splitlines()[0])
    single = json.loads((single_out / "log.jsonl").read_text().splitlines()[0])
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert (ddp_out / "model.safetensors").is_file() and (ddp_out / "checkpoint-1").is_dir()


def test_learning_rate_follows_the_transformers_cosine_with_a_floor(setup):
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    args = _args(setup["root"] / "schedule", max_steps=5, save_steps=0, warmup_steps=2, min_lr_ratio=0.25)
    history = train_clip(setup["config"], setup["train"], args, tokenizer=setup["tok"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    reference = get_cosine_with_min_lr_schedule_with_warmup(optimizer, 2, 5, min_lr_rate=0.25)
    expected = []
    for _ in range(5):  # the log holds the lr after each step's scheduler.step()
        optimizer.step()
        reference.step()
        expected.append(reference.get_last_lr()[0])
    assert [h["lr"] for h in history] == pytest.approx(expected, rel=1e-12)
    assert history[-1]["lr"] == pytest.approx(0.25 * args.learning_rate)
    with pytest.raises(ValueError, match="cosine schedule only"):
        TrainingArguments(output_dir="x", lr_schedule="constant", min_lr_ratio=0.1)


def test_training_errors_are_typed_internvl_errors(setup, tmp_path):
    from internvl_fm.errors import InternVLError

    with pytest.raises(InternVLError) as info:  # the CLI prints any InternVLError as one line
        load_model(setup["config"], tmp_path)
    assert isinstance(info.value, TrainingError) and isinstance(info.value, RuntimeError)
