"""The embedding store: clip-retrieval's output contract, written shard by shard with atomic renames.

Layout of an output folder::

    img_emb/img_emb_{N}.npy          [rows, D] image embeddings (L2-normalised)
    text_emb/text_emb_{N}.npy        [rows, D] caption embeddings, row-aligned with img_emb_{N}; a zero row where
                                     the image has no caption (its metadata `caption` is null)
    metadata/metadata_{N}.parquet    id, key, image_path, caption, source, position (one row per embedding)
    shards/shard_{N}.json            the commit record of shard N, written last

The three data folders hold the same shard numbers with the same row counts, so readers that pair files by their
sorted names (embedding-reader, autofaiss, clip-retrieval) pair every vector with its own metadata row:

* `text_emb/` is absent while no record of the store has had a caption; once one has, every shard has a
  text_emb file (earlier shards get all-zero ones, later uncaptioned shards too).
* A shard whose records all failed to decode has only its commit record (an empty `.npy` would be skipped by
  embedding-reader while the parquet beside it would not).

Every file is written to a temporary name and renamed into place; a shard exists only once its commit record
exists. A job killed at any point therefore leaves committed shards (kept) and uncommitted leftovers (deleted and
re-done on resume), so a resumed job never duplicates or loses a row.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from internvl_fm.loading import atomic_write

from .errors import StoreError

IMG_DIR, TEXT_DIR, META_DIR, SHARD_DIR = "img_emb", "text_emb", "metadata", "shards"
METADATA_COLUMNS = ("id", "key", "image_path", "caption", "source", "position")


@dataclass
class Failure:
    """A record that could not be embedded: which one and why."""

    source: str
    reason: str


@dataclass
class ShardInfo:
    """Commit record of one shard: which source records it covers and which ids it holds."""

    index: int
    source_id: str
    start: int  # first source position covered (inclusive)
    end: int  # last source position covered (exclusive)
    first_id: int  # id of the shard's first row; ids are contiguous across shards
    rows: int
    has_text: bool
    dim: int
    failures: list[Failure] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> ShardInfo:
        data = dict(data)
        data["failures"] = [Failure(**f) for f in data.get("failures", [])]
        return cls(**data)


def _shard_name(kind: str, index: int, suffix: str) -> str:
    return f"{kind}_{index}{suffix}"


class EmbeddingStore:
    """Reads and writes the sharded embeddings + metadata of one output folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # ----------------------------------------------------------------------------------------------- reading
    def shards(self) -> list[ShardInfo]:
        """Committed shards, in id order."""
        folder = self.root / SHARD_DIR
        if not folder.is_dir():
            return []
        infos = [ShardInfo.from_dict(json.loads(p.read_text())) for p in folder.glob("shard_*.json")]
        infos.sort(key=lambda s: s.index)
        expected = 0
        for info in infos:
            if info.first_id != expected:
                raise StoreError(f"{self.root}: shard {info.index} starts at id {info.first_id}, expected {expected}")
            expected += info.rows
        return infos

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards())

    @property
    def dim(self) -> int | None:
        shards = self.shards()
        return shards[0].dim if shards else None

    @property
    def storage_dtype(self) -> str | None:
        """The dtype the vectors are stored in (None while the store is empty)."""
        shard = next((s for s in self.shards() if s.rows), None)
        return None if shard is None else str(self.read_image_embeddings(shard).dtype)

    def check_storage_dtype(self, wanted: str | None) -> str:
        """The dtype new shards must use: `wanted` (default: the store's, else float32). Readers take one dtype per
        folder, so a store never mixes them."""
        stored = self.storage_dtype
        if wanted and stored and wanted != stored:
            raise StoreError(f"{self.root} stores {stored} vectors; cannot add {wanted} ones (readers such as "
                             f"embedding-reader take one dtype per folder)")
        return wanted or stored or "float32"

    def next_shard_index(self) -> int:
        shards = self.shards()
        return shards[-1].index + 1 if shards else 0

    def resume_position(self, source_id: str) -> int:
        """Number of records of `source_id` already covered by committed shards."""
        return max((s.end for s in self.shards() if s.source_id == source_id), default=0)

    def failures(self) -> list[Failure]:
        return [f for s in self.shards() for f in s.failures]

    def _path(self, kind: str, index: int) -> Path:
        folder, suffix = {"img_emb": (IMG_DIR, ".npy"), "text_emb": (TEXT_DIR, ".npy"),
                          "metadata": (META_DIR, ".parquet"), "shard": (SHARD_DIR, ".json")}[kind]
        return self.root / folder / _shard_name(kind, index, suffix)

    def read_image_embeddings(self, shard: ShardInfo, mmap: bool = True) -> np.ndarray:
        return np.load(self._path("img_emb", shard.index), mmap_mode="r" if mmap else None)

    def read_text_embeddings(self, shard: ShardInfo, mmap: bool = True) -> np.ndarray | None:
        if not shard.has_text:
            return None
        return np.load(self._path("text_emb", shard.index), mmap_mode="r" if mmap else None)

    def iter_embeddings(self, kind: str = "image", start_id: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield `(ids, vectors)` per shard as float32, skipping rows below `start_id`.

        For `kind="text"` only rows with a caption are yielded.
        """
        for shard in self.shards():
            if shard.first_id + shard.rows <= start_id or shard.rows == 0:
                continue
            ids = np.arange(shard.first_id, shard.first_id + shard.rows, dtype=np.int64)
            if kind == "image":
                vectors = self.read_image_embeddings(shard)
                keep = ids >= start_id
            elif kind == "text":
                vectors = self.read_text_embeddings(shard)
                if vectors is None:
                    continue
                keep = (ids >= start_id) & (np.abs(np.asarray(vectors)).sum(axis=1) > 0)
            else:
                raise ValueError(f"kind must be 'image' or 'text', got {kind!r}")
            if keep.any():
                yield ids[keep], np.ascontiguousarray(np.asarray(vectors)[keep], dtype=np.float32)

    def read_metadata(self, columns: list[str] | None = None):
        """All metadata rows (a pyarrow Table, ordered by id)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = [pq.read_table(self._path("metadata", s.index), columns=columns) for s in self.shards() if s.rows]
        if not tables:
            return pa.table({c: pa.array([], type=_column_type(c)) for c in (columns or METADATA_COLUMNS)})
        return pa.concat_tables(tables)

    # ----------------------------------------------------------------------------------------------- writing
    def clean_uncommitted(self) -> list[Path]:
        """Delete shard files that have no commit record and temporary files left by a killed job."""
        committed = {s.index for s in self.shards()}
        removed = []
        for folder in (IMG_DIR, TEXT_DIR, META_DIR, SHARD_DIR):
            directory = self.root / folder
            if not directory.is_dir():
                continue
            for path in directory.iterdir():
                stem = path.name.split(".")[0] if not path.name.startswith(".") else ""
                index = stem.rsplit("_", 1)[-1]
                if path.name.startswith(".") and path.name.endswith(".tmp") or index.isdigit() and int(index) not in committed:
                    path.unlink(missing_ok=True)
                    removed.append(path)
        return removed

    def write_shard(self, info: ShardInfo, image_embeddings: np.ndarray, text_embeddings: np.ndarray | None,
                    metadata: dict[str, list]) -> None:
        """Write one shard's files atomically, then its commit record."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if len(image_embeddings) != info.rows or any(len(v) != info.rows for v in metadata.values()):
            raise StoreError(f"shard {info.index}: {info.rows} rows declared but arrays of lengths "
                             f"{len(image_embeddings)} / {[len(v) for v in metadata.values()]} given")
        if (text_embeddings is not None) != info.has_text:
            raise StoreError(f"shard {info.index}: has_text={info.has_text} but text embeddings "
                             f"{'given' if text_embeddings is not None else 'missing'}")
        if info.rows:  # an empty shard is only a commit record (see the module docstring)
            if text_embeddings is not None:
                self._backfill_text()
            elif any((self.root / TEXT_DIR).glob("text_emb_*.npy")):
                text_embeddings = np.zeros_like(image_embeddings)
            self._save_array("img_emb", info.index, image_embeddings)
            if text_embeddings is not None:
                self._save_array("text_emb", info.index, text_embeddings)
            table = pa.table({c: pa.array(metadata[c], type=_column_type(c)) for c in METADATA_COLUMNS})
            with atomic_write(self._path("metadata", info.index)) as tmp:
                pq.write_table(table, tmp)
        with atomic_write(self._path("shard", info.index)) as tmp:
            Path(tmp).write_text(json.dumps(asdict(info), indent=1))

    def _save_array(self, kind: str, index: int, array: np.ndarray) -> None:
        with atomic_write(self._path(kind, index)) as tmp, open(tmp, "wb") as fh:
            np.save(fh, array)

    def _backfill_text(self) -> None:
        """Give every committed shard without a text_emb file an all-zero one (keeps text_emb/ row-aligned)."""
        for shard in self.shards():
            if shard.rows and not self._path("text_emb", shard.index).is_file():
                images = self.read_image_embeddings(shard)
                self._save_array("text_emb", shard.index, np.zeros(images.shape, images.dtype))


def _column_type(column: str):
    import pyarrow as pa

    return pa.int64() if column in ("id", "position") else pa.string()
