"""The embedding job: source records -> (DataLoader workers: decode + preprocess) -> model -> sharded store.

Decoding and resizing run in DataLoader worker processes, overlapped with the model on the main process / device.
Output follows clip-retrieval's contract (see `store.py`); unreadable images are skipped and reported; a killed
job resumes where its last committed shard ended, so the output never has a duplicated or missing row.
"""
from __future__ import annotations

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
from internvl_fm.models.internvl import MODES

from .sources import Record, Source, open_source
from .store import EmbeddingStore, Failure, ShardInfo


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


@dataclass
class ModelSpec:
    """The model an index was built with; saved with the index so that search needs no `--model`."""

    path: str  # checkpoint folder (absolute) or hub id
    mode: str = "InternVL-C"
    image_size: int | None = None
    dtype: str | None = None  # None: the checkpoint's own dtype (recorded once loaded)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown embedding mode {self.mode!r}; use one of {MODES}")

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        return cls(**{k: data[k] for k in ("path", "mode", "image_size", "dtype") if k in data})

    def to_dict(self) -> dict:
        return asdict(self)

    def load(self, device: str | torch.device | None = None, dtype: str | None = None):
        """Load the InternVL-C/G model (`InternVLModel.from_pretrained`) in eval mode; `dtype` overrides the
        spec's, `device` defaults to cuda when available, else cpu."""
        from internvl_fm.cli_utils import resolve_device
        from internvl_fm.models.internvl import InternVLModel

        model = InternVLModel.from_pretrained(self.path, dtype=dtype or self.dtype, device=resolve_device(device))
        if self.image_size is None:
            self.image_size = int(model.image_size)
        if self.dtype is None:
            self.dtype = str(model.dtype).removeprefix("torch.")
        return model.eval()


@dataclass
class EmbedConfig:
    """Options of the embedding job."""

    mode: str = "InternVL-C"
    batch_size: int = 64
    num_workers: int = 2  # DataLoader processes decoding images; 0 decodes in the main process
    shard_size: int = 50_000  # source records per output shard (rounded up to whole batches)
    captions: bool = True  # embed captions into text_emb/ when the source has them
    storage_dtype: str | None = None  # "float32" / "float16" (half the disk); None: the store's, else float32
    progress: bool = True


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


# --------------------------------------------------------------------------------------------- batch preparation
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


def _batched(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    while chunk := list(islice(records, size)):
        yield chunk


class _BatchStream(torch.utils.data.IterableDataset):
    """Batches of prepared records; batch b is produced by worker b % num_workers, so the loader's round-robin
    keeps the source order."""

    def __init__(self, source: Source, start: int, batch_size: int, processor: Any, captions: bool):
        self.source, self.start, self.batch_size = source, start, batch_size
        self.processor, self.captions = processor, captions

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for b, chunk in enumerate(_batched(self.source.iter_from(self.start), self.batch_size)):
            if b % workers == worker:
                yield prepare_batch(chunk, self.start + b * self.batch_size, self.processor, self.captions)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def iter_prepared_batches(source: Source, start: int, processor: Any, config: EmbedConfig) -> Iterator[dict]:
    """Prepared batches in source order, decoded by `config.num_workers` loader processes."""
    stream = _BatchStream(source, start, config.batch_size, processor, config.captions)
    if config.num_workers <= 0:
        yield from stream
        return
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=config.num_workers,
                                         worker_init_fn=_worker_init, prefetch_factor=4, persistent_workers=False)
    yield from loader


# --------------------------------------------------------------------------------------------------- the writer
class ShardWriter:
    """Accumulates embedded batches and commits a shard every `shard_size` source records."""

    def __init__(self, store: EmbeddingStore, source_id: str, start: int, shard_size: int,
                 storage_dtype: str | None = None):
        self.store, self.source_id, self.shard_size = store, source_id, shard_size
        self.storage_dtype = np.dtype(store.check_storage_dtype(storage_dtype))
        self.shard_index = store.next_shard_index()
        self.next_id = store.num_rows
        self.shards_written = 0
        self.rows_written = 0
        self._reset(start)

    @classmethod
    def resume(cls, source: Any, out: str | os.PathLike, config: "EmbedConfig") -> "ShardWriter":
        """Open the store at `out`, drop any uncommitted shard of a crashed run and continue where the last
        committed shard of `source` ended (shards hold a whole number of batches)."""
        store = EmbeddingStore(out)
        store.clean_uncommitted()
        start = store.resume_position(source.source_id)
        shard_size = max(config.batch_size, -(-config.shard_size // config.batch_size) * config.batch_size)
        return cls(store, source.source_id, start, shard_size, config.storage_dtype)

    def _reset(self, start: int) -> None:
        self.start = self.end = start
        self.images: list[np.ndarray] = []
        self.texts: list[np.ndarray | None] = []
        self.meta: dict[str, list] = {"key": [], "image_path": [], "caption": [], "position": []}
        self.failures: list[Failure] = []

    def add(self, batch: dict, image_embeddings: np.ndarray, text_embeddings: np.ndarray | None) -> None:
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
        if self.end - self.start >= self.shard_size:
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


def _embed_texts(model: Embedder, captions: list[str | None], mode: str, dim: int) -> np.ndarray | None:
    present = [i for i, c in enumerate(captions) if c is not None]
    if not present:
        return None
    out = np.zeros((len(captions), dim), np.float32)
    out[present] = model.embed_texts([captions[i] for i in present], mode=mode).float().cpu().numpy()
    return out


@torch.inference_mode()
def run_embedding(source: Any, out: str | os.PathLike, model: Embedder, config: EmbedConfig | None = None) -> EmbedReport:
    """Embed every image (and caption) of `source` into the store at `out`, resuming a previous run.

    `source` is anything `open_source` accepts. Returns the report of this run (rows, skipped images).
    """
    config = config or EmbedConfig()
    source = open_source(source)
    writer = ShardWriter.resume(source, out, config)
    start, store = writer.start, writer.store
    failures: list[Failure] = []
    bar = tqdm(total=source.length_hint(), initial=start, desc="embedding", unit="img", disable=not config.progress)
    for batch in iter_prepared_batches(source, start, model.image_processor, config):
        images = np.zeros((0, 0), np.float32)
        texts = None
        if batch["pixel_values"] is not None:
            images = model.embed_images(batch["pixel_values"], mode=config.mode).float().cpu().numpy()
            if config.captions:
                texts = _embed_texts(model, batch["captions"], config.mode, images.shape[1])
        failures += batch["failures"]
        writer.add(batch, images, texts)
        bar.update(batch["end"] - batch["start"])
    writer.flush()
    bar.close()
    return EmbedReport(source.source_id, start, writer.end - start, writer.rows_written, store.num_rows,
                       writer.shards_written, failures)
