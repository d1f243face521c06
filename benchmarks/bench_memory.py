"""How much memory do I need? Peak RSS / weight bytes and seconds per image, per model x dtype x phase, CPU.

Models at real sizes with random weights in the official layout (`make_random_checkpoint.py` writes them into
`--ckpt-dir`, once): InternViT-300M, InternViT-6B and QLLaMA (text-only) read from the InternVL-14B-224px checkpoint,
InternVL-14B (InternVL-C/G), InternVL2-2B and InternVL2.5-8B chat. Dtypes: bf16, int8 (`quantization="int8"`).
Phases: load (from_pretrained), then forwards at batch 1 / 8 and 224 / 448 px (text-only: 32 tokens; chat: 448 px
tiles + 16 text tokens, one prefill). Each model x dtype runs in its own subprocess, one at a time, skipped when the
available memory (psutil) is below its estimated need + `--headroom-gib`; the peak RSS (VmHWM) is reset before each
phase, so a forward's peak excludes the load's. Forwards estimated to take longer than `--max-seconds` are skipped
(said so). Columns: peak GiB (whole process), peak / weights, (peak - RSS before loading) / weights, s/image.

    python benchmarks/bench_memory.py --ckpt-dir /path/to/random-ckpts [--models internvit-300m,internvit-6b]
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_random_checkpoint import MODELS, write_checkpoint

GiB = 2**30
# benchmark model -> (checkpoint written by make_random_checkpoint, class, kind)
BENCH_MODELS = {
    "internvit-300m": ("internvit-300m", "InternVisionModel", "vision"),
    "internvit-6b": ("internvl-14b", "InternVisionModel", "vision"),
    "qllama-text": ("internvl-14b", "InternVLTextModel", "text"),
    "internvl-14b": ("internvl-14b", "InternVLModel", "clip"),
    "internvl2-2b": ("internvl2-2b", "InternVLChatModel", "chat"),
    "internvl2_5-8b": ("internvl2_5-8b", "InternVLChatModel", "chat"),
}
FORWARDS = [(1, 224), (8, 224), (1, 448), (8, 448)]
IMAGE_TOKEN_ID = 92546  # <IMG_CONTEXT> of the InternLM2 chat tokenizers
BF16_GFLOPS_GUESS = 100.0  # for the time estimate only (2 shared cores); the measured rate replaces it


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes held by a tensor, looking inside tensor subclasses (torchao int8 weights: data + scales)."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    if isinstance(t, torch.nn.Parameter) and type(t.data) is not torch.Tensor:
        return tensor_bytes(t.data)
    return t.numel() * t.element_size()


def model_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    for layer in getattr(getattr(model, "encoder", None), "layers", []):  # InternViT weights packed in place
        total += sum(p.numel() * p.element_size() for p in (getattr(layer, "_packed", None) or ()))
    return total


def meta_info(bench: str) -> tuple[int, float]:
    """(bf16 weight bytes, forward GFLOP per image at 224 px / per 32-token text) from the meta-built model."""
    import internvl_fm

    ckpt, class_name, kind = BENCH_MODELS[bench]
    cls = getattr(internvl_fm, class_name)
    config = cls.config_class.from_dict(MODELS[ckpt][1]())
    with torch.device("meta"):
        module = cls(config)
    params = sum(p.numel() for p in module.parameters())
    if kind == "clip":  # InternViT on 257 tokens, QLLaMA on the 96 query tokens (InternVL-G)
        vision = sum(p.numel() for p in module.vision_model.parameters())
        return 2 * params, 2 * (vision * 257 + (params - vision) * 96) / 1e9
    tokens = {"vision": 257, "text": 32, "chat": 256 + 16 + 1025}[kind]
    return 2 * params, 2 * params * tokens / 1e9


def run_row(args: argparse.Namespace) -> None:
    """Child process: load one model x dtype, then each forward phase; prints one JSON line per phase."""
    import internvl_fm
    from internvl_fm.loading import release_freed_memory

    torch.manual_seed(0)
    ckpt, class_name, kind = BENCH_MODELS[args.row_model]
    cls = getattr(internvl_fm, class_name)
    folder = Path(args.ckpt_dir) / ckpt
    quant = None if args.row_dtype == "bf16" else args.row_dtype
    with torch.device("meta"):  # imports every module the model needs: library memory, not model memory
        cls(cls.config_from_checkpoint(folder))
    if quant:
        import torchao  # noqa: F401

        import internvl_fm.quantization
    base = _status("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    kwargs = {"load_tokenizer": False} if class_name != "InternVisionModel" else {}
    if quant:
        if "quantization" not in inspect.signature(cls.from_pretrained).parameters:
            print(json.dumps({"model": args.row_model, "dtype": args.row_dtype, "phase": "all",
                              "skipped": f"{class_name}.from_pretrained takes no quantization= yet"}), flush=True)
            return
        kwargs["quantization"] = quant
    model = cls.from_pretrained(folder, dtype=torch.bfloat16, **kwargs).eval()
    load_s = time.perf_counter() - start
    weights = model_bytes(model)
    release_freed_memory()

    def emit(phase: str, seconds: float | None, n: int = 1, note: str = "") -> None:
        peak = _status("VmHWM")
        print(json.dumps({"model": args.row_model, "dtype": args.row_dtype, "phase": phase, "weights": weights,
                          "peak": peak, "base": base, "seconds": seconds, "per_image": seconds / n if seconds else None,
                          "note": note}), flush=True)

    emit("load", load_s)
    gflop = json.loads(args.row_meta)["gflop"]
    rate = BF16_GFLOPS_GUESS
    warm = False  # the first forward also packs InternViT's weights in place and loads kernels: warm up once
    for batch, size in FORWARDS:
        if (kind == "text" and size == 448) or (kind == "chat" and size == 224):
            continue  # text: no image; chat: 448 px tiles only
        scale = (size / 224) ** 2 if kind in ("vision", "clip") else 1
        est = gflop * scale * batch / rate
        phase = f"fwd b{batch}" + ("" if kind == "text" else f" {size}px")
        if est > args.max_seconds:
            print(json.dumps({"model": args.row_model, "dtype": args.row_dtype, "phase": phase, "skipped":
                              f"estimated {est:.0f}s > --max-seconds {args.max_seconds:.0f}"}), flush=True)
            continue
        g = torch.Generator().manual_seed(batch)
        if kind == "text":
            ids = torch.randint(3, 400, (batch, 32), generator=g)
            call = lambda ids=ids: model(ids)
        elif kind == "chat":
            px = torch.randn(batch, 3, 448, 448, generator=g, dtype=torch.float32).to(torch.bfloat16)
            ids = torch.cat([torch.full((1, batch * 256), IMAGE_TOKEN_ID), torch.randint(3, 400, (1, 16), generator=g)],
                            dim=1)
            call = lambda px=px, ids=ids: model(px, ids, image_token_id=IMAGE_TOKEN_ID)
        else:
            px = torch.randn(batch, 3, size, size, generator=g).to(torch.bfloat16)
            call = (lambda px=px: model(px)) if kind == "vision" else (
                lambda px=px: model.encode_image(px, mode="InternVL-G"))
        if not warm:
            warm = True
            if est <= args.max_seconds / 3:
                with torch.inference_mode():
                    call()
        release_freed_memory()
        _reset_peak()
        with torch.inference_mode():
            start = time.perf_counter()
            call()
            seconds = time.perf_counter() - start
        rate = max(rate, gflop * scale * batch / seconds)  # later estimates use the measured rate
        emit(phase, seconds, batch)


def ensure_checkpoint(ckpt_dir: Path, ckpt: str) -> Path:
    folder = ckpt_dir / ckpt
    if not (folder / "model.safetensors.index.json").exists():
        print(f"writing random checkpoint {folder} ...", file=sys.stderr)
        write_checkpoint(ckpt, folder, log=lambda s: print(s, file=sys.stderr))
    return folder


def int8_available() -> bool:
    try:
        from internvl_fm.quantization import check_quantization
        check_quantization("int8")
        import torchao  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - any failure: no int8 rows
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt-dir", type=Path, default=Path(os.environ.get("INTERNVL_BENCH_CKPTS",
                                                                            "/tmp/internvl-fm-bench-ckpts")))
    parser.add_argument("--models", default=",".join(BENCH_MODELS))
    parser.add_argument("--dtypes", default="bf16,int8")
    parser.add_argument("--headroom-gib", type=float, default=4.0)
    parser.add_argument("--max-seconds", type=float, default=150.0, help="skip forwards estimated to take longer")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--row-model", help=argparse.SUPPRESS)
    parser.add_argument("--row-dtype", help=argparse.SUPPRESS)
    parser.add_argument("--row-meta", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row_model:
        return run_row(args)
    import psutil

    rows: list[dict] = []
    has_int8 = int8_available()
    for bench in args.models.split(","):
        weight_bytes, gflop = meta_info(bench)
        for dtype in args.dtypes.split(","):
            if dtype == "int8" and not has_int8:
                rows.append({"model": bench, "dtype": dtype, "phase": "all", "skipped": "int8 not available"})
                continue
            need = weight_bytes * (1.1 if dtype == "bf16" else 0.6) + 0.75 * GiB  # measured: lean forward, streaming load
            avail = psutil.virtual_memory().available
            if avail < need + args.headroom_gib * GiB:
                rows.append({"model": bench, "dtype": dtype, "phase": "all", "skipped":
                             f"needs ~{need / GiB:.1f} GiB + {args.headroom_gib:.0f} headroom, "
                             f"{avail / GiB:.1f} GiB available"})
                print(f"skip {bench} {dtype}: {rows[-1]['skipped']}", file=sys.stderr)
                continue
            ensure_checkpoint(args.ckpt_dir, BENCH_MODELS[bench][0])
            print(f"run {bench} {dtype} (~{need / GiB:.1f} GiB)", file=sys.stderr)
            cmd = [sys.executable, __file__, "--ckpt-dir", str(args.ckpt_dir), "--row-model", bench,
                   "--row-dtype", dtype, "--row-meta", json.dumps({"gflop": gflop}),
                   "--max-seconds", str(args.max_seconds)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            got = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            rows.extend(got)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                rows.append({"model": bench, "dtype": dtype, "phase": "after " + (got[-1]["phase"] if got else "start"),
                             "skipped": f"failed (exit {proc.returncode}): {tail[:160]}"})
            for row in got:
                print(format_row(row), file=sys.stderr)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print(headline(rows))


def format_row(row: dict) -> str:
    if "skipped" in row:
        return f"| {row['model']} | {row['dtype']} | {row['phase']} | skipped: {row['skipped']} | | | |"
    w = row["weights"]
    per = f"{row['per_image']:.2f}" if row.get("per_image") and row["phase"] != "load" else (
        f"{row['seconds']:.1f} s load" if row["phase"] == "load" else "")
    return (f"| {row['model']} | {row['dtype']} | {row['phase']} | {row['peak'] / GiB:.2f} | {row['peak'] / w:.2f}x | "
            f"{(row['peak'] - row['base']) / w:.2f}x | {per} |")


def table(rows: list[dict]) -> str:
    head = ("| model | dtype | phase | peak RSS GiB | peak / weights | (peak - start) / weights | s / image |\n"
            "|---|---|---|---|---|---|---|")
    return "\n".join([head] + [format_row(r) for r in rows])


def headline(rows: list[dict]) -> str:
    def peak_of(model: str, dtype: str) -> dict | None:
        done = [r for r in rows if r["model"] == model and r["dtype"] == dtype and "peak" in r]
        return max(done, key=lambda r: r["peak"]) if done else None

    best = peak_of("internvl-14b", "int8")
    if best:
        return (f"bench_memory: {best['peak'] / GiB:.1f} GiB peak InternVL-14B int8 "
                f"({best['peak'] / best['weights']:.2f}x weights)")
    vit = peak_of("internvit-6b", "bf16") or peak_of("internvit-300m", "bf16")
    if vit:
        return (f"bench_memory: {vit['peak'] / GiB:.1f} GiB peak {vit['model']} bf16 ({vit['peak'] / vit['weights']:.2f}x "
                f"weights; InternVL-14B int8 not measured in this run)")
    return "bench_memory: no row ran"


if __name__ == "__main__":
    main()
