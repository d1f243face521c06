"""FAISS index construction the autofaiss way: pick the index type from the vector count and a memory budget,
train on a sample, add shard by shard, tune the search parameter to a latency target on held-out queries and
measure recall@k against exact search.

All indexes use inner product on L2-normalised vectors (= cosine similarity) and carry the row ids of the
embedding store (`add_with_ids`), so an id found in any index points at the same metadata row.

Choice (first that fits `max_memory`):

==========================  ==========================================================  ===================
factory                     when                                                        tuned parameter
==========================  ==========================================================  ===================
``Flat``                    n <= ``flat_max`` (exact search is fast enough)             --
``HNSW32,Flat``             n <= ``hnsw_max`` and the graph fits                        ``efSearch``
``IVF{L},Flat``             the raw vectors fit                                         ``nprobe``
``OPQ{m}_{d'},IVF{L},PQ{m}``  otherwise; the largest ``m`` whose codes fit               ``nprobe``
==========================  ==========================================================  ===================
"""
from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .errors import IndexStateError

VectorShards = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]  # () -> iterator of (ids, float32 vectors)

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30,
          "T": 2**40, "TB": 2**40}


def parse_memory(value: str | int) -> int:
    """'4GB', '512M', '1.5G' or a number of bytes -> bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", value)
    if not match or match.group(2).upper().replace("IB", "B") not in _UNITS:
        raise ValueError(f"cannot read memory size {value!r}; use e.g. '4GB', '512MB' or a byte count")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper().replace("IB", "B")])


FACTORY_FORMS = "Flat, HNSW{M}[,Flat], IVF{L},Flat, [OPQ{m}[_{d}],]IVF{L},PQ{m}[x{bits}]"
_FACTORY = re.compile(r"Flat|HNSW\d+(,Flat)?|IVF\d+,Flat|(OPQ\d+(_\d+)?,)?IVF\d+,PQ\d+(x\d+)?")


def check_factory(factory: str | None) -> str | None:
    """A forced FAISS factory string, if it is one of the forms the builder knows how to train and tune."""
    if factory is not None and not _FACTORY.fullmatch(factory):
        raise IndexStateError(f"unsupported index factory {factory!r}; use one of: {FACTORY_FORMS}")
    return factory


@dataclass
class IndexChoice:
    """The chosen index: factory string, family, estimated memory and the parameter to tune."""

    factory: str
    family: str  # "flat" | "hnsw" | "ivf" | "ivfpq"
    memory_bytes: int
    nlist: int = 0
    train_size: int = 0  # vectors needed for training (0: no training)

    @property
    def tuned_parameter(self) -> str | None:
        return {"flat": None, "hnsw": "efSearch"}.get(self.family, "nprobe")


def _nlist(n: int) -> int:
    """IVF list count: ~4 sqrt(n), a power of two, at least 39 training points per list."""
    target = 2 ** round(math.log2(max(16.0, 4 * math.sqrt(n))))
    return int(max(16, min(target, 2 ** int(math.log2(max(16, n // 39))), 65536)))


def estimate_memory(family: str, n: int, dim: int, nlist: int = 0, m: int = 0, hnsw_m: int = 32) -> int:
    """Bytes the index needs in RAM (vectors / codes, ids, graph or centroids)."""
    ids = 16 * n  # id map (+ reverse map for IDMap2)
    if family == "flat":
        return n * dim * 4 + ids
    if family == "hnsw":
        return int(n * (dim * 4 + hnsw_m * 2 * 4 * 1.1)) + ids
    if family == "ivf":
        return n * (dim * 4 + 8) + nlist * dim * 4
    if family == "ivfpq":
        return n * (m + 8) + nlist * 4 * m * 4 + (4 * m) * dim * 4 + m * 256 * 4 * 4
    raise ValueError(f"unknown index family {family!r}")


def choose_index(n: int, dim: int, max_memory: str | int = "4GB", flat_max: int = 50_000,
                 hnsw_max: int = 200_000) -> IndexChoice:
    """Pick the index for `n` vectors of `dim` within `max_memory` bytes (see the module docstring)."""
    budget = parse_memory(max_memory)
    if n <= 0:
        raise IndexStateError("cannot build an index over 0 vectors")
    flat = estimate_memory("flat", n, dim)
    if n <= flat_max and flat <= budget:
        return IndexChoice("Flat", "flat", flat)
    hnsw = estimate_memory("hnsw", n, dim)
    if n <= hnsw_max and hnsw <= budget:
        return IndexChoice("HNSW32,Flat", "hnsw", hnsw)
    nlist = _nlist(n)
    ivf = estimate_memory("ivf", n, dim, nlist)
    if ivf <= budget:
        return IndexChoice(f"IVF{nlist},Flat", "ivf", ivf, nlist, train_size=min(n, 64 * nlist))
    for m in (256, 128, 96, 64, 48, 32, 24, 16, 12, 8, 4):
        if m > dim:
            continue
        memory = estimate_memory("ivfpq", n, dim, nlist, m)
        if memory <= budget:
            out_dim = min(dim, 4 * m) // m * m
            nbits = 8 if n >= 40 * 256 else 4  # PQ with 256 centroids per sub-quantizer needs ~10k points
            return IndexChoice(f"OPQ{m}_{out_dim},IVF{nlist},PQ{m}x{nbits}", "ivfpq", memory, nlist,
                               train_size=min(n, max(64 * nlist, 40 * 2**nbits)))
    raise IndexStateError(f"{n} vectors of dimension {dim} do not fit in {budget} bytes even as 4-byte PQ codes "
                          f"(need about {estimate_memory('ivfpq', n, dim, nlist, 4)}); raise --max-index-memory")


def new_index(choice: IndexChoice, dim: int, opq_iterations: int = 20, opq_max_train: int = 32_768):
    """An empty (untrained) faiss index for `choice` that accepts `add_with_ids`.

    OPQ training costs one PQ training per iteration (faiss default: 50 iterations on up to 65k vectors); the
    rotation converges much earlier, so fewer iterations on a smaller sample are used.
    """
    import faiss

    index = faiss.index_factory(dim, choice.factory, faiss.METRIC_INNER_PRODUCT)
    if choice.family in ("flat", "hnsw"):
        index = faiss.IndexIDMap2(index)
    elif isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            transform = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(transform, faiss.OPQMatrix):
                transform.niter = opq_iterations
                transform.max_train_points = opq_max_train
    return index


def search_parameters(family: str, value: int | None, exclude: np.ndarray | None = None):
    """faiss SearchParameters for one search: the tuned knob and an optional id exclusion (deleted ids).

    Passing the knob per call (instead of setting it on the index) keeps concurrent searches independent.
    """
    import faiss

    sel = None
    if exclude is not None and len(exclude):
        sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.ascontiguousarray(exclude, dtype=np.int64)))
    if family == "hnsw":
        params = faiss.SearchParametersHNSW()
        if value:
            params.efSearch = int(value)
    elif family in ("ivf", "ivfpq"):
        params = faiss.SearchParametersIVF()
        if value:
            params.nprobe = int(value)
    else:
        params = faiss.SearchParameters()
    if sel is not None:
        params.sel = sel
        params._keep_alive = sel  # the swig object must outlive the params
    return params


def normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation (float32, contiguous); zero rows stay zero."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def exact_search(shards: Iterable[tuple[np.ndarray, np.ndarray]], queries: np.ndarray, k: int,
                 exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product search streamed over `(ids, vectors)` shards (memory: one shard)."""
    import faiss

    queries = normalize(queries)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for ids, vectors in shards:
        if exclude is not None and len(exclude):
            keep = ~np.isin(ids, exclude)
            ids, vectors = ids[keep], vectors[keep]
        if not len(ids):
            continue
        distances, positions = faiss.knn(queries, normalize(vectors), min(k, len(ids)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(distances, np.where(positions >= 0, ids[np.maximum(positions, 0)], -1))
    heap.finalize()
    return heap.D, heap.I


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of the true top-k ids that the approximate top-k contains."""
    hits = [len(set(f[:k]) & set(t[:k]) - {-1}) / max(1, len(set(t[:k]) - {-1})) for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else 1.0


@dataclass
class TuneResult:
    """The tuned search parameter with its measured recall and latency, and the whole measured curve."""

    parameter: str | None
    value: int | None
    recall: float
    latency_ms: float
    k: int
    num_queries: int
    curve: list[dict] = field(default_factory=list)


def _candidates(family: str, nlist: int, k: int) -> list[int | None]:
    if family == "hnsw":
        return [v for v in (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024) if v >= k] or [k]
    if family in ("ivf", "ivfpq"):
        values, v = [], 1
        while v < nlist:
            values.append(v)
            v = v * 2 if v < 8 else int(v * 1.5)
        return values + [nlist]
    return [None]


def measure(index, family: str, value: int | None, queries: np.ndarray, truth: np.ndarray, k: int,
            latency_queries: int = 100, exclude: np.ndarray | None = None) -> tuple[float, float]:
    """(recall@k over all queries, median single-query latency in ms over the first `latency_queries`)."""
    params = search_parameters(family, value, exclude)
    _, found = index.search(queries, k, params=params)
    recall = recall_at_k(found, truth, k)
    times = []
    for row in queries[:latency_queries]:
        start = time.perf_counter()
        index.search(row[None], k, params=params)
        times.append(time.perf_counter() - start)
    return recall, float(np.median(times)) * 1000 if times else 0.0


def tune(index, family: str, queries: np.ndarray, truth: np.ndarray, k: int = 10, latency_target_ms: float = 10.0,
         min_recall: float = 0.95, nlist: int = 0, exclude: np.ndarray | None = None) -> TuneResult:
    """Pick the search knob: the fastest setting that reaches `min_recall` within the latency target, else the
    best recall within the target (the cheapest setting if none is within it)."""
    parameter = {"hnsw": "efSearch", "ivf": "nprobe", "ivfpq": "nprobe"}.get(family)
    curve = []
    for value in _candidates(family, nlist, k):
        recall, latency = measure(index, family, value, queries, truth, k, exclude=exclude)
        curve.append({"value": value, "recall": recall, "latency_ms": latency})
        if recall >= min_recall or latency > latency_target_ms or recall >= 0.9999:
            break
    within = [c for c in curve if c["latency_ms"] <= latency_target_ms] or curve[:1]
    good = [c for c in within if c["recall"] >= min_recall]
    best = good[0] if good else max(within, key=lambda c: c["recall"])
    return TuneResult(parameter, best["value"], best["recall"], best["latency_ms"], k, len(queries), curve)


def sample_vectors(shards: VectorShards, n: int, size: int, seed: int = 0,
                   exclude_positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Uniform sample of `size` rows (by stream position) from the shards: (positions, vectors)."""
    rng = np.random.default_rng(seed)
    pool = np.arange(n)
    if exclude_positions is not None and len(exclude_positions):
        pool = np.setdiff1d(pool, exclude_positions)
    chosen = np.sort(rng.choice(pool, size=min(size, len(pool)), replace=False))
    parts, offset = [], 0
    for _, vectors in shards():
        lo, hi = np.searchsorted(chosen, [offset, offset + len(vectors)])
        if hi > lo:
            parts.append(np.asarray(vectors)[chosen[lo:hi] - offset])
        offset += len(vectors)
    dim = parts[0].shape[1] if parts else 0
    return chosen, normalize(np.concatenate(parts)) if parts else np.zeros((0, dim), np.float32)


@dataclass
class BuildResult:
    """A built index and what is saved beside it."""

    index: object
    choice: IndexChoice
    tuning: TuneResult | None
    ntotal: int
    dim: int
    build_seconds: float
    train_seconds: float = 0.0
    add_seconds: float = 0.0

    def info(self) -> dict:
        """JSON-able description (factory, memory, tuned knob, recall@k, latency)."""
        return {"factory": self.choice.factory, "family": self.choice.family, "metric": "inner_product",
                "normalized": True, "ntotal": self.ntotal, "dim": self.dim, "nlist": self.choice.nlist,
                "estimated_memory_bytes": self.choice.memory_bytes,
                "build_seconds": round(self.build_seconds, 3), "train_seconds": round(self.train_seconds, 3),
                "add_seconds": round(self.add_seconds, 3),
                "search": asdict(self.tuning) if self.tuning else None}


def build_index(shards: VectorShards, n: int, dim: int, max_memory: str | int = "4GB", *, factory: str | None = None,
                k: int = 10, num_queries: int = 500, latency_target_ms: float = 10.0, min_recall: float = 0.95,
                flat_max: int = 50_000, hnsw_max: int = 200_000, opq_iterations: int = 20, seed: int = 0,
                progress: bool = True) -> BuildResult:
    """Choose, train (on a sample), fill (shard by shard), tune and measure an index over streamed shards."""
    start = time.perf_counter()
    choice = choose_index(n, dim, max_memory, flat_max, hnsw_max)
    if factory:
        family = ("flat" if factory.startswith("Flat") else "hnsw" if factory.startswith("HNSW")
                  else "ivfpq" if "PQ" in factory else "ivf")
        nlist = int(re.search(r"IVF(\d+)", factory).group(1)) if "IVF" in factory else 0
        choice = IndexChoice(factory, family, choice.memory_bytes, nlist,
                             train_size=min(n, 64 * nlist) if nlist else 0)
        if n < nlist:
            raise IndexStateError(f"factory {factory} needs at least {nlist} vectors to train its lists; "
                                  f"there are {n}")
    index = new_index(choice, dim, opq_iterations)
    query_positions, queries = sample_vectors(shards, n, min(num_queries, n), seed=seed + 1)
    train_seconds = 0.0
    if not index.is_trained:
        t0 = time.perf_counter()
        # train on vectors other than the held-out tuning queries when there are enough of them
        exclude = query_positions if n - len(query_positions) >= choice.train_size else None
        _, train = sample_vectors(shards, n, choice.train_size, seed=seed, exclude_positions=exclude)
        index.train(train)
        train_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    for ids, vectors in tqdm(shards(), desc=f"adding to {choice.factory}", unit="shard", disable=not progress):
        index.add_with_ids(normalize(vectors), np.ascontiguousarray(ids, dtype=np.int64))
    add_seconds = time.perf_counter() - t0
    result = BuildResult(index, choice, None, int(index.ntotal), dim, 0.0, train_seconds, add_seconds)
    result.tuning = evaluate(index, choice, shards, queries, k, latency_target_ms, min_recall)
    result.build_seconds = time.perf_counter() - start
    return result


def evaluate(index, choice: IndexChoice, shards: VectorShards, queries: np.ndarray, k: int = 10,
             latency_target_ms: float = 10.0, min_recall: float = 0.95, value: int | None = None,
             exclude: np.ndarray | None = None) -> TuneResult:
    """Exact ground truth for `queries`, then tune (or, with `value`, just measure) the search knob."""
    k = min(k, int(index.ntotal)) or 1
    _, truth = exact_search(shards(), queries, k, exclude)
    if value is not None or choice.family == "flat":
        recall, latency = measure(index, choice.family, value, queries, truth, k, exclude=exclude)
        return TuneResult(choice.tuned_parameter, value, recall, latency, k, len(queries),
                          [{"value": value, "recall": recall, "latency_ms": latency}])
    return tune(index, choice.family, queries, truth, k, latency_target_ms, min_recall, choice.nlist, exclude)
