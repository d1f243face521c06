"""`internvl-fm chat` / `serve-chat` fail fast in one line (exit 2) on a wrong MODEL, and follow the CLI conventions."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from PIL import Image

import internvl_fm
from internvl_fm.chat import InternVLChatConfig, InternVLChatModel
from internvl_fm.chat.cli import chat_main, serve_main
from internvl_fm.chat.testing import save_tiny_chat_checkpoint, tiny_chat_config, tiny_chat_model, tiny_tokenizer
from internvl_fm.cli import main
from internvl_fm.errors import CheckpointNotFoundError, ConfigError, ModelKindError

COMMANDS = ["chat", "serve-chat"]

# A transformers-native `-hf` InternVL config.json (InternVL2-1B-hf layout, sizes shrunk): text_config /
# vision_config with list-valued image_size / patch_size, no llm_config.
HF_CONFIG = {
    "architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl", "downsample_ratio": 0.5,
    "image_seq_length": 256, "image_token_id": 151667, "projector_hidden_act": "gelu",
    "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
    "text_config": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
                    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "vocab_size": 151674},
    "vision_config": {"model_type": "internvl_vision", "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": [448, 448],
                      "patch_size": [14, 14], "use_qk_norm": False, "layer_scale_init_value": 0.1},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_chat_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def hf_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    return tmp_path


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"internvl-fm {command}: error: ")
    return err


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_local_folder_is_one_line(command, tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    assert main([command, str(missing), "--device", "cpu"]) == 2
    assert str(missing) in _one_line_error(capsys, command)
    with pytest.raises(CheckpointNotFoundError, match="no_such_model"):
        InternVLChatModel.from_pretrained(missing)


@pytest.mark.parametrize("command", COMMANDS)
def test_hub_id_offline_is_one_line(command, tmp_path):
    """The real entry point, as a user runs it: one line on stderr naming the id, exit 2, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    extra = ["-q", "hi"] if command == "chat" else []
    proc = subprocess.run([sys.executable, "-m", "internvl_fm.cli", command, "OpenGVLab/no-such-model-xyz",
                           "--device", "cpu", *extra], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"internvl-fm {command}: error: ") and "OpenGVLab/no-such-model-xyz" in lines[0]


@pytest.mark.parametrize("path", ["demo", "golden"])
def test_internvl_c_checkpoint_names_its_kind_and_command(path, tiny_clip_path, capsys):
    folder = internvl_fm.demo_model_path() if path == "demo" else tiny_clip_path
    with pytest.raises(ModelKindError) as err:
        InternVLChatModel.from_pretrained(folder)
    message = str(err.value)
    assert "InternVL-C/G" in message and "InternVL-Chat" in message and "classify" in message
    assert "missing keys" not in message
    assert main(["chat", str(folder), "--device", "cpu", "-q", "hi"]) == 2
    line = _one_line_error(capsys, "chat")
    assert "InternVL-C/G" in line and "classify" in line


def test_hf_layout_folder_config_is_read_and_its_problems_are_one_line(hf_folder, capsys):
    """-hf configs are converted (not the old TypeError from `image_size // patch_size`); what cannot be built is a
    ConfigError naming the -hf field, one line in the CLI."""
    config = InternVLChatConfig.from_pretrained(hf_folder)
    assert config.image_size == 448 and config.ps_version == "v2" and config.img_context_token_id == 151667
    assert config.llm_config.architectures == ["Qwen2ForCausalLM"] and config.template == "internvl2_5"
    assert config == InternVLChatConfig.from_dict(json.loads((hf_folder / "config.json").read_text()))
    with pytest.raises(CheckpointNotFoundError, match="no weights"):  # the folder holds config.json only
        InternVLChatModel.from_pretrained(hf_folder)
    (hf_folder / "config.json").write_text(json.dumps({**HF_CONFIG, "vision_feature_select_strategy": "full"}))
    for load in (InternVLChatModel.from_pretrained, InternVLChatConfig.from_pretrained):
        with pytest.raises(ConfigError, match="vision_feature_select_strategy"):
            load(hf_folder)
    assert main(["chat", str(hf_folder), "--device", "cpu", "-q", "hi"]) == 2
    assert "vision_feature_select_strategy" in _one_line_error(capsys, "chat")


def test_config_problems_are_internvl_errors():
    """Bad values in an InternVL-Chat config are ConfigErrors (one line in the CLI), still ValueErrors."""
    base = {"vision_config": {}, "llm_config": {"architectures": ["Qwen2ForCausalLM"]}}
    for bad in ({"ps_version": "v3"}, {"downsample_ratio": 0.3}, {"template": "no-such-template"},
                {"llm_config": {"architectures": ["GPT2LMHeadModel"]}},
                {"llm_config": {"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 1_000_000}}):
        with pytest.raises(ConfigError):
            InternVLChatConfig.from_dict({**base, **bad})
    assert issubclass(ConfigError, ValueError)


def test_float16_on_cpu_warns_once(checkpoint):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["chat", str(checkpoint), "--dtype", "float16", "--device", "cpu", "-q", "describe this image",
                     "--max-new-tokens", "2", "--no-stream"]) == 0
    slow = [w for w in caught if "float16" in str(w.message)]
    assert len(slow) == 1 and "bfloat16" in str(slow[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        InternVLChatModel.from_pretrained(checkpoint, dtype="bfloat16", device="cpu")
    assert not [w for w in caught if "float16" in str(w.message)]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_defaults_and_the_shared_options(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "MODEL" in text and "checkpoint folder or Hugging Face hub id" in text
    assert "{auto,bfloat16,float32,float16}" in text and "(default: bfloat16)" in text
    assert "(default: auto)" in text  # --device
    assert ("(default: 512)" if command == "chat" else "(default: 8000)") in text


def test_device_auto_and_model_option(checkpoint, monkeypatch):
    seen = {}

    def fake_from_pretrained(path, **kwargs):
        seen.update(path=path, **kwargs)
        raise CheckpointNotFoundError("stop here")

    monkeypatch.setattr(InternVLChatModel, "from_pretrained", fake_from_pretrained)
    for available, device in ((False, "cpu"), (True, "cuda")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        with pytest.raises(CheckpointNotFoundError):
            chat_main(["--model", str(checkpoint), "-q", "hi"])  # --model works like the positional MODEL
        assert seen["device"] == device and seen["path"] == str(checkpoint)
        assert seen["dtype"] == "bfloat16"  # chat's default dtype
    with pytest.raises(CheckpointNotFoundError):
        chat_main([str(checkpoint), "--dtype", "auto", "-q", "hi"])
    assert seen["dtype"] is None  # auto keeps the stored dtype
    with pytest.raises(SystemExit):
        chat_main([str(checkpoint), "--model", "other", "-q", "hi"])
    with pytest.raises(SystemExit):
        chat_main(["-q", "hi"])
    with pytest.raises(SystemExit):
        chat_main([str(checkpoint), "--dtype", "fp8"])


def test_bad_inputs_fail_before_the_model_loads(checkpoint, tmp_path, monkeypatch, capsys):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(InternVLChatModel, "from_pretrained", must_not_load)
    image = tmp_path / "cat.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["chat", str(checkpoint), "-i", str(tmp_path / "missing.png"), "-q", "hi"]) == 2
    assert "missing.png" in _one_line_error(capsys, "chat")
    assert main(["chat", str(checkpoint), "--device", "cpu", "--load-in-8bit", "-q", "hi"]) == 2
    assert "CUDA" in _one_line_error(capsys, "chat")
    assert main(["serve-chat", str(checkpoint), "--allowed-root", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in _one_line_error(capsys, "serve-chat")
    with pytest.raises(SystemExit):
        chat_main([str(checkpoint), "-q", "hi", "--boxes-out", str(tmp_path / "b.png")])  # needs an --image
    with pytest.raises(SystemExit):
        chat_main([str(checkpoint), "-q", "hi", "-i", str(image), "--boxes-out", str(tmp_path / "boxes.txt")])
    with pytest.raises(SystemExit):
        serve_main([str(checkpoint), "--port", "70000"])


def test_missing_tokenizer_is_one_line(tmp_path, capsys):
    model = tiny_chat_model(tiny_chat_config(len(tiny_tokenizer())), seed=0)
    folder = model.save_pretrained(tmp_path / "no_tokenizer")
    assert main(["chat", str(folder), "--device", "cpu", "--dtype", "float32", "-q", "hi"]) == 2
    assert "--tokenizer" in _one_line_error(capsys, "chat")
    assert main(["chat", str(folder), "--device", "cpu", "--tokenizer", str(tmp_path / "nope"), "-q", "hi"]) == 2
    assert "nope" in _one_line_error(capsys, "chat")



def test_serve_settings_are_checked_before_the_model_loads(checkpoint, monkeypatch, capsys):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(InternVLChatModel, "from_pretrained", must_not_load)
    with pytest.raises(SystemExit):
        serve_main([str(checkpoint), "--max-images", "0"])
    assert "max_images must be >= 1" in capsys.readouterr().err
