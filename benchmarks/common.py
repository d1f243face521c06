"""Helpers shared by the benchmark scripts (timing, GEMM peak)."""
from __future__ import annotations

import time
from typing import Callable

import torch


def best_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Best wall time of `repeats` calls after `warmup` calls (no autograd)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return min(times)


def interleaved_best(fns: dict, repeats: int = 3, warmup: int = 1) -> dict:
    """Best wall time of each callable, measured in interleaved rounds (one call of each per round), so that a
    machine whose speed drifts (shared or virtual CPUs) penalises every contestant alike."""
    best = {name: float("inf") for name in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def gemm_peak_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Achieved GFLOP/s of an n x n x n GEMM in `dtype` on this machine, now: the better of torch.matmul (MKL /
    oneDNN as torch dispatches it) and oneDNN's linear kernel (on AMD CPUs MKL's fp32 path is far from peak)."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    kernels = [lambda: a @ b]
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        kernels.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    return max(2 * n**3 / best_time(k, repeats=repeats, warmup=2) / 1e9 for k in kernels)
