"""`internvl-fm classify`, `eval zeroshot` and `probe train|eval` end to end on the tiny golden checkpoints."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from internvl_fm.classification.cli import classify_main, eval_main, probe_main


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """root/<class>/<n>.png with three visually different classes."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    colors = {"blue": (20, 30, 220), "green": (20, 200, 30), "red": (220, 30, 20)}
    for name, color in colors.items():
        (root / name).mkdir()
        for i in range(4):
            arr = np.clip(np.array(color) + rng.normal(0, 25, (30, 34, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def test_classify_prints_every_label_with_probability(tiny_clip_path, image_folder, capsys):
    images = [str(image_folder / "red" / "0.png"), str(image_folder / "blue" / "1.png")]
    assert classify_main([*images, "--labels", "cat, dog,red panda", "--model", str(tiny_clip_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == images[0] and out[4] == images[1]
    for block in (out[1:4], out[5:8]):
        labels = {line.split(maxsplit=1)[1] for line in block}
        probs = [float(line.split()[0]) for line in block]
        assert labels == {"cat", "dog", "red panda"}
        assert sum(probs) == pytest.approx(1.0, abs=1e-3) and probs == sorted(probs, reverse=True)


def test_classify_json_language_and_mode(tiny_clip_path, image_folder, capsys):
    image = str(image_folder / "green" / "0.png")
    assert classify_main([image, "--labels", "猫,狗", "--lang", "zh", "--mode", "InternVL-G", "--json",
                          "--model", str(tiny_clip_path)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["input"] == image and sorted(row["labels"]) == ["狗", "猫"]
    assert sum(row["probs"]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--labels", ""], "empty"),
    (["--labels", "cat,dog,cat"], "duplicate labels: 'cat'"),
    (["--labels", "cat,dog", "--lang", "xx"], "unknown language 'xx'"),
])
def test_classify_bad_input(tiny_clip_path, image_folder, capsys, args, message):
    code = classify_main([str(image_folder / "red" / "0.png"), *args, "--model", str(tiny_clip_path)])
    assert code == 2
    assert message in capsys.readouterr().err


def test_eval_zeroshot_writes_clip_benchmark_json_and_confusion(tiny_clip_path, image_folder, tmp_path, capsys):
    out, png = tmp_path / "result.json", tmp_path / "cm.png"
    code = eval_main(["zeroshot", str(image_folder), "--model", str(tiny_clip_path), "--output", str(out),
                      "--confusion", str(png), "--templates", "a photo of a {c}.,a {c} thing."])
    assert code == 0
    record = json.loads(out.read_text())
    assert list(record)[:5] == ["dataset", "model", "task", "metrics", "language"]
    assert record["task"] == "zeroshot_classification" and record["language"] == "en"
    assert set(record["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert record["metrics"]["acc5"] is None  # 3 classes < 5
    assert 0.0 <= record["metrics"]["acc1"] <= 1.0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert json.loads(capsys.readouterr().out)["dataset"] == str(image_folder)


def test_eval_rejects_classname_count_mismatch(tiny_clip_path, image_folder, capsys):
    code = eval_main(["zeroshot", str(image_folder), "--model", str(tiny_clip_path), "--classnames", "a,b"])
    assert code == 2 and "2 classnames for a dataset with 3 classes" in capsys.readouterr().err


def test_probe_train_then_eval(tiny_vit_path, tiny_clip_path, image_folder, tmp_path, capsys):
    head, cache = tmp_path / "head", tmp_path / "cache"
    common = [str(image_folder), "--model", str(tiny_vit_path), "--head", str(head), "--cache-dir", str(cache)]
    assert probe_main(["train", *common, "--weight-decays", "0,1e-3", "--val-fraction", "0.25",
                       "--min-steps", "60", "--train-batch-size", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["sweep"]) == {"0.0", "0.001"} and summary["method"] == "sgd"
    assert (head / "model.safetensors").is_file() and (head / "config.json").is_file()
    assert len(list(cache.glob("features-*.safetensors"))) == 1

    out = tmp_path / "probe.json"
    assert probe_main(["eval", *common, "--split", "train", "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["task"] == "linear_probe" and record["metrics"]["acc1"] >= 0.9  # colours are separable

    # the head was trained on 96-d features of the 48-wide ViT: features of another model do not fit
    code = probe_main(["eval", str(image_folder), "--model", str(tiny_clip_path), "--head", str(head)])
    assert code == 2
    assert "head expects features [N, 96]" in capsys.readouterr().err


def test_eval_zeroshot_on_a_datasets_table(tiny_clip_path, image_folder, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    rows = {"img": [], "label": []}
    for label, name in enumerate(["blue", "green", "red"]):
        for path in sorted((image_folder / name).glob("*.png"))[:2]:
            rows["img"].append(str(path))
            rows["label"].append(label)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["b", "g", "r"])})
    table = datasets.Dataset.from_dict(rows, features=features)
    table.save_to_disk(str(tmp_path / "table"))
    out = tmp_path / "r.json"
    code = eval_main(["zeroshot", str(tmp_path / "table"), "--model", str(tiny_clip_path), "--image-column", "img",
                      "--templates", "a photo of a {c}.", "--output", str(out)])
    assert code == 0
    assert json.loads(out.read_text())["metrics"]["acc1"] is not None
    code = eval_main(["zeroshot", str(tmp_path / "table"), "--model", str(tiny_clip_path)])
    assert code == 2 and "lacks column(s) ['image']" in capsys.readouterr().err
