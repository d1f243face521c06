"""Retrieval embedding job: unreadable images are skipped and reported; a killed job resumes exactly."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from internvl_fm.retrieval import EmbeddingStore, ImageIndex, run_embedding
from PIL import Image
from test_retrieval_common import fast_config, make_images, tiny_model  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]


def _bad_images(folder: Path) -> dict[str, str]:
    """Writes problem files; returns name -> 'skip' | 'keep' (what the job must do with it)."""
    make_images(folder, 4, captions=False)
    (folder / "zero.png").write_bytes(b"")
    (folder / "corrupt.jpg").write_bytes(os.urandom(2000))
    buffer = folder / "whole.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, quality=90)
    data = buffer.read_bytes()
    buffer.unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.new("1", (9500, 9500)).save(folder / "bomb.png")  # 90M pixels: over the decompression-bomb limit
    Image.new("CMYK", (40, 30), (10, 200, 30, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50).save(folder / "grey16.png")
    return {"zero.png": "skip", "corrupt.jpg": "skip", "truncated.jpg": "skip", "bomb.png": "skip",
            "cmyk.jpg": "keep", "grey16.png": "keep"}


def test_bad_images_are_skipped_and_reported(tmp_path, tiny_model):  # noqa: F811
    expected = _bad_images(tmp_path / "imgs")
    assert Image.open(tmp_path / "imgs" / "grey16.png").mode.startswith("I")
    report = run_embedding(tmp_path / "imgs", tmp_path / "out", tiny_model, fast_config(num_workers=2))
    skipped = sorted(Path(f.source).name for f in report.failures)
    assert skipped == sorted(n for n, what in expected.items() if what == "skip")
    reasons = {Path(f.source).name: f.reason for f in report.failures}
    assert "decompression bomb" in reasons["bomb.png"] and "empty" in reasons["zero.png"]
    assert report.rows_written == 4 + 2  # the good PNGs + CMYK + 16-bit grey
    store = EmbeddingStore(tmp_path / "out")
    kept = {Path(p).name for p in store.read_metadata().column("image_path").to_pylist()}
    assert {"cmyk.jpg", "grey16.png"} <= kept and not kept & set(skipped)
    assert sorted(Path(f.source).name for f in store.failures()) == skipped  # also in the shard records
    summary = report.summary()
    assert "skipped 4 unreadable image(s)" in summary and "truncated.jpg" in summary


_CRASHING_JOB = textwrap.dedent("""
    import sys, time
    import torch
    from internvl_fm import InternVLModel
    from internvl_fm.retrieval import EmbedConfig, run_embedding

    torch.set_num_threads(1)
    model = InternVLModel.from_pretrained(sys.argv[1])
    embed_images = model.embed_images

    def slow(*args, **kwargs):  # slow enough to be killed in the middle
        time.sleep(0.15)
        return embed_images(*args, **kwargs)

    model.embed_images = slow
    run_embedding(sys.argv[2], sys.argv[3], model,
                  EmbedConfig(batch_size=4, shard_size=8, num_workers=1, progress=False))
""")


def test_killed_build_resumes_without_duplicates_or_losses(tmp_path, tiny_clip_path, tiny_model):  # noqa: F811
    n = 60
    make_images(tmp_path / "imgs", n)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _CRASHING_JOB, str(tiny_clip_path), str(tmp_path / "imgs"),
                             str(out)], env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if len(list(out.glob("shards/shard_*.json"))) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # kill -9 (with its loader worker)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    committed = EmbeddingStore(out).num_rows
    assert 0 < committed < n
    report = run_embedding(tmp_path / "imgs", out, tiny_model, fast_config())
    assert report.resumed_from == committed and report.rows_written == n - committed
    store = EmbeddingStore(out)
    meta = store.read_metadata().to_pydict()
    assert store.num_rows == n and meta["id"] == list(range(n)) and meta["position"] == list(range(n))
    assert len(set(meta["key"])) == n
    vectors = np.concatenate([v for _, v in store.iter_embeddings()])
    assert vectors.shape == (n, 32)
    texts = np.concatenate([np.load(p) for p in sorted((out / "text_emb").glob("*.npy"),
                                                       key=lambda p: int(p.stem.rsplit("_", 1)[1]))])
    assert texts.shape == (n, 32)
    # identical to a run that was never interrupted
    run_embedding(tmp_path / "imgs", tmp_path / "clean", tiny_model, fast_config(shard_size=64))
    clean = np.concatenate([v for _, v in EmbeddingStore(tmp_path / "clean").iter_embeddings()])
    assert np.allclose(vectors, clean, atol=1e-5)
    assert pq.read_table(tmp_path / "clean" / "metadata" / "metadata_0.parquet").column("key").to_pylist() == meta["key"]
    # and an index built on the resumed store finds each image as its own top-1
    index = ImageIndex.build(tmp_path / "imgs", out, tiny_model, model_path=str(tiny_clip_path),
                             embed=fast_config())
    assert len(index) == n
    for i in (0, 17, 59):
        assert index.search_embedding(vectors[i], 1)[0].id == i


def test_bfloat16_model_and_float16_storage(tmp_path, tiny_clip_path, tiny_model):  # noqa: F811
    from internvl_fm.retrieval import ModelSpec

    make_images(tmp_path / "imgs", 8)
    run_embedding(tmp_path / "imgs", tmp_path / "fp32", tiny_model, fast_config())
    bf16 = ModelSpec(str(tiny_clip_path), dtype="bfloat16").load("cpu")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    run_embedding(tmp_path / "imgs", tmp_path / "bf16", bf16, fast_config(storage_dtype="float16"))
    assert np.load(tmp_path / "bf16" / "img_emb" / "img_emb_0.npy").dtype == np.float16
    (_, a), (_, b) = (next(EmbeddingStore(tmp_path / d).iter_embeddings()) for d in ("fp32", "bf16"))
    assert b.dtype == np.float32 and a.shape == b.shape
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.98


class _RecordingModel:
    """The tiny model, recording the size of every batch the job hands it (and the batch_size it asks for)."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self.image_processor = model.image_processor

    def embed_images(self, images, mode="InternVL-C", batch_size=32):
        self.calls.append(("image", len(images), batch_size))
        return self.model.embed_images(images, mode=mode, batch_size=batch_size)

    def embed_texts(self, texts, mode="InternVL-C", batch_size=64):
        self.calls.append(("text", len(texts), batch_size))
        return self.model.embed_texts(texts, mode=mode, batch_size=batch_size)


def test_each_batch_goes_to_the_model_whole(tmp_path, tiny_model):  # noqa: F811
    make_images(tmp_path / "imgs", 10)
    (tmp_path / "imgs" / "img_005.txt").unlink()  # one image without caption
    recording = _RecordingModel(tiny_model)
    report = run_embedding(tmp_path / "imgs", tmp_path / "out", recording, fast_config(batch_size=4, shard_size=6))
    # split once: batches of 4 records, each embedded in one call per tower, never re-split by the model
    assert [(kind, n) for kind, n, _ in recording.calls] == [("image", 4), ("text", 4), ("image", 4), ("text", 3),
                                                             ("image", 2), ("text", 2)]
    assert all(n == batch_size for _, n, batch_size in recording.calls)
    # shards hold whole batches: shard_size 6 -> 8 records per shard
    store = EmbeddingStore(tmp_path / "out")
    assert [(s.start, s.end) for s in store.shards()] == [(0, 8), (8, 10)] and report.rows_written == 10
    texts = np.concatenate([np.load(p) for p in sorted((tmp_path / "out" / "text_emb").glob("*.npy"))])
    assert not texts[5].any() and texts[4].any()  # the uncaptioned image has a zero caption row
