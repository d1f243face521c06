#!/usr/bin/env bash
# CUDA paths of internvl-fm against transformers' native InternVL, on whatever GPUs are visible (<= 8 minutes on one):
#   InternViT at the 300M and 6B shapes (random weights, bf16): ours (SDPA, and flash-attn when installed) vs
#   transformers' InternVLVisionModel with the same weights; int8 (torchao) vs bf16; device_map="auto" over the
#   visible GPUs vs one GPU; the chat model (InternVL2-2B hub config, random weights) bf16 vs its 8-bit LLM
#   (bitsandbytes, when installed). Writes throughput (images/s, tokens/s) and max differences as JSON.
#
#   bash benchmarks/gpu_check.sh [OUTPUT_JSON]        (default: gpu_check.json; work files in $TMPDIR)
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT="${1:-gpu_check.json}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
timeout 470 python - "$OUTPUT" "$WORK" <<'PY'
import importlib.util, json, sys, time, traceback
from pathlib import Path

import torch
from transformers import InternVLVisionConfig, InternVLVisionModel

sys.path.insert(0, "benchmarks")
from internvl_fm import InternVisionConfig, InternVisionModel
from internvl_fm.convert import vision_to_transformers

output, work = Path(sys.argv[1]), Path(sys.argv[2])
report = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "results": {}, "errors": {}}
if not torch.cuda.is_available():
    report["errors"]["cuda"] = "no CUDA device visible"
    output.write_text(json.dumps(report, indent=2))
    sys.exit(1)
n_gpus = torch.cuda.device_count()
report["gpus"] = [torch.cuda.get_device_name(i) for i in range(n_gpus)]
report["flash_attn"] = importlib.util.find_spec("flash_attn") is not None
report["bitsandbytes"] = importlib.util.find_spec("bitsandbytes") is not None
dev = torch.device("cuda:0")
SHAPES = {  # name: (ours, transformers) config kwargs; the 6B shape as a 24-layer slice (half of it) to fit the time
    "internvit-300m": (dict(hidden_size=1024, num_attention_heads=16, intermediate_size=4096, num_hidden_layers=24,
                            qkv_bias=True, qk_normalization=False, norm_type="layer_norm"),
                       dict(attention_bias=True, use_qk_norm=False, norm_type="layer_norm")),
    "internvit-6b": (dict(hidden_size=3200, num_attention_heads=25, intermediate_size=12800, num_hidden_layers=24,
                          qkv_bias=False, qk_normalization=True, norm_type="rms_norm"),
                     dict(attention_bias=False, use_qk_norm=True, norm_type="rms_norm")),
}


def timed(fn, batch, repeats=3):
    """(images/s, last output) of fn() after one warm-up, CUDA-synchronised."""
    with torch.inference_mode():
        out = fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn()
        torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - start), out


def diff(a, b):
    a, b = a.float(), b.float()
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min().item()
    return {"max_abs": (a - b).abs().max().item(), "max_ref": b.abs().max().item(), "min_cosine": cos}


def step(name, fn):
    start = time.perf_counter()
    try:
        report["results"][name] = {**fn(), "seconds": round(time.perf_counter() - start, 1)}
    except Exception as err:  # noqa: BLE001 - record and go on with the other checks
        report["errors"][name] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    torch.cuda.empty_cache()
    output.write_text(json.dumps(report, indent=2))  # partial results survive a timeout
    print(name, json.dumps(report["results"].get(name) or report["errors"].get(name)), flush=True)


def vision_checks(shape):
    ours_kw, hf_kw = SHAPES[shape]
    cfg = InternVisionConfig(image_size=224, use_flash_attn=False, **ours_kw)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with dev:  # built and initialised on the GPU in bf16 (the 6B shape in fp32 on the host would take minutes)
        ours = InternVisionModel(cfg).init_weights().eval()
    torch.set_default_dtype(torch.float32)
    folder = work / shape
    x = torch.randn(8, 3, 224, 224, device=dev, dtype=torch.bfloat16)
    state = {}

    def native():
        torch.set_default_dtype(torch.bfloat16)
        with dev:
            hf = InternVLVisionModel(InternVLVisionConfig(
                hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers, image_size=224,
                patch_size=14, layer_norm_eps=1e-6, **hf_kw)).eval()
        torch.set_default_dtype(torch.float32)
        hf.load_state_dict(vision_to_transformers(ours.state_dict()), strict=True)
        hf.set_attn_implementation("sdpa")
        ours.set_attn_implementation("sdpa")
        ips_hf, ref = timed(lambda: hf(x).last_hidden_state, 8)
        ips, out = timed(lambda: ours(x).last_hidden_state, 8)
        state["ref"] = out
        hf = None
        return {"images_per_s": ips, "transformers_images_per_s": ips_hf, "speedup": ips / ips_hf,
                "vs_transformers": diff(out, ref)}

    def flash():
        if not report["flash_attn"]:
            return {"skipped": "flash-attn not installed"}
        ours.set_attn_implementation("flash_attention_2")
        ips, out = timed(lambda: ours(x).last_hidden_state, 8)
        ours.set_attn_implementation("sdpa")
        return {"images_per_s": ips, "vs_sdpa": diff(out, state["ref"])}

    def int8():
        ours.save_pretrained(folder)
        q = InternVisionModel.from_pretrained(folder, dtype=torch.bfloat16, device=dev, quantization="int8")
        ips, out = timed(lambda: q(x).last_hidden_state, 8)
        mem = torch.cuda.max_memory_allocated(dev)
        q = None
        return {"images_per_s": ips, "vs_bf16": diff(out, state["ref"]), "max_memory_allocated_gib": mem / 2**30}

    def device_map():
        if not folder.exists():
            ours.save_pretrained(folder)
        split = InternVisionModel.from_pretrained(folder, dtype=torch.bfloat16, device_map="auto")
        ips, out = timed(lambda: split(x).last_hidden_state, 8)
        devices = sorted({str(p.device) for p in split.parameters()})
        split = None
        return {"gpus": n_gpus, "devices": devices, "images_per_s": ips, "vs_one_gpu": diff(out.to(dev), state["ref"])}

    step(f"{shape} bf16 sdpa vs transformers", native)
    step(f"{shape} flash_attention_2", flash)
    step(f"{shape} int8", int8)
    step(f"{shape} device_map=auto", device_map)
    ours = None
    torch.cuda.empty_cache()


def chat_checks():
    from make_random_checkpoint import write_checkpoint
    from internvl_fm import InternVLChatModel

    folder = work / "internvl2-2b"
    write_checkpoint("internvl2-2b", folder, log=lambda s: None)
    image_token = 92546  # <IMG_CONTEXT>
    torch.manual_seed(0)
    px = torch.randn(1, 3, 448, 448, dtype=torch.bfloat16, device=dev)
    ids = torch.cat([torch.full((1, 256), image_token), torch.randint(3, 1000, (1, 16))], dim=1).to(dev)
    state = {}

    def decode(model):
        with torch.inference_mode():
            logits = model(px, ids, image_token_id=image_token).logits[:, -1]
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = model.generate(pixel_values=px, input_ids=ids, image_token_id=image_token, max_new_tokens=32,
                                 min_new_tokens=32, do_sample=False)
            torch.cuda.synchronize()
        return logits, out.shape[-1] / (time.perf_counter() - start), out

    def bf16():
        model = InternVLChatModel.from_pretrained(folder, dtype=torch.bfloat16, device=dev, load_tokenizer=False)
        state["logits"], tps, state["tokens"] = decode(model)
        del model
        return {"tokens_per_s": tps}

    def eight_bit():
        if not report["bitsandbytes"]:
            return {"skipped": "bitsandbytes not installed"}
        model = InternVLChatModel.from_pretrained(folder, dtype=torch.bfloat16, device=dev, load_in_8bit=True,
                                                  load_tokenizer=False)
        logits, tps, _ = decode(model)
        del model
        return {"tokens_per_s": tps, "prefill_logits_vs_bf16": diff(logits, state["logits"])}

    step("internvl2-2b chat bf16 generate", bf16)
    step("internvl2-2b chat 8-bit LLM generate", eight_bit)


start = time.perf_counter()
for shape in SHAPES:
    vision_checks(shape)
chat_checks()
report["total_seconds"] = round(time.perf_counter() - start, 1)
output.write_text(json.dumps(report, indent=2))
print(f"gpu_check: wrote {output} ({len(report['results'])} checks, {len(report['errors'])} errors, "
      f"{report['total_seconds']:.0f}s)")
sys.exit(1 if report["errors"] else 0)
PY
