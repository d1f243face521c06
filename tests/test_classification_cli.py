"""`internvl-fm classify`, `eval zeroshot` and `probe train|eval` end to end on the tiny golden checkpoints."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_fm.cli import main


def classify_main(argv: list[str]) -> int:
    return main(["classify", *argv])


def eval_main(argv: list[str]) -> int:
    return main(["eval", *argv])


def probe_main(argv: list[str]) -> int:
    return main(["probe", *argv])


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
    out = capsys.readouterr().out
    assert json.loads(out)["dataset"] == str(image_folder)
    assert "NaN" not in out and json.loads(out)["acc5"] is None  # strict JSON, as in the file


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


def test_single_label_warns_and_shows_the_cosine(tiny_clip_path, image_folder, capsys):
    from internvl_fm import InternVLModel
    from internvl_fm.classification import ZeroShotClassifier

    image = str(image_folder / "red" / "0.png")
    with pytest.warns(UserWarning, match="single label is always 1.0.*add labels"):
        assert classify_main([image, "--labels", "cat", "--templates", "a photo of a {c}.",
                              "--model", str(tiny_clip_path)]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    prob, label, _, cosine = line.split()
    clf = ZeroShotClassifier.from_classnames(InternVLModel.from_pretrained(tiny_clip_path), ["cat"],
                                             ["a photo of a {c}."], progress=False)
    expected = float(clf.embed_images([image]) @ clf.weights)
    assert (prob, label) == ("1.0000", "cat") and float(cosine.rstrip(")")) == pytest.approx(expected, abs=1e-4)


def test_two_labels_do_not_warn(tiny_clip_path, image_folder, capsys, recwarn):
    assert classify_main([str(image_folder / "red" / "0.png"), "--labels", "cat,dog", "--templates", "a {c}.",
                          "--model", str(tiny_clip_path), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert not [w for w in recwarn if "always 1.0" in str(w.message)]
    assert len(row["cosines"]) == 2 and all(-1.0 <= c <= 1.0 for c in row["cosines"])
    # probabilities are the softmax of 100 x cosine, as the zero-shot protocol defines them
    assert row["probs"] == pytest.approx(torch.tensor(row["cosines"]).mul(100).softmax(0).tolist(), abs=1e-5)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if any checkpoint is loaded."""
    import internvl_fm.loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(internvl_fm.loading, "resolve_checkpoint", refuse)  # every from_pretrained starts here


@pytest.mark.parametrize("command", [["eval", "zeroshot"], ["probe", "eval"]])
def test_confusion_without_matplotlib_fails_before_any_work(command, image_folder, tmp_path, monkeypatch, capsys,
                                                            no_model_load):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    extra = ["--head", str(tmp_path / "head")] if command[0] == "probe" else []
    code = main([*command, str(image_folder), "--model", "nobody/never-loaded", *extra,
                 "--confusion", str(tmp_path / "cm.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"internvl-fm {command[0]}: error: ") and "needs matplotlib" in err[0]
    assert not (tmp_path / "cm.png").exists()


def test_missing_input_and_bad_labels_fail_before_the_model_loads(image_folder, tmp_path, capsys, no_model_load):
    assert classify_main([str(tmp_path / "nope.jpg"), "--labels", "a,b", "--model", "nobody/x"]) == 2
    assert "input file(s) not found: " + str(tmp_path / "nope.jpg") in capsys.readouterr().err
    assert classify_main([str(image_folder / "red" / "0.png"), "--labels", "a,,b", "--model", "nobody/x"]) == 2
    assert "label #1 is blank" in capsys.readouterr().err
    assert eval_main(["zeroshot", str(image_folder), "--model", "nobody/x", "--templates", "no placeholder"]) == 2
    assert "has no '{c}' placeholder" in capsys.readouterr().err
    assert eval_main(["zeroshot", str(tmp_path / "missing_data"), "--model", "nobody/x"]) == 2
    assert capsys.readouterr().err.strip() == f"internvl-fm eval: error: dataset not found: {tmp_path / 'missing_data'}"


def _offline(monkeypatch):
    import huggingface_hub

    def unreachable(repo_id, **kwargs):
        raise OSError(f"cannot reach https://huggingface.co/{repo_id}: [Errno -2] Name or service not known\n"
                      + "traceback line\n" * 50)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)


@pytest.mark.parametrize("model", ["{tmp}/no_such_checkpoint", "OpenGVLab/InternVL-14B-224px"])
@pytest.mark.parametrize("command", [["classify", "{image}", "--labels", "a,b"], ["eval", "zeroshot", "{data}"],
                                     ["probe", "train", "{data}", "--head", "{tmp}/head"]])
def test_missing_checkpoint_or_offline_hub_id_is_one_line(command, model, image_folder, tmp_path, monkeypatch,
                                                          capsys):
    _offline(monkeypatch)
    fill = dict(tmp=tmp_path, image=image_folder / "red" / "0.png", data=image_folder)
    model = model.format(**fill)
    code = main([arg.format(**fill) for arg in command] + ["--model", model])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"internvl-fm {command[0]}: error: ") and model in err[0]


def test_help_of_each_command_shows_its_own_options_and_defaults(capsys):
    def help_text(*argv: str) -> str:
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--help"])
        assert exc.value.code == 0
        return capsys.readouterr().out

    text = help_text("classify")
    assert "{auto,bfloat16,float32,float16}" in text and "float16 is for GPUs" in text
    assert "never" not in text and "--top-k" in text and "(default: auto)" in text
    text = help_text("eval", "zeroshot")
    assert "usage: internvl-fm eval zeroshot" in text
    assert "--classnames" in text and "--confusion" in text and "(default: test)" in text
    text = help_text("probe", "train")
    assert "--weight-decays" in text and "--epochs" in text and "(default: 10)" in text and "--confusion" not in text
    text = help_text("probe", "eval")
    assert "--confusion" in text and "--head" in text and "--epochs" not in text
    assert "zeroshot" in help_text("eval") and {"train", "eval"} <= set(help_text("probe").split())


def test_probe_logreg_sweeps_positive_c_values(tiny_vit_path, image_folder, tmp_path, capsys, monkeypatch):
    pytest.importorskip("sklearn")
    common = [str(image_folder), "--model", str(tiny_vit_path), "--head", str(tmp_path / "head"), "--logreg"]
    assert probe_main(["train", *common]) == 0  # the SGD weight decays (0 included) are not used as C values
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] != "sgd" and set(summary["sweep"]) == {"0.01", "0.1", "1.0", "10.0"}

    import internvl_fm.loading

    monkeypatch.setattr(internvl_fm.loading, "resolve_checkpoint", lambda *a, **k: pytest.fail("model loaded"))
    assert probe_main(["train", *common, "--weight-decays", "0,1"]) == 2
    assert "C values and must be > 0, got [0.0, 1.0]" in capsys.readouterr().err


def test_a_checkpoint_of_another_kind_is_refused_before_loading(tiny_vit_path, image_folder, capsys):
    code = classify_main([str(image_folder / "red" / "0.png"), "--labels", "a,b", "--model", str(tiny_vit_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "holds an InternViT vision encoder, not an InternVL-C/G model" in err[0]
