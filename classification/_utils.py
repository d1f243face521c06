"""Small shared helpers: safetensors files written atomically, model fingerprints, batching of inputs."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from internvl_fm.loading import atomic_write


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, Any]) -> Path:
    """Save tensors to a safetensors file atomically; `metadata` values are stored JSON-encoded."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: json.dumps(v, ensure_ascii=False) for k, v in metadata.items()}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of `save_tensors`: (tensors, decoded metadata)."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        raw = f.metadata() or {}
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            tensors[key] = f.get_tensor(key)
    return tensors, {k: json.loads(v) for k, v in raw.items()}


def module_fingerprint(module: nn.Module, *, max_tensors: int = 4, max_numel: int = 1 << 22) -> str:
    """A short hash identifying a module's weights: parameter names and shapes plus the bytes of a few tensors.

    Cheap even for 14B models (hashes at most `max_tensors` tensors of at most `max_numel` elements, spread over
    the state dict) and different for any two differently initialised or fine-tuned models in practice.
    """
    h = hashlib.sha256()
    state = module.state_dict()
    names = sorted(state)
    for name in names:
        h.update(f"{name}:{tuple(state[name].shape)}:{state[name].dtype};".encode())
    small = [n for n in names if state[n].is_floating_point() and 0 < state[n].numel() <= max_numel]
    if small:
        step = max(1, len(small) // max_tensors)
        for name in small[::step][:max_tensors]:
            h.update(state[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def hash_json(obj: Any) -> str:
    """sha256 (16 hex digits) of a JSON-serialisable object, key order independent."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of a module's first floating parameter (cpu / float32 when it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32
