"""Linear probing on frozen InternViT / InternVL-C features (InternVL `classification/` protocol).

Features (computed once, cached to a safetensors file):
- `cls_patch_concat` (official main probe): `cat(x[:, 0], x[:, 1:].mean(1))` of the LAST block output of InternViT
  (no final norm), width `2 * hidden_size`;
- `clip_embedding`: the raw InternVL-C image embedding (`clip_projector` output), width `embed_dim`.

Head: `BatchNorm1d(dim, eps=1e-6)` -> `Linear(dim, num_classes)` (weights N(0, 0.01), bias 0), state-dict keys
`norm.*` / `head.*` exactly as the official `InternViT6B` classifier, so `intern_vit_6b_224px_head.pth` loads.
Training: SGD (momentum 0.9) with warmup + cosine, a weight-decay sweep scored on a held-out split of the
training set, then a refit on the whole training set with the best value. `fit_logistic_regression` is the
scikit-learn alternative (C swept the same way) and returns the same head type (scaler folded into the head).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from internvl_fm.errors import CheckpointNotFoundError, WeightLoadingError
from internvl_fm.loading import atomic_write, torch_load_state_dict
from internvl_fm.training.runtime import build_lr_scheduler

from ._utils import load_tensors, module_device_dtype, module_fingerprint, save_tensors
from .errors import ClassificationError, FeatureDimError
from .evaluate import EvaluationResult, classification_metrics

FEATURE_TYPES = ("cls_patch_concat", "clip_embedding")
HEAD_WEIGHTS_NAME = "model.safetensors"
HEAD_CONFIG_NAME = "config.json"


# --------------------------------------------------------------------------------------------------- features


def cls_patch_concat(last_hidden_state: torch.Tensor) -> torch.Tensor:
    """Official `cls_patch_concat` feature: CLS token concatenated with the mean of the patch tokens, [B, 2C]."""
    if last_hidden_state.ndim != 3 or last_hidden_state.shape[1] < 2:
        raise FeatureDimError(f"expected hidden states [B, 1 + patches, C], got {tuple(last_hidden_state.shape)}")
    return torch.cat([last_hidden_state[:, 0], last_hidden_state[:, 1:].mean(dim=1)], dim=-1)


@dataclass
class FeatureSet:
    """Frozen features [N, D] (float32) with integer labels [N] and the metadata that identifies them."""

    features: torch.Tensor
    labels: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.features.ndim != 2:
            raise FeatureDimError(f"features must be [N, D], got {tuple(self.features.shape)}")
        if self.labels.ndim != 1 or self.labels.shape[0] != self.features.shape[0]:
            raise FeatureDimError(
                f"labels must be [N] with N = {self.features.shape[0]}, got {tuple(self.labels.shape)}"
            )

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def save(self, path: str | os.PathLike) -> Path:
        """Write to a safetensors file atomically."""
        return save_tensors({"features": self.features, "labels": self.labels}, path, self.metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureSet:
        tensors, metadata = load_tensors(path)
        return cls(tensors["features"].float(), tensors["labels"].long(), metadata)


def _vision_tower(model: nn.Module) -> nn.Module:
    return getattr(model, "vision_model", model)


def _default_transform(model: nn.Module):
    processor = getattr(model, "image_processor", None)
    from internvl_fm.processing import InternVLImageProcessor

    vision = _vision_tower(model)
    size = getattr(processor, "image_size", None) or vision.config.image_size
    return InternVLImageProcessor(size, mode="classification")


@torch.no_grad()
def compute_features(model: nn.Module, pixel_values: torch.Tensor, feature_type: str = "cls_patch_concat"
                     ) -> torch.Tensor:
    """Features of one pre-processed batch, returned as float32 on CPU."""
    if feature_type not in FEATURE_TYPES:
        raise ClassificationError(f"unknown feature type {feature_type!r}; choose from {FEATURE_TYPES}")
    device, dtype = module_device_dtype(model)
    pixel_values = pixel_values.to(device=device, dtype=dtype)
    if feature_type == "cls_patch_concat":
        out = _vision_tower(model)(pixel_values)
        feats = cls_patch_concat(out.last_hidden_state)
    else:
        if not hasattr(model, "encode_image"):
            raise ClassificationError("feature type 'clip_embedding' needs an InternVLModel (with encode_image)")
        feats = model.encode_image(pixel_values, mode="InternVL-C")
    return feats.float().cpu()


def extract_features(
    model: nn.Module,
    data: Dataset | tuple[torch.Tensor, torch.Tensor],
    *,
    feature_type: str = "cls_patch_concat",
    batch_size: int = 32,
    transform=None,
    cache_path: str | os.PathLike | None = None,
    cache_key: str | None = None,
    progress: bool = True,
) -> FeatureSet:
    """Frozen features of a labelled dataset, cached to `cache_path` (safetensors) when given.

    `model` is an `InternVisionModel` or an `InternVLModel` (its vision tower is used for `cls_patch_concat`).
    `data` is a dataset of `(PIL image | [3,S,S] tensor, label)` items or a `(pixel_values [N,3,S,S], labels)`
    pair. A cache file is reused only when its metadata (feature type, model fingerprint, sample count and
    `cache_key`, e.g. the dataset path + split) match; otherwise it is recomputed and replaced.
    """
    from .sources import image_loader

    if isinstance(data, tuple):
        pixels, labels = data
        data = torch.utils.data.TensorDataset(pixels, torch.as_tensor(labels, dtype=torch.long))
    expected = {"feature_type": feature_type, "model": module_fingerprint(_vision_tower(model)
                                                                          if feature_type == "cls_patch_concat"
                                                                          else model),
                "num_samples": len(data), "cache_key": cache_key}
    if cache_path is not None and Path(cache_path).is_file():
        cached = FeatureSet.load(cache_path)
        if all(cached.metadata.get(k) == v for k, v in expected.items()):
            return cached
    transform = transform or _default_transform(model)
    loader = image_loader(data, transform, batch_size=batch_size)
    chunks, targets = [], []
    for pixels, labels in tqdm(loader, desc=f"features ({feature_type})", disable=not progress):
        chunks.append(compute_features(model, pixels, feature_type))
        targets.append(labels)
    result = FeatureSet(torch.cat(chunks), torch.cat(targets), expected)
    if cache_path is not None:
        result.save(cache_path)
    return result


# --------------------------------------------------------------------------------------------------- head


@dataclass
class LinearProbeConfig:
    """Shape and provenance of a linear-probe head."""

    feature_dim: int
    num_classes: int
    feature_type: str = "cls_patch_concat"
    norm_eps: float = 1e-6
    classnames: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinearProbeConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class LinearProbeHead(nn.Module):
    """`BatchNorm1d(eps=1e-6)` + `Linear`, keys `norm.*` / `head.*` as the official InternViT6B classifier."""

    def __init__(self, config: LinearProbeConfig):
        super().__init__()
        if config.feature_type not in FEATURE_TYPES:
            raise ClassificationError(f"unknown feature type {config.feature_type!r}; choose from {FEATURE_TYPES}")
        if config.classnames is not None and len(config.classnames) != config.num_classes:
            raise ClassificationError(
                f"{len(config.classnames)} classnames given for a head with {config.num_classes} classes"
            )
        self.config = config
        self.norm = nn.BatchNorm1d(config.feature_dim, eps=config.norm_eps)
        self.head = nn.Linear(config.feature_dim, config.num_classes)
        nn.init.normal_(self.head.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.config.feature_dim:
            raise FeatureDimError(
                f"head expects features [N, {self.config.feature_dim}] ({self.config.feature_type}), "
                f"got {tuple(features.shape)}"
            )
        return self.head(self.norm(features.to(self.head.weight.dtype)))

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write `config.json` + `model.safetensors` (official key names) atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_tensors(self.state_dict(), folder / HEAD_WEIGHTS_NAME, {"format": "pt"})
        with atomic_write(folder / HEAD_CONFIG_NAME) as tmp:
            Path(tmp).write_text(json.dumps(self.config.to_dict(), ensure_ascii=False, indent=2) + "\n")
        return folder

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], *, feature_type: str | None = None,
                        classnames: Sequence[str] | None = None) -> LinearProbeHead:
        """Build a head from an official-layout state dict; backbone keys (`blocks.*`, ...) are ignored.

        Without `feature_type`, a 768-wide head is taken as `clip_embedding` (the official `clip_projector`
        target) and any other width as `cls_patch_concat`."""
        sd = _strip_head_state_dict(state_dict)
        weight = sd["head.weight"]
        num_classes, dim = weight.shape
        if feature_type is None:
            feature_type = "clip_embedding" if dim == 768 else "cls_patch_concat"
        config = LinearProbeConfig(feature_dim=dim, num_classes=num_classes, feature_type=feature_type,
                                   classnames=list(classnames) if classnames is not None else None)
        head = cls(config)
        head.load_head_state_dict(sd)
        return head.eval()

    def load_head_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load `norm.*` / `head.*` (official layout); names every missing key or shape mismatch."""
        sd = _strip_head_state_dict(state_dict)
        own = self.state_dict()
        missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
        mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs head {tuple(v.shape)}"
                      for k, v in own.items() if k in sd and sd[k].shape != v.shape]
        if missing or mismatched:
            raise WeightLoadingError(f"linear-probe head weights do not fit: missing {missing}, "
                                     f"shape mismatches {mismatched}")
        self.load_state_dict({k: sd[k] for k in own if k in sd}, strict=False)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, feature_type: str | None = None) -> LinearProbeHead:
        """Load a head saved by `save_pretrained`, a bare `.safetensors`, or an official `.pth` checkpoint
        (`{'model': ...}` / `{'module': ...}` / flat; read by `internvl_fm.loading.torch_load_state_dict`, which
        uses `torch.load(weights_only=True)`)."""
        path = Path(path)
        if path.is_dir():
            cfg_file, weights = path / HEAD_CONFIG_NAME, path / HEAD_WEIGHTS_NAME
            if not weights.is_file():
                raise CheckpointNotFoundError(f"{path} has no {HEAD_WEIGHTS_NAME}")
            state, _ = load_tensors(weights)
            if cfg_file.is_file():
                config = LinearProbeConfig.from_dict(json.loads(cfg_file.read_text()))
                head = cls(config)
                head.load_head_state_dict(state)
                return head.eval()
            return cls.from_state_dict(state, feature_type=feature_type)
        if not path.is_file():
            raise CheckpointNotFoundError(f"linear-probe head {path} not found")
        if path.suffix == ".safetensors":
            state, _ = load_tensors(path)
        else:
            state = torch_load_state_dict(path)
        return cls.from_state_dict(state, feature_type=feature_type)


def _strip_head_state_dict(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    for key in ("model", "module", "state_dict", "model_ema"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    out = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = key.removeprefix("module.")
        if key.startswith(("norm.", "head.")):
            out[key] = value
    if "head.weight" not in out:
        raise WeightLoadingError("no 'head.weight' in the checkpoint: not a linear-probe head "
                                 f"(keys seen: {sorted(state_dict)[:8]}...)")
    return out


# --------------------------------------------------------------------------------------------------- training


@dataclass
class ProbeTrainingConfig:
    """Hyper-parameters of `train_linear_probe` (official: SGD momentum 0.9, lr 0.1 @ batch 512, cosine, warmup).

    `weight_decays` is the regularisation sweep, each value scored on a held-out `val_fraction` of the training
    set; the best one is refitted on the whole training set when `refit` is set. Small datasets get more epochs
    so that at least `min_steps` optimizer steps are taken.
    """

    epochs: int = 10
    min_steps: int = 1000
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    warmup_epochs: int = 1
    weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2)
    val_fraction: float = 0.2
    label_smoothing: float = 0.0
    seed: int = 0
    refit: bool = True


@dataclass
class ProbeResult:
    """A trained head, the regularisation value picked and the held-out accuracy of every value tried."""

    head: LinearProbeHead
    best_regularization: float
    sweep: dict[float, float]
    method: str = "sgd"


def _check_features(features: torch.Tensor, labels: torch.Tensor) -> None:
    FeatureSet(features, labels)  # validates shapes
    if features.shape[0] < 2:
        raise FeatureDimError("need at least 2 training samples")


def split_holdout(labels: torch.Tensor, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split of indices into (train, val); every class keeps at least one training sample."""
    if not 0.0 < val_fraction < 1.0:
        raise ClassificationError(f"val_fraction must be in (0, 1), got {val_fraction}")
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = min(round(len(idx) * val_fraction), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def _fit_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float,
              config: ProbeTrainingConfig, feature_type: str, progress: bool) -> LinearProbeHead:
    torch.manual_seed(config.seed)
    head = LinearProbeHead(LinearProbeConfig(features.shape[1], num_classes, feature_type))
    optimizer = torch.optim.SGD(head.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=weight_decay)
    n = features.shape[0]
    batch = min(config.batch_size, n)
    steps_per_epoch = max(1, n // batch)  # drop_last keeps BatchNorm batches full
    epochs = max(config.epochs, math.ceil(config.min_steps / steps_per_epoch))
    total = epochs * steps_per_epoch
    scheduler = build_lr_scheduler(optimizer, "cosine", config.warmup_epochs * steps_per_epoch, total)
    gen = torch.Generator().manual_seed(config.seed)
    head.train()
    bar = tqdm(total=total, desc=f"probe wd={weight_decay:g}", disable=not progress, leave=False)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(head(features[idx]), labels[idx], label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update(1)
    bar.close()
    head.eval()
    return head


@torch.no_grad()
def _accuracy(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    head.eval()
    return float((head(features).argmax(1) == labels).float().mean())


def train_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    config: ProbeTrainingConfig | None = None,
    feature_type: str = "cls_patch_concat",
    classnames: Sequence[str] | None = None,
    val_features: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    progress: bool = True,
) -> ProbeResult:
    """Train the BatchNorm + Linear head with a weight-decay sweep on a held-out split.

    Without `val_features` the held-out split is `config.val_fraction` of the training set (stratified); the
    chosen weight decay is then refitted on all training samples (`config.refit`).
    """
    config = config or ProbeTrainingConfig()
    features, labels = features.float(), labels.long()
    _check_features(features, labels)
    num_classes = num_classes or (len(classnames) if classnames is not None else int(labels.max()) + 1)
    if (val_features is None) != (val_labels is None):
        raise ClassificationError("give both val_features and val_labels, or neither")
    if val_features is not None:
        _check_features(val_features, val_labels)
        if val_features.shape[1] != features.shape[1]:
            raise FeatureDimError(f"validation features have width {val_features.shape[1]}, "
                                  f"training features {features.shape[1]}")
        tr_x, tr_y, va_x, va_y = features, labels, val_features.float(), val_labels.long()
    else:
        tr_idx, va_idx = split_holdout(labels, config.val_fraction, config.seed)
        tr_x, tr_y, va_x, va_y = features[tr_idx], labels[tr_idx], features[va_idx], labels[va_idx]
    if not config.weight_decays:
        raise ClassificationError("weight_decays is empty: give at least one value to try")
    sweep: dict[float, float] = {}
    best: tuple[float, float, LinearProbeHead] | None = None
    for wd in config.weight_decays:
        head = _fit_head(tr_x, tr_y, num_classes, wd, config, feature_type, progress)
        acc = _accuracy(head, va_x, va_y)
        sweep[float(wd)] = acc
        if best is None or acc > best[0]:
            best = (acc, float(wd), head)
    _, best_wd, head = best  # type: ignore[misc]
    if config.refit:
        all_x = torch.cat([tr_x, va_x]) if val_features is None else features
        all_y = torch.cat([tr_y, va_y]) if val_features is None else labels
        head = _fit_head(all_x, all_y, num_classes, best_wd, config, feature_type, progress)
    if classnames is not None:
        head.config.classnames = list(classnames)
    return ProbeResult(head=head, best_regularization=best_wd, sweep=sweep, method="sgd")


def fit_logistic_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    Cs: Iterable[float] = (0.01, 0.1, 1.0, 10.0),
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
    blas_threads: int | None = None,
    num_classes: int | None = None,
    feature_type: str = "cls_patch_concat",
    classnames: Sequence[str] | None = None,
) -> ProbeResult:
    """scikit-learn `StandardScaler` + `LogisticRegression` with C chosen on a held-out split, refitted on all
    samples and folded into a `LinearProbeHead` (BatchNorm running stats = scaler mean, Linear = coef / scale).

    `blas_threads` caps the BLAS / OpenMP threads scikit-learn uses (1 avoids heavy oversubscription slow-downs
    on busy machines; None leaves the library default).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    features, labels = features.float(), labels.long()
    _check_features(features, labels)
    num_classes = num_classes or (len(classnames) if classnames is not None else int(labels.max()) + 1)
    tr_idx, va_idx = split_holdout(labels, val_fraction, seed)
    x, y = features.double().numpy(), labels.numpy()

    def fit(idx, c):
        scaler = StandardScaler().fit(x[idx])
        clf = LogisticRegression(C=c, max_iter=max_iter).fit(scaler.transform(x[idx]), y[idx])
        return scaler, clf

    sweep = {}
    with threadpool_limits(limits=blas_threads):
        for c in Cs:
            scaler, clf = fit(tr_idx.numpy(), c)
            sweep[float(c)] = float((clf.predict(scaler.transform(x[va_idx.numpy()])) == y[va_idx.numpy()]).mean())
        best_c = max(sweep, key=lambda c: (sweep[c], -abs(math.log10(c))))
        scaler, clf = fit(slice(None), best_c)

    config = LinearProbeConfig(features.shape[1], num_classes, feature_type,
                               classnames=list(classnames) if classnames is not None else None)
    head = LinearProbeHead(config)
    weight = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
    bias = torch.full((num_classes,), -1e4, dtype=torch.float64)  # classes never seen in training
    coef, intercept = torch.from_numpy(clf.coef_), torch.from_numpy(clf.intercept_)
    classes = torch.from_numpy(clf.classes_).long()
    if len(classes) == 2:  # binary sklearn models keep one row: logit(class 1) - logit(class 0)
        coef = torch.cat([-coef / 2, coef / 2])
        intercept = torch.cat([-intercept / 2, intercept / 2])
    weight[classes] = coef / torch.from_numpy(scaler.scale_)[None]
    bias[classes] = intercept
    with torch.no_grad():
        head.norm.running_mean.copy_(torch.from_numpy(scaler.mean_).float())
        head.norm.running_var.fill_(1.0 - head.norm.eps)  # denominator sqrt(var + eps) == 1
        head.norm.weight.fill_(1.0)
        head.norm.bias.zero_()
        head.head.weight.copy_(weight.float())
        head.head.bias.copy_(bias.float())
    head.eval()
    return ProbeResult(head=head, best_regularization=best_c, sweep=sweep, method="logistic_regression")


@torch.no_grad()
def evaluate_probe(head: LinearProbeHead, features: FeatureSet | torch.Tensor,
                   labels: torch.Tensor | None = None, *, batch_size: int = 4096) -> EvaluationResult:
    """Top-1 / top-5 / mean per-class recall of a head on cached features."""
    if isinstance(features, FeatureSet):
        features, labels = features.features, features.labels
    if labels is None:
        raise ClassificationError("labels are required to evaluate a probe")
    head.eval()
    logits = torch.cat([head(features[i:i + batch_size].float()) for i in range(0, len(features), batch_size)])
    return EvaluationResult(classification_metrics(logits, labels), logits, labels.long(),
                            list(head.config.classnames or []))
