"""Zero-shot classifier build: texts/s with length-sorted dynamic padding vs the official padding to 80 tokens.

Both paths run in the same process on the same small random QLLaMA text tower (fp32, CPU), the tiny golden
sentencepiece tokenizer and the bundled ImageNet classnames x 80 OpenAI templates, same batch size; the two
classifiers must agree within 1e-5. Dynamic padding is exact for EOS pooling under causal attention with right
padding (no token attends to what follows it). Default: 50 classes, 2 layers (short); `--full` = 1000 classes x 80.

    python benchmarks/bench_zeroshot.py [--classes 50 | --full] [--layers 2] [--batch-size 256] [--threads 1]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from internvl_fm.classification import imagenet_classnames, zeroshot_templates
from internvl_fm.classification.zeroshot import build_zeroshot_weights
from internvl_fm.models.configuration_internvl import InternVLConfig
from internvl_fm.models.modeling_internvl import InternVLTextModel
from internvl_fm.tokenization import InternVLTokenizer

GOLDEN_TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "golden" / "internvl_c_g" / "checkpoint"


def small_text_model(tokenizer: InternVLTokenizer, hidden: int, layers: int) -> InternVLTextModel:
    """A random QLLaMA text tower (+ text_projection) sized for CPU benchmarking."""
    qllama = {"hidden_size": hidden, "intermediate_size": int(hidden * 2.6875), "num_hidden_layers": layers,
              "num_attention_heads": max(1, hidden // 64), "num_key_value_heads": max(1, hidden // 64),
              "vocab_size": tokenizer.vocab_size, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    config = InternVLConfig(vision_config={"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128,
                                           "num_hidden_layers": 1, "image_size": 28},
                            qllama_config=qllama, clip_embed_dim=128)
    model = InternVLTextModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p)  # RMSNorm weights
            else:
                nn.init.normal_(p, std=p.shape[-1] ** -0.5)
    model.tokenizer = tokenizer
    return model.eval()


def timed_build(model, classnames, templates, padding: str, batch_size: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    weights = build_zeroshot_weights(model, classnames, templates, batch_size=batch_size, padding=padding,
                                     progress=False)
    return weights, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=50, help="ImageNet classes used (default 50)")
    parser.add_argument("--full", action="store_true", help="all 1000 classes x 80 templates")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokenizer", default=str(GOLDEN_TOKENIZER), help="folder with tokenizer.model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tokenizer = InternVLTokenizer.from_pretrained(args.tokenizer)
    model = small_text_model(tokenizer, args.hidden, args.layers)
    classnames = imagenet_classnames("en")[: 1000 if args.full else args.classes]
    templates = zeroshot_templates("en")
    n_texts = len(classnames) * len(templates)
    ids = tokenizer([t.format(c=c) for c in classnames[:20] for t in templates])["input_ids"]
    lengths = (ids > 0).sum(1).float()
    print(f"{len(classnames)} classes x {len(templates)} templates = {n_texts} texts; text tower hidden "
          f"{args.hidden}, {args.layers} layers, fp32, {args.threads} thread(s), batch {args.batch_size}; "
          f"prompt length mean {lengths.mean():.1f} / max {lengths.max():.0f} of {tokenizer.max_length} tokens")

    build_zeroshot_weights(model, classnames[:4], templates[:8], progress=False)  # warm-up
    official, t_official = timed_build(model, classnames, templates, "max_length", args.batch_size)
    dynamic, t_dynamic = timed_build(model, classnames, templates, "dynamic", args.batch_size)
    max_diff = float((official - dynamic).abs().max())
    print(f"official (pad to {tokenizer.max_length}):  {n_texts / t_official:9.1f} texts/s  ({t_official:.1f} s)")
    print(f"dynamic (length-sorted): {n_texts / t_dynamic:9.1f} texts/s  ({t_dynamic:.1f} s)")
    print(f"max |W_official - W_dynamic| = {max_diff:.2e}  ({'OK' if max_diff <= 1e-5 else 'MISMATCH'} at 1e-5)")
    if max_diff > 1e-5:
        raise SystemExit("classifier weights differ by more than 1e-5")
    print(f"bench_zeroshot: {t_official / t_dynamic:.2f}x texts/s with length-sorted dynamic padding vs "
          f"official padding to {tokenizer.max_length} tokens")


if __name__ == "__main__":
    main()
