"""Decode speed and time to first token of InternVLChatModel vs transformers' native InternVLForConditionalGeneration.

Both models hold the same random weights (ours exported with `save_pretrained(..., layout="hf")`, read by
transformers' own loader) and run in the same process, same dtype, same greedy settings, interleaved. A streamer timestamps each
token: time to first token (TTFT) covers the vision tower and the prefill; decode speed is tokens/s after it. On a CPU
the timestamps are process CPU time by default (`--clock wall` for wall-clock), because on a shared machine wall-clock
time mostly measures the other processes.

    python benchmarks/bench_chat.py                       # small default, well under 3 minutes on 2 CPU cores
    python benchmarks/bench_chat.py --llm-hidden 896 --llm-layers 24 --vocab 151655 --image-size 448 --device cuda
    python benchmarks/bench_chat.py --llm-hidden 2048 --llm-intermediate 8192 --llm-heads 16 --llm-kv-heads 8 \
        --llm-layers 12 --vocab 92553 --quantization int8     # InternVL2-2B's LLM width, int8 decode vs bf16

Last line: ``bench_chat: <ratio>x decode tokens/s vs transformers InternVLForConditionalGeneration``.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from internvl_fm.chat.testing import tiny_chat_config, tiny_chat_model
from internvl_fm.chat_templates import IMG_CONTEXT_TOKEN  # noqa: F401  (documents which id is the image token)


def build_hf_model(ours, folder: str):
    """transformers' InternVLForConditionalGeneration holding our weights: written with our `-hf` layout export
    (`save_pretrained(..., layout="hf")`) and read by transformers' own loader."""
    from transformers import InternVLForConditionalGeneration

    ours.save_pretrained(folder, layout="hf")
    return InternVLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()


class TokenClock:
    """A generate() streamer that timestamps every new token (the first ``put`` is the prompt and is skipped)."""

    def __init__(self, clock=time.perf_counter) -> None:
        self.clock = clock
        self.start = clock()
        self.prompt_seen = False
        self.stamps: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.stamps.append(self.clock())

    def end(self) -> None:
        pass

    def measure(self) -> tuple[float, float]:
        """(time to first token in s, decode tokens/s after the first token)."""
        ttft = self.stamps[0] - self.start
        decode = (len(self.stamps) - 1) / max(self.stamps[-1] - self.stamps[0], 1e-9)
        return ttft, decode


def make_timer(kind: str, device: torch.device):
    """The clock for token timestamps: process CPU time (robust to other load on a shared CPU) or wall-clock."""
    if kind == "cpu" or (kind == "auto" and device.type == "cpu"):
        return time.process_time, "process CPU"
    if device.type == "cuda":
        def cuda_wall() -> float:  # a token is only out once the GPU is done with it
            torch.cuda.synchronize()
            return time.perf_counter()

        return cuda_wall, "wall-clock"
    return time.perf_counter, "wall-clock"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--tiles", type=int, default=2)
    parser.add_argument("--vision-hidden", type=int, default=256)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--llm-hidden", type=int, default=512)
    parser.add_argument("--llm-layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--llm-intermediate", type=int, default=None, help="default: 2 x --llm-hidden")
    parser.add_argument("--llm-heads", type=int, default=None, help="attention heads (default: 4)")
    parser.add_argument("--llm-kv-heads", type=int, default=None, help="key/value heads (default: 2)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="text tokens around the image span")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quantization", default="none", choices=["none", "int8", "int8-dynamic"],
                        help="quantise OUR model (transformers' stays in --dtype): int8 weight-only decode vs bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                        help="cpu = process CPU time (stable on a shared CPU); auto = cpu on CPU, wall on CUDA")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)

    config = tiny_chat_config(args.vocab, llm="qwen2", vision_hidden=args.vision_hidden, llm_hidden=args.llm_hidden,
                              llm_layers=args.llm_layers, image_size=args.image_size)
    config.vision_config.num_hidden_layers = args.vision_layers
    for name, value in (("intermediate_size", args.llm_intermediate), ("num_attention_heads", args.llm_heads),
                        ("num_key_value_heads", args.llm_kv_heads)):
        if value is not None:
            setattr(config.llm_config, name, value)
    config.vision_config.num_attention_heads = max(1, args.vision_hidden // 64)
    ours = tiny_chat_model(config, seed=0, dtype=torch.float32)
    image_token_id = args.vocab - 1
    ours.img_context_token_id = image_token_id
    workdir = tempfile.TemporaryDirectory(prefix="bench_chat_")
    hf = build_hf_model(ours, workdir.name + "/hf")
    ours, hf = ours.to(device=device, dtype=dtype), hf.to(device=device, dtype=dtype)
    if args.quantization != "none":
        ours._quantize(args.quantization, device)  # what from_pretrained(..., quantization=) does after loading

    g = torch.Generator().manual_seed(0)
    n_img = ours.num_image_token * args.tiles
    text = torch.randint(10, args.vocab - 10, (args.prompt_tokens,), generator=g)
    half = args.prompt_tokens // 2
    input_ids = torch.cat([text[:half], torch.full((n_img,), image_token_id), text[half:]])[None].to(device)
    attention_mask = torch.ones_like(input_ids)
    pixel_values = torch.randn(args.tiles, 3, args.image_size, args.image_size, generator=g).to(device, dtype)
    gen = dict(do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0)

    @torch.no_grad()
    def run_ours(n, streamer=None):
        return ours.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                             max_new_tokens=n, min_new_tokens=n, streamer=streamer, **gen)

    @torch.no_grad()
    def run_hf(n, streamer=None):
        return hf.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                           max_new_tokens=n, min_new_tokens=n, streamer=streamer, **gen)[:, input_ids.shape[1]:]

    timer, clock_name = make_timer(args.clock, device)
    same = run_ours(8).tolist() == run_hf(8).tolist()  # also warms both up
    samples: dict[str, list[tuple[float, float]]] = {"internvl_fm": [], "transformers": []}
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        for name, fn in (("internvl_fm", run_ours), ("transformers", run_hf)):
            clock = TokenClock(timer)
            fn(args.new_tokens, clock)
            samples[name].append(clock.measure())
    results = {}
    for name, runs in samples.items():
        results[name] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        print(f"{name:12s} TTFT {results[name][0] * 1000:8.1f} ms   decode {results[name][1]:8.1f} tokens/s")
    print(f"prompt {input_ids.shape[1]} tokens ({n_img} image tokens, {args.tiles} tiles of {args.image_size}px), "
          f"{args.new_tokens} new tokens, {args.dtype} on {device} (ours: quantization {args.quantization}), median of {args.repeats}, "
          f"{clock_name} time; same greedy ids: {same}"
          " (exact in float32; bf16 rounding may differ)")
    ttft_ratio = results["transformers"][0] / results["internvl_fm"][0]
    print(f"TTFT speed-up: {ttft_ratio:.2f}x (transformers TTFT / ours)")
    ratio = results["internvl_fm"][1] / results["transformers"][1]
    ours_name = "int8 " if args.quantization != "none" else ""
    print(f"bench_chat: {ratio:.2f}x {ours_name}decode tokens/s vs transformers InternVLForConditionalGeneration"
          + (f" {args.dtype}" if ours_name else ""))


if __name__ == "__main__":
    main()
