"""Embeddings server throughput: `--clients` concurrent clients (16) against `POST /v1/embeddings` of a real uvicorn
server on 127.0.0.1 (bundled demo model), with dynamic batching, vs the same server with batching off
(`max_batch_size=1`: one model call per request, one request after another). Both servers run side by side in this
process (the idle one costs nothing); the clients run in a child process, as real clients would (they do not share
the server's GIL).

Each client sends one-input requests back to back over its keep-alive connection for `--seconds`: distinct texts
(`--kind text`), data-URL PNG images (`image`) or both in turn (`mixed`). The servers are measured in interleaved
rounds, so that a machine whose speed drifts penalises both alike; each reports its best round, its mean inputs per
model call and p50 / p99 latency. `--threads` sets torch's intra-op threads of the server (default 1: on a 2-core
machine the model gets one core and the HTTP side the other; 2 threads there stall whenever another process runs).

    python benchmarks/bench_embed_server.py                    # 16 clients, texts, 3 rounds x 8 s (~1 minute)
    python benchmarks/bench_embed_server.py --kind mixed --threads 2
    python benchmarks/bench_embed_server.py --model real-width --seconds 20   # a real-width text tower

Last line: `bench_embed_server: <ratio>x throughput at 16 clients vs one-by-one serving`.
"""
from __future__ import annotations

import argparse
import base64
import io
import multiprocessing
import random
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_random_checkpoint

from internvl_fm import InternVLModel, demo_model_path  # noqa: E402
from internvl_fm.retrieval.embeddings_api import EmbeddingsConfig, create_embeddings_app, serve_in_thread  # noqa: E402

WORDS = ["red", "blue", "green", "circle", "square", "star", "small", "large", "left", "top", "a", "photo", "of",
         "two", "dogs", "on", "the", "beach", "Hund", "chat"]


def make_inputs(kind: str, count: int = 64, seed: int = 0, max_words: int = 12) -> list[str]:
    """`count` request inputs: texts of 1..`max_words` random words (at least 3 when it allows), data-URL PNGs
    (48-96 px, random pixels), or both."""
    rng = np.random.default_rng(seed)
    low = min(3, max_words)
    texts = [" ".join(rng.choice(WORDS, int(rng.integers(low, max_words + 1)))) for _ in range(count)]
    images = []
    for _ in range(count):
        size = int(rng.integers(48, 97))
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        images.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return {"text": texts, "image": images, "mixed": [x for pair in zip(texts, images) for x in pair]}[kind]


def run_load(url: str, inputs: list[str], clients: int, seconds: float) -> dict:
    """`clients` threads sending one-input requests for `seconds`: requests/s and latencies, or the first answer
    that was not a 200 (`error`)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: list[str] = []
    barrier, go = threading.Barrier(clients + 1), threading.Event()
    stop = [0.0]

    def client(i: int) -> None:
        rng = random.Random(i)
        with httpx.Client(base_url=url, timeout=120) as http:
            http.post("/v1/embeddings", json={"input": "warm up", "model": "InternVL-C"})
            barrier.wait()
            go.wait()
            while time.perf_counter() < stop[0]:
                started = time.perf_counter()
                response = http.post("/v1/embeddings", json={"input": rng.choice(inputs), "model": "InternVL-C"})
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
                    return
                latencies[i].append(time.perf_counter() - started)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()  # every client has warmed up
    began = time.perf_counter()
    stop[0] = began + seconds
    go.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    if failures:
        return {"error": failures[0]}
    flat = np.asarray([x for per_client in latencies for x in per_client])
    return {"rps": len(flat) / elapsed, "p50_ms": float(np.percentile(flat, 50)) * 1000,
            "p99_ms": float(np.percentile(flat, 99)) * 1000}


def _client_process(connection, inputs: list[str], clients: int) -> None:
    """The load generator (a child process): runs `run_load(url, ...)` for each `(url, seconds)` it is sent."""
    while (job := connection.recv()) is not None:
        url, seconds = job
        connection.send(run_load(url, inputs, clients, seconds))


def load_model(name: str, text_layers: int, kind: str) -> InternVLModel:
    """The bundled demo model, or a real-width text tower (random weights, bf16, the demo model's tokenizer)."""
    demo = InternVLModel.from_pretrained(demo_model_path()).eval()
    if name == "demo":
        return demo
    if kind != "text":
        raise SystemExit("--model real-width serves texts only (--kind text)")
    from make_random_checkpoint import random_internvl_model

    model = random_internvl_model(1, text_layers).to(torch.bfloat16)
    model.tokenizer = demo.tokenizer  # ids of a small vocabulary are valid ids of QLLaMA's
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of one measured round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per server (best one counts)")
    parser.add_argument("--kind", choices=("text", "image", "mixed"), default="text", help="what the requests hold")
    parser.add_argument("--max-batch-size", type=int, default=32, help="of the batching server")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="of the batching server")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the server")
    parser.add_argument("--model", choices=("demo", "real-width"), default="demo",
                        help="demo: the bundled tiny InternVL-C (HTTP-bound); real-width: random weights at "
                             "InternVL-14B's QLLaMA width (4096, MLP 11008) with --text-layers layers, bf16")
    parser.add_argument("--text-layers", type=int, default=2, help="QLLaMA layers of --model real-width")
    parser.add_argument("--max-words", type=int, default=12, help="texts have 3..max-words words (search queries: ~1-4)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = load_model(args.model, args.text_layers, args.kind)
    configs = {"batched": EmbeddingsConfig(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms),
               "one-by-one": EmbeddingsConfig(max_batch_size=1, max_wait_ms=0)}
    apps = {name: create_embeddings_app(model, config) for name, config in configs.items()}
    print(f"bench_embed_server: {args.clients} clients, {args.kind} inputs, {args.rounds} x {args.seconds:g} s, "
          f"torch threads {torch.get_num_threads()}", file=sys.stderr)
    here, there = multiprocessing.get_context("spawn").Pipe()
    clients = multiprocessing.get_context("spawn").Process(target=_client_process,
                                                           args=(there, make_inputs(args.kind, max_words=args.max_words),
                                                                 args.clients))
    clients.start()
    best: dict[str, dict] = {}
    try:
        with serve_in_thread(apps["batched"]) as batched_url, serve_in_thread(apps["one-by-one"]) as single_url:
            urls = {"batched": batched_url, "one-by-one": single_url}
            for round_ in range(args.rounds):
                for name, url in urls.items():
                    here.send((url, args.seconds))
                    result = here.recv()
                    if "error" in result:
                        raise SystemExit(f"bench_embed_server: a request failed: {result['error']}")
                    print(f"  round {round_ + 1} {name:10s} {result['rps']:8.1f} req/s  p50 {result['p50_ms']:7.1f} "
                          f"ms  p99 {result['p99_ms']:7.1f} ms", file=sys.stderr)
                    if result["rps"] > best.get(name, {"rps": 0})["rps"]:
                        best[name] = result
    finally:
        here.send(None)
        clients.join(60)
    for name, app in apps.items():
        stats = app.state.embeddings.stats
        per_call = stats["embedded_inputs"] / max(1, stats["model_calls"])
        print(f"{name:10s} best {best[name]['rps']:8.1f} req/s, {per_call:5.1f} inputs per model call "
              f"(largest batch {stats['largest_batch']}), p50 {best[name]['p50_ms']:.1f} ms")
    ratio = best["batched"]["rps"] / best["one-by-one"]["rps"]
    print(f"bench_embed_server: {ratio:.2f}x throughput at {args.clients} clients vs one-by-one serving")


if __name__ == "__main__":
    main()
