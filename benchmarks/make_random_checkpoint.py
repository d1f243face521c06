"""Write a random-weight checkpoint in the official on-disk layout at a real model size, tensor by tensor.

The model is built on the meta device (no memory) for its official keys and shapes; each tensor is then filled
from a shared random pool (cheap, so 14B parameters take minutes, not hours) and written into ~2 GB safetensors
shards with a `model.safetensors.index.json`, so memory stays near one shard whatever the model size. Norm weights
are 1, biases 0, layer scales 0.1, `logit_scale` log(1/0.07), everything else ~N(0, 0.02): realistic magnitudes for
memory and speed measurements and int8 quality checks, not a trained model. No tokenizer is written (benchmarks
pass token ids; load with `load_tokenizer=False`).

    python benchmarks/make_random_checkpoint.py --model internvl-14b --output /work/bigckpt/InternVL-14B-224px
    python benchmarks/make_random_checkpoint.py --model internvl2-2b --output /tmp/InternVL2-2B-random

Models (configs from the model cards / hub config.json, see `MODELS`): internvl-14b (InternVL-14B-224px:
InternViT-6B + QLLaMA, for InternVL-C/G and the QLLaMA text encoder), internvit-6b (InternViT-6B-224px alone),
internvit-300m (InternViT-300M-448px), internvl2-2b (the hub config.json of OpenGVLab/InternVL2-2B),
internvl2_5-8b (InternVL2.5-8B: InternViT-300M-448px-V2_5 + internlm2_5-7b-chat).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
INTERNVL2_2B_CONFIG = ROOT / "tests" / "fixtures" / "realconfigs" / "InternVL2-2B" / "config.json"

# InternViT-6B-224px (the vision tower of InternVL-14B-224px): official InternVisionConfig field names
INTERNVIT_6B = dict(num_channels=3, patch_size=14, image_size=224, qkv_bias=False, hidden_size=3200,
                    num_attention_heads=25, intermediate_size=12800, qk_normalization=True, num_hidden_layers=48,
                    use_flash_attn=True, hidden_act="gelu", norm_type="rms_norm", layer_norm_eps=1e-6,
                    dropout=0.0, drop_path_rate=0.0, attention_dropout=0.0, initializer_range=0.02,
                    initializer_factor=0.1)
# QLLaMA of InternVL-14B-224px: LLaMA-7B-like, 49954 tokens (LLaMA's 32000 + Chinese), 96 query tokens
QLLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=11008,
              num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=49954,
              max_position_embeddings=2048, hidden_act="silu", rms_norm_eps=1e-6, initializer_range=0.02,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, rope_theta=10000.0,
              attention_bias=False, num_query_token=96, cross_attention_frequency=2, torch_dtype="bfloat16")
# internlm2_5-7b-chat, the LLM of InternVL2.5-8B (its hub llm_config)
INTERNLM2_5_7B = dict(architectures=["InternLM2ForCausalLM"], model_type="internlm2", hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=92553, max_position_embeddings=32768, hidden_act="silu", rms_norm_eps=1e-5,
                      rope_theta=1000000, rope_scaling={"type": "dynamic", "factor": 2.0}, bias=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
                      initializer_range=0.02, attn_implementation="eager", torch_dtype="bfloat16")


def internvl_14b_config() -> dict[str, Any]:
    return dict(architectures=["InternVLModel"], model_type="internvl", vision_config=dict(INTERNVIT_6B),
                qllama_config=dict(QLLAMA), clip_embed_dim=768, attn_pool_num_heads=16, num_query_token=96,
                cross_attention_frequency=2, label_smoothing=0.0, use_backbone_lora=0, use_qllama_lora=0,
                force_image_size=None, initializer_range=0.02, hidden_size=4096, torch_dtype="bfloat16")


def internvl2_2b_config() -> dict[str, Any]:
    return json.loads(INTERNVL2_2B_CONFIG.read_text())


def internvl2_5_8b_config() -> dict[str, Any]:
    """InternVL2-2B's hub config with InternVL2.5-8B's LLM and template (the vision tower is the same
    InternViT-300M-448px shape)."""
    config = internvl2_2b_config()
    config["llm_config"] = {**{k: v for k, v in config["llm_config"].items() if k not in INTERNLM2_5_7B},
                            **INTERNLM2_5_7B}
    config["template"] = "internvl2_5"
    return config


def internvit_300m_config() -> dict[str, Any]:
    return {**internvl2_2b_config()["vision_config"], "architectures": ["InternVisionModel"]}


MODELS: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
    "internvl-14b": ("InternVLModel", internvl_14b_config),
    "internvit-6b": ("InternVisionModel", lambda: {**INTERNVIT_6B, "architectures": ["InternVisionModel"],
                                                   "model_type": "intern_vit_6b"}),
    "internvit-300m": ("InternVisionModel", internvit_300m_config),
    "internvl2-2b": ("InternVLChatModel", internvl2_2b_config),
    "internvl2_5-8b": ("InternVLChatModel", internvl2_5_8b_config),
}


def official_shapes(model: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config dict and the official-layout state dict of `model` as meta tensors (nothing allocated)."""
    import internvl_fm

    class_name, make_config = MODELS[model]
    config_dict = make_config()
    cls = getattr(internvl_fm, class_name)
    config = cls.config_class.from_dict(copy.deepcopy(config_dict))
    with torch.device("meta"):
        module = cls(config)
    return config_dict, module.checkpoint_state_dict()


class RandomPool:
    """Fills tensors with slices of one shared N(0, 1) pool at random offsets, scaled (memcpy speed)."""

    def __init__(self, size: int = 1 << 26, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(size, generator=self.generator).to(torch.bfloat16)

    def normal(self, shape: torch.Size, dtype: torch.dtype, std: float) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        flat, size = out.view(-1), self.pool.numel()
        done = 0
        while done < flat.numel():
            start = int(torch.randint(0, size // 2, (1,), generator=self.generator))
            n = min(flat.numel() - done, size - start)
            flat[done:done + n].copy_(self.pool[start:start + n])
            done += n
        return out.mul_(std)


def random_tensor(key: str, meta: torch.Tensor, dtype: torch.dtype, pool: RandomPool) -> torch.Tensor:
    name = key.rsplit(".", 1)[-1]
    if not meta.is_floating_point():
        return torch.zeros(meta.shape, dtype=meta.dtype)
    if key.endswith("logit_scale"):
        return torch.full(meta.shape, math.log(1 / 0.07), dtype=dtype)
    if meta.ndim == 1 and name == "weight":  # 1-D weights are norm scales
        return torch.ones(meta.shape, dtype=dtype)
    if name in ("ls1", "ls2"):
        return torch.full(meta.shape, 0.1, dtype=dtype)
    if name == "bias" or name.endswith("_bias"):
        return torch.zeros(meta.shape, dtype=dtype)
    return pool.normal(meta.shape, dtype, 0.02)


def write_checkpoint(model: str, output: Path, dtype: torch.dtype = torch.bfloat16,
                     shard_bytes: int = 2 << 30, log: Callable[[str], None] = print) -> int:
    """Write `model` with random weights to `output`; returns the bytes of weights written."""
    config_dict, shapes = official_shapes(model)
    output.mkdir(parents=True, exist_ok=True)
    total = sum(t.numel() * (t.element_size() if not t.is_floating_point() else dtype.itemsize)
                for t in shapes.values())
    n_shards = max(1, math.ceil(total / shard_bytes))
    pool = RandomPool()
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size, index, start = 0, 1, time.perf_counter()

    def flush() -> None:
        nonlocal shard, size, index
        name = f"model-{index:05d}-of-{n_shards:05d}.safetensors"
        save_file(shard, str(output / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        log(f"  {name}: {len(shard)} tensors, {size / 2**30:.2f} GiB ({time.perf_counter() - start:.0f}s)")
        shard, size, index = {}, 0, index + 1

    for key, meta in shapes.items():
        tensor = random_tensor(key, meta, dtype, pool)
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > shard_bytes and index < n_shards:
            flush()
        shard[key] = tensor
        size += nbytes
    flush()
    n_written = index - 1
    if n_written != n_shards:  # the greedy packing used fewer shards than estimated: rename to "-of-<actual>"
        renamed = {}
        for old in sorted(set(weight_map.values())):
            new = old.replace(f"-of-{n_shards:05d}", f"-of-{n_written:05d}")
            (output / old).rename(output / new)
            renamed[old] = new
        weight_map = {k: renamed[v] for k, v in weight_map.items()}
    (output / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config_dict = {**config_dict, "torch_dtype": str(dtype).removeprefix("torch.")}
    (output / "config.json").write_text(json.dumps(config_dict, indent=2))
    return total


INTERNVIT_300M_SHAPE = dict(hidden_size=1024, num_attention_heads=16, intermediate_size=4096, qkv_bias=True,
                      qk_normalization=False, norm_type="layer_norm", use_flash_attn=False, patch_size=14,
                      layer_norm_eps=1e-6, initializer_factor=0.1)


def random_internvl_model(layers: int, text_layers: int, image_size: int = 224):
    """An InternVL-C/G model with a 300M-shaped ViT and a real-width QLLaMA of `text_layers` layers, random
    weights as make_random_checkpoint.py writes them (float32)."""
    from internvl_fm import InternVisionConfig, InternVLConfig, InternVLModel

    config = InternVLConfig(
        vision_config=InternVisionConfig(**INTERNVIT_300M_SHAPE, num_hidden_layers=layers, image_size=image_size),
        qllama_config={**QLLAMA, "num_hidden_layers": text_layers}, clip_embed_dim=768, attn_pool_num_heads=16,
        num_query_token=96, cross_attention_frequency=2)
    with torch.device("meta"):
        model = InternVLModel(config)
    pool = RandomPool(seed=0)
    state = {key: random_tensor(key, meta, torch.float32, pool) for key, meta in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    model.qllama.lm_head = None  # part of neither tower (captioning only): 0.8 GB less to hold twice
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--shard-gib", type=float, default=2.0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    total = write_checkpoint(args.model, args.output, getattr(torch, args.dtype), int(args.shard_gib * 2**30))
    print(f"make_random_checkpoint: {args.model} -> {args.output}: {total / 2**30:.2f} GiB of {args.dtype} weights "
          f"in {time.perf_counter() - start:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
