"""`internvl-fm eval clip-benchmark`: upstream CLIP_benchmark's own CLI with an internvl-fm model.

Tiny offline datasets in CLIP_benchmark's conventions (a `wds/NAME` webdataset folder, a Flickr8k folder with its
Karpathy annotation file) are evaluated through the command; the metrics of its result JSON must equal what
CLIP_benchmark's own metric functions compute on the same model's embeddings, taken directly and in float64.
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("clip_benchmark")
wds = pytest.importorskip("webdataset")

import internvl_fm
from internvl_fm import InternVLModel
from internvl_fm.cli import main
from internvl_fm.evaluation import tokenize_prompts
from internvl_fm.processing import build_transform
from internvl_fm.training.data import render

DEMO = str(internvl_fm.demo_model_path())
CLASSES = ["red", "green", "blue", "yellow", "purple", "orange"]  # >= 5 classes: acc5 is computed too
TEMPLATES = ["a {c} shape", "a photo of a {c} thing"]
MODES = ("InternVL-C", "InternVL-G")
CAPTIONS = {  # Flickr8k: several captions for some images
    "red_circle.jpg": ["a red circle", "a round red shape"],
    "blue_square.jpg": ["a blue square"],
    "green_star.jpg": ["a green star", "a star that is green", "green"],
    "yellow_triangle.jpg": ["a yellow triangle"],
    "purple_circle.jpg": ["a purple circle"],
}


def run_cli(*args: str) -> int:
    return main(["eval", "clip-benchmark", *args, "--pretrained", DEMO, "--no_amp", "--num_workers", "0", "--quiet"])


@pytest.fixture(scope="module")
def model():
    return InternVLModel.from_pretrained(DEMO).eval()


@pytest.fixture(scope="module")
def transform(model):
    return build_transform(model.image_size, "classification")  # the transform the loader hands CLIP_benchmark


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="png")
    return buffer.getvalue()


def write_wds(root: Path, split: str, samples: list[dict]) -> None:
    """CLIP_benchmark's webdataset layout: SPLIT/0.tar (key.png + key.cls) and SPLIT/nshards.txt."""
    (root / split).mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(root / split / "0.tar")) as sink:
        for i, sample in enumerate(samples):
            sink.write({"__key__": f"s{i:07d}", **sample})
    (root / split / "nshards.txt").write_text("1\n")


def shape_samples(shapes: tuple[str, ...], size: str = "large") -> list[dict]:
    return [{"png": png_bytes(render(dict(shape=s, color=c, size=size, position="center"), 56)), "cls": label}
            for label, c in enumerate(CLASSES) for s in shapes]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """`{root}/shapes`: a classification webdataset; `{root}/flickr8k`: images + flickr8k_test_karpathy.txt."""
    root = tmp_path_factory.mktemp("clip_benchmark_data")
    shapes = root / "shapes"
    write_wds(shapes, "test", shape_samples(("circle", "star")))
    (shapes / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (shapes / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    flickr = root / "flickr8k"
    flickr.mkdir()
    lines = ["image,caption"]
    for name, captions in CAPTIONS.items():
        color, shape = name[:-4].split("_")
        render(dict(shape=shape, color=color, size="large", position="center"), 56).save(flickr / name)
        lines += [f"{name},{caption}" for caption in captions]
    (flickr / "flickr8k_test_karpathy.txt").write_text("\n".join(lines) + "\n")
    return root


@torch.no_grad()
def image_embeddings(model, transform, images, mode: str) -> torch.Tensor:
    pixels = torch.stack([transform(image.convert("RGB")) for image in images])
    return F.normalize(model.encode_image(pixels, mode=mode).double(), dim=-1)


@torch.no_grad()
def text_embeddings(model, texts: list[str]) -> torch.Tensor:
    return F.normalize(model.encode_text(tokenize_prompts(model.tokenizer, texts)).double(), dim=-1)


def read_result(path: Path, **expected) -> dict:
    record = json.loads(path.read_text())
    assert {k: record[k] for k in expected} == expected
    return record["metrics"]


def assert_upstream_untouched():
    from clip_benchmark.metrics import linear_probe, zeroshot_classification

    source = zeroshot_classification.accuracy
    assert source.__module__ == "clip_benchmark.metrics.zeroshot_classification"
    assert linear_probe.accuracy is source and "float" not in vars(zeroshot_classification)
    with pytest.raises(TypeError, match="0-dimensional"):  # still upstream's, still failing under numpy 2
        source(torch.eye(3), torch.arange(3))


# ------------------------------------------------------------------------------------------ the numpy-2 fix


def test_upstream_accuracy_fails_under_numpy2_and_the_fix_is_scoped():
    import numpy as np
    from clip_benchmark.metrics import linear_probe, zeroshot_classification

    from internvl_fm.classification.clip_benchmark import numpy2_safe_accuracy

    assert int(np.__version__.split(".")[0]) >= 2
    upstream = zeroshot_classification.accuracy
    gen = torch.Generator().manual_seed(0)
    logits, target = torch.randn(97, 7, generator=gen), torch.randint(0, 7, (97,), generator=gen)
    with pytest.raises(TypeError, match="only 0-dimensional arrays"):
        upstream(logits, target, topk=(1, 5))
    with numpy2_safe_accuracy() as fixed:
        assert zeroshot_classification.accuracy is fixed and linear_probe.accuracy is fixed
        assert fixed is not upstream and fixed.__code__ is upstream.__code__  # upstream's own code, not a copy
        top5 = logits.topk(5, dim=1).indices
        expected = [(top5[:, :k] == target[:, None]).any(1).sum().item() / 97 for k in (1, 5)]
        assert fixed(logits, target, topk=(1, 5)) == expected  # hits / n in float64, bit for bit
        assert fixed(logits.double(), target.double(), topk=(1,)) == expected[:1]  # linear_probe passes floats
    assert zeroshot_classification.accuracy is upstream and linear_probe.accuracy is upstream
    with pytest.raises(RuntimeError, match="inside"), numpy2_safe_accuracy():
        raise RuntimeError("inside")
    assert_upstream_untouched()


# ------------------------------------------------------------------------------------------ the tasks


def test_zeroshot_classification_json_equals_upstream_metrics(model, transform, data_root, tmp_path):
    """`--dataset wds/shapes` with a `{dataset}` root template, both modes in one call (CLIP_benchmark's product)."""
    from clip_benchmark.metrics import zeroshot_classification as zsc
    from sklearn.metrics import balanced_accuracy_score

    from internvl_fm.classification.clip_benchmark import numpy2_safe_accuracy

    out = tmp_path / "results"
    out.mkdir()
    assert run_cli("--dataset", "wds/shapes", "--dataset_root", f"{data_root}/{{dataset}}", "--model", *MODES,
                   "--batch_size", "5", "--output", f"{out}/{{dataset}}_{{model}}_{{language}}_{{task}}.json") == 0
    assert_upstream_untouched()

    samples = list(wds.WebDataset(str(data_root / "shapes/test/0.tar"), shardshuffle=False).decode("pil"))
    images, target = [s["png"] for s in samples], torch.tensor([int(s["cls"]) for s in samples])
    for mode in MODES:
        metrics = read_result(out / f"shapes_{mode}_en_zeroshot_classification.json", dataset="wds/shapes",
                              model=mode, pretrained=DEMO, task="zeroshot_classification", language="en")
        weights = torch.stack([F.normalize(text_embeddings(model, [t.format(c=c) for t in TEMPLATES]).mean(0), dim=0)
                               for c in CLASSES], dim=1)  # zero_shot_classifier's recipe, in float64
        logits = 100.0 * image_embeddings(model, transform, images, mode) @ weights
        top2 = logits.topk(2, dim=1).values
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-3  # no near-tie: float32 vs float64 ranks must agree
        with numpy2_safe_accuracy() as accuracy:
            acc1, acc5 = accuracy(logits, target, topk=(1, 5))
        pred = logits.argmax(1)
        assert acc1 == (pred == target).double().mean().item()  # the same number, computed independently
        assert metrics == {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": balanced_accuracy_score(target, pred)}
    assert zsc.accuracy.__module__ == "clip_benchmark.metrics.zeroshot_classification"


def test_zeroshot_retrieval_json_equals_upstream_metrics(model, transform, data_root, tmp_path, monkeypatch):
    """Flickr8k's folder + `flickr8k_test_karpathy.txt`, --task auto, --recall_k 1 2, --dtype passed to the loader."""
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k
    from PIL import Image

    loads = []
    original = InternVLModel.from_pretrained.__func__

    def spy(cls, path, **kwargs):
        loads.append(kwargs)
        return original(cls, path, **kwargs)

    monkeypatch.setattr(InternVLModel, "from_pretrained", classmethod(spy))
    assert run_cli("--dataset", "flickr8k", "--dataset_root", f"{data_root}/{{dataset}}", "--model", *MODES,
                   "--recall_k", "1", "2", "--batch_size", "2", "--dtype", "float32",
                   "--output", f"{tmp_path}/{{dataset}}_{{model}}.json") == 0
    assert [(k["dtype"], k["quantization"]) for k in loads] == [("float32", "none")] * 2

    images = [Image.open(data_root / "flickr8k" / name) for name in CAPTIONS]
    texts = [c for captions in CAPTIONS.values() for c in captions]
    owner = torch.tensor([i for i, captions in enumerate(CAPTIONS.values()) for _ in captions])
    for mode in MODES:
        metrics = read_result(tmp_path / f"flickr8k_{mode}.json", dataset="flickr8k", model=mode,
                              task="zeroshot_retrieval")
        scores = text_embeddings(model, texts) @ image_embeddings(model, transform, images, mode).T
        for side in (scores, scores.T):  # no near-tie: float32 vs float64 rankings must agree
            assert side.sort(1).values.diff(dim=1).min() > 1e-3
        positive = torch.zeros_like(scores, dtype=torch.bool)
        positive[torch.arange(len(texts)), owner] = True
        expected = {}
        for k in (1, 2):
            ranked = scores.topk(k, dim=1).indices
            text_hit = (ranked == owner[:, None]).any(1)  # independent: each caption finds its image in the top k
            image_hit = torch.stack([positive[:, i][scores[:, i].topk(k).indices].any() for i in range(len(images))])
            expected[f"image_retrieval_recall@{k}"] = (batchify(recall_at_k, scores, positive, 2, "cpu", k=k) > 0
                                                       ).float().mean().item()
            expected[f"text_retrieval_recall@{k}"] = (batchify(recall_at_k, scores.T, positive.T, 2, "cpu", k=k) > 0
                                                      ).float().mean().item()
            assert expected[f"image_retrieval_recall@{k}"] == text_hit.float().mean().item()
            assert expected[f"text_retrieval_recall@{k}"] == image_hit.float().mean().item()
        assert metrics == expected
    assert_upstream_untouched()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CLIP_benchmark's linear_probe runs on CUDA only")
def test_linear_probe_json_equals_upstream_metrics(model, transform, tmp_path, monkeypatch):
    from clip_benchmark.metrics import linear_probe
    from sklearn.metrics import balanced_accuracy_score

    root = tmp_path / "shapes"
    write_wds(root, "train", shape_samples(("circle", "square", "triangle")))
    write_wds(root, "test", shape_samples(("star",)))
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    seen = []
    original = linear_probe.infer

    def spy(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(linear_probe, "infer", spy)
    assert run_cli("--dataset", "wds/shapes", "--dataset_root", f"{tmp_path}/{{dataset}}", "--task", "linear_probe",
                   "--feature_root", str(tmp_path / "features"), "--fewshot_epochs", "5", "--batch_size", "6",
                   "--output", f"{tmp_path}/{{dataset}}_{{task}}.json") == 0
    assert_upstream_untouched()
    metrics = read_result(tmp_path / "shapes_linear_probe.json", dataset="wds/shapes", task="linear_probe")
    logits, target = seen[-1]
    pred = logits.argmax(1)
    assert metrics["lp_acc1"] == (pred == target).double().mean().item()
    assert metrics["lp_mean_per_class_recall"] == balanced_accuracy_score(target, pred)
    assert metrics["lp_acc5"] == (logits.topk(5, 1).indices == target[:, None]).any(1).double().mean().item()
    # the features CLIP_benchmark cached are this model's normalised embeddings of the test images
    features = torch.load(next((tmp_path / "features").glob("*/features_test.pt")))
    samples = list(wds.WebDataset(str(root / "test/0.tar"), shardshuffle=False).decode("pil"))
    reference = image_embeddings(model, transform, [s["png"] for s in samples], "InternVL-C")
    assert features.shape == reference.shape
    assert (F.normalize(features.double().cpu(), dim=-1) * reference).sum(1).min() > 0.999  # cosine (TF32 convs)


# ------------------------------------------------------------------------------------------ errors and help


@pytest.fixture
def no_model_load(monkeypatch):
    """These errors must come before any weight is read."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(InternVLModel, "from_pretrained", refuse)


@pytest.mark.parametrize("args, message", [
    (["--dataset", "cifar1O"], "unknown CLIP_benchmark dataset 'cifar1O'; did you mean cifar10"),
    (["--dataset", "wds/nope", "--dataset_root", "{root}/{{dataset}}"], "{root}/nope/test/nshards.txt not found"),
    (["--dataset", "wds/shapes", "--dataset_root", "{root}/{{split}}"],
     "--dataset_root '{root}/{{split}}': cannot fill it (KeyError: 'split'); CLIP_benchmark fills {{dataset}}"),
    (["--dataset", "wds/shapes", "--dataset_root", "{root}/{{dataset}}", "--output", "{root}/none/{{dataset}}.json"],
     "--output '{root}/none/{{dataset}}.json' gives {root}/none/shapes.json, whose folder {root}/none does not"),
    (["--dataset", "wds/shapes", "--dataset_root", "{root}/{{dataset}}", "--model", "ViT-B-32"],
     "--model 'ViT-B-32': with --model_type internvl_fm use InternVL-C or InternVL-G"),
    (["--dataset", "wds/shapes", "--dataset_root", "{root}/{{dataset}}", "--task", "captioning"],
     "--task captioning needs a generative model"),
    (["--dataset", "wds/shapes", "--dataset_root", "{root}/{{dataset}}", "--model_type", "open_clip", "--dtype",
      "bfloat16"], "--dtype and --quantization apply to --model_type internvl_fm only"),
    pytest.param(["--dataset", "wds/shapes", "--dataset_root", "{root}/{{dataset}}", "--task", "linear_probe"],
                 "linear_probe runs on CUDA only", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="GPU")),
])
def test_input_errors_are_one_line_before_the_model_loads(args, message, data_root, no_model_load, capsys):
    assert run_cli(*[a.format(root=data_root) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("internvl-fm eval: error: ") and "\n" not in err, err
    assert message.format(root=data_root) in err


def test_missing_pretrained_and_unreadable_dataset_are_one_line(data_root, tmp_path, capsys):
    assert main(["eval", "clip-benchmark", "--dataset", "wds/shapes", "--dataset_root", f"{data_root}/{{dataset}}"]) == 2
    assert capsys.readouterr().err.strip() == ("internvl-fm eval: error: --pretrained is required: an InternVL-C/G "
                                               "checkpoint folder or hub id")
    (tmp_path / "fer").mkdir()  # fer2013 reads ROOT/test as an image folder: it is not there
    assert run_cli("--dataset", "fer2013", "--dataset_root", str(tmp_path / "fer"), "--output",
                   str(tmp_path / "r.json")) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"internvl-fm eval: error: CLIP_benchmark could not read dataset 'fer2013' from "
                   f"'{tmp_path}/fer/test': FileNotFoundError: [Errno 2] No such file or directory: "
                   f"'{tmp_path}/fer/test'")
    assert not (tmp_path / "r.json").exists()
    assert_upstream_untouched()  # restored on the error path too


def test_missing_clip_benchmark_names_the_extra(monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "clip_benchmark" or m.startswith("clip_benchmark.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "clip_benchmark", None)
    assert main(["eval", "clip-benchmark", "--dataset", "cifar10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("internvl-fm eval: error: CLIP_benchmark evaluation needs the clip-benchmark package")
    assert err.endswith("pip install 'internvl-fm[eval]'") and "\n" not in err


def test_help_is_upstreams_parser_with_our_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "clip-benchmark", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: internvl-fm eval clip-benchmark [-h] [--dataset DATASET [DATASET ...]]")
    for needle in ("--dataset_root DATASET_ROOT", "--recall_k RECALL_K", "--fewshot_k FEWSHOT_K",  # upstream's
                   "clip model type (default: internvl_fm)", "(default: ['InternVL-C'])",
                   "(default: {dataset}_{model}_{language}_{task}.json)", "--dtype {auto,bfloat16,float32,float16}",
                   "--quantization {none,"):
        assert needle in text, needle
    assert "suppress verbose messages (default" not in text  # flags show no misleading "default: True"
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "clip-benchmark" in capsys.readouterr().out
