"""Key maps between the official InternViT layout and transformers' native `InternVLVisionModel` ("-hf" repos)."""
from __future__ import annotations

import re

import torch

_RENAMES = [  # official -> transformers, applied in order
    (r"^embeddings\.class_embedding$", "embeddings.cls_token"),
    (r"^embeddings\.position_embedding$", "embeddings.position_embeddings"),
    (r"^embeddings\.patch_embedding\.", "embeddings.patch_embeddings.projection."),
    (r"^encoder\.layers\.(\d+)\.ls1$", r"encoder.layer.\1.lambda_1"),
    (r"^encoder\.layers\.(\d+)\.ls2$", r"encoder.layer.\1.lambda_2"),
    (r"^encoder\.layers\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.projection_layer."),
    (r"^encoder\.layers\.(\d+)\.attn\.q_norm\.", r"encoder.layer.\1.attention.q_norm."),
    (r"^encoder\.layers\.(\d+)\.attn\.k_norm\.", r"encoder.layer.\1.attention.k_norm."),
    (r"^encoder\.layers\.(\d+)\.norm1\.", r"encoder.layer.\1.layernorm_before."),
    (r"^encoder\.layers\.(\d+)\.norm2\.", r"encoder.layer.\1.layernorm_after."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"encoder.layer.\1.mlp."),
]
_QKV = re.compile(r"^encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")


def vision_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official InternViT keys -> transformers `InternVLVisionModel` keys (fused qkv split into q/k/v)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = _QKV.match(key)
        if match:
            layer, kind = match.groups()
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"encoder.layer.{layer}.attention.{name}.{kind}"] = part
            continue
        for pattern, repl in _RENAMES:
            if re.search(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        out[key] = value
    return out


def vision_from_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers `InternVLVisionModel` keys -> official InternViT keys (q/k/v fused back into qkv)."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        match = re.match(r"^encoder\.layer\.(\d+)\.attention\.(q_proj|k_proj|v_proj)\.(weight|bias)$", key)
        if match:
            layer, name, kind = match.groups()
            pending.setdefault((layer, kind), {})[name] = value
            continue
        for pattern, repl in _RENAMES:
            target = repl.replace(r"\1", "{}")
            regex = "^" + re.escape(target).replace(r"\{\}", r"(\d+)")
            found = re.match(regex, key)
            if found:
                original = pattern.strip("^$").replace(r"\.", ".").replace(r"(\d+)", "{}").format(*found.groups())
                key = original + key[found.end():]
                break
        out[key] = value
    for (layer, kind), parts in pending.items():
        out[f"encoder.layers.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out
