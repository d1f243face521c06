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
