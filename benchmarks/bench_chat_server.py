"""Chat server (`internvl-fm serve-chat`) throughput with batching, and a load test with hostile clients.

Throughput: two servers in this process hold the same random chat model, one batching the queued requests into one
generate call (`max_batch_size` 16), one answering them one after another (`max_batch_size` 1, the serial server).
`--concurrent` clients (16) each send one request with an image (greedy, `--max-tokens` new tokens) at once; the
time until the last answer is measured on each server in interleaved rounds (best of `--repeats`, as the other
benchmarks: on a shared machine the best round is the one least disturbed). The answers of both servers are compared.

Load test, on the batched server: `--clients` (64) concurrent clients send `--requests` requests each, drawn from:
chat completions with and without an image, sampled ones, full streams, streams dropped after the first piece,
requests abandoned by a client that times out after 0.3 s, and bad requests (NaN temperature, a NUL in an image path,
100k-deep JSON, a lone surrogate, `max_tokens: 0`, the reserved `<IMG_CONTEXT>` token, an undecodable image). A
request is hung when it gets no answer within `--timeout` seconds. Reported: p50 / p99 latency of the answered
requests by kind, the number of 5xx and of hung requests, and the server's counters; /health must be "ok" after.

    python benchmarks/bench_chat_server.py                  # small random model (LLM 512 x 8), ~3 min on 2 CPU cores
    python benchmarks/bench_chat_server.py --model tiny     # the test suite's tiny model, ~1 min

Last line: `bench_chat_server: <ratio>x throughput (16 concurrent, batched) vs serial`.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import random
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import torch
from PIL import Image

from internvl_fm.chat.server import create_app, serve_in_thread
from internvl_fm.chat.testing import DEFAULT_WORDS, tiny_chat_config, tiny_chat_model, tiny_tokenizer

NAME = "bench"
WORDS = [w for w in DEFAULT_WORDS if w.isalpha() and w.islower()]


def build_model(size: str, dtype: torch.dtype):
    tokenizer = tiny_tokenizer()
    if size == "tiny":
        config = tiny_chat_config(len(tokenizer))
    else:  # bench_chat's small LLM; a 4-layer 128-wide ViT at 56 px (4 visual tokens per tile)
        config = tiny_chat_config(len(tokenizer), vision_hidden=128, llm_hidden=512, llm_layers=8, image_size=56)
        config.vision_config.num_hidden_layers = 4
    return tiny_chat_model(config, seed=0, dtype=dtype), tokenizer


def data_url(seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def question(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) + " ?"


def chat_body(text: str, max_tokens: int, image: str | None = None, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": text}] if image else text
    return {"model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}


def burst(clients: list[httpx.Client], bodies: list[dict]) -> tuple[float, list[str]]:
    """Send all bodies at once, one per (already connected) client; (seconds until the last answer, the answers)."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        start = time.perf_counter()
        replies = list(pool.map(lambda cb: cb[0].post("/v1/chat/completions", json=cb[1]), zip(clients, bodies)))
        elapsed = time.perf_counter() - start
    for reply in replies:
        reply.raise_for_status()
    return elapsed, [r.json()["choices"][0]["message"]["content"] for r in replies]


BAD = {
    "nan temperature": json.dumps(chat_body("hi", 4, temperature=float("nan"))).encode(),
    "nul path": json.dumps(chat_body("hi", 4, image="a\x00b.png")).encode(),
    "nested json": b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "lone surrogate": b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    "max_tokens 0": json.dumps(chat_body("hi", 0)).encode(),
    "image token": json.dumps(chat_body("<IMG_CONTEXT> hi", 4)).encode(),
    "bad image": json.dumps(chat_body("hi", 4, image="data:image/png;base64,AAAAAAAA")).encode(),
}


def load_test(url: str, clients: int, requests: int, timeout: float, max_tokens: int, seed: int) -> dict:
    latencies: dict[str, list[float]] = defaultdict(list)
    statuses: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    hung: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()
    images = [data_url(i) for i in range(8)]

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        with httpx.Client(base_url=url, timeout=timeout) as http:
            for _ in range(requests):
                kind = rng.choices(["chat", "image", "sampled", "stream", "drop", "abandon", "bad"],
                                   weights=[3, 2, 1, 1, 1, 1, 2])[0]
                tokens = rng.randint(2, max_tokens)
                body = chat_body(question(rng), tokens, rng.choice(images) if kind == "image" else None)
                start = time.perf_counter()
                status = 0
                try:
                    if kind in ("chat", "image", "sampled"):
                        if kind == "sampled":
                            body.update(temperature=0.8, top_p=0.9)
                        status = http.post("/v1/chat/completions", json=body).status_code
                    elif kind == "bad":
                        name = rng.choice(list(BAD))
                        kind = f"bad: {name}"
                        status = http.post("/v1/chat/completions", content=BAD[name],
                                           headers={"content-type": "application/json"}).status_code
                    elif kind == "stream":
                        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
                            status = s.status_code
                            if not any(line == "data: [DONE]" for line in s.iter_lines()):
                                raise RuntimeError("stream ended without [DONE]")
                    elif kind == "drop":  # leave after the first generated piece (or the error)
                        with httpx.Client(base_url=url, timeout=timeout) as own, \
                                own.stream("POST", "/v1/chat/completions", json={**body, "stream": True,
                                                                                 "max_tokens": 4 * max_tokens}) as s:
                            status = s.status_code
                            for line in s.iter_lines():
                                if '"content": "' in line and '"role"' not in line:
                                    break
                    else:  # abandon: the client gives up after 0.3 s and closes the connection
                        try:
                            status = httpx.post(url + "/v1/chat/completions",
                                                json={**body, "max_tokens": 4 * max_tokens}, timeout=0.3).status_code
                        except httpx.ReadTimeout:
                            status = -1  # abandoned, as intended
                except httpx.TimeoutException:
                    with lock:
                        hung.append(kind)
                    continue
                except Exception as exc:  # noqa: BLE001 - reported, not raised: the load goes on
                    with lock:
                        errors.append(f"{kind}: {exc!r}"[:200])
                    continue
                with lock:
                    statuses[kind][status] += 1
                    if status > 0:
                        latencies[kind].append(time.perf_counter() - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return {"wall": time.perf_counter() - start, "latencies": latencies, "statuses": statuses, "hung": hung,
            "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "small"], default="small")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--concurrent", type=int, default=16, help="requests sent at once in the throughput test")
    parser.add_argument("--max-tokens", type=int, default=24, help="new tokens per request (load test: up to)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds of the throughput test (best)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients in the load test")
    parser.add_argument("--requests", type=int, default=4, help="requests per client in the load test")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds without an answer: a hung request")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = build_model(args.model, getattr(torch, args.dtype))
    rng = random.Random(args.seed)
    bodies = [chat_body(question(rng), args.max_tokens, data_url(i)) for i in range(args.concurrent)]
    root = tempfile.mkdtemp(prefix="bench-chat-server-")  # local image files allowed (and empty): paths are checked
    settings = {"model_name": NAME, "max_new_tokens": 4 * args.max_tokens, "max_queue": args.clients,
                "allowed_root": root}
    batched_app = create_app(model, tokenizer, max_batch_size=args.concurrent, **settings)
    serial_app = create_app(model, tokenizer, max_batch_size=1, **settings)
    llm = model.config.llm_config
    print(f"model: {args.model} (LLM {llm.hidden_size} x {llm.num_hidden_layers}, ViT "
          f"{model.config.vision_config.hidden_size} x {model.config.vision_config.num_hidden_layers} at "
          f"{model.config.image_size} px), {args.dtype}, {args.threads} torch threads")

    with serve_in_thread(batched_app) as batched, serve_in_thread(serial_app) as serial:
        pools = {name: [httpx.Client(base_url=url, timeout=args.timeout) for _ in bodies]
                 for name, url in (("serial", serial), ("batched", batched))}
        answers: dict[str, list[str]] = {}
        times: dict[str, list[float]] = {"serial": [], "batched": []}

        for _ in range(1 + args.repeats):  # interleaved, so both see the same machine load; round 0 (warm-up,
            for name, clients in pools.items():  # every client connects) is not counted
                elapsed, answers[name] = burst(clients, bodies)
                times[name].append(elapsed)
        best = {name: min(runs[1:]) for name, runs in times.items()}
        for client in (c for clients in pools.values() for c in clients):
            client.close()
        same = sum(a == b for a, b in zip(answers["serial"], answers["batched"]))
        tokens = args.concurrent * args.max_tokens
        print(f"{args.concurrent} concurrent requests (1 image, {args.max_tokens} new tokens each), best of "
              f"{args.repeats} interleaved rounds:")
        for name in ("serial", "batched"):
            print(f"  {name:<8}{best[name]:7.2f} s  {tokens / best[name]:8.1f} tokens/s   rounds "
                  f"{[round(t, 2) for t in times[name][1:]]}")
        print(f"  same answers: {same}/{args.concurrent}; median ratio "
              f"{statistics.median(times['serial'][1:]) / statistics.median(times['batched'][1:]):.2f}x")

        service = batched_app.state.service
        before = dict(service.stats)
        result = load_test(batched, args.clients, args.requests, args.timeout, args.max_tokens, args.seed)
        health = httpx.get(batched + "/health", timeout=10).json()
        stats = {k: v - before.get(k, 0) if k != "largest_batch" else v for k, v in service.stats.items()}

    print(f"load test: {args.clients} clients x {args.requests} requests in {result['wall']:.1f} s")
    print(f"  {'kind':<22} {'n':>4} {'p50 ms':>9} {'p99 ms':>9}  statuses")
    all_ms = []
    for kind in sorted(result["statuses"]):
        ms = [1000 * s for s in result["latencies"][kind]]
        all_ms += ms
        p50, p99 = (f"{np.percentile(ms, 50):9.0f}", f"{np.percentile(ms, 99):9.0f}") if ms else ("-", "-")
        codes = dict(sorted(result["statuses"][kind].items()))
        print(f"  {kind:<22} {sum(codes.values()):>4} {p50:>9} {p99:>9}  {codes}")
    five = sum(n for codes in result["statuses"].values() for code, n in codes.items() if code >= 500)
    print(f"  all answered: p50 {np.percentile(all_ms, 50):.0f} ms, p99 {np.percentile(all_ms, 99):.0f} ms; "
          f"5xx: {five}; hung: {len(result['hung'])}; client errors: {len(result['errors'])}")
    for error in result["errors"][:5]:
        print("   ", error)
    print(f"  server: {stats['batches']} generate batches (largest {stats['largest_batch']}), {stats['completed']} "
          f"answers, {stats['cancelled']} cancelled (dropped / abandoned), {stats['rejected']} refused (429); "
          f"/health after: {health['status']}, queued {health['queued']}")
    ratio = best["serial"] / best["batched"]
    print(f"bench_chat_server: {ratio:.2f}x throughput ({args.concurrent} concurrent, batched) vs serial")


if __name__ == "__main__":
    main()
