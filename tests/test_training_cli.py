"""`internvl-fm train-clip` usage errors: one line, exit 2, before the model is loaded when they can be."""
from __future__ import annotations

import json

import pytest

from internvl_fm.cli import main


@pytest.fixture
def pairs(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text(json.dumps({"image": "a.png", "text": "a red circle"}) + "\n")
    return folder


@pytest.fixture
def no_model_load(monkeypatch):
    from internvl_fm.training import trainer

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(trainer, "load_model", refuse)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("internvl-fm train-clip: error: ")
    return err[0]


@pytest.mark.parametrize("model", ["{tmp}/no_such_model", "OpenGVLab/InternVL-14B-224px"])
def test_missing_model_or_offline_hub_id_is_one_line(model, pairs, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def unreachable(repo_id, **kwargs):
        raise OSError(f"cannot reach https://huggingface.co/{repo_id}\n" + "traceback line\n" * 50)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    model = model.format(tmp=tmp_path)
    assert main(["train-clip", str(pairs), "--model", model, "--output", str(tmp_path / "run")]) == 2
    assert model in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_data_without_metadata_fails_before_the_model_loads(tmp_path, capsys, no_model_load):
    assert main(["train-clip", str(tmp_path), "--model", "any/model", "--output", str(tmp_path / "run")]) == 2
    assert f"DATA {tmp_path}: no metadata.jsonl" in _one_line_error(capsys)


def test_conflicting_options_fail_before_the_model_loads(pairs, tmp_path, capsys, no_model_load):
    common = ["train-clip", str(pairs), "--model", "any/model", "--output", str(tmp_path / "run")]
    assert main([*common, "--freeze-vision", "--lora-vision", "4"]) == 2
    assert "freeze_vision and lora_vision_rank exclude each other" in _one_line_error(capsys)
    assert main([*common, "--steps", "0"]) == 2
    assert "max_steps must be >= 1, got 0" in _one_line_error(capsys)


def test_dataset_format_errors_are_one_line(tmp_path, capsys):
    from internvl_fm import demo_model_path

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metadata.jsonl").write_text('{"image": "a.png"}\n')
    assert main(["train-clip", str(bad), "--model", str(demo_model_path()), "--output", str(tmp_path / "run")]) == 2
    assert 'metadata.jsonl:1: record needs "image" and "text"' in _one_line_error(capsys)


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train-clip", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--steps STEPS optimizer steps (default: 1000)" in text
    assert "learning-rate schedule after the warm-up (default: cosine)" in text
