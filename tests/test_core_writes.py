"""Checkpoint writes cannot be torn and checkpoint reads cannot be pointed elsewhere.

- save_pretrained over an existing checkpoint swaps a complete new folder in: kill -9 at random moments of
  repeated saves always leaves a folder that loads (the old weights or the new ones), and files a save does not
  write (a README) survive;
- a safetensors index whose weight_map points outside the folder is refused;
- NaN weights are refused with check_finite=True.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from internvl_fm import InternVisionModel, WeightLoadingError
from internvl_fm.loading import atomic_directory


def test_save_over_an_existing_checkpoint_keeps_other_files(tiny_vit_path, tmp_path):
    model = InternVisionModel.from_pretrained(tiny_vit_path)
    target = tmp_path / "ckpt"
    model.save_pretrained(target)
    (target / "README.md").write_text("my notes")
    with torch.no_grad():
        model.embeddings.class_embedding.add_(1.0)
    model.save_pretrained(target)
    assert (target / "README.md").read_text() == "my notes"
    again = InternVisionModel.from_pretrained(target)
    assert torch.equal(again.embeddings.class_embedding, model.embeddings.class_embedding)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left behind


_SAVER = """
import sys, torch
from internvl_fm import InternVisionModel
model = InternVisionModel.from_pretrained(sys.argv[1])
step = 0
while True:
    step += 1
    with torch.no_grad():
        model.embeddings.class_embedding.fill_(float(step))
    model.save_pretrained(sys.argv[2], max_shard_bytes=200_000)  # several shards: a long, many-file write
    print(step, flush=True)
"""


@pytest.mark.slow
def test_kill_9_during_save_pretrained_always_leaves_a_loadable_checkpoint(tiny_vit_path, tmp_path):
    target = tmp_path / "ckpt"
    InternVisionModel.from_pretrained(tiny_vit_path).save_pretrained(target)
    rng = random.Random(0)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(tiny_vit_path), str(target)],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        proc.stdout.readline()  # the first save finished: the process is in its save loop
        time.sleep(rng.uniform(0.0, 0.3))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        model = InternVisionModel.from_pretrained(target)  # never torn
        value = float(model.embeddings.class_embedding.detach().flatten()[0])
        assert torch.all(model.embeddings.class_embedding == value)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt.")]
    with atomic_directory(target) as tmp:  # the next write cleans what the kills left
        shutil.copytree(target, tmp, dirs_exist_ok=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.")], leftovers


def _sharded_copy(src, dst):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    save_file(tensors, dst / "model-00001-of-00001.safetensors")
    return {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in tensors}}


def test_weight_map_pointing_outside_the_folder_is_refused(tiny_vit_path, tmp_path):
    folder = tmp_path / "ckpt"
    index = _sharded_copy(tiny_vit_path, folder)
    shutil.copy(folder / "model-00001-of-00001.safetensors", tmp_path / "elsewhere.safetensors")
    first = next(iter(index["weight_map"]))
    for target in ("../elsewhere.safetensors", str(tmp_path / "elsewhere.safetensors")):
        index["weight_map"][first] = target
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(WeightLoadingError, match="outside the checkpoint folder"):
            InternVisionModel.from_pretrained(folder)


def test_non_finite_weights_are_refused_on_request(tiny_vit_path, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_vit_path, folder)
    tensors = load_file(folder / "model.safetensors")
    key = next(k for k in tensors if k.endswith("norm1.weight"))
    tensors[key][0] = float("nan")
    save_file(tensors, folder / "model.safetensors")
    InternVisionModel.from_pretrained(folder)  # loads as stored by default
    with pytest.raises(WeightLoadingError, match="non-finite.*norm1.weight"):
        InternVisionModel.from_pretrained(folder, check_finite=True)
