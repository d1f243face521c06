"""Config-driven training of segmentation heads (and full tuning) on InternViT, in plain PyTorch.

Recipes (segmentation/configs/): linear probing on a frozen backbone, UperNet head tuning on a frozen backbone,
full tuning. AdamW with layer-wise lr decay, poly schedule with linear warm-up, bf16, gradient checkpointing, DDP
(`torchrun --nproc_per_node N -m internvl_fm.cli seg-train CONFIG`), atomic checkpoints and exact resume.

Work dir layout: `checkpoints/step_XXXXXXXX/` (config.json + model.safetensors + training_state.pt), `final/`
(the trained model), `log.jsonl`. Distributed set-up, sampler, checkpoints and log come from the core training
runtime (`internvl_fm.training.runtime`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from internvl_fm.errors import CheckpointNotFoundError
from internvl_fm.loading import atomic_directory
from internvl_fm.training.runtime import (Checkpoints, DistributedState, JsonlLog, ResumableSampler, distributed,
                                          load_training_state, save_training_state)

from .data import ADE20K_CLASSES, EvalTransform, SegmentationDataset, TrainTransform
from .errors import CropSizeError, SegmentationConfigError
from .infer import INFERENCE_MODES, check_crop, default_stride, evaluate
from .modeling import SegmentationConfig, SegmentationModel

CHECKPOINT_PREFIX = "step_"


@dataclasses.dataclass
class DataConfig:
    """Where the data is and how it is augmented. `type`: "ade20k" (`root` in ADEChallengeData2016 layout) or
    "folders" (explicit `train_images` / `train_masks` / `val_images` / `val_masks`)."""

    type: str = "ade20k"
    root: str | None = None
    train_split: str = "training"
    val_split: str = "validation"
    train_images: str | None = None
    train_masks: str | None = None
    val_images: str | None = None
    val_masks: str | None = None
    ratio_range: list[float] = dataclasses.field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    num_workers: int = 4


@dataclasses.dataclass
class OptimConfig:
    """AdamW + layer-wise lr decay (`lr * layer_decay ** (L + 1 - layer_id)`) + poly schedule with linear warm-up."""

    lr: float = 4e-5
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.05
    layer_decay: float = 1.0
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 1.0
    min_lr: float = 0.0
    grad_clip: float | None = None


@dataclasses.dataclass
class RunConfig:
    """The loop: iterations, batch size per process, logging, checkpoints, evaluation."""

    work_dir: str = "work_dirs/segmentation"
    max_iters: int = 80000
    batch_size: int = 2
    seed: int = 0
    device: str = "auto"
    gradient_checkpointing: bool = True
    drop_path_rate: float = 0.0
    log_interval: int = 50
    checkpoint_interval: int = 1000
    max_keep_checkpoints: int = 2
    eval_interval: int = 0
    eval_mode: str = "slide"
    eval_stride: int | None = None  # sliding-window stride; None: 2/3 of model.crop_size (infer.default_stride)


@dataclasses.dataclass
class TrainConfig:
    """A whole recipe: `model` (SegmentationConfig fields + `pretrained`), `data`, `optim`, `train`."""

    model: SegmentationConfig
    data: DataConfig
    optim: OptimConfig
    train: RunConfig
    pretrained: str | None = None

    def to_dict(self) -> dict[str, Any]:
        model = self.model.to_dict()
        for key in ("model_type", "architectures"):
            model.pop(key, None)
        if self.pretrained is not None:
            model["pretrained"] = self.pretrained
        return {"model": model, "data": dataclasses.asdict(self.data), "optim": dataclasses.asdict(self.optim),
                "train": dataclasses.asdict(self.train)}


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the loss / lr of every step run by this call, the last step, final metrics."""

    history: list[dict[str, float]]
    step: int
    metrics: dict[str, Any] | None
    final_dir: Path | None


# ------------------------------------------------------------------------------------------------ config io


def _section(cls: type, data: dict[str, Any], name: str):
    if not isinstance(data, dict):
        raise SegmentationConfigError(f"config section {name!r} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SegmentationConfigError(f"unknown key(s) in config section {name!r}: {unknown}; "
                                      f"known: {sorted(names)}")
    return cls(**data)


def _apply_override(raw: dict[str, Any], override: str) -> None:
    import yaml

    key, sep, value = override.partition("=")
    if not sep or "." not in key:
        raise SegmentationConfigError(f"override {override!r} must look like section.key=value")
    section, _, name = key.partition(".")
    raw.setdefault(section, {})[name] = yaml.safe_load(value)


def load_train_config(path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML or JSON recipe; `overrides` like ["train.max_iters=100", "data.root=/data/ade"]."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SegmentationConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SegmentationConfigError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise SegmentationConfigError(f"{path} must hold a mapping with model/data/optim/train sections")
    for override in overrides or []:
        _apply_override(raw, override)
    return train_config_from_dict(raw)


def train_config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Build a `TrainConfig` from its dict form (unknown sections or keys are errors)."""
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}  # "_comment" and friends
    unknown = sorted(set(raw) - {"model", "data", "optim", "train"})
    if unknown:
        raise SegmentationConfigError(f"unknown config section(s) {unknown}; expected model, data, optim, train")
    model = dict(raw.get("model") or {})
    pretrained = model.pop("pretrained", None)
    config = TrainConfig(model=_section(SegmentationConfig, model, "model"),
                         data=_section(DataConfig, raw.get("data") or {}, "data"),
                         optim=_section(OptimConfig, raw.get("optim") or {}, "optim"),
                         train=_section(RunConfig, raw.get("train") or {}, "train"),
                         pretrained=pretrained)
    if pretrained is None and config.model.vision_config is None:
        raise SegmentationConfigError("model.pretrained (an InternViT / InternVL checkpoint) or model.vision_config "
                                      "(a random backbone) is required")
    if config.data.type not in ("ade20k", "folders"):
        raise SegmentationConfigError(f"data.type must be 'ade20k' or 'folders', got {config.data.type!r}")
    if config.data.type == "ade20k" and config.model.class_names is None \
            and config.model.num_classes == len(ADE20K_CLASSES):
        config.model.class_names = list(ADE20K_CLASSES)
    if config.train.eval_mode not in INFERENCE_MODES:
        raise SegmentationConfigError(f"train.eval_mode must be one of {INFERENCE_MODES}")
    return config


# ------------------------------------------------------------------------------------------- building blocks


def build_model(config: TrainConfig) -> SegmentationModel:
    """The model of a recipe: pretrained ViT weights (or a random ViT from `vision_config`) + new heads."""
    if config.pretrained is not None:
        try:
            model = SegmentationModel.from_backbone_checkpoint(config.model, config.pretrained,
                                                               drop_path_rate=config.train.drop_path_rate)
        except CheckpointNotFoundError as err:  # name the config key the path came from
            raise CheckpointNotFoundError(f"model.pretrained: {err}") from None
    else:
        vision = dataclasses.replace(config.model.vision_config, drop_path_rate=config.train.drop_path_rate)
        from internvl_fm.models.modeling_intern_vit import InternVisionModel

        model = SegmentationModel(config.model, vit=InternVisionModel(vision).init_weights())
    if config.train.gradient_checkpointing and not config.model.freeze_backbone:
        model.backbone.vit.gradient_checkpointing_enable()
    return model


def layer_id(name: str, num_layers: int) -> int:
    """Layer of a parameter for lr decay: ViT embeddings 0, block i -> i + 1, everything else num_layers + 1."""
    if name.startswith("backbone.vit.embeddings."):
        return 0
    if name.startswith("backbone.vit.encoder.layers."):
        return int(name.split(".")[4]) + 1
    return num_layers + 1


def param_groups(model: SegmentationModel, optim: OptimConfig) -> list[dict[str, Any]]:
    """AdamW groups: lr scale `layer_decay ** (L + 1 - layer_id)`; no weight decay on 1-D params, biases,
    position embedding and class token (official `CustomLayerDecayOptimizerConstructor`)."""
    num_layers = model.backbone.num_layers
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim == 1 or name.endswith((".bias", "position_embedding", "class_embedding"))
        lid = layer_id(name, num_layers)
        group = groups.setdefault((lid, no_decay), {
            "params": [], "names": [], "layer_id": lid,
            "weight_decay": 0.0 if no_decay else optim.weight_decay,
            "lr": optim.lr * optim.layer_decay ** (num_layers + 1 - lid),
        })
        group["params"].append(param)
        group["names"].append(name)
    if not groups:
        raise SegmentationConfigError("the model has no trainable parameters")
    return [groups[k] for k in sorted(groups)]


def poly_warmup_factor(step: int, optim: OptimConfig, max_iters: int) -> float:
    """lr multiplier at `step`: mmcv poly decay (power, min_lr) with linear warm-up from `warmup_ratio`.

    This is the official recipe's `PolyLrUpdaterHook(warmup="linear")`: the decay runs over all `max_iters` and the
    warm-up scales the decayed lr. transformers' polynomial schedule warms up from 0 and starts the decay after
    the warm-up, which gives another curve, so this one schedule is not taken from transformers.
    """
    progress = min(step, max_iters) / max(max_iters, 1)
    ratio = optim.min_lr / optim.lr if optim.lr else 0.0
    factor = (1 - ratio) * (1 - progress) ** optim.power + ratio
    if step < optim.warmup_iters:
        factor *= 1 - (1 - step / optim.warmup_iters) * (1 - optim.warmup_ratio)
    return factor


def build_datasets(config: TrainConfig, patch_size: int) -> tuple[SegmentationDataset, SegmentationDataset | None]:
    """Training set (with `TrainTransform`) and validation set (with `EvalTransform`, None if not configured)."""
    data, model = config.data, config.model
    train_tf = TrainTransform(crop_size=model.crop_size, ratio_range=tuple(data.ratio_range),
                              cat_max_ratio=data.cat_max_ratio, flip_prob=data.flip_prob,
                              photometric=data.photometric, mean=model.mean, std=model.std,
                              ignore_index=model.ignore_index)
    eval_tf = EvalTransform(model.crop_size, patch_size, model.mean, model.std)
    common = dict(num_classes=model.num_classes, reduce_zero_label=model.reduce_zero_label,
                  ignore_index=model.ignore_index)
    if data.type == "ade20k":
        if data.root is None:
            raise SegmentationConfigError("data.root is required for data.type 'ade20k'")
        train_set = SegmentationDataset.ade20k(data.root, data.train_split, transform=train_tf,
                                               seed=config.train.seed, **common)
        val_root = Path(data.root) / "images" / data.val_split
        val_set = (SegmentationDataset.ade20k(data.root, data.val_split, transform=eval_tf, **common)
                   if val_root.is_dir() else None)
        return train_set, val_set
    if not (data.train_images and data.train_masks):
        raise SegmentationConfigError("data.train_images and data.train_masks are required for data.type 'folders'")
    train_set = SegmentationDataset(data.train_images, data.train_masks, transform=train_tf,
                                    seed=config.train.seed, **common)
    val_set = None
    if data.val_images and data.val_masks:
        val_set = SegmentationDataset(data.val_images, data.val_masks, transform=eval_tf, **common)
    return train_set, val_set


# ------------------------------------------------------------------------------------------- checkpointing


def _checkpoints(work_dir: str | os.PathLike, keep: int | None = None) -> Checkpoints:
    return Checkpoints(Path(work_dir) / "checkpoints", CHECKPOINT_PREFIX, width=8, keep=keep)


def latest_checkpoint(work_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of a work dir (None when there is none)."""
    return _checkpoints(work_dir).latest()


def save_checkpoint(work_dir: Path, model: SegmentationModel, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, step: int, config: TrainConfig,
                    max_keep: int) -> Path:
    """Write `checkpoints/step_XXXXXXXX` atomically (built in a temp folder, then renamed); keep the newest
    `max_keep` (0: all)."""
    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        save_training_state(folder, step, optimizer, scheduler, config=json.dumps(config.to_dict()))

    return _checkpoints(work_dir, max_keep).save(step, write)


def _load_checkpoint(folder: Path, model: SegmentationModel, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
    from internvl_fm.loading import check_state_dict, load_state_dict

    state_dict = load_state_dict(folder)  # single or sharded safetensors
    check_state_dict(model, state_dict)
    model.load_state_dict(state_dict)
    return int(load_training_state(folder, optimizer, scheduler)["step"])


# -------------------------------------------------------------------------------------------------- train


def train(config: TrainConfig, on_step: Callable[[int, dict[str, float]], None] | None = None,
          resume: bool = True, progress: bool = True) -> TrainResult:
    """Run a recipe; resumes from the newest checkpoint in `train.work_dir` unless `resume=False`.

    `on_step(step, logs)` is called after every optimisation step (step counts from 1).
    """
    with distributed(config.train.device) as dist:
        return _train(config, dist, on_step, resume, progress)


def _train(config: TrainConfig, dist: DistributedState, on_step: Callable[[int, dict[str, float]], None] | None,
           resume: bool, progress: bool) -> TrainResult:
    from tqdm.auto import tqdm

    run = config.train
    rank, world, device = dist.rank, dist.world_size, dist.device
    work_dir = Path(run.work_dir)
    torch.manual_seed(run.seed)
    model = build_model(config)
    check_config(config, model.patch_size)
    if world > 1 and device.type == "cuda":  # SyncBatchNorm is CUDA-only; gloo (CPU) runs keep per-rank statistics
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, config.optim), lr=config.optim.lr,
                                  betas=tuple(config.optim.betas), weight_decay=config.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(poly_warmup_factor, optim=config.optim, max_iters=run.max_iters))
    start = 0
    checkpoint = latest_checkpoint(work_dir) if resume else None
    if checkpoint is not None:
        start = _load_checkpoint(checkpoint, model, optimizer, scheduler)
    train_set, val_set = build_datasets(config, model.patch_size)
    sampler = ResumableSampler(len(train_set), run.batch_size, seed=run.seed, rank=rank, world_size=world,
                               start_step=start)
    loader = DataLoader(train_set, batch_size=run.batch_size, sampler=sampler, num_workers=config.data.num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator(),
                        persistent_workers=config.data.num_workers > 0)
    net = dist.wrap(model)
    log = JsonlLog(work_dir / "log.jsonl", enabled=dist.is_main)
    log.resume_at(start)
    history: list[dict[str, float]] = []
    metrics = None
    model.train()
    batches = iter(loader)
    bar = tqdm(range(start, run.max_iters), initial=start, total=run.max_iters, desc="seg-train",
               disable=not progress or rank != 0)
    for step in bar:
        batch = next(batches)
        out = net(batch["pixel_values"].to(device, non_blocking=True), batch["labels"].to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if config.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        lr = optimizer.param_groups[-1]["lr"]
        optimizer.step()
        scheduler.step()
        done = step + 1
        logs = {"step": done, "loss": float(out.loss.detach()), "lr": lr}
        if out.aux_loss is not None:
            logs["decode_loss"] = float(out.decode_loss.detach())
            logs["aux_loss"] = float(out.aux_loss.detach())
        history.append(logs)
        bar.set_postfix(loss=f"{logs['loss']:.4f}")
        if done % run.log_interval == 0 or done == run.max_iters:
            log.append(logs)
        if run.checkpoint_interval and done % run.checkpoint_interval == 0 and done < run.max_iters and rank == 0:
            save_checkpoint(work_dir, model, optimizer, scheduler, done, config, run.max_keep_checkpoints)
        if val_set is not None and run.eval_interval and done % run.eval_interval == 0 and done < run.max_iters:
            metrics = _evaluate(model, val_set, config, dist, log, done, progress)
        if on_step is not None:
            on_step(done, logs)
    final_dir = work_dir / "final" if (work_dir / "final").is_dir() else None
    if start < run.max_iters:
        if val_set is not None:
            metrics = _evaluate(model, val_set, config, dist, log, run.max_iters, progress)
        if rank == 0:
            save_checkpoint(work_dir, model, optimizer, scheduler, run.max_iters, config, run.max_keep_checkpoints)
            with atomic_directory(work_dir / "final") as tmp:
                model.save_pretrained(tmp)
            final_dir = work_dir / "final"
    dist.barrier()
    return TrainResult(history=history, step=max(start, run.max_iters), metrics=metrics, final_dir=final_dir)


def _evaluate(model: SegmentationModel, val_set: SegmentationDataset, config: TrainConfig, dist: DistributedState,
              log: JsonlLog, step: int, progress: bool) -> dict[str, Any]:
    run = config.train
    result = evaluate(model, val_set, run.eval_mode, config.model.crop_size, run.eval_stride, dist.rank,
                      dist.world_size, progress=progress)
    log.append({"step": step, "mIoU": result.miou, "mAcc": result.macc, "aAcc": result.aacc})
    return result.to_dict(config.model.class_names)


def check_config(config: TrainConfig, patch_size: int) -> None:
    """Validate sizes that depend on the backbone (raises `CropSizeError`)."""
    if config.model.crop_size % patch_size:
        raise CropSizeError(f"model.crop_size {config.model.crop_size} is not divisible by the patch size "
                            f"{patch_size}")
    if config.train.eval_mode == "slide":
        check_crop(config.model.crop_size, config.train.eval_stride or default_stride(config.model.crop_size),
                   patch_size)

