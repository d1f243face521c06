"""Contrastive fine-tuning of InternVL-C: symmetric InfoNCE, frozen towers or LoRA, bf16, DDP, resumable checkpoints.

Checkpoints are written in the official InternVL layout (`config.json` + `model.safetensors` + tokenizer files, LoRA
merged), so `InternVLModel.from_pretrained` and every other loader read them; `training_state.pt` next to them holds
the optimizer, scheduler, RNG and (with LoRA) adapter state for an exact resume.

Batches are a pure function of (seed, step): the sample at global position p of the run is record
`randperm_epoch(p // N)[p % N]` with its caption / jitter drawn from (seed, epoch, index).  Resuming at step s
therefore replays exactly the batches an uninterrupted run would have seen, on any number of data-loader workers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from internvl_fm.errors import InternVLError
from internvl_fm.loading import save_state_dict
from internvl_fm.models.configuration_internvl import InternVLConfig
from internvl_fm.models.modeling_internvl import InternVLModel

from .data import DatasetFormatError, read_metadata
from .evaluate import evaluate_retrieval, match_key
from .loss import ClipLoss, clamp_logit_scale_
from .runtime import (Checkpoints, JsonlLog, ResumableSampler, build_lr_scheduler, distributed, init_distributed,
                      load_training_state, save_training_state)
from .tokenizer import copy_tokenizer_files

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"
LOG_FILE = "log.jsonl"

# Parameters InternVL-C never uses (G-mode query path, ITM head, LM head): frozen so DDP sees no unused gradients.
C_MODE_UNUSED = (r"^query_tokens$", r"^clip_projector2\.", r"^itm_head\.", r"^qllama\.model\.layers\.\d+\.cross_attn\.",
                 r"^qllama\.lm_head\.")
# The official recipe also adapts `attn.qkv`; the core's InternAttention reads `qkv.weight` through F.linear instead
# of calling the module, which would bypass a LoRA wrapper, so qkv is left out until the core calls the module.
VISION_LORA_TARGETS = r"vision_model\.encoder\.layers\.\d+\.(attn\.proj|mlp\.fc1|mlp\.fc2)"
TEXT_LORA_TARGETS = r"qllama\.model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


class TrainingError(InternVLError, RuntimeError):
    """Training cannot start or continue (bad model / data / checkpoint combination); the message says why."""


@dataclasses.dataclass
class TrainingArguments:
    """Everything that defines a contrastive training run (saved in every checkpoint's trainer_state.json)."""

    output_dir: str
    max_steps: int = 1000
    batch_size: int = 64  # per process
    learning_rate: float = 5e-4
    min_lr_ratio: float = 0.0
    warmup_steps: int = 50
    lr_schedule: str = "cosine"  # cosine | constant
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-6
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.0
    match_attributes: bool = True  # pairs with equal attribute metadata are positives of each other
    bf16: bool = False
    gradient_checkpointing: bool = False
    freeze_vision: bool = False
    freeze_text: bool = False
    lora_vision_rank: int = 0
    lora_text_rank: int = 0
    lora_alpha: float | None = None  # default: 2 * rank
    lora_dropout: float = 0.0
    seed: int = 0
    num_workers: int = 0
    save_steps: int = 500
    save_total_limit: int | None = 2
    logging_steps: int = 10
    eval_steps: int = 0
    eval_size: int = 500
    cache_images: bool = False
    num_threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0 or (self.min_lr_ratio and self.lr_schedule != "cosine"):
            raise ValueError(f"min_lr_ratio must be in [0, 1] and applies to the cosine schedule only, got "
                             f"{self.min_lr_ratio} with lr_schedule {self.lr_schedule!r}")
        if self.freeze_vision and self.lora_vision_rank:
            raise ValueError("freeze_vision and lora_vision_rank exclude each other (LoRA already freezes the base)")
        if self.freeze_text and self.lora_text_rank:
            raise ValueError("freeze_text and lora_text_rank exclude each other (LoRA already freezes the base)")


# ---------------------------------------------------------------------------------------------------------- data


class ImageTextDataset(Dataset):
    """Image-text pairs of a dataset folder (`metadata.jsonl` + images); items are addressed by (epoch, index).

    A record with "captions" (dict or list) gives one caption per visit, drawn from (seed, epoch, index); otherwise
    its "text" is used.  Each item is (pixel_values [3, S, S], caption, match id).  With `cache_images` every image is
    decoded and resized once into a uint8 tensor (N x 3 x S x S bytes of memory) instead of on every visit.
    """

    def __init__(self, data_dir: str | os.PathLike, image_size: int, seed: int = 0, match_attributes: bool = True,
                 cache_images: bool = False, progress: bool = True):
        from internvl_fm.processing import IMAGENET_MEAN, IMAGENET_STD, build_transform

        self.data_dir = Path(data_dir)
        self.records = read_metadata(self.data_dir)
        self.image_size = image_size
        self.transform = build_transform(image_size, "retrieval")
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self.seed = seed
        keys = [match_key(r, i) if match_attributes else f"#{i}" for i, r in enumerate(self.records)]
        ids = {k: n for n, k in enumerate(dict.fromkeys(keys))}
        self.match_ids = [ids[k] for k in keys]
        self.cache: torch.Tensor | None = self._decode_all(progress) if cache_images else None

    def _decode_all(self, progress: bool) -> torch.Tensor:
        import numpy as np
        from PIL import Image
        from tqdm.auto import tqdm

        from internvl_fm.processing import load_image

        size = self.image_size
        cache = torch.empty(len(self.records), 3, size, size, dtype=torch.uint8)
        for i, rec in enumerate(tqdm(self.records, desc="cache images", disable=not progress)):
            img = load_image(self.data_dir / rec["image"])
            if img.size != (size, size):
                img = img.resize((size, size), Image.BICUBIC)
            cache[i] = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return cache

    def __len__(self) -> int:
        return len(self.records)

    def caption(self, epoch: int, index: int) -> str:
        """The caption record `index` shows in `epoch`."""
        rec = self.records[index]
        caps = rec.get("captions")
        if isinstance(caps, dict):
            caps = [caps[k] for k in sorted(caps)]
        if isinstance(caps, list) and caps:
            return random.Random(f"{self.seed}:{epoch}:{index}").choice(caps)
        return rec["text"]

    def pixels(self, index: int) -> torch.Tensor:
        """Normalised pixel values [3, S, S] of record `index`."""
        if self.cache is not None:
            return (self.cache[index].float() / 255.0 - self.mean) / self.std
        from internvl_fm.processing import load_image

        return self.transform(load_image(self.data_dir / self.records[index]["image"]))

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, str, int]:
        epoch, index = item
        return self.pixels(index), self.caption(epoch, index), self.match_ids[index]


class StepBatchSampler(ResumableSampler):
    """The runtime's `ResumableSampler` as batches of `(epoch, index)` items (what `ImageTextDataset` takes), one
    batch per step `start_step..max_steps-1`, this rank's slice of the global batch."""

    def __init__(self, num_records: int, batch_size: int, seed: int, max_steps: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1):
        super().__init__(num_records, batch_size, seed, rank, world_size, start_step, max_steps)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in self.steps():
            yield [(position // self.num_samples, index) for index, position in self.batch(step)]

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step)


def collate(batch: list[tuple[torch.Tensor, str, int]]) -> dict[str, Any]:
    pixels, texts, ids = zip(*batch)
    return {"pixel_values": torch.stack(pixels), "texts": list(texts), "match_ids": torch.tensor(ids)}


# --------------------------------------------------------------------------------------------------------- model


def init_weights(model: InternVLModel, seed: int | None = None) -> InternVLModel:
    """Initialise an InternVLModel built from a config for training from scratch (CLIP-style initialisation)."""
    if seed is not None:
        torch.manual_seed(seed)
    model.vision_model.init_weights()
    with torch.no_grad():
        # Position embeddings at the scale of the patch embeddings (not timm's 0.02): with 0.02 a small model trained
        # from scratch learned colour and shape but stayed blind to where the object is (text "left" == "right").
        nn.init.normal_(model.vision_model.embeddings.position_embedding, std=0.5)
    model.qllama.apply(model.qllama._init_weights)
    std = model.config.initializer_range
    with torch.no_grad():
        for module in (model.clip_projector, model.clip_projector2, model.itm_head):
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.trunc_normal_(sub.weight, std=std)
                    if sub.bias is not None:
                        nn.init.zeros_(sub.bias)
                elif isinstance(sub, nn.LayerNorm):
                    nn.init.ones_(sub.weight)
                    nn.init.zeros_(sub.bias)
            for name, p in module.named_parameters():
                if name.endswith("_bias"):
                    nn.init.zeros_(p)
        nn.init.normal_(model.query_tokens, std=std)
        nn.init.normal_(model.text_projection, std=model.config.hidden_size ** -0.5)
        model.logit_scale.fill_(math.log(1 / 0.07))
    if model.config.tie_word_embeddings:  # what from_pretrained does with a tied checkpoint
        model.qllama.lm_head.weight = model.qllama.model.embed_tokens.weight
    with torch.no_grad():
        for layer in model.vision_model.encoder.layers:
            for name in ("ls1", "ls2"):
                getattr(layer, name).fill_(model.config.vision_config.initializer_factor)
    return model


def load_model(model: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
               seed: int = 0) -> tuple[InternVLModel, Path]:
    """The model to train and the folder its tokenizer files come from.

    `model` is a checkpoint folder (weights loaded, float32) or a `config.json` / folder with only a config
    (random init).  `tokenizer` overrides where the tokenizer is read from (default: the model folder).
    """
    from internvl_fm.loading import resolve_checkpoint
    from internvl_fm.tokenization import InternVLTokenizer, has_tokenizer_files

    path = Path(model)
    if path.is_file() and path.suffix == ".json":
        folder, has_weights = path.parent, False
        config = InternVLConfig.from_dict(json.loads(path.read_text()))
    else:
        folder = resolve_checkpoint(model)
        has_weights = any((folder / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json",
                                                           "pytorch_model.bin", "pytorch_model.bin.index.json"))
        config = InternVLConfig.from_pretrained(folder)
    architectures = config.extra.get("architectures") or ["InternVLModel"]
    if architectures != ["InternVLModel"]:
        raise TrainingError(f"{model} is not an InternVL-C/G checkpoint (architectures {architectures}); "
                            "train-clip needs InternVLModel")
    if has_weights:
        net = InternVLModel.from_pretrained(folder, dtype=torch.float32)
    else:
        net = init_weights(InternVLModel(config), seed=seed)
    tok_dir = Path(tokenizer) if tokenizer is not None else folder
    if not has_tokenizer_files(tok_dir):
        raise TrainingError(f"no tokenizer files (tokenizer.model / tokenizer.json) in {tok_dir}; pass --tokenizer")
    net.tokenizer = InternVLTokenizer.from_pretrained(tok_dir)
    vocab = int(config.qllama_config.get("vocab_size", 0))
    if net.tokenizer.vocab_size > vocab:
        raise TrainingError(f"tokenizer in {tok_dir} has {net.tokenizer.vocab_size} tokens but the model's QLLaMA "
                            f"vocab_size is {vocab}")
    return net.float(), tok_dir


def apply_lora(model: InternVLModel, vision_rank: int = 0, text_rank: int = 0, alpha: float | None = None,
               dropout: float = 0.0) -> list[str]:
    """Inject LoRA adapters (peft) into the vision tower and/or QLLaMA; the base weights of those towers freeze.

    Targets follow the official InternVL training code (attn.proj + mlp.fc1/fc2 in InternViT, see
    VISION_LORA_TARGETS about attn.qkv; q/k/v/o and gate/up/down projections in QLLaMA).  Returns the names of the
    adapted modules.
    """
    if not (vision_rank or text_rank):
        return []
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise TrainingError("LoRA needs the `peft` package: pip install 'internvl-fm[peft]'") from e
    adapted = []
    for rank, pattern, prefix in ((vision_rank, VISION_LORA_TARGETS, "vision_model"),
                                  (text_rank, TEXT_LORA_TARGETS, "qllama")):
        if not rank:
            continue
        sub = model.get_submodule(prefix)
        local = pattern.split(r"\.", 1)[1]  # the regex relative to the sub-module
        config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, target_modules=local)
        inject_adapter_in_model(config, sub)
        adapted += [f"{prefix}.{n}" for n, _ in sub.named_modules() if re.fullmatch(local, n)]
    return adapted


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the official key names, with any LoRA adapter merged into its base weight."""
    layers = _lora_layers(model)
    out = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    for name, layer in layers.items():
        merged = layer.base_layer.weight.detach().clone()
        for adapter in layer.active_adapters:
            merged += layer.get_delta_weight(adapter).to(merged.dtype)
        out[f"{name}.weight"] = merged
    return out


@contextlib.contextmanager
def merged_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Run with every LoRA adapter merged into its base weight, restored bit-exactly afterwards.

    Inference paths that read `.weight` directly (the core's fused CPU kernels) would otherwise skip the adapters.
    """
    layers = _lora_layers(model)
    saved = {name: layer.base_layer.weight.detach().clone() for name, layer in layers.items()}
    for layer in layers.values():
        layer.merge()
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, layer in layers.items():
                layer.unmerge()
                layer.base_layer.weight.copy_(saved[name])


def freeze_parameters(model: InternVLModel, freeze_vision: bool = False, freeze_text: bool = False) -> None:
    """Freeze what InternVL-C training does not update: the G-only parts always, and optionally a whole tower."""
    embed = model.qllama.get_input_embeddings().weight
    patterns = [re.compile(p) for p in C_MODE_UNUSED]
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is embed:
            continue
        if any(pat.search(name) for pat in patterns):
            p.requires_grad_(False)
        elif freeze_vision and name.startswith("vision_model."):
            p.requires_grad_(False)
        elif freeze_text and name.startswith("qllama."):
            p.requires_grad_(False)


class ContrastiveModel(nn.Module):
    """The module DDP wraps: (pixel_values, input_ids) -> (image features, text features), InternVL-C mode."""

    def __init__(self, model: InternVLModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_image(pixel_values, mode="InternVL-C"), self.model.encode_text(input_ids)


# ---------------------------------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first (a checkpoint is complete once its folder is renamed in)."""
    return Checkpoints(output_dir, CHECKPOINT_PREFIX).list()


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder in `output_dir`, or None."""
    return Checkpoints(output_dir, CHECKPOINT_PREFIX).latest()


def save_model(model: InternVLModel, folder: str | os.PathLike, tokenizer_dir: str | os.PathLike | None) -> Path:
    """Write `model` in the official layout (config.json + safetensors, LoRA merged) plus its tokenizer files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    config.extra["torch_dtype"] = "float32"
    config.save_pretrained(folder)
    save_state_dict({k: v.float() for k, v in export_state_dict(model).items()}, folder)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, folder)
    return folder


# ------------------------------------------------------------------------------------------------------- trainer


class ContrastiveTrainer:
    """Runs InternVL-C contrastive training on a dataset folder; resumes from the last checkpoint in output_dir.

    >>> model, tok_dir = load_model("path/to/internvl_c")
    >>> ContrastiveTrainer(model, TrainingArguments("runs/x", max_steps=100), "data/train", tokenizer_dir=tok_dir).train()
    """

    def __init__(self, model: InternVLModel, args: TrainingArguments, train_data: str | os.PathLike,
                 eval_data: str | os.PathLike | None = None, tokenizer_dir: str | os.PathLike | None = None,
                 base_model: str | None = None):
        if model.tokenizer is None:
            raise TrainingError("the model has no tokenizer attached (model.tokenizer is None)")
        self.args = args
        self.model = model
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
        self.base_model = base_model
        self.train_data = Path(train_data)
        self.eval_data = Path(eval_data) if eval_data is not None else None
        self.output_dir = Path(args.output_dir)
        self.dist = init_distributed()
        self.rank, self.world_size, self.device = self.dist.rank, self.dist.world_size, self.dist.device
        self.checkpoints = Checkpoints(self.output_dir, CHECKPOINT_PREFIX, keep=args.save_total_limit)
        self.log = JsonlLog(self.output_dir / LOG_FILE, enabled=self.dist.is_main)
        self.history: list[dict[str, Any]] = []

    # ---------------------------------------------------------------------------------------------- setup
    def _prepare(self) -> None:
        args = self.args
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        torch.manual_seed(args.seed)
        freeze_parameters(self.model, args.freeze_vision, args.freeze_text)
        self.lora_modules = apply_lora(self.model, args.lora_vision_rank, args.lora_text_rank, args.lora_alpha,
                                       args.lora_dropout)
        if args.gradient_checkpointing:
            self.model.vision_model.gradient_checkpointing_enable()
            self.model.qllama.model.gradient_checkpointing = True
        self.model.to(self.device).train()
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not trainable:
            raise TrainingError("no trainable parameters (both towers frozen and no LoRA?)")
        decay = [p for n, p in trainable if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in trainable if not (p.ndim >= 2 and "embed" not in n)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        self.scheduler = build_lr_scheduler(self.optimizer, args.lr_schedule, args.warmup_steps, args.max_steps,
                                            args.min_lr_ratio)
        self.module = self.dist.wrap(ContrastiveModel(self.model))
        self.loss_fn = ClipLoss(label_smoothing=args.label_smoothing)
        self.dataset = ImageTextDataset(self.train_data, self.model.image_size, args.seed, args.match_attributes,
                                        cache_images=args.cache_images, progress=args.progress and self.rank == 0)
        if len(self.dataset) < args.batch_size:
            raise DatasetFormatError(f"{self.train_data} has {len(self.dataset)} records, fewer than batch_size "
                                     f"{args.batch_size}")
        self.eval_set = None
        if self.eval_data is not None and self.rank == 0:
            from .evaluate import load_eval_set

            self.eval_set = load_eval_set(self.eval_data, args.eval_size)

    def _trainable_state(self) -> dict[str, torch.Tensor] | None:
        if not self.lora_modules:
            return None
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    # ---------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, step: int) -> Path | None:
        """Write `checkpoint-{step}` atomically (rank 0): official model files + training state."""
        if self.rank != 0:
            return None

        def write(folder: Path) -> None:
            save_model(self.model, folder, self.tokenizer_dir)
            save_training_state(folder, step, self.optimizer, self.scheduler, trainable=self._trainable_state())
            (folder / TRAINER_STATE).write_text(json.dumps({
                "step": step, "base_model": self.base_model, "train_data": str(self.train_data),
                "world_size": self.world_size, "lora_modules": self.lora_modules,
                "args": dataclasses.asdict(self.args),
                "last_log": self.history[-1] if self.history else None,
            }, indent=2, default=str) + "\n")

        return self.checkpoints.save(step, write)

    def load_checkpoint(self, folder: Path) -> int:
        """Restore model, optimizer, scheduler and RNG from `folder`; returns the step to continue from."""
        from internvl_fm.loading import load_state_dict

        meta = json.loads((folder / TRAINER_STATE).read_text())
        if meta.get("lora_modules", []) != self.lora_modules:
            raise TrainingError(f"{folder} was trained with LoRA modules {meta.get('lora_modules')}, this run has "
                                f"{self.lora_modules}: resume with the same LoRA settings")
        state = load_training_state(folder, self.optimizer, self.scheduler)
        if state["trainable"] is not None:
            # LoRA run: the frozen base comes from --model, the adapters and other trainables from the state.
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, value in state["trainable"].items():
                    params[name].copy_(value)
        else:
            weights = load_state_dict(folder)
            target = self.model.state_dict()
            missing = [k for k in target if k not in weights]
            if missing:
                raise TrainingError(f"{folder} lacks weights {missing[:5]} of the model being trained")
            with torch.no_grad():
                for key, tensor in target.items():
                    tensor.copy_(weights[key])
        return int(state["step"])

    # ---------------------------------------------------------------------------------------------- logging
    def _log(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        self.log.append(entry)

    def evaluate(self) -> dict[str, Any] | None:
        """Recall on the eval set (rank 0; None without an eval set)."""
        if self.eval_set is None:
            return None
        records, images = self.eval_set
        with merged_lora(self.model):
            return evaluate_retrieval(self.model, records, images, ks=(1, 5, 10))

    # ------------------------------------------------------------------------------------------------- loop
    def train(self, resume: bool = True) -> list[dict[str, Any]]:
        """Train until `max_steps`, resuming from the last checkpoint when `resume`; returns the log entries."""
        from tqdm.auto import tqdm

        args = self.args
        self._prepare()
        start = 0
        ckpt = self.checkpoints.latest() if resume else None
        if ckpt is not None:
            start = self.load_checkpoint(ckpt)
        self.history = self.log.resume_at(start)
        sampler = StepBatchSampler(len(self.dataset), args.batch_size, args.seed, args.max_steps, start,
                                   self.rank, self.world_size)
        loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate, num_workers=args.num_workers,
                            persistent_workers=False)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=args.bf16)
        bar = tqdm(total=args.max_steps, initial=start, desc="train-clip", disable=not args.progress or self.rank)
        window: list[float] = []
        t0, samples = time.perf_counter(), 0
        step = start
        for step, batch in enumerate(loader, start=start + 1):
            tokens = self.model.tokenizer(batch["texts"], padding="longest")["input_ids"].to(self.device)
            pixels = batch["pixel_values"].to(self.device)
            with autocast:
                image_features, text_features = self.module(pixels, tokens)
            match_ids = batch["match_ids"].to(self.device) if args.match_attributes else None
            loss = self.loss_fn(image_features.float(), text_features.float(), self.model.logit_scale, match_ids)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                               args.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            clamp_logit_scale_(self.model.logit_scale)
            window.append(float(loss.detach()))
            samples += pixels.shape[0] * self.world_size
            bar.update(1)
            if step % args.logging_steps == 0 or step == args.max_steps:
                elapsed = time.perf_counter() - t0
                entry = {"step": step, "loss": sum(window) / len(window), "lr": self.scheduler.get_last_lr()[0],
                         "logit_scale": float(self.model.logit_scale.detach().exp()), "samples_per_s": samples / elapsed}
                window, samples, t0 = [], 0, time.perf_counter()
                self._log(entry)
                bar.set_postfix(loss=f"{entry['loss']:.3f}")
            if args.eval_steps and (step % args.eval_steps == 0 or step == args.max_steps):
                metrics = self.evaluate()
                if metrics is not None:
                    self._log({"step": step, "eval": metrics})
                    bar.set_postfix(loss=f"{self.history[-2].get('loss', float('nan')):.3f}",
                                    r5=f"{metrics['t2i']['r@5']:.3f}")
            if args.save_steps and step % args.save_steps == 0 and step != args.max_steps:
                self.save_checkpoint(step)
                self.dist.barrier()
        bar.close()
        if step >= args.max_steps and start < args.max_steps:
            self.save_checkpoint(args.max_steps)
        if self.rank == 0:
            save_model(self.model, self.output_dir, self.tokenizer_dir)
        self.dist.barrier()
        return self.history


def train_clip(model: str | os.PathLike, train_data: str | os.PathLike, args: TrainingArguments,
               eval_data: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
               resume: bool = True) -> list[dict[str, Any]]:
    """Load `model` (checkpoint folder or config.json), train it on `train_data`, save into `args.output_dir`.

    Under torchrun the process group is created here and destroyed when training ends.
    """
    with distributed():
        net, tok_dir = load_model(model, tokenizer, seed=args.seed)
        trainer = ContrastiveTrainer(net, args, train_data, eval_data, tokenizer_dir=tok_dir, base_model=str(model))
        return trainer.train(resume=resume)


__all__ = [
    "ContrastiveModel", "ContrastiveTrainer", "ImageTextDataset", "StepBatchSampler", "TrainingArguments",
    "TrainingError", "apply_lora", "checkpoint_dirs", "export_state_dict", "freeze_parameters", "init_weights",
    "last_checkpoint", "load_model", "merged_lora", "save_model", "train_clip",
]
