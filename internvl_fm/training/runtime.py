"""The training runtime shared by contrastive training, segmentation training and the linear probe.

- `distributed()` / `init_distributed()`: torch.distributed from the torchrun environment (nccl on CUDA, gloo on
  CPU), the device of this process, DDP wrapping, barrier and teardown;
- `ResumableSampler`: batches that are a pure function of (seed, step), so a resumed run replays nothing and skips
  nothing, on any number of ranks and data-loader workers;
- `build_lr_scheduler`: transformers' warm-up schedules (`transformers.get_scheduler`);
- `Checkpoints` and `save_training_state` / `load_training_state`: numbered checkpoint folders written atomically
  (`internvl_fm.loading.atomic_directory`), with optimizer, scheduler and RNG state for an exact resume;
- `JsonlLog`: the `log.jsonl` writer, cut back to the resumed step when a run continues.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Sampler

from internvl_fm.loading import atomic_directory, atomic_write

TRAINING_STATE = "training_state.pt"

__all__ = [
    "TRAINING_STATE", "Checkpoints", "DistributedState", "JsonlLog", "ResumableSampler", "build_lr_scheduler",
    "distributed", "init_distributed", "load_training_state", "rng_state", "save_training_state", "set_rng_state",
]


# --------------------------------------------------------------------------------------------------- distributed


@dataclasses.dataclass(frozen=True)
class DistributedState:
    """Rank, world size and device of this process; `owns_process_group` when `init_distributed` created it."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: nn.Module) -> nn.Module:
        """`module` in DistributedDataParallel when there is more than one process, else unchanged."""
        if self.world_size == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def teardown(self) -> None:
        """Destroy the process group if `init_distributed` created it."""
        import torch.distributed as dist

        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str | torch.device | None = "auto") -> DistributedState:
    """The state of this process; initialises the process group when launched by torchrun (`WORLD_SIZE` > 1).

    `device` "auto" is CUDA when available; a CUDA process uses GPU `LOCAL_RANK`. The backend is nccl on CUDA and
    gloo on the CPU. A process group that already exists is used as it is (and not torn down by `teardown`).
    """
    import torch.distributed as dist

    from internvl_fm.cli_utils import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(resolve_device(device if device is None else str(device)))
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    owns = world > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistributedState(rank=rank, world_size=world, device=dev, owns_process_group=owns)


@contextlib.contextmanager
def distributed(device: str | torch.device | None = "auto") -> Iterator[DistributedState]:
    """`init_distributed(device)` for the length of the block; the process group it created is destroyed after."""
    state = init_distributed(device)
    try:
        yield state
    finally:
        state.teardown()


# ------------------------------------------------------------------------------------------------------ sampler


class ResumableSampler(Sampler):
    """Deterministic stream of `(index, position)` keys for step-based training.

    The sample at global stream position `p` is `permutation(p // N)[p % N]`, the permutation of epoch `e` drawn
    from (seed, e). Rank `r` of `world_size` reads positions `(step * world_size + r) * batch_size ...` of each
    step, so ranks never overlap and together read what one process with the global batch would. Starting at
    `start_step` replays nothing and skips nothing. The stream ends before `max_steps` (None: endless); the
    position seeds per-visit randomness (augmentation, caption choice) in the dataset.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, max_steps: int | None = None, shuffle: bool = True):
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.start_step, self.max_steps, self.shuffle = start_step, max_steps, shuffle
        self._order: tuple[int, list[int]] | None = None

    def permutation(self, epoch: int) -> list[int]:
        """The sample order of `epoch` (the last one is cached)."""
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(self.num_samples, generator=gen).tolist()
            else:
                order = list(range(self.num_samples))
            self._order = (epoch, order)
        return self._order[1]

    def batch(self, step: int) -> list[tuple[int, int]]:
        """This rank's `(index, position)` keys at `step`."""
        first = (step * self.world_size + self.rank) * self.batch_size
        return [(self.permutation(p // self.num_samples)[p % self.num_samples], p)
                for p in range(first, first + self.batch_size)]

    def steps(self) -> Iterator[int]:
        step = self.start_step
        while self.max_steps is None or step < self.max_steps:
            yield step
            step += 1

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for step in self.steps():
            yield from self.batch(step)

    def __len__(self) -> int:
        if self.max_steps is None:
            raise TypeError("an endless ResumableSampler (max_steps=None) has no length")
        return max(0, self.max_steps - self.start_step) * self.batch_size


# ---------------------------------------------------------------------------------------------------- schedules


def build_lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int,
                       min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' schedule (`transformers.get_scheduler`): linear warm-up from 0 to the optimizer's lr over
    `warmup_steps`, then `schedule` until `total_steps`.

    `schedule` is a `transformers.SchedulerType` name; "cosine" ends at `min_lr_ratio` x the peak lr
    (`get_cosine_with_min_lr_schedule_with_warmup`), "constant" keeps the warm-up
    (`get_constant_schedule_with_warmup`).
    """
    from transformers import get_scheduler

    kwargs: dict[str, Any] = {}
    if schedule == "cosine" and min_lr_ratio:
        schedule, kwargs = "cosine_with_min_lr", {"min_lr_rate": min_lr_ratio}
    elif min_lr_ratio:
        raise ValueError(f"min_lr_ratio applies to the cosine schedule only, not {schedule!r}")
    elif schedule == "constant":
        schedule = "constant_with_warmup"
    return get_scheduler(schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         scheduler_specific_kwargs=kwargs)


# -------------------------------------------------------------------------------------------------- checkpoints


def rng_state() -> dict[str, Any]:
    """The torch, Python and (when in use) CUDA random states."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": cuda}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(folder: str | os.PathLike, step: int, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler, **extra: Any) -> Path:
    """Write `folder/training_state.pt`: step, optimizer, scheduler, RNG state and `extra` (tensors, plain data)."""
    path = Path(folder) / TRAINING_STATE
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state(), **extra}, path)
    return path


def load_training_state(folder: str | os.PathLike, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG state from `folder/training_state.pt` (read with `weights_only=True`);
    returns the whole state (`state["step"]` and the `extra` entries)."""
    state = torch.load(Path(folder) / TRAINING_STATE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


class Checkpoints:
    """Numbered checkpoint folders `root/{prefix}{step}` (step zero-padded to `width` digits).

    Each one is built in a temporary folder and renamed into place, so a folder that holds `training_state.pt` is
    complete and a crash mid-save leaves the previous checkpoints as they were. Beyond `keep` (None or 0: all) the
    oldest are removed after each save.
    """

    def __init__(self, root: str | os.PathLike, prefix: str = "checkpoint-", width: int = 0, keep: int | None = None):
        self.root, self.prefix, self.width, self.keep = Path(root), prefix, width, keep

    def path(self, step: int) -> Path:
        return self.root / f"{self.prefix}{step:0{self.width}d}"

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        pattern = re.compile(re.escape(self.prefix) + r"(\d+)")
        found = [(int(m.group(1)), p) for p in self.root.iterdir()
                 if (m := pattern.fullmatch(p.name)) and (p / TRAINING_STATE).is_file()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = self.list()
        return found[-1] if found else None

    def save(self, step: int, write: Callable[[Path], Any]) -> Path:
        """`write(folder)` fills the checkpoint of `step` (it must write `training_state.pt`); then old ones go."""
        target = self.path(step)
        with atomic_directory(target) as tmp:
            write(tmp)
            if not (tmp / TRAINING_STATE).is_file():
                raise RuntimeError(f"checkpoint writer did not write {TRAINING_STATE}")
        if self.keep:
            for old in self.list()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        return target


# ---------------------------------------------------------------------------------------------------------- log


class JsonlLog:
    """`log.jsonl`: one JSON object per line, appended by the main process only (`enabled`)."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def append(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def resume_at(self, step: int) -> list[dict[str, Any]]:
        """Drop the records of steps after `step` (written by the interrupted run now resumed; all of them when
        `step` is 0, a fresh start) and return the records kept."""
        if not self.enabled:
            return []
        if step == 0:
            self.path.unlink(missing_ok=True)
            return []
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        with atomic_write(self.path) as tmp:
            Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        return kept
