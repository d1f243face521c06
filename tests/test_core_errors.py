"""Bad input fails fast, in one line, naming the problem: missing folders, offline hub ids, the wrong kind of model,
transformers -hf folders, absurd config sizes, float16 on the CPU, Ctrl-C."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from internvl_fm import InternVisionModel, InternVLModel, InternVLTextModel, __version__
from internvl_fm.cli import main
from internvl_fm.errors import CheckpointNotFoundError, ConfigError, ModelKindError
from internvl_fm.loading import resolve_checkpoint


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_missing_local_path_is_named_not_downloaded(tmp_path):
    for missing in (tmp_path / "nope", "./models/nope", "~/nope/deeper/still"):
        with pytest.raises(CheckpointNotFoundError, match="checkpoint folder not found"):
            resolve_checkpoint(missing)


def test_offline_hub_id_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["info", "OpenGVLab/InternVL-14B-224px"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "OpenGVLab/InternVL-14B-224px" in line and "hub" in line


def test_missing_path_in_a_subprocess_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "internvl_fm.cli", "info", str(tmp_path / "absent")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert str(tmp_path / "absent") in _one_error_line(result.stderr)


def test_wrong_kind_of_model_names_what_the_folder_holds(tiny_vit_path, tiny_clip_path):
    with pytest.raises(ModelKindError, match=r"InternViT vision encoder.*InternVisionModel"):
        InternVLModel.from_pretrained(tiny_vit_path)
    with pytest.raises(ModelKindError, match="InternViT"):
        InternVLTextModel.from_pretrained(tiny_vit_path)
    assert InternVisionModel.from_pretrained(tiny_clip_path).config.hidden_size > 0  # a tower of a bigger checkpoint


def _copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_absurd_sizes_are_refused_before_building(tiny_clip_path, tmp_path):
    folder = _copy_with_config(tiny_clip_path, tmp_path / "huge", qllama_config__num_hidden_layers=1_000_000)
    with pytest.raises(ConfigError, match=r"qllama_config\.num_hidden_layers = 1000000"):
        InternVLModel.from_pretrained(folder)
    folder = _copy_with_config(tiny_clip_path, tmp_path / "neg", vision_config__hidden_size=-3)
    with pytest.raises(ConfigError, match="hidden_size"):
        InternVisionModel.from_pretrained(folder)


def test_transformers_hf_folder_settings_we_cannot_build_are_clear_errors(tmp_path):
    """-hf folders load (tests/test_core_hf_layout.py); an -hf setting InternViT does not have is a ConfigError."""
    config = {"architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl",
              "text_config": {"model_type": "qwen2", "hidden_size": 896},
              "vision_config": {"model_type": "internvl_vision", "use_mean_pooling": False},
              "downsample_ratio": 0.5, "image_token_id": 151667}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="use_mean_pooling"):
        InternVisionModel.from_pretrained(tmp_path)
    config["vision_config"]["use_mean_pooling"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointNotFoundError, match="no weights"):
        InternVisionModel.from_pretrained(tmp_path)


def test_float16_on_cpu_warns(tiny_vit_path):
    with pytest.warns(UserWarning, match="bfloat16"):
        model = InternVisionModel.from_pretrained(tiny_vit_path, dtype="float16")
    assert model.dtype == torch.float16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        InternVisionModel.from_pretrained(tiny_vit_path, dtype="bfloat16")


def test_version_flag(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"internvl-fm {__version__}"


def test_keyboard_interrupt_is_one_line(monkeypatch, capsys):
    import internvl_fm.cli as cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "info_main", interrupted)
    assert main(["info", "x"]) == 130
    assert "interrupted" in _one_error_line(capsys.readouterr().err)
