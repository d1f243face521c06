"""Confusion-matrix metrics against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from internvl_fm.segmentation import ConfusionMeter, confusion_matrix, metrics_from_confusion


def test_miou_equals_hand_computed_confusion_matrix_value():
    target = torch.tensor([[0, 0, 1, 1],
                           [0, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 2, 0, 0]])
    # rows = ground truth, cols = prediction; the 255 pixel is skipped
    # gt 0: pred 0, 1, 2 -> [1, 1, 1]; gt 1: [0, 2, 0]; gt 2: [1, 0, 1]
    matrix = confusion_matrix(pred, target, num_classes=3)
    assert matrix.tolist() == [[1, 1, 1], [0, 2, 0], [1, 0, 1]]
    m = metrics_from_confusion(matrix)
    iou = [1 / (3 + 2 - 1), 2 / (2 + 3 - 2), 1 / (2 + 2 - 1)]  # TP / (gt + pred - TP)
    assert m.per_class_iou == pytest.approx(iou)
    assert m.miou == pytest.approx(sum(iou) / 3)
    assert m.aacc == pytest.approx(4 / 7)
    assert m.per_class_acc == pytest.approx([1 / 3, 2 / 2, 1 / 2])


def test_class_absent_everywhere_is_skipped_not_zero():
    target = torch.tensor([0, 0, 1, 1])
    m = metrics_from_confusion(confusion_matrix(target.clone(), target, num_classes=4))
    assert m.miou == 1.0
    assert math.isnan(m.per_class_iou[2]) and math.isnan(m.per_class_iou[3])


def test_meter_accumulates_batches_like_one_big_batch():
    torch.manual_seed(0)
    preds, targets = torch.randint(0, 5, (3, 10, 10)), torch.randint(0, 5, (3, 10, 10))
    targets[0, 0] = 255
    meter = ConfusionMeter(5)
    for p, t in zip(preds, targets):
        meter.update(p, t)
    assert torch.equal(meter.matrix, confusion_matrix(preds, targets, 5))
    assert meter.compute().miou == pytest.approx(metrics_from_confusion(meter.matrix).miou)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 2), torch.zeros(2, 3), 2)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.zeros(4), torch.tensor([0, 1, 7, 255]), 2)
