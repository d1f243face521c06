"""The embedding job and the store it fills: source records -> (DataLoader workers: decode + preprocess with the
model's processor) -> the model, one call per batch -> shards written with atomic renames.

The store follows clip-retrieval's output contract. Layout of an output folder::

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
re-done on resume), so a resumed job never duplicates or loses a row. Unreadable images are skipped and reported.

The source is split into batches once (`EmbedConfig.batch_size`); each batch goes to the model whole, and a shard
holds a whole number of batches, so a job resumes at a batch boundary.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from internvl_fm.errors import ImageLoadError
from internvl_fm.loading import atomic_write
from internvl_fm.models.configuration_internvl import MODES

from .errors import OptionError, StoreError, check_int
from .sources import Record, Source, open_source

IMG_DIR, TEXT_DIR, META_DIR, SHARD_DIR = "img_emb", "text_emb", "metadata", "shards"
METADATA_COLUMNS = ("id", "key", "image_path", "caption", "source", "position")
STORAGE_DTYPES = ("float32", "float16")


class Embedder(Protocol):
    """What the job needs from a model (InternVLModel has it): a processor and two embedding functions."""

    image_processor: Any  # has .preprocess(image) -> [3, S, S] tensor (raises ImageLoadError)

    def embed_images(self, images: Any, mode: str = ..., batch_size: int = ...) -> torch.Tensor: ...

    def embed_texts(self, texts: Any, mode: str = ..., batch_size: int = ...) -> torch.Tensor: ...


def model_reference(model: str | os.PathLike) -> str:
    """How an index names its model: an existing local path made absolute (so that search works from any folder),
    anything else (a hub id) as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


# ------------------------------------------------------------------------------------------------------ options
@dataclass
class ModelSpec:
    """The model an index was built with (and its embedding mode); saved with the index so that search needs no
    `--model`."""

    path: str  # checkpoint folder (absolute) or hub id
    mode: str = "InternVL-C"
    image_size: int | None = None
    dtype: str | None = None  # None: the checkpoint's own dtype (recorded once loaded)
    quantization: str | None = None  # e.g. "int8": re-applied whenever the index loads its model

    def __post_init__(self):
        if self.mode not in MODES:
            raise OptionError("mode", self.mode, f"unknown embedding mode; use one of {', '.join(MODES)}")

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        return cls(**{k: data[k] for k in ("path", "mode", "image_size", "dtype", "quantization") if k in data})

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["quantization"] is None:  # full precision: index.json stays as before quantization existed
            del out["quantization"]
        return out

    def load(self, device: str | torch.device | None = None, dtype: str | None = None):
        """Load the InternVL-C/G model (`InternVLModel.from_pretrained`) in eval mode; `dtype` overrides the
        spec's, `device` defaults to cuda when available, else cpu."""
        from internvl_fm.cli_utils import resolve_device
        from internvl_fm.models.modeling_internvl import InternVLModel

        model = InternVLModel.from_pretrained(self.path, dtype=dtype or self.dtype, device=resolve_device(device),
                                              quantization=self.quantization)
        if self.image_size is None:
            self.image_size = int(model.image_size)
        if self.dtype is None:
            self.dtype = str(model.dtype).removeprefix("torch.")
        return model.eval()


@dataclass
class EmbedConfig:
    """Options of the embedding job (checked when made; the job trusts them)."""

    batch_size: int = 64  # records per batch: decoded together, embedded in one model call
    num_workers: int = 2  # DataLoader processes decoding images; 0 decodes in the main process
    shard_size: int = 50_000  # source records per output shard (rounded up to whole batches)
    captions: bool = True  # embed captions into text_emb/ when the source has them
    storage_dtype: str | None = None  # "float32" / "float16" (half the disk); None: the store's, else float32
    progress: bool = True

    def __post_init__(self):
        check_int("batch_size", self.batch_size, 1)
        check_int("num_workers", self.num_workers, 0)
        check_int("shard_size", self.shard_size, 1)
        if self.storage_dtype not in (None, *STORAGE_DTYPES):
            raise OptionError("storage_dtype", self.storage_dtype, f"use one of {', '.join(STORAGE_DTYPES)}")

    @property
    def rows_per_shard(self) -> int:
        """Source records per shard: `shard_size` rounded up to whole batches."""
        return -(-self.shard_size // self.batch_size) * self.batch_size


@dataclass
class EmbedReport:
    """What a run did: rows written, where it resumed, and the records it skipped (with reasons)."""

    source_id: str
    resumed_from: int
    records_read: int
    rows_written: int
    total_rows: int
    shards_written: int
    failures: list[Failure] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"embedded {self.rows_written} images ({self.records_read} records read"
                 + (f", resumed at record {self.resumed_from}" if self.resumed_from else "")
                 + f") into {self.shards_written} shard(s); the store holds {self.total_rows} rows",
                 f"skipped {len(self.failures)} unreadable image(s)"]
        lines += [f"  {f.source}: {f.reason}" for f in self.failures]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- the store
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


class ShardWriter:
    """Accumulates embedded batches and commits a shard every `rows_per_shard` source records."""

    def __init__(self, store: EmbeddingStore, source_id: str, start: int, rows_per_shard: int,
                 storage_dtype: str | None = None):
        self.store, self.source_id, self.rows_per_shard = store, source_id, rows_per_shard
        self.storage_dtype = np.dtype(store.check_storage_dtype(storage_dtype))
        self.shard_index = store.next_shard_index()
        self.next_id = store.num_rows
        self.resumed_from = start
        self.shards_written = 0
        self.rows_written = 0
        self.all_failures: list[Failure] = []
        self._reset(start)

    @classmethod
    def resume(cls, source: Source, out: str | os.PathLike, config: EmbedConfig) -> ShardWriter:
        """Open the store at `out`, drop any uncommitted shard of a crashed run and continue where the last
        committed shard of `source` ended (shards hold a whole number of batches)."""
        store = EmbeddingStore(out)
        store.clean_uncommitted()
        start = store.resume_position(source.source_id)
        return cls(store, source.source_id, start, config.rows_per_shard, config.storage_dtype)

    def _reset(self, start: int) -> None:
        self.start = self.end = start
        self.images: list[np.ndarray] = []
        self.texts: list[np.ndarray | None] = []
        self.meta: dict[str, list] = {"key": [], "image_path": [], "caption": [], "position": []}
        self.failures: list[Failure] = []

    def add(self, batch: dict, image_embeddings: np.ndarray, text_embeddings: np.ndarray | None) -> None:
        """Buffer one embedded batch (the next records in source order); commit a shard when it is full."""
        if batch["start"] != self.end:
            raise RuntimeError(f"batches out of order: expected record {self.end}, got {batch['start']}")
        self.end = batch["end"]
        if len(image_embeddings):
            self.images.append(image_embeddings)
            self.texts.append(text_embeddings)
            self.meta["key"] += batch["keys"]
            self.meta["image_path"] += batch["paths"]
            self.meta["caption"] += batch["captions"]
            self.meta["position"] += batch["positions"]
        self.failures += batch["failures"]
        self.all_failures += batch["failures"]
        if self.end - self.start >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        """Commit the buffered records as one shard (also when all of them failed, to record the progress)."""
        if self.end == self.start:
            return
        rows = len(self.meta["key"])
        dim = self.images[0].shape[1] if self.images else (self.store.dim or 0)
        images = np.concatenate(self.images) if self.images else np.zeros((0, dim), np.float32)
        has_text = rows > 0 and any(t is not None for t in self.texts)
        texts = None
        if has_text:
            texts = np.concatenate([t if t is not None else np.zeros_like(i) for t, i in zip(self.texts, self.images)])
        info = ShardInfo(self.shard_index, self.source_id, self.start, self.end, self.next_id, rows, has_text, dim,
                         self.failures)
        metadata = {"id": list(range(self.next_id, self.next_id + rows)), "source": [self.source_id] * rows,
                    **self.meta}
        self.store.write_shard(info, images.astype(self.storage_dtype),
                               texts.astype(self.storage_dtype) if texts is not None else None, metadata)
        self.shard_index += 1
        self.next_id += rows
        self.rows_written += rows
        self.shards_written += 1
        self._reset(self.end)

    def report(self) -> EmbedReport:
        """Commit what is buffered and describe the run."""
        self.flush()
        return EmbedReport(self.source_id, self.resumed_from, self.end - self.resumed_from, self.rows_written,
                           self.store.num_rows, self.shards_written, self.all_failures)


# ------------------------------------------------------------------------------------------------------ the job
def _clean_caption(caption: Any) -> str | None:
    if caption is None:
        return None
    text = str(caption).strip()
    return text or None


def prepare_batch(records: list[Record], start: int, processor: Any, captions: bool = True) -> dict[str, Any]:
    """Decode + preprocess one batch of records (runs in a loader worker or a Ray task).

    Returns positions `[start, end)`, the kept rows (pixel tensor, keys, paths, captions, positions) and the
    failures. An image that cannot be decoded (corrupt, truncated, empty, too many pixels...) becomes a failure.
    """
    pixels, kept, failures = [], [], []
    for offset, record in enumerate(records):
        try:
            pixels.append(processor.preprocess(record.image_source()))
        except ImageLoadError as exc:
            failures.append(Failure(record.name, exc.reason))
            continue
        except (OSError, ValueError, RuntimeError, SyntaxError) as exc:  # e.g. a transform failing on odd data
            failures.append(Failure(record.name, f"{type(exc).__name__}: {exc}"))
            continue
        caption = None
        if captions:
            try:
                caption = _clean_caption(record.read_caption())
            except OSError as exc:
                failures.append(Failure(record.caption_path or record.name, f"caption unreadable: {exc}"))
        kept.append((start + offset, record, caption))
    return {
        "start": start,
        "end": start + len(records),
        "pixel_values": torch.stack(pixels) if pixels else None,
        "positions": [p for p, _, _ in kept],
        "keys": [r.key for _, r, _ in kept],
        "paths": [r.path for _, r, _ in kept],
        "captions": [c for _, _, c in kept],
        "failures": failures,
    }


def embed_batch(model: Embedder, batch: dict[str, Any], mode: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(image embeddings [rows, D], caption embeddings [rows, D] with a zero row for an image without caption, or
    None when no row has one) of a prepared batch. The batch goes to the model whole: one call per tower."""
    pixels = batch["pixel_values"]
    if pixels is None:
        return np.zeros((0, 0), np.float32), None
    images = model.embed_images(pixels, mode=mode, batch_size=len(pixels)).float().cpu().numpy()
    present = [i for i, caption in enumerate(batch["captions"]) if caption is not None]
    if not present:
        return images, None
    texts = np.zeros_like(images)
    captions = [batch["captions"][i] for i in present]
    texts[present] = model.embed_texts(captions, mode=mode, batch_size=len(captions)).float().cpu().numpy()
    return images, texts


class _BatchStream(torch.utils.data.IterableDataset):
    """Batches of prepared records; batch b is produced by worker b % num_workers, so the loader's round-robin
    keeps the source order."""

    def __init__(self, source: Source, start: int, batch_size: int, processor: Any, captions: bool):
        self.source, self.start, self.batch_size = source, start, batch_size
        self.processor, self.captions = processor, captions

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        records = self.source.iter_from(self.start)
        for b, chunk in enumerate(iter(lambda: list(islice(records, self.batch_size)), [])):
            if b % workers == worker:
                yield prepare_batch(chunk, self.start + b * self.batch_size, self.processor, self.captions)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def iter_prepared_batches(source: Source, start: int, processor: Any, config: EmbedConfig) -> Iterator[dict]:
    """Prepared batches in source order, decoded by `config.num_workers` loader processes."""
    stream = _BatchStream(source, start, config.batch_size, processor, config.captions)
    if config.num_workers == 0:
        yield from stream
        return
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=config.num_workers,
                                         worker_init_fn=_worker_init, prefetch_factor=4, persistent_workers=False)
    yield from loader


@torch.inference_mode()
def run_embedding(source: Any, out: str | os.PathLike, model: Embedder, config: EmbedConfig | None = None,
                  mode: str = "InternVL-C") -> EmbedReport:
    """Embed every image (and caption) of `source` into the store at `out` with `model` in `mode`, resuming a
    previous run. `source` is anything `open_source` accepts. Returns the report of this run (rows, skipped images).
    """
    config = config or EmbedConfig()
    source = open_source(source)
    writer = ShardWriter.resume(source, out, config)
    bar = tqdm(total=source.length_hint(), initial=writer.start, desc="embedding", unit="img",
               disable=not config.progress)
    for batch in iter_prepared_batches(source, writer.start, model.image_processor, config):
        writer.add(batch, *embed_batch(model, batch, mode))
        bar.update(batch["end"] - batch["start"])
    bar.close()
    return writer.report()
