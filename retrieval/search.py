"""Answering queries on an index folder: `SearchIndex` (text, image or embedding -> hits, best first) and the FAISS
pieces a query needs (the index file pair, per-call search parameters, exact search).

Folder layout (everything in one output folder, clip-retrieval + autofaiss style)::

    img_emb/ text_emb/ metadata/ shards/    the embedding store (see embed.py)
    image.{G}.index                         FAISS index over image embeddings (generation G)
    text.{G}.index                          FAISS index over caption embeddings (when there are captions)
    index.json                              the manifest: model spec, index options, image roots, sources, deleted
                                            ids, and for each FAISS index its file name and description

Writes are atomic as a whole: new FAISS files get new names, then `index.json` (written last, by one rename) names
them; the files it no longer names are removed afterwards. A crash at any point leaves the previous manifest and
the files it names, so an index never pairs vectors with a description (or deleted ids) of another state. Opening
checks that each FAISS file holds the vectors its description counts and that the image index holds one vector
per committed row (`indexed_rows`); store rows beyond it (embedded by an interrupted `add`) are not visible until
the next `add` indexes them. Folders of the older layout (`image.index` + `image.index.json`) are still read.

Indexes are built and changed by `index.ImageIndex` (a SearchIndex that can also build, add and delete).
"""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from internvl_fm.loading import atomic_write

from .embed import Embedder, EmbeddingStore, ModelSpec
from .errors import IndexNotFoundError, IndexStateError, check_int

INDEX_FILE = "index.json"
KINDS = ("image", "text")


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


def normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation (float32, contiguous); zero rows stay zero."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


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
    def read(cls, path: Path, mmap: bool, info: dict | None = None) -> _FaissIndex:
        """The index in `path` with its description (`info`; None: the legacy `path.json` beside it)."""
        import faiss

        if info is None:
            info = json.loads(path.with_name(path.name + ".json").read_text())
        try:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0)
        except RuntimeError as exc:
            raise IndexStateError(f"cannot read the FAISS index {path}: {str(exc).splitlines()[0]}") from exc
        return cls(index, info)

    def write(self, path: Path) -> None:
        """Write the FAISS file only (its description goes into the manifest, see `ImageIndex.save`)."""
        import faiss

        with atomic_write(path) as tmp:
            faiss.write_index(self.index, tmp)

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k, params=search_parameters(self.family, self.knob, exclude))


class SearchIndex:
    """A built index folder opened for queries: `search_text`, `search_image`, `search_embedding`, or
    `image_to_text` (captions for an image). Open with `SearchIndex.load(folder)`."""

    def __init__(self, root: str | os.PathLike, model: Embedder | None = None, mmap: bool = True,
                 device: str | None = None, dtype: str | None = None, quantization: str | None = None):
        self.root = Path(root)
        config_file = self.root / INDEX_FILE
        if not config_file.is_file():
            raise IndexNotFoundError(f"no search index in {self.root} (missing {INDEX_FILE}); "
                                     "build one with `internvl-fm index build SRC OUT --model M`")
        self.config = json.loads(config_file.read_text())
        self.spec = ModelSpec.from_dict(self.config["model"])
        if quantization is not None:  # override how this reader loads the model (the index keeps its own setting)
            self.spec.quantization = None if quantization == "none" else quantization
        self.store = EmbeddingStore(self.root)
        self._model = model
        self._device, self._dtype = device, dtype  # how to load the model (dtype None: the spec's)
        self._lock = threading.Lock()
        self._mmap = mmap
        self.indexes = self._read_indexes(mmap)
        self.deleted = np.asarray(sorted(self.config.get("deleted", [])), dtype=np.int64)
        self._load_metadata()
        self._check_counts()

    @classmethod
    def load(cls, path: str | os.PathLike, model: Embedder | None = None, mmap: bool = True,
             device: str | None = None, dtype: str | None = None, quantization: str | None = None):
        """Open a built index (memory-mapped by default); the model is loaded from the saved spec on first use
        (on `device`, in `dtype` when given, else in the dtype the index was built with; `quantization` likewise)."""
        return cls(path, model=model, mmap=mmap, device=device, dtype=dtype, quantization=quantization)

    def _read_indexes(self, mmap: bool) -> dict[str, _FaissIndex]:
        """The FAISS indexes the manifest names (or, in a folder of the older layout, `KIND.index` + `.json`)."""
        for _ in range(3):  # a writer may commit a new generation (and remove these files) while we open them
            named = [self.root / entry["file"] for entry in self.config.get("indexes", {}).values()]
            if all(path.is_file() for path in named):
                break
            self.config = json.loads((self.root / INDEX_FILE).read_text())
        if "indexes" in self.config:
            return {kind: _FaissIndex.read(self.root / entry["file"], mmap, dict(entry["info"]))
                    for kind, entry in self.config["indexes"].items()}
        return {kind: _FaissIndex.read(self.root / f"{kind}.index", mmap) for kind in KINDS
                if (self.root / f"{kind}.index").is_file()}

    def _load_metadata(self) -> None:
        self._shards = self.store.shards()
        rows = self.committed_rows
        table = self.store.read_metadata(["id", "key", "image_path", "caption"]).slice(0, rows)
        self._keys = table.column("key").to_pylist()
        self._paths = table.column("image_path").to_pylist()
        self._captions = table.column("caption").to_pylist()

    @property
    def committed_rows(self) -> int:
        """Rows the indexes cover (the store may hold more, embedded by an interrupted `add`)."""
        stored = sum(s.rows for s in self._shards)
        if "image" not in self.indexes:
            return stored
        rows = int(self.indexes["image"].info.get("indexed_rows", stored))
        if rows > stored:
            raise IndexStateError(f"{self.root}: the index covers {rows} rows but the embedding store holds only "
                                  f"{stored}; the store lost shards - rebuild the index")
        return rows

    def _check_counts(self) -> None:
        """Refuse a folder whose FAISS files do not match their descriptions or the committed rows (e.g. a torn
        write of the older layout, whose next `add` would insert duplicate vectors)."""
        for kind, target in self.indexes.items():
            vectors, described = int(target.index.ntotal), target.info.get("ntotal")
            if described is not None and vectors != int(described):
                raise IndexStateError(f"{self.root}: {kind} index holds {vectors} vectors but its description says "
                                      f"{described} (a torn write); rebuild the index from its store")
        if "image" in self.indexes:
            removed = 0 if self.indexes["image"].family == "hnsw" else len(self.deleted)
            vectors, expected = int(self.indexes["image"].index.ntotal), len(self._keys) - removed
            if vectors != expected:
                raise IndexStateError(f"{self.root}: the image index holds {vectors} vectors for {expected} rows "
                                      f"({len(self._keys)} indexed, {removed} deleted); rebuild the index from its "
                                      "store")

    def stored_vector(self, id_: int) -> np.ndarray:
        """The stored image embedding of row `id_` (float32 [D])."""
        if not 0 <= id_ < sum(shard.rows for shard in self._shards):
            raise IndexStateError(f"row {id_} is not in {self.root} (0..{len(self) - 1})")
        return self.stored_vectors([id_])[0]

    def stored_vectors(self, ids: list[int], kind: str = "image") -> np.ndarray:
        """The stored embeddings (float32 [len(ids), D]) of rows `ids`: image embeddings, or caption embeddings for
        kind "text"; read shard by shard (memory-mapped), one read per shard that holds some of them."""
        ids_array = np.asarray(ids, dtype=np.int64)
        vectors: np.ndarray | None = None
        for shard in self._shards:
            inside = (ids_array >= shard.first_id) & (ids_array < shard.first_id + shard.rows)
            if not inside.any():
                continue
            data = (self.store.read_image_embeddings(shard) if kind == "image"
                    else self.store.read_text_embeddings(shard))
            if data is None:
                continue
            if vectors is None:
                vectors = np.zeros((len(ids_array), data.shape[1]), dtype=np.float32)
            vectors[inside] = data[ids_array[inside] - shard.first_id]
        if vectors is None:
            raise IndexStateError(f"rows {list(ids)[:10]} of {self.root} have no stored {kind} embeddings")
        return vectors

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

    # ------------------------------------------------------------------------------------------------ the rows
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

    # ----------------------------------------------------------------------------------------------- searching
    def search_embedding(self, vectors: Any, k: int = 10, kind: str = "image") -> list[Hit] | list[list[Hit]]:
        """Nearest rows to one vector (-> list of hits) or a batch [N, D] (-> one list per row), best first."""
        if kind not in self.indexes:
            raise IndexStateError(f"{self.root} has no {kind} index" + (" (the source had no captions)"
                                                                        if kind == "text" else ""))
        check_int("k", k, 1)
        if hasattr(vectors, "detach"):
            vectors = vectors.detach().float().cpu().numpy()
        array = np.asarray(vectors, dtype=np.float32)
        single = array.ndim == 1
        queries = normalize(array)
        target = self.indexes[kind]
        if queries.shape[1] != target.index.d:
            raise IndexStateError(f"query dimension {queries.shape[1]} does not match the index ({target.index.d})")
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
