"""Metrics (checked against scikit-learn), confusion-matrix PNG and the CLIP_benchmark results JSON."""
from __future__ import annotations

import json
import math

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
