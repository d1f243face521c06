"""InternViT forward images/s vs transformers' native InternVLVisionModel with the same weights, same process.

300M-shaped config (1024 wide, 24 layers, 16 heads, LayerNorm, qkv bias) at 224 px, batch 4, CPU fp32 and bf16
weights, each side in its fastest attention setting. Prints achieved GFLOP/s as a fraction of a same-run GEMM peak.
Headline: the bf16 ratio.   python benchmarks/bench_vision.py [--repeats 3] [--layers 24]
"""
from __future__ import annotations

import argparse

import torch
from transformers import InternVLVisionConfig, InternVLVisionModel

from common import gemm_peak_gflops, interleaved_best
from internvl_fm import InternVisionConfig, InternVisionModel
from internvl_fm.convert import vision_to_transformers


def flops_per_image(cfg: InternVisionConfig, image_size: int) -> float:
    tokens = (image_size // cfg.patch_size) ** 2 + 1
    d, inter = cfg.hidden_size, cfg.intermediate_size
    per_layer = 2 * tokens * (4 * d * d + 2 * d * inter) + 4 * tokens * tokens * d
    return per_layer * cfg.num_hidden_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = InternVisionConfig(hidden_size=1024, num_attention_heads=16, intermediate_size=4096,
                             num_hidden_layers=args.layers, image_size=args.image_size, qkv_bias=True,
                             qk_normalization=False, norm_type="layer_norm", use_flash_attn=False)
    ours = InternVisionModel(cfg).init_weights().eval()
    hf_cfg = InternVLVisionConfig(hidden_size=1024, num_attention_heads=16, intermediate_size=4096,
                                  num_hidden_layers=args.layers, image_size=args.image_size, patch_size=14,
                                  attention_bias=True, use_qk_norm=False, norm_type="layer_norm", layer_norm_eps=1e-6)
    theirs = InternVLVisionModel(hf_cfg).eval()
    theirs.load_state_dict(vision_to_transformers(ours.state_dict()), strict=True)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    with torch.inference_mode():
        diff = (ours(x).last_hidden_state - theirs(x).last_hidden_state).abs().max().item()
    print(f"same weights: max |ours - transformers| = {diff:.2e} (fp32)")
    gflop = flops_per_image(cfg, args.image_size) / 1e9
    print(f"{gflop:.1f} GFLOP per image, batch {args.batch}, {args.image_size} px, {torch.get_num_threads()} threads")

    ratios = {}
    for dtype in (torch.float32, torch.bfloat16):
        ours.to(dtype)
        theirs.to(dtype)
        xd = x.to(dtype)
        peak = gemm_peak_gflops(dtype)
        fns = {}
        for impl in ("sdpa", "eager"):
            fns[("internvl-fm", impl)] = (lambda impl=impl: (ours.set_attn_implementation(impl), ours(xd)))
            fns[("transformers", impl)] = (lambda impl=impl: (theirs.set_attn_implementation(impl), theirs(xd)))
        results = interleaved_best(fns, args.repeats)
        best = {}
        for (side, impl), secs in sorted(results.items()):
            ips = args.batch / secs
            frac = ips * gflop / peak
            print(f"{str(dtype).removeprefix('torch.'):9s} {side:13s} {impl:6s} {ips:6.2f} img/s "
                  f"{ips * gflop:7.1f} GFLOP/s = {frac:.2f} of GEMM peak ({peak:.0f})")
            best[side] = max(best.get(side, 0.0), ips)
        ratios[dtype] = best["internvl-fm"] / best["transformers"]
        print(f"{str(dtype).removeprefix('torch.')}: {ratios[dtype]:.2f}x")
    print(f"bench_vision: {ratios[torch.bfloat16]:.2f}x bf16 InternViT-300M images/s vs transformers InternVLVisionModel")


if __name__ == "__main__":
    main()
