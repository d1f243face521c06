"""The shared training runtime: resumable sampler, transformers schedules, atomic checkpoints, JSONL log, DDP set-up."""
from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from internvl_fm.training.runtime import (TRAINING_STATE, Checkpoints, JsonlLog, ResumableSampler, build_lr_scheduler,
                                          init_distributed, load_training_state, save_training_state)

# ------------------------------------------------------------------------------------------------------ sampler


def _steps(sampler: ResumableSampler) -> list[list[tuple[int, int]]]:
    return [sampler.batch(step) for step in sampler.steps()]


def test_sampler_resume_loses_and_repeats_no_sample():
    n, batch, steps = 7, 3, 10  # 30 positions: epochs end mid-batch
    full = list(ResumableSampler(n, batch, seed=4, max_steps=steps))
    first = list(ResumableSampler(n, batch, seed=4, max_steps=6))  # interrupted after step 6 ...
    rest = list(ResumableSampler(n, batch, seed=4, start_step=6, max_steps=steps))  # ... and resumed there
    assert first + rest == full
    assert [p for _, p in full] == list(range(steps * batch))  # every position once, in order
    for epoch in range(len(full) // n):  # each complete epoch is a permutation of the dataset
        assert sorted(i for i, _ in full[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert [i for i, _ in full[:n]] != [i for i, _ in full[n:2 * n]]  # a new order every epoch
    assert len(ResumableSampler(n, batch, start_step=6, max_steps=steps)) == 12


def test_sampler_ranks_split_the_global_batch_without_overlap():
    single = _steps(ResumableSampler(10, 6, seed=1, max_steps=5))
    ranks = [_steps(ResumableSampler(10, 2, seed=1, rank=r, world_size=3, max_steps=5)) for r in range(3)]
    for step in range(5):
        assert ranks[0][step] + ranks[1][step] + ranks[2][step] == single[step]
    resumed = [_steps(ResumableSampler(10, 2, seed=1, rank=r, world_size=3, start_step=2, max_steps=5))
               for r in range(3)]
    assert all(resumed[r] == ranks[r][2:] for r in range(3))


class Keys(Dataset):
    """Returns the key it is indexed with."""

    def __getitem__(self, key):
        return key


def test_sampler_drives_a_dataloader_endlessly_and_in_order():
    keys = DataLoader(Keys(), batch_size=4, sampler=ResumableSampler(9, 4, seed=2), collate_fn=lambda items: items)
    sampler = ResumableSampler(9, 4, seed=2)
    assert list(itertools.islice(keys, 8)) == [sampler.batch(s) for s in range(8)]  # 32 samples: 3.5 epochs
    with pytest.raises(TypeError, match="endless"):
        len(sampler)
    assert [i for i, _ in ResumableSampler(4, 2, shuffle=False, max_steps=3)] == [0, 1, 2, 3, 0, 1]
    assert ResumableSampler(50, 5, seed=0).permutation(0) != ResumableSampler(50, 5, seed=1).permutation(0)


# ---------------------------------------------------------------------------------------------------- schedules


def _lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def _optimizer(lr: float = 0.5) -> torch.optim.Optimizer:
    return torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=lr)


@pytest.mark.parametrize("schedule, min_lr_ratio, reference", [
    ("cosine", 0.0, lambda opt: __import__("transformers").get_cosine_schedule_with_warmup(opt, 4, 20)),
    ("cosine", 0.1, lambda opt: __import__("transformers").get_cosine_with_min_lr_schedule_with_warmup(
        opt, 4, 20, min_lr_rate=0.1)),
    ("constant", 0.0, lambda opt: __import__("transformers").get_constant_schedule_with_warmup(opt, 4)),
    ("linear", 0.0, lambda opt: __import__("transformers").get_linear_schedule_with_warmup(opt, 4, 20)),
])
def test_schedules_are_the_transformers_ones(schedule, min_lr_ratio, reference):
    ours = _lrs(build_lr_scheduler(_optimizer(), schedule, 4, 20, min_lr_ratio), 21)
    assert ours == _lrs(reference(_optimizer()), 21)
    assert ours[0] == 0.0 and ours[4] == 0.5  # warm-up from 0 to the peak at step `warmup_steps`
    assert ours[20] == pytest.approx({"cosine": 0.5 * min_lr_ratio, "constant": 0.5, "linear": 0.0}[schedule])


def test_schedule_resumes_from_its_state_and_refuses_a_floor_it_cannot_apply():
    first = build_lr_scheduler(_optimizer(), "cosine", 3, 12, min_lr_ratio=0.2)
    head = _lrs(first, 5)
    resumed = build_lr_scheduler(_optimizer(), "cosine", 3, 12, min_lr_ratio=0.2)
    resumed.load_state_dict(first.state_dict())
    assert head + _lrs(resumed, 7) == _lrs(build_lr_scheduler(_optimizer(), "cosine", 3, 12, min_lr_ratio=0.2), 12)
    with pytest.raises(ValueError, match="cosine schedule only"):
        build_lr_scheduler(_optimizer(), "constant", 3, 12, min_lr_ratio=0.2)


# -------------------------------------------------------------------------------------------------- checkpoints


def _trainable() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, optimizer, build_lr_scheduler(optimizer, "constant", 0, 10)


def _save(checkpoints: Checkpoints, step: int, model: nn.Module, optimizer, scheduler, fail: bool = False):
    def write(folder):
        torch.save(model.state_dict(), folder / "weights.pt")
        save_training_state(folder, step, optimizer, scheduler, note=f"step {step}")
        if fail:
            raise KeyboardInterrupt  # killed mid-save, after some files were written

    return checkpoints.save(step, write)


def test_crash_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = build_lr_scheduler(optimizer, "cosine", 1, 10)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    checkpoints = Checkpoints(tmp_path / "run", "step_", width=4)
    first = _save(checkpoints, 1, model, optimizer, scheduler)
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected_rand = torch.rand(3)  # the RNG state was saved before this draw
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        _save(checkpoints, 2, model, optimizer, scheduler, fail=True)
    with pytest.raises(KeyboardInterrupt):  # a crash while re-writing the same step keeps the old one too
        _save(checkpoints, 1, model, optimizer, scheduler, fail=True)
    assert checkpoints.list() == [first] and checkpoints.latest().name == "step_0001"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["step_0001"]  # no half-written folder left

    fresh = nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh_sched = build_lr_scheduler(fresh_opt, "cosine", 1, 10)
    fresh.load_state_dict(torch.load(first / "weights.pt", weights_only=True))
    state = load_training_state(first, fresh_opt, fresh_sched)
    assert state["step"] == 1 and state["note"] == "step 1"
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved_weights.items())
    assert fresh_sched.state_dict()["last_epoch"] == 1 and fresh_opt.state_dict()["state"][0]["step"] == 1
    assert torch.equal(torch.rand(3), expected_rand)  # RNG restored


def test_checkpoints_keep_the_newest_and_ignore_incomplete_folders(tmp_path):
    model, optimizer, scheduler = _trainable()
    checkpoints = Checkpoints(tmp_path, "checkpoint-", keep=2)
    for step in (5, 10, 15):
        _save(checkpoints, step, model, optimizer, scheduler)
    (tmp_path / "checkpoint-20").mkdir()  # no training_state.pt: not a checkpoint
    (tmp_path / ".checkpoint-25.abc.tmp").mkdir()  # a temp folder a killed process left behind
    torch.save({}, tmp_path / ".checkpoint-25.abc.tmp" / TRAINING_STATE)
    assert [p.name for p in checkpoints.list()] == ["checkpoint-10", "checkpoint-15"]
    with pytest.raises(RuntimeError, match=TRAINING_STATE):
        checkpoints.save(30, lambda folder: None)
    assert checkpoints.latest().name == "checkpoint-15"


def test_training_state_round_trips_python_and_torch_rng(tmp_path):
    _, optimizer, scheduler = _trainable()
    random.seed(3)
    save_training_state(tmp_path, 7, optimizer, scheduler)
    expected = (random.random(), torch.randn(2))
    random.seed(99)
    torch.manual_seed(99)
    assert load_training_state(tmp_path, optimizer, scheduler)["step"] == 7
    got = (random.random(), torch.randn(2))
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])


# ------------------------------------------------------------------------------------------------------------ log


def test_jsonl_log_is_cut_back_to_the_resumed_step(tmp_path):
    log = JsonlLog(tmp_path / "run" / "log.jsonl")
    for step in range(1, 7):
        log.append({"step": step, "loss": 1.0 / step})
    log.append({"step": 6, "eval": {"r@1": 0.5}})
    kept = log.resume_at(4)
    assert [r["step"] for r in kept] == [1, 2, 3, 4] and kept == log.read()
    log.append({"step": 5, "loss": 0.1})  # the resumed run goes on from there
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]
    assert log.resume_at(0) == [] and not log.path.exists()  # a fresh start drops the old log


def test_jsonl_log_of_other_ranks_writes_and_cuts_nothing(tmp_path):
    main = JsonlLog(tmp_path / "log.jsonl")
    main.append({"step": 3})
    other = JsonlLog(tmp_path / "log.jsonl", enabled=False)
    other.append({"step": 9})
    assert other.resume_at(0) == [] and main.read() == [{"step": 3}]


# ---------------------------------------------------------------------------------------------------- distributed


def test_single_process_needs_no_process_group(monkeypatch):
    import torch.distributed as dist

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    state = init_distributed("cpu")
    assert (state.rank, state.world_size, state.device, state.owns_process_group) == (0, 1, torch.device("cpu"),
                                                                                      False)
    module = nn.Linear(2, 2)
    assert state.wrap(module) is module and state.is_main and not dist.is_initialized()
    state.barrier()
    state.teardown()


@pytest.mark.slow
def test_torchrun_processes_init_and_tear_down_a_gloo_group(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(
        "import json, sys, torch, torch.distributed as dist\n"
        "from internvl_fm.training.runtime import distributed\n"
        "with distributed('cpu') as state:\n"
        "    x = torch.tensor([state.rank + 1.0])\n"
        "    dist.all_reduce(x)\n"
        "    wrapped = type(state.wrap(torch.nn.Linear(2, 2))).__name__\n"
        "    info = dict(rank=state.rank, world=state.world_size, owns=state.owns_process_group, sum=x.item(),\n"
        "                backend=dist.get_backend(), wrapped=wrapped)\n"
        "info['after'] = dist.is_initialized()\n"
        "open(f'{sys.argv[1]}/rank{info[\"rank\"]}.json', 'w').write(json.dumps(info))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one file per rank: two processes printing to one pipe can interleave their lines
    infos = sorted((json.loads(f.read_text()) for f in tmp_path.glob("rank*.json")), key=lambda i: i["rank"])
    assert [i["rank"] for i in infos] == [0, 1]
    assert all(i["world"] == 2 and i["owns"] and i["sum"] == 3.0 and i["backend"] == "gloo" for i in infos)
    assert all(i["wrapped"] == "DistributedDataParallel" and i["after"] is False for i in infos)
