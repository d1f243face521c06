"""Confusion-matrix metrics of semantic segmentation: mIoU, per-class IoU / accuracy, aAcc (as mmseg)."""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class SegmentationMetrics:
    """Metrics of one evaluation. Classes absent from both prediction and ground truth have IoU NaN (skipped)."""

    miou: float
    macc: float
    aacc: float
    per_class_iou: list[float]
    per_class_acc: list[float]

    def to_dict(self, class_names: list[str] | None = None) -> dict:
        names = class_names or [str(i) for i in range(len(self.per_class_iou))]
        return {
            "mIoU": self.miou, "mAcc": self.macc, "aAcc": self.aacc,
            "per_class": {n: {"IoU": iou, "Acc": acc}
                          for n, iou, acc in zip(names, self.per_class_iou, self.per_class_acc)},
        }


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """[num_classes, num_classes] int64 counts, rows = ground truth, columns = prediction; `ignore_index` skipped."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    bad = (target < 0) | (target >= num_classes)
    if bad.any():
        raise ValueError(f"target holds class ids {sorted(set(target[bad].tolist()))[:10]} outside "
                         f"[0, {num_classes}) that are not the ignore index {ignore_index}")
    if ((pred < 0) | (pred >= num_classes)).any():
        raise ValueError(f"prediction holds class ids outside [0, {num_classes})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def metrics_from_confusion(matrix: torch.Tensor) -> SegmentationMetrics:
    """mIoU = mean over classes present (in ground truth or prediction) of TP / (TP + FP + FN)."""
    matrix = matrix.double()
    tp = matrix.diag()
    gt = matrix.sum(1)
    pred = matrix.sum(0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    total = matrix.sum()
    return SegmentationMetrics(
        miou=float(torch.nanmean(iou)) if not torch.isnan(iou).all() else float("nan"),
        macc=float(torch.nanmean(acc)) if not torch.isnan(acc).all() else float("nan"),
        aacc=float(tp.sum() / total) if total > 0 else float("nan"),
        per_class_iou=iou.tolist(),
        per_class_acc=acc.tolist(),
    )


class ConfusionMeter:
    """Accumulates a confusion matrix over batches (and over ranks with `all_reduce`)."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a prediction / ground-truth pair (any matching shapes; class ids)."""
        self.matrix += confusion_matrix(pred.cpu(), target.cpu(), self.num_classes, self.ignore_index)

    def all_reduce(self) -> None:
        """Sum the matrices of every rank (no-op outside torch.distributed)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            matrix = self.matrix.to(device)
            dist.all_reduce(matrix)
            self.matrix = matrix.cpu()

    def compute(self) -> SegmentationMetrics:
        return metrics_from_confusion(self.matrix)
