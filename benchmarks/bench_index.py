"""Index benchmark: the index `internvl_fm.retrieval` chooses vs exact flat search, same data, same run.

Synthetic clustered embeddings (a low-dimensional mixture of clusters projected to `--dim` plus noise, then
L2-normalised, so that nearest neighbours mean something), written as an embedding store on disk, indexed the way
`internvl-fm index build` does (choice from N and --max-index-memory, training on a sample, adding shard by shard,
knob tuned on held-out queries). Reported: build time, index size vs budget, peak RSS, QPS and recall@10 of the
chosen index and of exact flat search over separate held-out queries.

    python benchmarks/bench_index.py                    # 100k x 768 (< 3 minutes on 2 cores)
    python benchmarks/bench_index.py --n 1000000         # the full 1M x 768 run

Last line: `bench_index: <ratio>x queries/s (...) vs exact flat search`.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np


def clustered_embeddings(n: int, dim: int, seed: int, clusters: int = 1000, latent: int = 64,
                         chunk: int = 100_000):
    """Yield float32 chunks of unit vectors: cluster centre + noise in a `latent`-d space, projected to `dim`."""
    rng = np.random.default_rng(0)  # the same clusters and projection for data and queries
    centres = rng.normal(size=(clusters, latent)).astype(np.float32)
    projection = (rng.normal(size=(latent, dim)) / np.sqrt(latent)).astype(np.float32)
    rng = np.random.default_rng(seed)
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        z = centres[rng.integers(0, clusters, m)] + 0.35 * rng.normal(size=(m, latent)).astype(np.float32)
        x = z @ projection + 0.05 * rng.normal(size=(m, dim)).astype(np.float32)
        yield (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def qps(search, queries: np.ndarray, repeat: int = 1) -> float:
    search(queries[:10])  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        search(queries)
    return repeat * len(queries) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="indexed vectors")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=1000, help="held-out evaluation queries")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--max-index-memory", default="4GB")
    parser.add_argument("--min-recall", type=float, default=0.96, help="recall the knob is tuned for")
    parser.add_argument("--latency-target-ms", type=float, default=10.0)
    parser.add_argument("--shard-rows", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=0, help="faiss threads (0: all)")
    args = parser.parse_args()

    import faiss
    from internvl_fm.evaluation import neighbor_recall_at_k
    from internvl_fm.retrieval import EmbeddingStore, ShardInfo, build_index, parse_memory
    from internvl_fm.retrieval.search import search_parameters

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_index_") as tmp:
        store = EmbeddingStore(tmp)
        t0 = time.perf_counter()
        first = 0
        for index, chunk in enumerate(clustered_embeddings(args.n, args.dim, seed=1, chunk=args.shard_rows)):
            rows = len(chunk)
            meta = {"id": list(range(first, first + rows)), "key": [str(i) for i in range(first, first + rows)],
                    "image_path": [None] * rows, "caption": [None] * rows, "source": ["bench"] * rows,
                    "position": list(range(first, first + rows))}
            store.write_shard(ShardInfo(index, "bench", first, first + rows, first, rows, False, args.dim), chunk,
                              None, meta)
            first += rows
        print(f"wrote {args.n} x {args.dim} clustered embeddings in {time.perf_counter() - t0:.1f}s")
        queries = next(clustered_embeddings(args.queries, args.dim, seed=2, chunk=args.queries))

        t0 = time.perf_counter()
        built = build_index(store.iter_embeddings, args.n, args.dim, args.max_index_memory, k=args.k,
                            latency_target_ms=args.latency_target_ms, min_recall=args.min_recall, progress=False)
        build_s = time.perf_counter() - t0
        index_bytes = len(faiss.serialize_index(built.index))
        tuning = built.tuning
        print(f"built {built.choice.factory} in {build_s:.1f}s (train {built.train_seconds:.1f}s, add "
              f"{built.add_seconds:.1f}s); {tuning.parameter}={tuning.value}; tuning recall@{args.k} "
              f"{tuning.recall:.4f}; index {index_bytes / 2**30:.2f} GiB of {parse_memory(args.max_index_memory) / 2**30:.2f} GiB")

        data = np.concatenate([v for _, v in store.iter_embeddings()])
        params = search_parameters(built.choice.family, tuning.value)
        ann_ids = built.index.search(queries, args.k, params=params)[1]
        exact = faiss.knn(queries, data, args.k, metric=faiss.METRIC_INNER_PRODUCT)[1]
        recall = neighbor_recall_at_k(ann_ids, exact, args.k)
        ann_qps = qps(lambda q: built.index.search(q, args.k, params=params), queries, repeat=3)
        flat_qps = qps(lambda q: faiss.knn(q, data, args.k, metric=faiss.METRIC_INNER_PRODUCT), queries)
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"held-out queries: recall@{args.k} {recall:.4f}; {built.choice.factory} {ann_qps:,.0f} q/s; "
              f"exact flat {flat_qps:,.0f} q/s; peak RSS {peak_rss:.2f} GiB (includes the flat baseline's copy)")
        within = "within" if index_bytes <= parse_memory(args.max_index_memory) else "OVER"
        print(f"bench_index: {ann_qps / flat_qps:.1f}x queries/s ({built.choice.factory}, recall@{args.k} "
              f"{recall:.3f}, {args.n} x {args.dim}, {index_bytes / 2**30:.2f} GiB {within} "
              f"{args.max_index_memory}) vs exact flat search")


if __name__ == "__main__":
    main()
