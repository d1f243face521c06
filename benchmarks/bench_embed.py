"""Embedding-job benchmark: end-to-end images/s from JPEG files vs model-only images/s.

End to end = `internvl_fm.retrieval.run_embedding` on a folder of JPEGs: decode + resize in DataLoader workers,
the model, and the sharded npy/parquet writes. Model only = the same model on already pre-processed tensors,
same batch size. Both use a 300M-shaped InternViT (1024 wide, 24 layers, 16 heads, random weights) in bfloat16;
the embedding is its normalised pooled output. A ratio near 1 means decoding and writing are hidden behind the
model.

    python benchmarks/bench_embed.py                        # 64 images, about 1 minute on 2 CPU cores
    python benchmarks/bench_embed.py --n 2000 --batch-size 64 --device cuda --num-workers 8

Last line: `bench_embed: <ratio>x images/s end-to-end vs model-only`.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class ViTEmbedder:
    """Image side of the retrieval `Embedder` protocol over a bare InternViT (the job runs with captions off)."""

    def __init__(self, model, image_size: int, device: str):
        from internvl_fm.processing import InternVLImageProcessor

        self.model, self.device = model, device
        self.dtype = next(model.parameters()).dtype
        self.image_processor = InternVLImageProcessor(image_size, mode="retrieval")

    @torch.inference_mode()
    def embed_images(self, pixel_values: torch.Tensor, mode: str = "InternVL-C", batch_size: int = 64) -> torch.Tensor:
        out = self.model(pixel_values.to(self.device, self.dtype, non_blocking=True)).pooler_output
        return F.normalize(out.float(), dim=-1).cpu()


def model_only(embedder: ViTEmbedder, pixels: torch.Tensor, batch_size: int, device: str) -> float:
    """Images/s of the model alone on pre-processed pixels."""
    start = time.perf_counter()
    for lo in range(0, len(pixels), batch_size):
        embedder.embed_images(pixels[lo:lo + batch_size])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(pixels) / (time.perf_counter() - start)


def write_jpegs(folder: Path, n: int, size: tuple[int, int] = (640, 480)) -> list[Path]:
    """`n` photo-sized JPEGs (smooth colour fields with detail, so that decoding costs what a photo costs)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[: size[1], : size[0]].astype(np.float32)
    paths = []
    for i in range(n):
        freq = rng.uniform(0.005, 0.05, 3)
        phase = rng.uniform(0, 6.3, 3)
        channels = [np.sin(xx * f + p) * np.cos(yy * f * 1.3 - p) for f, p in zip(freq, phase)]
        image = (np.stack(channels, -1) * 100 + 128 + rng.normal(0, 12, (size[1], size[0], 3))).clip(0, 255)
        path = folder / f"photo_{i:05d}.jpg"
        Image.fromarray(image.astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="images (enough to amortise the decode worker start)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=1, help="DataLoader decode workers")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--layers", type=int, default=24, help="InternViT depth (24 = the 300M shape)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parser.parse_args()

    from internvl_fm.retrieval import EmbedConfig, EmbeddingStore, run_embedding

    from internvl_fm.models.configuration_intern_vit import InternVisionConfig

    from internvl_fm.models.modeling_intern_vit import InternVisionModel

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = InternVisionConfig(hidden_size=1024, num_attention_heads=16, intermediate_size=4096,
                                num_hidden_layers=args.layers, qkv_bias=True, qk_normalization=False,
                                norm_type="layer_norm", image_size=args.image_size, use_flash_attn=False)
    model = InternVisionModel(config).to(device=args.device, dtype=torch.bfloat16).eval()
    if args.device == "cpu":
        model.set_attn_implementation("eager")  # faster than SDPA for bf16 on CPU
    params = sum(p.numel() for p in model.parameters()) / 1e6
    embedder = ViTEmbedder(model, args.image_size, args.device)

    with tempfile.TemporaryDirectory(prefix="bench_embed_") as tmp:
        paths = write_jpegs(Path(tmp) / "jpegs", args.n)
        pixels = embedder.image_processor([str(p) for p in paths])
        embedder.embed_images(pixels[: args.batch_size])  # warm-up

        model_ips = model_only(embedder, pixels, args.batch_size, args.device)

        job = EmbedConfig(batch_size=args.batch_size, num_workers=args.num_workers, shard_size=max(args.n // 2, 1),
                          captions=False, progress=False)
        start = time.perf_counter()
        report = run_embedding(Path(tmp) / "jpegs", Path(tmp) / "out", embedder, job)
        e2e_ips = args.n / (time.perf_counter() - start)
        assert report.rows_written == args.n and EmbeddingStore(Path(tmp) / "out").num_rows == args.n
        # measured before and after the job; the faster one is the baseline (a busy machine only lowers it)
        model_ips = max(model_ips, model_only(embedder, pixels, args.batch_size, args.device))

    print(f"InternViT {params:.0f}M params, bf16, {args.image_size}px, {args.device}, batch {args.batch_size}, "
          f"{args.num_workers} decode worker(s), torch threads {torch.get_num_threads()}")
    print(f"model only: {model_ips:.2f} images/s; end to end (JPEG decode + resize + model + write): "
          f"{e2e_ips:.2f} images/s")
    print(f"bench_embed: {e2e_ips / model_ips:.2f}x images/s end-to-end (JPEG files, {args.n} images) vs model-only")


if __name__ == "__main__":
    main()
