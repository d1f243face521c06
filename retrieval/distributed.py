"""The embedding job on Ray Data (`pip install internvl-fm[distributed]`): one model replica per worker.

The driver streams the source in windows of `window_records` (a multiple of the shard size); each window becomes
a Ray dataset whose `map_batches` runs on an actor pool (each actor loads the model once per window: one replica
per GPU, or per CPU worker without GPUs); results come back in source order and are committed shard by shard with
the same writer as the local job. The output contract (img_emb / text_emb / metadata shards, failures, resume by
position) is identical, so a job can be resumed locally or on a cluster. With a cluster address every machine of
the cluster embeds.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .embed import EmbedConfig, Embedder, EmbedReport, Failure, ModelSpec, ShardWriter, embed_batch, prepare_batch
from .index import ImageIndex, IndexOptions, Runner
from .sources import Record, Source, open_source

RECORD_FIELDS = ("position", "key", "path", "data", "caption", "caption_path")


class EmbedWorker:
    """Ray Data callable class: loads the model once, then decodes + embeds batches of records."""

    def __init__(self, model_factory: Callable[[], Embedder], mode: str, captions: bool):
        import torch

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.model = model_factory()
        self.mode, self.captions = mode, captions

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        positions = [int(p) for p in batch["position"]]
        records = [Record(key=str(batch["key"][i]), path=_opt(batch["path"][i]), data=_opt(batch["data"][i]),
                          caption=_opt(batch["caption"][i]), caption_path=_opt(batch["caption_path"][i]))
                   for i in range(len(positions))]
        prepared = prepare_batch(records, 0, self.model.image_processor, self.captions)
        with torch.inference_mode():
            images, texts = embed_batch(self.model, prepared, self.mode)
        n = len(records)
        image_rows, text_rows = [b""] * n, [b""] * n  # float32 bytes: one schema whatever fails
        captions: dict[int, str | None] = {}
        for row, offset in enumerate(prepared["positions"]):  # offsets into this batch of the decodable records
            image_rows[offset] = images[row].astype(np.float32).tobytes()
            captions[offset] = prepared["captions"][row]
            if captions[offset] is not None:
                text_rows[offset] = texts[row].astype(np.float32).tobytes()
        failed = {f.source: f.reason for f in prepared["failures"]}
        return {
            "position": np.asarray(positions, dtype=np.int64),
            "ok": np.asarray([i in captions for i in range(n)]),
            "img_emb": np.asarray(image_rows, dtype=object),
            "text_emb": np.asarray(text_rows, dtype=object),
            "caption": np.asarray([captions.get(i) for i in range(n)], dtype=object),
            "error": np.asarray([failed.get(r.name) if i not in captions else None for i, r in enumerate(records)],
                                dtype=object),
        }


def _opt(value: Any) -> Any:
    """A Ray column value back to bytes / str / None (an all-None column arrives as float NaN)."""
    if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return None
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else str(value)


def _records_window(records, size: int) -> list[dict]:
    return [{"position": position, "key": r.key, "path": r.path, "data": r.data, "caption": r.caption,
             "caption_path": r.caption_path} for position, r in islice(records, size)]


def embed_with_ray(source: Any, out: str | os.PathLike, model_factory: Callable[[], Embedder],
                   config: EmbedConfig | None = None, mode: str = "InternVL-C", num_workers: int = 2,
                   num_gpus_per_worker: float | None = None, address: str | None = None,
                   window_records: int = 200_000) -> EmbedReport:
    """Embed `source` into the store at `out` with Ray Data (`num_workers` model replicas, `mode` embeddings);
    resumes like the local job. `model_factory` is a picklable zero-argument callable returning the model (e.g.
    `ModelSpec(...).load`)."""
    import ray

    config = config or EmbedConfig()
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    if num_gpus_per_worker is None:
        num_gpus_per_worker = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False

    source = open_source(source)
    writer = ShardWriter.resume(source, out, config)
    shard_size = writer.rows_per_shard
    records = ((position, record) for position, record in enumerate(source.iter_from(writer.start), writer.start))
    bar = tqdm(total=source.length_hint(), initial=writer.start, desc="embedding (ray)", unit="img",
               disable=not config.progress)
    window_size = shard_size * max(1, -(-window_records // shard_size))
    while window := _records_window(records, window_size):
        dataset = ray.data.from_items(window, override_num_blocks=max(1, -(-len(window) // config.batch_size)))
        embedded = dataset.map_batches(
            EmbedWorker, fn_constructor_args=(model_factory, mode, config.captions),
            batch_size=config.batch_size, batch_format="numpy", concurrency=num_workers, num_cpus=1,
            num_gpus=num_gpus_per_worker)
        rows = sorted(embedded.iter_rows(), key=lambda r: int(r["position"]))
        for lo in range(0, len(window), shard_size):  # one shard at a time, as the writer commits them
            writer.add(*_window_batch(window[lo:lo + shard_size], rows[lo:lo + shard_size]))
        bar.update(len(window))
    bar.close()
    return writer.report()


def _window_batch(window: list[dict], rows: list[dict]) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """Ray output rows of some records (in source order) -> the batch dict + arrays `ShardWriter.add` takes."""
    if [int(r["position"]) for r in rows] != [w["position"] for w in window]:
        raise RuntimeError("Ray returned a different set of records than it was given")
    kept = [(w, r) for w, r in zip(window, rows) if r["ok"]]
    batch = {"start": window[0]["position"], "end": window[-1]["position"] + 1,
             "positions": [w["position"] for w, _ in kept], "keys": [w["key"] for w, _ in kept],
             "paths": [w["path"] for w, _ in kept], "captions": [r["caption"] for _, r in kept],
             "failures": [Failure(w["path"] or w["key"], str(r["error"])) for w, r in zip(window, rows)
                          if not r["ok"]]}
    if not kept:
        return batch, np.zeros((0, 0), np.float32), None
    images = np.stack([np.frombuffer(r["img_emb"], np.float32) for _, r in kept])
    has_text = any(len(r["text_emb"]) for _, r in kept)
    texts = np.stack([np.frombuffer(r["text_emb"], np.float32) if len(r["text_emb"])
                      else np.zeros(images.shape[1], np.float32) for _, r in kept]) if has_text else None
    return batch, images, texts


def _runner(model_factory: Callable[[], Embedder] | None, num_workers: int, address: str | None) -> Runner:
    """The Ray job as `ImageIndex.build` / `add` run it; `model_factory` defaults to loading the index's spec."""
    def run(source: Source, out: Path, config: EmbedConfig, spec: ModelSpec) -> EmbedReport:
        factory = model_factory or functools.partial(ModelSpec.load, spec)
        return embed_with_ray(source, out, factory, config, spec.mode, num_workers, address=address)
    return run


def build_distributed(source: Any, out: str | os.PathLike, model: str | os.PathLike, *, mode: str = "InternVL-C",
                      embed: EmbedConfig | None = None, options: IndexOptions | None = None, num_workers: int = 2,
                      address: str | None = None, dtype: str | None = None,
                      model_factory: Callable[[], Embedder] | None = None) -> ImageIndex:
    """`ImageIndex.build` with the embedding step on Ray (`model_factory` defaults to loading `model`)."""
    return ImageIndex.build(source, out, model, mode=mode, embed=embed, options=options, dtype=dtype,
                            runner=_runner(model_factory, num_workers, address))


def add_distributed(index: ImageIndex, source: Any, embed: EmbedConfig | None = None, num_workers: int = 2,
                    address: str | None = None, model_factory: Callable[[], Embedder] | None = None) -> EmbedReport:
    """`ImageIndex.add` with the embedding step on Ray."""
    return index.add(source, embed, runner=_runner(model_factory, num_workers, address))
