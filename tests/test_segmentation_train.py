"""Training recipes on the synthetic shapes dataset: learning, UperNet vs linear, exact resume, config handling."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from internvl_fm.segmentation import (CropSizeError, SegmentationConfigError, SegmentationModel,
                                      load_train_config, make_shapes_dataset, train)
from internvl_fm.segmentation.cli import eval_main, train_main
from internvl_fm.segmentation.train import (OptimConfig, build_model, latest_checkpoint, param_groups,
                                            poly_warmup_factor, train_config_from_dict)

VISION = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=4, image_size=112,
              patch_size=8, qkv_bias=True, qk_normalization=False, norm_type="layer_norm")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """16 images of 112 px: coloured circles / squares / triangles on noisy backgrounds, exact masks."""
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_images=16, size=112)


def recipe(shapes, work_dir, head="linear", **train_kw):
    upernet = head == "upernet"
    raw = {
        "model": dict(vision_config=VISION, num_classes=4, head=head, out_indices=[0, 1, 2, 3] if upernet else [-1],
                      with_pyramid=upernet, crop_size=112, channels=32, aux_channels=16, dropout_ratio=0.0,
                      reduce_zero_label=False),
        "data": dict(type="ade20k", root=str(shapes), val_split="training", ratio_range=[0.75, 1.5],
                     num_workers=0),
        "optim": dict(lr=0.01, warmup_iters=5, weight_decay=0.0),
        "train": {**dict(work_dir=str(work_dir), max_iters=60, batch_size=8, checkpoint_interval=0,
                         eval_mode="whole", log_interval=10), **train_kw},
    }
    return train_config_from_dict(raw)


@pytest.fixture(scope="module")
def linear_result(shapes, tmp_path_factory):
    return train(recipe(shapes, tmp_path_factory.mktemp("linear"), max_iters=80), progress=False)


def test_linear_head_on_frozen_random_backbone_learns_the_shapes(linear_result):
    losses = [h["loss"] for h in linear_result.history]
    assert len(losses) == 80 and losses[-1] < 0.5 * losses[0]
    assert linear_result.metrics["mIoU"] >= 0.8


def test_upernet_with_pyramid_beats_the_linear_head(shapes, tmp_path, linear_result):
    result = train(recipe(shapes, tmp_path, head="upernet"), progress=False)  # 60 steps vs the linear 80
    assert result.metrics["mIoU"] > linear_result.metrics["mIoU"]
    assert {"decode_loss", "aux_loss"} <= set(result.history[-1])
    model = SegmentationModel.from_pretrained(result.final_dir)
    assert model.config.head == "upernet" and model.auxiliary_head is not None


def test_resume_after_interruption_continues_with_an_identical_loss_curve(shapes, tmp_path):
    def config(work_dir):
        cfg = recipe(shapes, work_dir, max_iters=8, checkpoint_interval=3, batch_size=4)
        cfg.model.dropout_ratio = 0.1  # exercises the saved RNG state
        return cfg

    reference = train(config(tmp_path / "straight"), progress=False)

    class Interrupt(Exception):
        pass

    def crash_after_step_7(step, logs):
        if step == 7:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(config(tmp_path / "resumed"), on_step=crash_after_step_7, progress=False)
    assert latest_checkpoint(tmp_path / "resumed").name == "step_00000006"
    resumed = train(config(tmp_path / "resumed"), progress=False)
    assert [h["step"] for h in resumed.history] == [7, 8]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in reference.history[6:]]
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in reference.history[6:]]
    a = SegmentationModel.from_pretrained(tmp_path / "straight" / "final").state_dict()
    b = SegmentationModel.from_pretrained(tmp_path / "resumed" / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [8]  # logs of the crashed steps were dropped


def test_layer_decay_and_no_weight_decay_groups(shapes, tmp_path):
    cfg = recipe(shapes, tmp_path, head="upernet")
    cfg.model.freeze_backbone = False
    model = build_model(cfg)
    optim = OptimConfig(lr=1.0, weight_decay=0.05, layer_decay=0.5)
    groups = {(g["layer_id"], g["weight_decay"]): g for g in param_groups(model, optim)}
    assert groups[(0, 0.0)]["lr"] == 0.5 ** 5  # embeddings (4 layers): decay^(L + 1)
    assert "backbone.vit.embeddings.position_embedding" in groups[(0, 0.0)]["names"]
    assert groups[(1, 0.05)]["lr"] == 0.5 ** 4 and groups[(4, 0.05)]["lr"] == 0.5
    head = groups[(5, 0.05)]
    assert head["lr"] == 1.0 and "decode_head.conv_seg.weight" in head["names"]
    assert "decode_head.conv_seg.bias" in groups[(5, 0.0)]["names"]
    assert model.backbone.vit.encoder.gradient_checkpointing  # full tuning turns it on


def test_poly_schedule_with_linear_warmup():
    optim = OptimConfig(lr=1.0, warmup_iters=10, warmup_ratio=1e-6, power=1.0, min_lr=0.0)
    assert poly_warmup_factor(0, optim, 100) == pytest.approx(1e-6)
    assert poly_warmup_factor(5, optim, 100) == pytest.approx(0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert poly_warmup_factor(10, optim, 100) == pytest.approx(0.9)
    assert poly_warmup_factor(100, optim, 100) == 0.0


def test_shipped_recipes_parse():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "segmentation" / "configs"
    linear = load_train_config(configs / "linear_frozen.yaml")
    assert linear.model.head == "linear" and linear.model.out_indices == [44] and linear.optim.weight_decay == 0.0
    uper = load_train_config(configs / "upernet_frozen.yaml", ["train.max_iters=10"])
    assert uper.model.with_pyramid and uper.model.aux_in_index == 1 and uper.train.max_iters == 10
    full = load_train_config(configs / "full_tuning.json")
    assert not full.model.freeze_backbone and full.optim.layer_decay == 0.95 and full.train.drop_path_rate == 0.4
    assert len(full.model.class_names) == 150


def test_config_errors(shapes, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {num_classes: 4, vision_config: {hidden_size: 64, num_attention_heads: 4}}\n"
                   "train: {max_iter: 10}\n")
    with pytest.raises(SegmentationConfigError, match=r"unknown key\(s\) in config section 'train': \['max_iter'\]"):
        load_train_config(bad)
    with pytest.raises(SegmentationConfigError, match="pretrained"):
        train_config_from_dict({"model": {"num_classes": 4}})
    cfg = recipe(shapes, tmp_path, eval_stride=30)
    cfg.model.crop_size = 100
    with pytest.raises(CropSizeError, match="not divisible by the patch size 8"):
        train(cfg, progress=False)


def test_seg_train_and_seg_eval_commands(shapes, tmp_path, capsys):
    config = tmp_path / "recipe.json"
    raw = recipe(shapes, tmp_path / "work", max_iters=3).to_dict()
    config.write_text(json.dumps(raw))
    assert train_main([str(config), "--quiet", "--set", "train.max_iters=4"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 4 and 0.0 <= summary["mIoU"] <= 1.0
    out = tmp_path / "metrics.json"
    assert eval_main([str(config), "--checkpoint", summary["final"], "--out", str(out), "--device", "cpu"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["mIoU"] == pytest.approx(summary["mIoU"]) and set(metrics["per_class"]) == {"0", "1", "2", "3"}


@pytest.mark.slow
def test_ddp_training_with_torchrun(shapes, tmp_path):
    """Two CPU processes (gloo): one summary, checkpoints written once, metrics summed over ranks."""
    import os
    import subprocess
    import sys

    config = tmp_path / "recipe.json"
    raw = recipe(shapes, tmp_path / "work", max_iters=2, batch_size=2, checkpoint_interval=1).to_dict()
    raw["model"].update(vision_config={**VISION, "num_hidden_layers": 2})
    config.write_text(json.dumps(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "internvl_fm.cli", "seg-train", str(config), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["step"] == 2 and 0 <= summaries[0]["mIoU"] <= 1
    assert latest_checkpoint(tmp_path / "work").name == "step_00000002"


def test_a_crash_while_saving_the_final_model_keeps_the_previous_one(shapes, tmp_path, monkeypatch):
    first = train(recipe(shapes, tmp_path, max_iters=2), progress=False)
    before = SegmentationModel.from_pretrained(first.final_dir).state_dict()
    save = SegmentationModel.save_pretrained

    def crash_in_final(self, folder, *args, **kwargs):
        save(self, folder, *args, **kwargs)
        if Path(folder).name.lstrip(".").startswith("final"):  # final/ or its temp folder, not a checkpoint
            raise KeyboardInterrupt  # killed after the new weights were written, before the save completed

    monkeypatch.setattr(SegmentationModel, "save_pretrained", crash_in_final)
    with pytest.raises(KeyboardInterrupt):
        train(recipe(shapes, tmp_path, max_iters=3, seed=1), resume=False, progress=False)
    after = SegmentationModel.from_pretrained(tmp_path / "final").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
