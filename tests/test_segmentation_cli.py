"""`internvl-fm segment | seg-train | seg-eval` through the `internvl-fm` entry point: the README commands, one-line
errors for missing checkpoints / offline hub ids, the shared option names and --help."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from internvl_fm.cli import main
from internvl_fm.segmentation import make_shapes_dataset

ROOT = Path(__file__).resolve().parents[1]
SHAPES_DEMO = ROOT / "segmentation" / "configs" / "shapes_demo.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's shapes demo: the shipped recipe (2 steps instead of 60) on a freshly generated dataset."""
    root = tmp_path_factory.mktemp("shapes_demo")
    make_shapes_dataset(root / "data" / "shapes", num_images=8)
    code = main(["seg-train", str(SHAPES_DEMO), "--set", f"data.root={root / 'data' / 'shapes'}",
                 "--set", "train.max_iters=2", "--work-dir", str(root / "work_dirs" / "shapes_demo"), "--quiet"])
    assert code == 0
    return root


def test_readme_segment_command_runs_with_the_default_stride(demo_run, capsys):
    """`segment IMAGE --checkpoint work_dirs/shapes_demo/final --out out/` as written in the README (crop 112: the
    old fixed default stride 322 was refused)."""
    capsys.readouterr()
    image = demo_run / "data" / "shapes" / "images" / "training" / "shapes_00000.png"
    out = demo_run / "out"
    code = main(["segment", str(image), "--checkpoint", str(demo_run / "work_dirs" / "shapes_demo" / "final"),
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["mask"] == str(out / "shapes_00000_mask.png")
    mask = np.asarray(Image.open(out / "shapes_00000_mask.png"))
    assert mask.shape == (112, 112) and mask.max() < 4
    assert set(record["classes"]) <= {"background", "circle", "square", "triangle"}


def test_seg_eval_takes_the_shared_option_names(demo_run, capsys):
    out = demo_run / "metrics.json"
    code = main(["seg-eval", str(SHAPES_DEMO), "--set", f"data.root={demo_run / 'data' / 'shapes'}",
                 "--model", str(demo_run / "work_dirs" / "shapes_demo" / "final"), "--output", str(out),
                 "--mode", "slide"])  # slide with the default stride (2/3 of the 112 crop)
    assert code == 0, capsys.readouterr().err
    assert 0.0 <= json.loads(out.read_text())["mIoU"] <= 1.0


def _offline(monkeypatch):
    import huggingface_hub

    def unreachable(repo_id, **kwargs):
        raise OSError(f"cannot reach https://huggingface.co/{repo_id}\n" + "traceback line\n" * 50)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"internvl-fm {command}: error: ")
    return err[0]


@pytest.mark.parametrize("model", ["{tmp}/no_such_model", "OpenGVLab/InternViT-6B-224px"])
def test_segment_and_seg_eval_name_a_missing_model_in_one_line(model, tmp_path, monkeypatch, capsys):
    _offline(monkeypatch)
    model = model.format(tmp=tmp_path)
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    assert main(["segment", str(image), "--model", model, "--output", str(tmp_path / "out")]) == 2
    assert model in _one_line_error(capsys, "segment")
    assert main(["seg-eval", str(SHAPES_DEMO), "--checkpoint", model]) == 2
    assert model in _one_line_error(capsys, "seg-eval")


@pytest.mark.parametrize("pretrained", ["{tmp}/no_such_vit", "OpenGVLab/InternViT-6B-224px"])
def test_seg_train_names_the_missing_pretrained_backbone_of_the_config(pretrained, tmp_path, monkeypatch, capsys):
    _offline(monkeypatch)
    pretrained = pretrained.format(tmp=tmp_path)
    config = tmp_path / "recipe.yaml"
    config.write_text(f"model: {{pretrained: {pretrained}, num_classes: 4, crop_size: 112}}\n"
                      f"data: {{root: {tmp_path / 'no_data'}}}\ntrain: {{work_dir: {tmp_path / 'work'}}}\n")
    assert main(["seg-train", str(config), "--quiet"]) == 2
    line = _one_line_error(capsys, "seg-train")
    assert "model.pretrained" in line and pretrained in line
    assert not (tmp_path / "work").exists()


def test_seg_train_missing_config_is_one_line(tmp_path, capsys):
    assert main(["seg-train", str(tmp_path / "missing.yaml")]) == 2
    assert _one_line_error(capsys, "seg-train").endswith(f"config file not found: {tmp_path / 'missing.yaml'}")


def test_segment_refuses_a_model_of_another_kind(tiny_vit_path, tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    assert main(["segment", str(image), "--model", str(tiny_vit_path), "--output", str(tmp_path / "out")]) == 2
    assert "not a segmentation model" in _one_line_error(capsys, "segment")


@pytest.mark.parametrize("command, expected", [
    ("segment", ["--output OUTPUT, --out OUTPUT", "--model MODEL, --checkpoint MODEL", "2/3 of the crop",
                 "(default: auto)", "(default: slide)"]),
    ("seg-eval", ["--output OUTPUT, --out OUTPUT", "--model MODEL, --checkpoint MODEL", "(default: auto)"]),
    ("seg-train", ["--set SECTION.KEY=VALUE", "(default: [])"]),
])
def test_help_shows_shared_names_and_defaults(command, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for item in expected:
        assert item in text
