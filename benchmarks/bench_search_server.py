"""Search service load test: 64 concurrent keep-alive clients against a real `internvl-fm serve` process (bundled
demo model, synthetic gallery), their requests mixed with hostile ones and dropped connections.

Each client sends `--requests` requests drawn from: text search (new and repeated texts), search by embedding, by an
indexed row id, by an indexed file path, by uploaded image bytes, GET /images/{id}; bad requests (k = Infinity,
`/images/²`, a lone surrogate, 100k-deep JSON, a path outside the roots, 9 query images, an oversized body); and
connections dropped mid-request (a raw socket that sends half a body and closes). A request counts as hung when it
gets no answer within `--timeout` seconds. Reported: p50 / p99 latency over all answered requests, by kind, the
number of 5xx and of hung requests; after the load, /health must still answer.

    python benchmarks/bench_search_server.py                # 64 clients x 20 requests (~1 minute on 2 cores)

Last line: `bench_search_server: <p99 ms> ms p99 at 64 clients, <n> 5xx`.
"""
from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


from internvl_fm.retrieval import SearchIndex


def build_index(folder: Path, images: int) -> Path:
    from internvl_fm import demo_model_path
    from internvl_fm.retrieval import EmbedConfig, ImageIndex
    from internvl_fm.training.data import SyntheticConfig, write_dataset

    write_dataset(folder / "photos", images, SyntheticConfig(image_size=56), progress=False)
    ImageIndex.build(folder / "photos", folder / "index", demo_model_path(),
                     embed=EmbedConfig(batch_size=32, num_workers=0, progress=False))
    return folder / "index"


def start_server(index: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "internvl_fm.cli", "serve", str(index), "--port", str(port),
                             "--device", "cpu", "--max-upload-mb", "1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(480):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit("bench_search_server: the server exited during start-up")
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("bench_search_server: the server did not start")


def dropped(port: int) -> None:
    """A client that sends half a body, then closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
                     b"\r\n{\"text\": \"hal")


JSON = {"Content-Type": "application/json"}
WORDS = ["red", "blue", "green", "circle", "square", "star", "small", "large", "left", "top"]


def request_kinds(image_paths: list[str], image_bytes: bytes, vector: list[float], rows: int):
    """(kind, bad, function(client, rng) -> response) for every request the clients draw from."""
    return [
        ("text", False, lambda c, r: c.get("/search", params={"text": " ".join(r.sample(WORDS, 3)), "k": 10})),
        ("text-cached", False, lambda c, r: c.post("/search", json={"text": "a red circle", "k": 5})),
        ("embedding", False, lambda c, r: c.post("/search", json={"embedding": vector, "k": 10})),
        ("by-id", False, lambda c, r: c.post("/search", json={"image": [r.randrange(rows)], "k": 5})),
        ("by-path", False, lambda c, r: c.post("/search", json={"image": [r.choice(image_paths)], "k": 5})),
        ("upload", False, lambda c, r: c.post("/search?k=5", content=image_bytes, headers={"Content-Type": "image/png"})),
        ("image-file", False, lambda c, r: c.get(f"/images/{r.randrange(rows)}")),
        ("bad-k", True, lambda c, r: c.post("/search", content=b'{"text": "x", "k": Infinity}', headers=JSON)),
        ("bad-id", True, lambda c, r: c.get("/images/\u00b2")),
        ("bad-surrogate", True, lambda c, r: c.post("/search", content=b'{"text": "\\ud800"}', headers=JSON)),
        ("bad-deep-json", True, lambda c, r: c.post("/search", content=b"[" * 100_000 + b"]" * 100_000, headers=JSON)),
        ("bad-path", True, lambda c, r: c.post("/search", json={"image": ["/etc/passwd"]})),
        ("bad-count", True, lambda c, r: c.post("/search", json={"image": [0] * 9})),
        ("bad-size", True, lambda c, r: c.post("/search", content=b"\0" * (2**20 + 1),
                                               headers={"Content-Type": "image/png"})),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--images", type=int, default=200, help="indexed synthetic images")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds after which a request counts as hung")
    parser.add_argument("--drop-every", type=int, default=10, help="every Nth request of a client is dropped")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        index = build_index(Path(tmp), args.images)
        print(f"built an index of {args.images} images in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        proc = start_server(index, port)
        try:
            image_paths = sorted(str(p) for p in (Path(tmp) / "photos" / "images").glob("*.png"))
            image_bytes = Path(image_paths[0]).read_bytes()
            vector = SearchIndex.load(index).stored_vector(1).tolist()
            kinds = request_kinds(image_paths, image_bytes, vector, args.images)
            latencies: dict[str, list[float]] = defaultdict(list)
            statuses: dict[str, list[int]] = defaultdict(list)
            hung, errors, drops = [0], [], [0]
            lock = threading.Lock()

            def client(seed: int) -> None:
                rng = random.Random(seed)
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=args.timeout) as c:
                    for i in range(args.requests):
                        if args.drop_every and i % args.drop_every == args.drop_every - 1:
                            dropped(port)
                            with lock:
                                drops[0] += 1
                            continue
                        kind, _, call = rng.choice(kinds)
                        start = time.perf_counter()
                        try:
                            status = call(c, rng).status_code
                        except httpx.TimeoutException:
                            with lock:
                                hung[0] += 1
                            continue
                        except httpx.HTTPError as exc:
                            with lock:
                                errors.append(f"{kind}: {type(exc).__name__}")
                            continue
                        with lock:
                            latencies[kind].append(time.perf_counter() - start)
                            statuses[kind].append(status)

            threads = [threading.Thread(target=client, args=(seed,)) for seed in range(args.clients)]
            start = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - start
            healthy = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    bad = {kind for kind, is_bad, _ in kinds if is_bad}
    all_ms = np.array([s for values in latencies.values() for s in values]) * 1000
    server_errors = sum(status >= 500 for values in statuses.values() for status in values)
    wrong = [(k, s) for k, values in statuses.items() for s in values if (k in bad) != (400 <= s < 500)]
    print(f"{'kind':<14} {'n':>5} {'p50 ms':>9} {'p99 ms':>9}  statuses")
    for kind, values in sorted(latencies.items()):
        ms = np.array(values) * 1000
        codes = ", ".join(f"{code} x{statuses[kind].count(code)}" for code in sorted(set(statuses[kind])))
        print(f"{kind:<14} {len(ms):>5} {np.percentile(ms, 50):>9.1f} {np.percentile(ms, 99):>9.1f}  {codes}")
    answered = len(all_ms)
    print(f"{args.clients} clients, {answered} answered requests + {drops[0]} dropped connections in {wall:.1f}s "
          f"({answered / wall:.1f} req/s); p50 {np.percentile(all_ms, 50):.1f} ms, p99 {np.percentile(all_ms, 99):.1f} "
          f"ms; {server_errors} 5xx, {hung[0]} hung, {len(errors)} transport errors, {len(wrong)} unexpected statuses; "
          f"health after the load: {'ok' if healthy else 'DOWN'}")
    if errors:
        print("transport errors:", sorted(set(errors))[:10])
    if wrong:
        print("unexpected statuses:", sorted(set(wrong))[:10])
    print(f"bench_search_server: {np.percentile(all_ms, 99):.0f} ms p99 at {args.clients} clients, "
          f"{server_errors} 5xx")
    if server_errors or hung[0] or errors or wrong or not healthy:
        sys.exit(1)


if __name__ == "__main__":
    main()
