"""Segmentation heads on a frozen 300M-shaped InternViT: training steps/s and peak memory (linear vs UperNet), and
UperNet parity / speed against transformers' `UperNetHead` with the same weights.

Backbone: 1024 wide, 24 layers, 16 heads, LayerNorm, qkv bias (InternViT-300M shape), random weights, frozen in
bf16 (the official recipe). Heads in float32. Each training configuration runs in its own process so its peak
memory is its own (peak RSS on CPU, `max_memory_allocated` on CUDA). Defaults keep the run short on a 2-core CPU
(crop 112, batch 2, 1 timed step after 1 warm-up); the official setting is `--crop 504 --channels 1536` on a GPU.
Headline: UperNet head forward throughput vs transformers.

    python benchmarks/bench_seg.py [--crop 112] [--batch 2] [--steps 1] [--layers 24] [--channels 512]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from common import best_time
from internvl_fm.models.configuration_intern_vit import InternVisionConfig
from internvl_fm.models.modeling_intern_vit import InternVisionModel
from internvl_fm.segmentation import SegmentationConfig, SegmentationModel, UperNetHead, convert_hf_upernet_state_dict

NUM_CLASSES = 150


def build(head: str, args: argparse.Namespace, device: torch.device) -> SegmentationModel:
    vision = InternVisionConfig(hidden_size=1024, num_attention_heads=16, intermediate_size=4096,
                                num_hidden_layers=args.layers, image_size=args.crop, patch_size=14, qkv_bias=True,
                                qk_normalization=False, norm_type="layer_norm", use_flash_attn=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build the frozen ViT directly in bf16 (no fp32 copy in the peak)
    try:
        vit = InternVisionModel(vision)
    finally:
        torch.set_default_dtype(default)
    quarter = [args.layers // 4 * i - 1 for i in range(1, 5)]
    config = SegmentationConfig(num_classes=NUM_CLASSES, head=head, crop_size=args.crop, bf16=True,
                                out_indices=quarter if head == "upernet" else [args.layers - 4],
                                with_pyramid=head == "upernet", channels=args.channels, aux_channels=args.channels,
                                aux_in_index=1, dropout_ratio=0.0 if head == "linear" else 0.1)
    return SegmentationModel(config, vit=vit).to(device)


def train_speed(head: str, args: argparse.Namespace) -> dict:
    """Steps/s of `head` (frozen backbone) and the process' peak memory; run in a child process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build(head, args, device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    pixels = torch.randn(args.batch, 3, args.crop, args.crop, device=device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch, args.crop, args.crop), device=device)

    def step() -> float:
        loss = model(pixels, labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss)

    step()  # warm-up (allocations, AdamW state)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"head": head, "steps_per_s": args.steps / elapsed, "images_per_s": args.steps * args.batch / elapsed,
            "peak_mib": peak / 2**20, "memory": "cuda max allocated" if device.type == "cuda" else "peak RSS",
            "trainable_params_m": sum(p.numel() for p in trainable) / 1e6, "device": device.type}


def upernet_parity(args: argparse.Namespace) -> tuple[float, float, float]:
    """(max |ours - transformers|, our forward s, transformers forward s) on pyramid-shaped 1024-wide maps."""
    from transformers import UperNetConfig
    from transformers.models.upernet.modeling_upernet import UperNetHead as HFUperNetHead

    torch.manual_seed(0)
    in_channels = [1024] * 4
    hf = HFUperNetHead(UperNetConfig(hidden_size=args.channels, num_labels=NUM_CLASSES, pool_scales=[1, 2, 3, 6]),
                       in_channels=in_channels).eval()
    with torch.no_grad():
        for module in hf.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    ours = UperNetHead(in_channels, args.channels, NUM_CLASSES).eval()
    ours.load_state_dict(convert_hf_upernet_state_dict(hf.state_dict()), strict=True)
    grid = args.crop // 14
    features = [torch.randn(args.batch, 1024, int(grid * s), int(grid * s)) for s in (4, 2, 1, 0.5)]
    with torch.inference_mode():  # also the warm-up of both
        diff = (ours(features) - hf(features)).abs().max().item()
    times: dict[str, float] = {"ours": float("inf"), "hf": float("inf")}
    heads = {"ours": ours, "hf": hf}
    for i in range(args.repeats):  # interleaved, alternating order: load from other processes hits both alike
        for name in ("ours", "hf") if i % 2 == 0 else ("hf", "ours"):
            times[name] = min(times[name], best_time(lambda head=heads[name]: head(features), repeats=1, warmup=0))
    return diff, times["ours"], times["hf"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", type=int, default=112, help="training crop (multiple of 14; official 504)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1, help="timed training steps per head (after 1 warm-up)")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--channels", type=int, default=512, help="UperNet channels (official 6B recipe: 1536)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of the head parity forward")
    parser.add_argument("--child", choices=("linear", "upernet"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(train_speed(args.child, args)))
        return

    print(f"frozen bf16 InternViT 1024x{args.layers}, crop {args.crop}, batch {args.batch}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads")
    for head in ("linear", "upernet"):
        cmd = [sys.executable, __file__, "--child", head] + [f"--{k}={v}" for k, v in
                                                             (("crop", args.crop), ("batch", args.batch),
                                                              ("steps", args.steps), ("layers", args.layers),
                                                              ("channels", args.channels))]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"  {head:8s} train: {r['steps_per_s']:.3f} steps/s ({r['images_per_s']:.2f} img/s), "
              f"{r['memory']} {r['peak_mib']:.0f} MiB, {r['trainable_params_m']:.1f}M trainable ({r['device']})")
    diff, t_ours, t_hf = upernet_parity(args)
    print(f"  UperNet head vs transformers UperNetHead, same weights: max |diff| = {diff:.2e}; forward "
          f"{t_ours * 1e3:.0f} ms vs {t_hf * 1e3:.0f} ms (batch {args.batch}, fp32)")
    print(f"bench_seg: {t_hf / t_ours:.2f}x UperNet head forward throughput vs transformers UperNetHead")


if __name__ == "__main__":
    main()
