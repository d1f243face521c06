"""onnxruntime (CPU, float32) vs internvl-fm's PyTorch CPU path (float32 and bfloat16) for the exported towers.

Vision: the InternVL-C image tower (InternViT-300M shape: 1024 wide, 24 layers, 16 heads, LayerNorm, qkv bias;
224 px; + attention pooling to 768) -> images/s. Text: the QLLaMA text tower at its real width (4096, 32 heads,
MLP 11008, vocab 49954) with `--text-layers` of its 32 layers (time per layer is what matters; the full depth does
not fit next to onnxruntime's copy on a small machine), EOS pooling + projection, 32-token captions -> texts/s.
Random weights (benchmarks/make_random_checkpoint.py's scheme); the towers are exported with
internvl_fm.onnx_export into a temporary folder. PyTorch runs its own CPU path (fused oneDNN kernels in inference);
onnxruntime gets the same number of threads. The three contestants (PyTorch float32, PyTorch bfloat16,
onnxruntime float32) run in interleaved rounds, one call each, so a shared machine's drift hits them alike; each
cell is the best of `--repeats` rounds.
Headline: onnxruntime vs our bf16 path, vision tower, batch 8.

    python benchmarks/bench_onnx.py [--repeats 3] [--layers 24] [--text-layers 2] [--batches 1 8]
"""
from __future__ import annotations

import argparse
import copy
import gc
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import interleaved_best
from make_random_checkpoint import random_internvl_model
from internvl_fm import InternVLModel
from internvl_fm.onnx_export import INPUT_NAMES, example_input, export_onnx, onnx_session, read_onnx_config

def encode(model: InternVLModel, tower: str, x: torch.Tensor) -> torch.Tensor:
    """The tower's raw embedding through our PyTorch path (pixels cast to the model's dtype)."""
    if tower == "vision":
        return model.encode_image(x.to(model.dtype))
    return model.encode_text(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24, help="ViT layers (InternViT-300M: 24)")
    parser.add_argument("--text-layers", type=int, default=2, help="QLLaMA layers (the real model: 32)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--text-length", type=int, default=32, help="tokens per caption (BOS ... EOS)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--towers", nargs="+", default=["vision", "text"], choices=["vision", "text"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    model = random_internvl_model(args.layers, args.text_layers, args.image_size)
    what = {"vision": f"InternViT-300M-shape ({args.layers} layers, {args.image_size} px) InternVL-C image tower",
            "text": f"QLLaMA-width text tower ({args.text_layers} of 32 layers, {args.text_length} tokens)"}
    print(f"{threads} threads (torch and onnxruntime); best of {args.repeats} interleaved rounds")

    with tempfile.TemporaryDirectory(prefix="bench_onnx.") as tmp:
        folder = Path(tmp) / "onnx"
        for tower in args.towers:
            export_onnx(model, tower, folder)
        config = read_onnx_config(folder)
        models = {"float32": model, "bfloat16": copy.deepcopy(model).to(torch.bfloat16)}
        rates: dict[tuple[str, int], dict[str, float]] = {}
        for tower in args.towers:
            session = onnx_session(folder / config["towers"][tower]["file"], threads=threads)
            for batch in args.batches:
                x = example_input(model, tower, batch=batch, length=args.text_length)
                feed = {INPUT_NAMES[tower]: x.numpy()}
                with torch.inference_mode():
                    diff = np.abs(encode(model, tower, x).numpy() - session.run(None, feed)[0]).max()
                contestants = {f"pytorch {name}": (lambda m=m, x=x, t=tower: encode(m, t, x))
                               for name, m in models.items()}
                contestants["onnxruntime float32"] = lambda s=session, feed=feed: s.run(None, feed)
                best = interleaved_best(contestants, args.repeats)  # one call of each per round
                rates[(tower, batch)] = {name: batch / secs for name, secs in best.items()}
                print(f"{tower:6s} batch {batch}: " + "   ".join(f"{name} {rate:7.2f}/s" for name, rate
                                                                 in rates[(tower, batch)].items())
                      + f"   (max |onnxruntime - pytorch float32| = {diff:.1e})", flush=True)
            del session
            gc.collect()

    print("\nratio = onnxruntime float32 / pytorch (items/s)")
    faster = []
    for (tower, batch), rate in rates.items():
        ort = rate["onnxruntime float32"]
        cells = [f"vs pytorch {name} {ort / rate[f'pytorch {name}']:.2f}x" for name in models]
        faster += [f"{tower} batch {batch} vs pytorch {name}" for name in models if ort > rate[f"pytorch {name}"]]
        print(f"{tower:6s} batch {batch}: " + " | ".join(cells))
    print("onnxruntime faster in: " + (", ".join(faster) if faster else "none"))
    tower, batch = args.towers[0], max(args.batches)
    ratio = rates[(tower, batch)]["onnxruntime float32"] / rates[(tower, batch)]["pytorch bfloat16"]
    unit = "images/s" if tower == "vision" else "texts/s"
    print(f"bench_onnx: {ratio:.2f}x onnxruntime float32 {unit} vs internvl-fm PyTorch bf16 CPU path "
          f"({what[tower]}, batch {batch})")


if __name__ == "__main__":
    main()
