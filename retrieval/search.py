"""`ImageIndex`: an embedding store + FAISS indexes (images, and captions for image -> text) + the model spec.

Folder layout (everything in one output folder, clip-retrieval + autofaiss style)::

    img_emb/ text_emb/ metadata/ shards/    the embedding store (see store.py)
    image.index  image.index.json           FAISS index over image embeddings + its description
    text.index   text.index.json            FAISS index over caption embeddings (when there are captions)
    index.json                              model spec, image roots, sources, deleted ids
"""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from internvl_fm.loading import atomic_write

from .embed import EmbedConfig, Embedder, EmbedReport, ModelSpec, model_reference, run_embedding
from .errors import IndexNotFoundError, IndexStateError, SourceError
from .index import (BuildResult, IndexChoice, build_index, check_factory, evaluate, normalize, parse_memory,
                    sample_vectors, search_parameters)
from .sources import Source, open_source
from .store import SHARD_DIR, EmbeddingStore

INDEX_FILE = "index.json"
KINDS = ("image", "text")
Runner = Callable[[Source, Path, EmbedConfig], EmbedReport]  # an embedding job: (source, out, config) -> report


@dataclass
class Hit:
    """One search result: the row id, its similarity (cosine) and its metadata."""

    id: int
    score: float
    image_path: str | None
    caption: str | None
    key: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class IndexOptions:
    """How the FAISS indexes are chosen and tuned."""

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
        except ValueError as exc:
            raise IndexStateError(str(exc)) from None
        check_factory(self.factory)
        if not 0.0 <= self.min_recall <= 1.0 or not self.latency_target_ms >= 0 or self.k < 1:
            raise IndexStateError(f"need 0 <= min_recall <= 1, latency_target_ms >= 0 and k >= 1: got "
                                  f"{self.min_recall}, {self.latency_target_ms}, {self.k}")

    @classmethod
    def from_dict(cls, data: dict) -> IndexOptions:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


class _FaissIndex:
    """One FAISS index file + its JSON description (factory, tuned knob, recall)."""

    def __init__(self, index: Any, info: dict):
        self.index, self.info = index, info

    @property
    def family(self) -> str:
        return self.info["family"]

    @property
    def knob(self) -> int | None:
        search = self.info.get("search") or {}
        return search.get("value")

    @classmethod
    def read(cls, path: Path, mmap: bool) -> _FaissIndex:
        import faiss

        info = json.loads(path.with_name(path.name + ".json").read_text())
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0)
        return cls(index, info)

    def write(self, path: Path) -> None:
        import faiss

        with atomic_write(path) as tmp:
            faiss.write_index(self.index, tmp)
        with atomic_write(path.with_name(path.name + ".json")) as tmp:
            Path(tmp).write_text(json.dumps(self.info, indent=1))

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k, params=search_parameters(self.family, self.knob, exclude))


class ImageIndex:
    """A searchable image (and caption) collection.

    Build with `ImageIndex.build(source, out, model)`, open with `ImageIndex.load(out)`; query with
    `search_text`, `search_image`, `search_embedding`, or `image_to_text` (captions for an image).
    """

    def __init__(self, root: str | os.PathLike, model: Embedder | None = None, mmap: bool = True,
                 device: str | None = None, dtype: str | None = None):
        self.root = Path(root)
        config_file = self.root / INDEX_FILE
        if not config_file.is_file():
            raise IndexNotFoundError(f"no search index in {self.root} (missing {INDEX_FILE}); "
                                     "build one with `internvl-fm index build SRC OUT --model M`")
        self.config = json.loads(config_file.read_text())
        self.spec = ModelSpec.from_dict(self.config["model"])
        self.store = EmbeddingStore(self.root)
        self._model = model
        self.last_report: EmbedReport | None = None  # of the last build / add in this process
        self._device, self._dtype = device, dtype  # how to load the model (dtype None: the spec's)
        self._lock = threading.Lock()
        self._mmap = mmap
        self.indexes: dict[str, _FaissIndex] = {}
        for kind in KINDS:
            path = self.root / f"{kind}.index"
            if path.is_file():
                self.indexes[kind] = _FaissIndex.read(path, mmap)
        self.deleted = np.asarray(sorted(self.config.get("deleted", [])), dtype=np.int64)
        self._load_metadata()

    def _load_metadata(self) -> None:
        table = self.store.read_metadata(["id", "key", "image_path", "caption"])
        self._keys = table.column("key").to_pylist()
        self._paths = table.column("image_path").to_pylist()
        self._captions = table.column("caption").to_pylist()

    # --------------------------------------------------------------------------------------------- construction
    @classmethod
    def build(cls, source: Any, out: str | os.PathLike, model: Embedder | str | os.PathLike, *,
              mode: str = "InternVL-C", embed: EmbedConfig | None = None, options: IndexOptions | None = None,
              model_path: str | None = None, dtype: str | None = None, device: str | None = None,
              runner: Runner | None = None) -> ImageIndex:
        """Embed `source` into `out` (resuming a previous run) and build the image / caption indexes.

        `model` is an InternVL-C/G checkpoint path / hub id, or an already loaded model (then `model_path`, or
        its `name_or_path`, is what the index remembers for later loading). `dtype` (None: the checkpoint's) and
        `device` apply when the model is loaded here. `runner(source, out, config)` replaces the local embedding
        job (`distributed.build_distributed` passes the Ray job); the model is then not loaded here.
        The source and output folder are checked before the model is loaded; the options, the embedding
        settings and the model spec are saved in `index.json`, so `add` and search reuse them.
        """
        out = Path(out)
        _check_build_folders(source, out)
        src = _open_nonempty(source)
        options = options or IndexOptions()
        spec, model = _resolve_model(model, mode, model_path, dtype, device, load=runner is None)
        out.mkdir(parents=True, exist_ok=True)
        store = EmbeddingStore(out)
        embed = replace(embed or EmbedConfig(), mode=mode)
        embed.storage_dtype = store.check_storage_dtype(embed.storage_dtype)
        config_file = out / INDEX_FILE
        config = json.loads(config_file.read_text()) if config_file.is_file() else {
            "model": spec.to_dict(), "image_roots": [], "sources": [], "deleted": []}
        _check_same_model(config, spec, out)
        config.update(model=spec.to_dict(), options=asdict(options),
                      embed={"captions": embed.captions, "storage_dtype": embed.storage_dtype})
        _remember_source(config, src)
        _write_json(config_file, config)  # before embedding: a resumed build knows its model and roots
        report = runner(src, out, embed) if runner else run_embedding(src, out, model, embed)
        if store.num_rows == 0:
            first = f" (e.g. {report.failures[0].source}: {report.failures[0].reason})" if report.failures else ""
            raise SourceError(f"no image of {source} could be read{first}: nothing to index")
        for kind in KINDS:
            built = _build_kind(store, kind, options, config.get("deleted", []))
            if built is not None:
                info = {**built.info(), "model": spec.to_dict(), "kind": kind, "indexed_rows": store.num_rows}
                _FaissIndex(built.index, info).write(out / f"{kind}.index")
        config["last_report"] = _report_dict(report)
        _write_json(config_file, config)
        index = cls(out, model=model, device=device)
        index.last_report = report
        return index

    @classmethod
    def load(cls, path: str | os.PathLike, model: Embedder | None = None, mmap: bool = True,
             device: str | None = None, dtype: str | None = None) -> ImageIndex:
        """Open a built index (memory-mapped by default); the model is loaded from the saved spec on first use
        (on `device`, in `dtype` when given, else in the dtype the index was built with)."""
        return cls(path, model=model, mmap=mmap, device=device, dtype=dtype)

    def add(self, source: Any, embed: EmbedConfig | None = None, runner: Runner | None = None) -> EmbedReport:
        """Embed `source` into the store and add the new rows to the indexes (incremental; ids continue).

        `embed` defaults to the settings the index was built with (captions, storage dtype); a new caption
        index is built with the saved index options.
        """
        embed = replace(embed or EmbedConfig(**self.config.get("embed", {})), mode=self.spec.mode)
        src = _open_nonempty(source)
        _remember_source(self.config, src)
        self._save_config()
        report = runner(src, self.root, embed) if runner else run_embedding(src, self.root, self.model, embed)
        self._writable()
        for kind in KINDS:
            if kind not in self.indexes:
                built = _build_kind(self.store, kind, self.options, self.deleted.tolist())
                if built is not None:
                    self.indexes[kind] = _FaissIndex(built.index, {**built.info(), "model": self.spec.to_dict(),
                                                                   "kind": kind, "indexed_rows": self.store.num_rows})
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
        import faiss

        ids = np.unique(np.asarray(ids, dtype=np.int64).ravel())
        bad = ids[(ids < 0) | (ids >= len(self))]
        if len(bad):
            raise IndexStateError(f"ids {bad[:10].tolist()} are not in the index (0..{len(self) - 1})")
        self._writable()
        new = np.setdiff1d(ids, self.deleted)
        for target in self.indexes.values():
            try:
                target.index.remove_ids(faiss.IDSelectorBatch(new))
            except RuntimeError:  # HNSW cannot remove: the deleted ids are filtered at search time
                pass
        self.deleted = np.union1d(self.deleted, new)
        self.config["deleted"] = self.deleted.tolist()
        self.save()
        return len(new)

    def save(self) -> None:
        """Write the indexes and `index.json` atomically."""
        for kind, target in self.indexes.items():
            target.info["ntotal"] = int(target.index.ntotal)
            target.write(self.root / f"{kind}.index")
        self._save_config()

    def _save_config(self) -> None:
        _write_json(self.root / INDEX_FILE, self.config)

    def _writable(self) -> None:
        """Memory-mapped indexes are read-only: reload them into RAM before changing them."""
        if self._mmap:
            for kind in list(self.indexes):
                self.indexes[kind] = _FaissIndex.read(self.root / f"{kind}.index", mmap=False)
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

    # ------------------------------------------------------------------------------------------------ the model
    @property
    def model(self) -> Embedder:
        """The embedding model (loaded from the saved spec on first use)."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = self.spec.load(self._device, self._dtype)
        return self._model

    def embed_text(self, texts: str | list[str]) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.model.embed_texts(texts, mode=self.spec.mode).float().cpu().numpy()

    def embed_image(self, images: Any) -> np.ndarray:
        """Embed PIL images, paths or bytes (decoded with `internvl_fm.processing.load_image`)."""
        from internvl_fm.processing import load_image

        items = images if isinstance(images, (list, tuple)) else [images]
        pil = [load_image(x) for x in items]
        return self.model.embed_images(pil, mode=self.spec.mode).float().cpu().numpy()

    # ----------------------------------------------------------------------------------------------- searching
    def __len__(self) -> int:
        return len(self._keys)

    @property
    def ntotal(self) -> int:
        """Vectors searchable in the image index."""
        if "image" not in self.indexes:
            return 0
        return int(self.indexes["image"].index.ntotal) - self._hnsw_tombstones("image")

    def _hnsw_tombstones(self, kind: str) -> int:
        return len(self.deleted) if kind in self.indexes and self.indexes[kind].family == "hnsw" else 0

    @property
    def options(self) -> IndexOptions:
        """The index options saved at build time (defaults for indexes built before they were saved)."""
        return IndexOptions.from_dict(self.config.get("options", {}))

    @property
    def image_roots(self) -> list[str]:
        return list(self.config.get("image_roots", []))

    @property
    def info(self) -> dict:
        """Descriptions of the indexes (factory, recall@k, latency) and the model spec."""
        return {"model": self.spec.to_dict(), "rows": len(self), "deleted": len(self.deleted),
                **{kind: target.info for kind, target in self.indexes.items()}}

    def is_deleted(self, id_: int) -> bool:
        position = int(np.searchsorted(self.deleted, id_))
        return position < len(self.deleted) and int(self.deleted[position]) == id_

    def hit(self, id_: int, score: float) -> Hit:
        return Hit(int(id_), float(score), self._paths[id_], self._captions[id_], self._keys[id_])

    def search_embedding(self, vectors: Any, k: int = 10, kind: str = "image") -> list[Hit] | list[list[Hit]]:
        """Nearest rows to one vector (-> list of hits) or a batch [N, D] (-> one list per row), best first."""
        if kind not in self.indexes:
            raise IndexStateError(f"{self.root} has no {kind} index" + (" (the source had no captions)"
                                                                        if kind == "text" else ""))
        if hasattr(vectors, "detach"):
            vectors = vectors.detach().float().cpu().numpy()
        array = np.asarray(vectors, dtype=np.float32)
        single = array.ndim == 1
        queries = normalize(array)
        target = self.indexes[kind]
        if queries.shape[1] != target.index.d:
            raise IndexStateError(f"query dimension {queries.shape[1]} does not match the index ({target.index.d})")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        scores, ids = target.search(queries, k, self.deleted if len(self.deleted) else None)
        results = [[self.hit(i, s) for s, i in zip(row_s, row_i) if i >= 0] for row_s, row_i in zip(scores, ids)]
        return results[0] if single else results

    def search_text(self, query: str | list[str], k: int = 10) -> list[Hit] | list[list[Hit]]:
        """Images best matching a text query (any language the tokenizer covers)."""
        vectors = self.embed_text(query)
        return self.search_embedding(vectors[0] if isinstance(query, str) else vectors, k)

    def search_image(self, image: Any, k: int = 10) -> list[Hit]:
        """Images most similar to an image (PIL image, path or bytes)."""
        return self.search_embedding(self.embed_image(image)[0], k)

    def image_to_text(self, image: Any, k: int = 10) -> list[Hit]:
        """Captions (of the indexed rows) best matching an image."""
        return self.search_embedding(self.embed_image(image)[0], k, kind="text")


# ----------------------------------------------------------------------------------------------------- helpers
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
                   device: str | None = None, load: bool = True) -> tuple[ModelSpec, Embedder | None]:
    if isinstance(model, (str, os.PathLike)):
        spec = ModelSpec(model_reference(model), mode, dtype=dtype)
        if not load:
            from internvl_fm.models.internvl import InternVLConfig

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


def _remember_source(config: dict, source: Any) -> None:
    if source.source_id not in config["sources"]:
        config["sources"].append(source.source_id)
    config["image_roots"] = sorted(set(config["image_roots"]) | set(source.roots))


def _build_kind(store: EmbeddingStore, kind: str, options: IndexOptions, deleted: list[int]) -> BuildResult | None:
    shards = lambda: store.iter_embeddings(kind)
    n = sum(len(ids) for ids, _ in shards())
    if n == 0:
        return None
    dim = next(shards())[1].shape[1]
    result = build_index(shards, n, dim, options.max_index_memory, factory=options.factory, k=options.k,
                         num_queries=options.num_queries, latency_target_ms=options.latency_target_ms,
                         min_recall=options.min_recall, flat_max=options.flat_max, hnsw_max=options.hnsw_max,
                         opq_iterations=options.opq_iterations)
    if deleted:
        import faiss

        try:
            result.index.remove_ids(faiss.IDSelectorBatch(np.asarray(deleted, dtype=np.int64)))
        except RuntimeError:
            pass
    return result


def _report_dict(report: EmbedReport) -> dict:
    data = asdict(report)
    data["failures"] = data["failures"][:1000]
    return data


def _write_json(path: Path, data: dict) -> None:
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=1))
