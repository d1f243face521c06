"""Building an index: `ImageIndex.build` embeds a source into the store (embed.py) and builds FAISS indexes over it
the autofaiss way; `add` / `delete` change it. Queries are answered by `SearchIndex` (search.py), which
`ImageIndex` extends.

FAISS construction: pick the index type from the vector count and a memory budget, train on a sample, add shard
by shard, tune the search parameter to a latency target on held-out queries and measure recall@k against exact
search. All indexes use inner product on L2-normalised vectors (= cosine similarity) and carry the row ids of the
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

import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from internvl_fm.evaluation import neighbor_recall_at_k
from internvl_fm.loading import atomic_write, clean_stale_temporaries

from .embed import SHARD_DIR, EmbedConfig, Embedder, EmbeddingStore, EmbedReport, ModelSpec, model_reference, \
    run_embedding
from .errors import IndexStateError, OptionError, SourceError, check_int, check_number
from .search import INDEX_FILE, KINDS, SearchIndex, _FaissIndex, exact_search, normalize, search_parameters
from .sources import Source, open_source

VectorShards = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]  # () -> iterator of (ids, float32 vectors)
Runner = Callable[[Source, Path, EmbedConfig, ModelSpec], EmbedReport]  # an embedding job: (source, out, config, model)

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30,
          "T": 2**40, "TB": 2**40}
FACTORY_FORMS = "Flat, HNSW{M}[,Flat], IVF{L},Flat, [OPQ{m}[_{d}],]IVF{L},PQ{m}[x{bits}]"
_FACTORY = re.compile(r"Flat|HNSW\d+(,Flat)?|IVF\d+,Flat|(OPQ\d+(_\d+)?,)?IVF\d+,PQ\d+(x\d+)?")


def parse_memory(value: str | int) -> int:
    """'4GB', '512M', '1.5G' or a number of bytes -> bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", value)
    if not match or match.group(2).upper().replace("IB", "B") not in _UNITS:
        raise ValueError(f"cannot read memory size {value!r}; use e.g. '4GB', '512MB' or a byte count")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper().replace("IB", "B")])


@dataclass
class IndexOptions:
    """How the FAISS indexes are chosen and tuned (checked when made; saved in index.json for `add`)."""

    max_index_memory: str | int = "4GB"
    factory: str | None = None  # force a factory string instead of choosing
    k: int = 10  # recall@k measured and tuned for
    num_queries: int = 500  # held-out tuning queries
    latency_target_ms: float = 10.0
    min_recall: float = 0.95
    flat_max: int = 50_000
    hnsw_max: int = 200_000
    opq_iterations: int = 20

    def __post_init__(self):
        try:
            parse_memory(self.max_index_memory)
        except (TypeError, ValueError):
            raise OptionError("max_index_memory", self.max_index_memory,
                              "cannot read memory size; use e.g. '4GB', '512MB' or a byte count") from None
        if self.factory is not None and not _FACTORY.fullmatch(self.factory):
            raise OptionError("factory", self.factory, f"unsupported index factory; use one of: {FACTORY_FORMS}")
        check_int("k", self.k, 1)
        check_int("num_queries", self.num_queries, 1)
        check_number("latency_target_ms", self.latency_target_ms, 0)
        check_number("min_recall", self.min_recall, 0, 1)
        check_int("flat_max", self.flat_max, 0)
        check_int("hnsw_max", self.hnsw_max, 0)
        check_int("opq_iterations", self.opq_iterations, 1)

    @classmethod
    def from_dict(cls, data: dict) -> IndexOptions:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    @property
    def max_memory_bytes(self) -> int:
        return parse_memory(self.max_index_memory)


# ------------------------------------------------------------------------------------------------- the choice
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

    @classmethod
    def forced(cls, factory: str, n: int, memory_bytes: int) -> IndexChoice:
        """The choice for a factory string given by the user (one of FACTORY_FORMS)."""
        family = ("flat" if factory.startswith("Flat") else "hnsw" if factory.startswith("HNSW")
                  else "ivfpq" if "PQ" in factory else "ivf")
        nlist = int(re.search(r"IVF(\d+)", factory).group(1)) if "IVF" in factory else 0
        if n < nlist:
            raise IndexStateError(f"factory {factory} needs at least {nlist} vectors to train its lists; there are {n}")
        return cls(factory, family, memory_bytes, nlist, train_size=min(n, 64 * nlist) if nlist else 0)


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


# ------------------------------------------------------------------------------------------------- the tuning
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
    """(neighbour recall@k over all queries, median single-query latency in ms over the first `latency_queries`)."""
    params = search_parameters(family, value, exclude)
    _, found = index.search(queries, k, params=params)
    recall = neighbor_recall_at_k(found, truth, k)
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


# -------------------------------------------------------------------------------------------------- the build
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
    """Choose, train (on a sample), fill (shard by shard), tune and measure an index over streamed shards (the
    keywords are those of `IndexOptions`)."""
    options = IndexOptions(max_memory, factory, k, num_queries, latency_target_ms, min_recall, flat_max, hnsw_max,
                           opq_iterations)
    return _build_faiss(shards, n, dim, options, seed, progress)


def _build_faiss(shards: VectorShards, n: int, dim: int, options: IndexOptions, seed: int = 0,
                 progress: bool = True) -> BuildResult:
    start = time.perf_counter()
    choice = choose_index(n, dim, options.max_memory_bytes, options.flat_max, options.hnsw_max)
    if options.factory:
        choice = IndexChoice.forced(options.factory, n, choice.memory_bytes)
    index = new_index(choice, dim, options.opq_iterations)
    query_positions, queries = sample_vectors(shards, n, min(options.num_queries, n), seed=seed + 1)
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
    result.tuning = evaluate(index, choice, shards, queries, options.k, options.latency_target_ms,
                             options.min_recall)
    result.build_seconds = time.perf_counter() - start
    return result


class ImageIndex(SearchIndex):
    """A searchable image (and caption) collection that can be built and changed.

    Build with `ImageIndex.build(source, out, model)`, open with `ImageIndex.load(out)`; extend with `add`, remove
    rows with `delete`; query with the `SearchIndex` methods (`search_text`, `search_image`, ...).
    """

    def __init__(self, root: str | os.PathLike, model: Embedder | None = None, mmap: bool = True,
                 device: str | None = None, dtype: str | None = None, quantization: str | None = None):
        super().__init__(root, model=model, mmap=mmap, device=device, dtype=dtype, quantization=quantization)
        self.last_report: EmbedReport | None = None  # of the last build / add in this process

    @classmethod
    def build(cls, source: Any, out: str | os.PathLike, model: Embedder | str | os.PathLike, *,
              mode: str = "InternVL-C", embed: EmbedConfig | None = None, options: IndexOptions | None = None,
              model_path: str | None = None, dtype: str | None = None, device: str | None = None,
              runner: Runner | None = None, quantization: str | None = None) -> ImageIndex:
        """Embed `source` into `out` (resuming a previous run) and build the image / caption indexes.

        `model` is an InternVL-C/G checkpoint path / hub id, or an already loaded model (then `model_path`, or
        its `name_or_path`, is what the index remembers for later loading). `dtype` (None: the checkpoint's),
        `device` and `quantization` ("int8": torchao weight-only, remembered by the index) apply when the model is
        loaded here. `runner(source, out, config, spec)` replaces the local
        embedding job (`distributed.build_distributed` passes the Ray job); the model is then not loaded here.
        The source and output folder are checked before the model is loaded; the options, the embedding
        settings and the model spec are saved in `index.json`, so `add` and search reuse them.
        """
        out = Path(out)
        _check_build_folders(source, out)
        src = _open_nonempty(source)
        options = options or IndexOptions()
        embed = embed or EmbedConfig()
        spec, model = _resolve_model(model, mode, model_path, dtype, device, load=runner is None,
                                     quantization=quantization)
        out.mkdir(parents=True, exist_ok=True)
        store = EmbeddingStore(out)
        config_file = out / INDEX_FILE
        config = json.loads(config_file.read_text()) if config_file.is_file() else {
            "model": spec.to_dict(), "image_roots": [], "sources": [], "deleted": []}
        _check_same_model(config, spec, out)
        saved_embed = {"captions": embed.captions, "storage_dtype": store.check_storage_dtype(embed.storage_dtype)}
        config.update(model=spec.to_dict(), options=asdict(options), embed=saved_embed)
        _remember_source(config, src)
        _write_json(config_file, config)  # before embedding: a resumed build knows its model and roots
        report = (runner or _local_runner(model))(src, out, embed, spec)
        if store.num_rows == 0:
            first = f" (e.g. {report.failures[0].source}: {report.failures[0].reason})" if report.failures else ""
            raise SourceError(f"no image of {source} could be read{first}: nothing to index")
        built = {kind: _build_kind(store, kind, options, spec, config.get("deleted", []), embed.progress)
                 for kind in KINDS}
        config["last_report"] = _report_dict(report)
        commit(out, config, {kind: target for kind, target in built.items() if target is not None})
        index = cls(out, model=model, device=device)
        index.last_report = report
        return index

    @property
    def options(self) -> IndexOptions:
        """The index options saved at build time (defaults for indexes built before they were saved)."""
        return IndexOptions.from_dict(self.config.get("options", {}))

    def add(self, source: Any, embed: EmbedConfig | None = None, runner: Runner | None = None) -> EmbedReport:
        """Embed `source` into the store and add the new rows to the indexes (incremental; ids continue).

        `embed` defaults to the settings the index was built with (captions, storage dtype); a new caption
        index is built with the saved index options.
        """
        embed = embed or EmbedConfig(**self.config.get("embed", {}))
        src = _open_nonempty(source)
        _remember_source(self.config, src)
        self._save_config()
        report = (runner or _local_runner(self.model))(src, self.root, embed, self.spec)
        self._writable()
        for kind in KINDS:
            if kind not in self.indexes:
                built = _build_kind(self.store, kind, self.options, self.spec, self.deleted.tolist(), embed.progress)
                if built is not None:
                    self.indexes[kind] = built
                continue
            target = self.indexes[kind]
            # rows embedded since the index was last saved (also those of an earlier add that was interrupted)
            for ids, vectors in self.store.iter_embeddings(kind, start_id=target.info["indexed_rows"]):
                target.index.add_with_ids(normalize(vectors), ids)
            target.info["indexed_rows"] = self.store.num_rows
            self._remeasure(kind)
        self.config["last_report"] = _report_dict(report)
        self.save()
        self._load_metadata()
        self.last_report = report
        return report

    def delete(self, ids: Any) -> int:
        """Remove rows by id from every index (their metadata stays, marked deleted). Returns how many were new."""
        ids = np.unique(np.asarray(ids, dtype=np.int64).ravel())
        bad = ids[(ids < 0) | (ids >= len(self))]
        if len(bad):
            raise IndexStateError(f"ids {bad[:10].tolist()} are not in the index (0..{len(self) - 1})")
        self._writable()
        new = np.setdiff1d(ids, self.deleted)
        for target in self.indexes.values():
            _remove_ids(target.index, new)
        self.deleted = np.union1d(self.deleted, new)
        self.config["deleted"] = self.deleted.tolist()
        self.save()
        return len(new)

    def save(self) -> None:
        """Commit the indexes and `index.json` as one atomic step (see `commit`)."""
        commit(self.root, self.config, self.indexes)

    def _save_config(self) -> None:
        _write_json(self.root / INDEX_FILE, self.config)

    def _writable(self) -> None:
        """Memory-mapped indexes are read-only: reload them into RAM before changing them."""
        if self._mmap:
            self.indexes = self._read_indexes(mmap=False)
            self._mmap = False

    def _remeasure(self, kind: str, num_queries: int = 200) -> None:
        """Re-measure recall@k of the current search knob after the index changed."""
        target = self.indexes[kind]
        shards = lambda: self.store.iter_embeddings(kind)
        n = sum(len(ids) for ids, _ in shards())
        _, queries = sample_vectors(shards, n, min(num_queries, n), seed=1)
        search = target.info.get("search") or {}
        choice = IndexChoice(target.info["factory"], target.family, 0, target.info.get("nlist", 0))
        result = evaluate(target.index, choice, shards, queries, search.get("k", 10), value=search.get("value"),
                          exclude=self.deleted)
        target.info["search"] = asdict(result) | {"curve": search.get("curve", [])}


# ----------------------------------------------------------------------------------------------------- helpers
def _local_runner(model: Embedder) -> Runner:
    return lambda source, out, config, spec: run_embedding(source, out, model, config, spec.mode)


def _check_build_folders(source: Any, out: Path) -> None:
    """Refuse an index folder as the source, and an output folder that is neither new, empty, an index nor an
    embedding store (e.g. the photos, when SOURCE and OUTPUT were swapped): nothing may be written into it."""
    if isinstance(source, (str, os.PathLike)) and (Path(source) / INDEX_FILE).is_file():
        raise IndexStateError(f"the source {source} is a search index, not images (did you swap SOURCE and "
                              f"OUTPUT?); to add images to it: `internvl-fm index add {source} SOURCE`")
    if out.exists() and not out.is_dir():
        raise IndexStateError(f"the output {out} is a file; give a folder")
    known = (out / INDEX_FILE).is_file() or (out / SHARD_DIR).is_dir()
    if out.is_dir() and not known and any(not p.name.startswith(".") for p in out.iterdir()):
        raise IndexStateError(f"the output folder {out} is not empty and holds no search index (did you swap SOURCE "
                              "and OUTPUT?); give a new or empty folder")


def _open_nonempty(source: Any) -> Source:
    """`open_source`, refusing a source without a single record (an empty folder would give a 0-row index)."""
    src = open_source(source)
    if next(iter(src), None) is None:
        raise SourceError(f"the source {source} holds no images: nothing to index")
    return src


def _resolve_model(model: Any, mode: str, model_path: str | None, dtype: str | None = None,
                   device: str | None = None, load: bool = True,
                   quantization: str | None = None) -> tuple[ModelSpec, Embedder | None]:
    if isinstance(model, (str, os.PathLike)):
        spec = ModelSpec(model_reference(model), mode, dtype=dtype, quantization=quantization)
        if not load:
            from internvl_fm.models.configuration_internvl import InternVLConfig

            spec.image_size = int(InternVLConfig.from_pretrained(spec.path).image_size)
            return spec, None
        return spec, spec.load(device)
    path = model_path or getattr(model, "name_or_path", None)
    if path is None:
        raise IndexStateError("a model object was given without `model_path` (and it has no `name_or_path`): "
                              "the index must remember how to load its model")
    dtype = getattr(model, "dtype", None)
    spec = ModelSpec(model_reference(path), mode, getattr(model, "image_size", None),
                     str(dtype).removeprefix("torch.") if dtype is not None else "float32")
    return spec, model


def _check_same_model(config: dict, spec: ModelSpec, out: Path) -> None:
    old = ModelSpec.from_dict(config["model"])
    if (old.path, old.mode) != (spec.path, spec.mode) and EmbeddingStore(out).num_rows:
        raise IndexStateError(f"{out} holds embeddings of {old.path} ({old.mode}); cannot continue it with "
                              f"{spec.path} ({spec.mode}) - use another output folder")


def _remember_source(config: dict, source: Source) -> None:
    if source.source_id not in config["sources"]:
        config["sources"].append(source.source_id)
    config["image_roots"] = sorted(set(config["image_roots"]) | set(source.roots))


def _remove_ids(index: Any, ids: np.ndarray) -> None:
    """Remove ids from a faiss index; HNSW cannot remove, its deleted ids are filtered at search time."""
    import faiss

    try:
        index.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, dtype=np.int64)))
    except RuntimeError:
        pass


def _build_kind(store: EmbeddingStore, kind: str, options: IndexOptions, spec: ModelSpec, deleted: list[int],
                progress: bool = True) -> _FaissIndex | None:
    """The FAISS index (with its description) over the store's `kind` vectors; None when there are none."""
    shards = lambda: store.iter_embeddings(kind)
    n = sum(len(ids) for ids, _ in shards())
    if n == 0:
        return None
    dim = next(shards())[1].shape[1]
    result = _build_faiss(shards, n, dim, options, progress=progress)
    if deleted:
        _remove_ids(result.index, np.asarray(deleted))
    info = {**result.info(), "model": spec.to_dict(), "kind": kind, "indexed_rows": store.num_rows}
    return _FaissIndex(result.index, info)


def _report_dict(report: EmbedReport) -> dict:
    data = asdict(report)
    data["failures"] = data["failures"][:1000]
    return data


_LEFTOVER = re.compile(r"\.((?:image|text)(?:\.\d+)?\.index(?:\.json)?)\..*\.(?:tmp|old)")


def _named_files(config: dict) -> set[str]:
    """The FAISS files a manifest names (the fixed names of the older layout when it names none)."""
    if "indexes" in config:
        return {entry["file"] for entry in config["indexes"].values()}
    return {name for kind in KINDS for name in (f"{kind}.index", f"{kind}.index.json")}


def _remove_unnamed(root: Path, config: dict) -> None:
    """Delete FAISS files the manifest `config` does not name and temporaries of crashed writes."""
    named = _named_files(config)
    clean_stale_temporaries(root / INDEX_FILE)
    for path in root.iterdir():
        leftover = _LEFTOVER.fullmatch(path.name)
        if leftover:
            clean_stale_temporaries(root / leftover.group(1))
        elif re.fullmatch(r"(image|text)(\.\d+)?\.index(\.json)?", path.name) and path.name not in named:
            path.unlink(missing_ok=True)


def commit(root: Path, config: dict, indexes: dict[str, _FaissIndex]) -> None:
    """Write `indexes` and the manifest `config` (index.json) as one atomic step.

    The FAISS files are written under new names (`KIND.{generation}.index`); `index.json`, written last with one
    rename, names them with their descriptions. A crash before that rename leaves the previous manifest and the
    files it names (the new files are orphans, removed here on the next write); after it, the new state. The files
    of the previous generation are removed once the manifest no longer names them."""
    root = Path(root)
    on_disk = json.loads((root / INDEX_FILE).read_text()) if (root / INDEX_FILE).is_file() else {}
    _remove_unnamed(root, on_disk)  # leftovers of an earlier crashed write
    generation = int(config.get("generation", 0)) + 1
    entries = {}
    for kind, target in indexes.items():
        target.info["ntotal"] = int(target.index.ntotal)
        name = f"{kind}.{generation}.index"
        target.write(root / name)
        entries[kind] = {"file": name, "info": dict(target.info)}
    config.update(generation=generation, indexes=entries)
    _write_json(root / INDEX_FILE, config)  # the commit point
    _remove_unnamed(root, config)


def _write_json(path: Path, data: dict) -> None:
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=1))
