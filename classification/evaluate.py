"""Classification metrics the way CLIP_benchmark reports them, a confusion-matrix PNG and the results JSON.

`classification_metrics` returns `acc1`, `acc5` (the core `internvl_fm.evaluation.topk_accuracy`; NaN with fewer
than 5 classes, as CLIP_benchmark) and `mean_per_class_recall` (balanced accuracy over the classes present in the
targets, as `sklearn.metrics.balanced_accuracy_score`): equal to CLIP_benchmark's numbers bit for bit.
`results_record` builds the CLIP_benchmark JSON shape `{"dataset", "model", "task", "metrics", "language"}`.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from internvl_fm.evaluation import EvaluationInputError, check_logits_targets, topk_accuracy
from internvl_fm.loading import atomic_write

from .errors import FeatureDimError, MissingDependencyError


@dataclass
class EvaluationResult:
    """Metrics plus the raw material they came from (logits [N, C], integer targets [N])."""

    metrics: dict[str, float]
    logits: torch.Tensor
    targets: torch.Tensor
    classnames: list[str] = field(default_factory=list)

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(dim=1)

    def confusion_matrix(self) -> torch.Tensor:
        return confusion_matrix(self.predictions, self.targets, self.logits.shape[1])


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`[num_classes, num_classes]` int64 counts; rows are true classes, columns predicted classes."""
    idx = targets.long() * num_classes + predictions.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def mean_per_class_recall(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> float:
    """Recall averaged over the classes that occur in `targets`: sklearn's `balanced_accuracy_score`, which
    CLIP_benchmark reports, to the last bit (per-class ratios in float64, numpy's mean)."""
    cm = confusion_matrix(predictions, targets, num_classes).numpy()
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float(np.mean(cm.diagonal()[present] / support[present]))


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """`{"acc1", "acc5", "mean_per_class_recall"}` from logits [N, C] and integer targets [N]."""
    logits = logits.float().cpu()
    targets = targets.long().cpu()
    try:
        check_logits_targets(logits, targets)
    except EvaluationInputError as err:  # this package's error for inputs of the wrong shape
        raise FeatureDimError(str(err)) from None
    num_classes = logits.shape[1]
    if num_classes >= 5:
        acc1, acc5 = topk_accuracy(logits, targets, (1, 5))
    else:
        (acc1,) = topk_accuracy(logits, targets, (1,))
        acc5 = float("nan")
    recall = mean_per_class_recall(logits.argmax(dim=1), targets, num_classes)
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": recall}


def require_matplotlib() -> None:
    """Raise `MissingDependencyError` unless matplotlib imports (call it before work whose output needs it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependencyError("drawing a confusion matrix needs matplotlib: pip install matplotlib "
                                     "(or the extra: pip install 'internvl-fm[eval]')") from None


def save_confusion_matrix_png(
    cm: torch.Tensor,
    path: str | os.PathLike,
    classnames: Sequence[str] | None = None,
    *,
    normalize: bool = True,
    max_labeled_classes: int = 40,
    title: str = "Confusion matrix",
) -> Path:
    """Draw the confusion matrix (row-normalised by default) to a PNG with matplotlib; written atomically.

    Tick labels are shown when there are at most `max_labeled_classes` classes (ImageNet's 1000 would be
    unreadable), the image is drawn either way.
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cm = cm.double().cpu()
    if normalize:
        cm = cm / cm.sum(dim=1, keepdim=True).clamp_min(1)
    n = cm.shape[0]
    size = min(4 + 0.3 * n, 24) if n <= max_labeled_classes else 12
    fig, ax = plt.subplots(figsize=(size, size))
    try:
        im = ax.imshow(cm.numpy(), cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(title)
        if classnames is not None and n <= max_labeled_classes:
            ax.set_xticks(range(n), labels=list(classnames), rotation=90)
            ax.set_yticks(range(n), labels=list(classnames))
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def results_record(
    dataset: str, model: str, task: str, metrics: dict[str, float], language: str = "en", **extra: Any
) -> dict[str, Any]:
    """A result in CLIP_benchmark's JSON shape; extra keys (e.g. `pretrained`, `classnames`) are appended."""
    record: dict[str, Any] = {"dataset": dataset, "model": model, "task": task, "metrics": dict(metrics),
                              "language": language}
    record.update(extra)
    return record


def write_results_json(record: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a results record atomically (NaN metrics become JSON null, as strict JSON has no NaN)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(_json_safe(record), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return path
