"""Metrics (checked against scikit-learn), confusion-matrix PNG and the CLIP_benchmark results JSON."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from internvl_fm.classification.errors import FeatureDimError
from internvl_fm.classification.evaluate import (classification_metrics, confusion_matrix, results_record,
                                                 save_confusion_matrix_png, topk_accuracy, write_results_json)


def _random_problem(n=200, c=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, c, (n,), generator=gen)
    logits = torch.randn(n, c, generator=gen)
    logits[torch.arange(n), targets] += 1.0  # better than chance
    return logits, targets


def test_metrics_match_sklearn():
    metrics_mod = pytest.importorskip("sklearn.metrics")
    logits, targets = _random_problem()
    m = classification_metrics(logits, targets)
    pred = logits.argmax(1)
    assert m["acc1"] == pytest.approx(metrics_mod.accuracy_score(targets, pred))
    assert m["acc5"] == pytest.approx(metrics_mod.top_k_accuracy_score(targets, logits.numpy(), k=5))
    assert m["mean_per_class_recall"] == pytest.approx(metrics_mod.balanced_accuracy_score(targets, pred))
    assert 0.0 < m["acc1"] < m["acc5"] <= 1.0


def test_mean_per_class_recall_ignores_absent_classes_and_differs_from_accuracy():
    # 4 samples of class 0 (all right), 1 of class 1 (wrong); class 2 never occurs
    logits = torch.tensor([[5.0, 0, 0]] * 4 + [[5.0, 0, 0]])
    targets = torch.tensor([0, 0, 0, 0, 1])
    m = classification_metrics(logits, targets)
    assert m["acc1"] == pytest.approx(0.8)
    assert m["mean_per_class_recall"] == pytest.approx(0.5)
    assert math.isnan(m["acc5"])  # fewer than 5 classes, as CLIP_benchmark


def test_topk_and_confusion():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    targets = torch.tensor([1, 2, 0])
    assert topk_accuracy(logits, targets, (1, 2, 3)) == pytest.approx([1 / 3, 1 / 3, 1.0])
    cm = confusion_matrix(logits.argmax(1), targets, 3)
    assert cm.tolist() == [[0, 0, 1], [0, 1, 0], [1, 0, 0]]


def test_bad_shapes():
    with pytest.raises(FeatureDimError, match="targets"):
        classification_metrics(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(FeatureDimError, match="target ids"):
        classification_metrics(torch.zeros(2, 4), torch.tensor([0, 4]))


def test_confusion_png_and_results_json(tmp_path):
    pytest.importorskip("matplotlib")
    logits, targets = _random_problem(c=5)
    cm = confusion_matrix(logits.argmax(1), targets, 5)
    png = save_confusion_matrix_png(cm, tmp_path / "cm" / "confusion.png", ["a", "b", "c", "d", "e"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(png.parent.glob("*.tmp"))

    metrics = classification_metrics(logits[:, :3], targets.clamp(max=2))
    record = results_record("cifar-mini", "InternVL-C", "zeroshot_classification", metrics, "zh", pretrained="x")
    assert list(record)[:5] == ["dataset", "model", "task", "metrics", "language"]
    path = write_results_json(record, tmp_path / "out.json")
    data = json.loads(path.read_text())
    assert data["metrics"]["acc5"] is None  # NaN -> null (strict JSON)
    assert data["metrics"]["acc1"] == pytest.approx(metrics["acc1"])
    assert data["language"] == "zh" and data["pretrained"] == "x"


class _FeatureModel:
    """A CLIP-like stand-in for CLIP_benchmark: the "images" it gets are already image features."""

    def encode_image(self, features: torch.Tensor) -> torch.Tensor:
        return features


class _Loader(list):
    def __init__(self, batches, num_classes):
        super().__init__(batches)
        self.dataset = type("Dataset", (), {"classes": [f"class {i}" for i in range(num_classes)]})()


@pytest.mark.parametrize("n,c,missing", [(997, 37, ()), (300, 1000, ()), (50, 3, ()), (120, 8, (2, 5))])
def test_metrics_equal_clip_benchmark_evaluate_bit_for_bit(tmp_path, monkeypatch, n, c, missing):
    """Upstream CLIP_benchmark's own `evaluate` (its `accuracy` + sklearn's balanced accuracy) on the same logits."""
    zsc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    # CLIP_benchmark calls float() on a 1-element array, which numpy 2 refuses: give its module a float that takes it
    monkeypatch.setattr(zsc, "float", lambda x: float(np.asarray(x).reshape(-1)[0]), raising=False)

    gen = torch.Generator().manual_seed(n + c)
    weights = torch.nn.functional.normalize(torch.randn(16, c, generator=gen), dim=0)
    targets = torch.randint(0, c, (n,), generator=gen)
    for cls in missing:  # classes that are predicted but absent from the targets (sklearn drops them)
        targets[targets == cls] = (cls + 1) % c
    features = torch.randn(n, 16, generator=gen) + 0.5 * weights.t()[targets]
    loader = _Loader([(features[i:i + 64], targets[i:i + 64]) for i in range(0, n, 64)], c)
    torch.save(weights, tmp_path / "clf.pt")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn: "y_pred contains classes not in y_true"
        theirs = zsc.evaluate(_FeatureModel(), loader, None, None, None, "cpu", amp=False,
                              load_clfs=[str(tmp_path / "clf.pt")])
    logits, target = zsc.run_classification(_FeatureModel(), weights, loader, "cpu", amp=False)
    ours = classification_metrics(logits, target)
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key] == value or (math.isnan(ours[key]) and math.isnan(value)), key  # bit for bit
    assert 0.0 < ours["acc1"] < 1.0 and math.isnan(ours["acc5"]) == (c < 5)
    predicted_only = set(logits.argmax(1).tolist()) - set(target.tolist())
    assert predicted_only or not missing  # the case where sklearn drops classes is really exercised
