"""Retrieval: shared helpers (imported by the other test_retrieval_* files) and tests of sources + store."""
from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from internvl_fm.retrieval import EmbedConfig, EmbeddingStore, ShardInfo, SourceError, open_source, run_embedding
from internvl_fm.retrieval.sources import DatasetSource, FolderSource, ListSource, ParquetSource, WebDatasetSource
from PIL import Image


# ------------------------------------------------------------------------------------------------------- helpers
def make_images(folder: Path, n: int, seed: int = 7, captions: bool = True) -> list[Path]:
    """`n` distinct PNGs (solid colours, stripes, checkers, noise) with a caption file each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        kind = i % 4
        colour = rng.integers(0, 256, 3)
        if kind == 0:
            a = np.ones((h, w, 3)) * colour
        elif kind == 1:
            a = np.zeros((h, w, 3))
            a[:, ::int(rng.integers(3, 9))] = colour
        elif kind == 2:
            yy, xx = np.mgrid[:h, :w]
            s = int(rng.integers(4, 12))
            a = ((yy // s + xx // s) % 2)[..., None] * colour
        else:
            a = rng.integers(0, 256, (h, w, 3))
        path = folder / f"img_{i:03d}.png"
        Image.fromarray(a.astype(np.uint8)).save(path)
        if captions:
            name = ["a plain colour", "vertical stripes", "a checkerboard", "random noise"][kind]
            path.with_suffix(".txt").write_text(f"{name} number {i}")
        paths.append(path)
    return paths


def fast_config(**kw) -> EmbedConfig:
    """Small batches/shards, no worker processes, no progress bars: quick and deterministic in tests."""
    return EmbedConfig(**{"batch_size": 4, "num_workers": 0, "shard_size": 8, "progress": False, **kw})


def write_vectors(root: Path, vectors: np.ndarray, shard_rows: int = 1000) -> EmbeddingStore:
    """An embedding store holding `vectors` (no model involved), in shards of `shard_rows`."""
    store = EmbeddingStore(root)
    for index, lo in enumerate(range(0, len(vectors), shard_rows)):
        chunk = vectors[lo:lo + shard_rows]
        n = len(chunk)
        info = ShardInfo(index, "synthetic", lo, lo + n, lo, n, False, vectors.shape[1])
        meta = {"id": list(range(lo, lo + n)), "key": [f"k{i}" for i in range(lo, lo + n)],
                "image_path": [None] * n, "caption": [None] * n, "source": ["synthetic"] * n,
                "position": list(range(lo, lo + n))}
        store.write_shard(info, chunk.astype(np.float32), None, meta)
    return store


def clustered(n: int, dim: int, clusters: int = 40, noise: float = 0.35, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_model(tiny_clip_path):
    from internvl_fm import InternVLModel

    torch.manual_seed(0)
    return InternVLModel.from_pretrained(tiny_clip_path)


# ---------------------------------------------------------------------------------------------------- sources
def test_folder_source_order_and_captions(tmp_path):
    make_images(tmp_path / "imgs" / "sub", 3)
    make_images(tmp_path / "imgs", 2, seed=1)
    (tmp_path / "imgs" / "notes.md").write_text("not an image")
    source = open_source(tmp_path / "imgs")
    assert isinstance(source, FolderSource)
    records = list(source)
    assert [r.key for r in records] == ["img_000.png", "img_001.png", "sub/img_000.png", "sub/img_001.png",
                                        "sub/img_002.png"]
    assert records[2].read_caption() == "a plain colour number 0"
    assert [r.key for r in source.iter_from(3)] == ["sub/img_001.png", "sub/img_002.png"]
    assert len(source) == 5 and source.roots == [str((tmp_path / "imgs").resolve())]


def test_list_sources_txt_and_csv(tmp_path):
    paths = make_images(tmp_path / "imgs", 3, captions=False)
    (tmp_path / "list.txt").write_text(f"# comment\nimgs/{paths[0].name}\tfirst one\n{paths[1]}\n\n")
    records = list(open_source(tmp_path / "list.txt"))
    assert isinstance(open_source(tmp_path / "list.txt"), ListSource)
    assert [r.path for r in records] == [str(paths[0].resolve()), str(paths[1].resolve())]
    assert [r.caption for r in records] == ["first one", None]
    with open(tmp_path / "list.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filepath", "title"])
        writer.writerows([[f"imgs/{p.name}", f"t{i}"] for i, p in enumerate(paths)])
    assert [r.caption for r in open_source(tmp_path / "list.csv")] == ["t0", "t1", "t2"]
    (tmp_path / "bad.csv").write_text("nothing,here\n1,2\n")
    with pytest.raises(SourceError, match="no image path column"):
        open_source(tmp_path / "bad.csv")


def test_shard_sources_parquet_webdataset_datasets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = make_images(tmp_path / "imgs", 4)
    blobs = [p.read_bytes() for p in paths]
    captions = [p.with_suffix(".txt").read_text() for p in paths]
    pq.write_table(pa.table({"image": [{"bytes": b, "path": p.name} for b, p in zip(blobs, paths)],
                             "caption": captions, "key": [f"k{i}" for i in range(4)]}), tmp_path / "part.parquet")
    parquet = open_source(tmp_path / "part.parquet")
    assert isinstance(parquet, ParquetSource)
    rows = list(parquet)
    assert [r.data for r in rows] == blobs and [r.caption for r in rows] == captions and rows[1].key == "k1"
    assert [r.key for r in parquet.iter_from(2)] == ["k2", "k3"]

    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for i, (blob, caption) in enumerate(zip(blobs, captions)):
            for name, data in ((f"{i:04d}.png", blob), (f"{i:04d}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    wds = open_source(tmp_path / "shard-*.tar")
    assert isinstance(wds, WebDatasetSource)
    assert [(r.data, r.caption, r.key) for r in wds] == [(b, c, f"shard-000/{i:04d}") for i, (b, c)
                                                         in enumerate(zip(blobs, captions))]

    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"image": [str(p) for p in paths], "text": captions})
    table = table.cast_column("image", datasets.Image())
    ds = open_source(table)
    assert isinstance(ds, DatasetSource)
    got = list(ds)
    assert [r.caption for r in got] == captions
    assert all((r.data is not None) or (r.path is not None) for r in got)


def test_unknown_source_is_a_typed_error(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(SourceError, match="cannot tell"):
        open_source(tmp_path / "x.bin")
    with pytest.raises(SourceError, match="does not exist"):
        open_source(tmp_path / "missing.txt")


# -------------------------------------------------------------------------------------------------------- store
def test_store_writes_clip_retrieval_contract(tmp_path, tiny_model):
    make_images(tmp_path / "imgs", 10)
    report = run_embedding(tmp_path / "imgs", tmp_path / "out", tiny_model, fast_config())
    assert report.rows_written == 10 and report.shards_written == 2 and not report.failures
    out = tmp_path / "out"
    for n in (0, 1):
        assert (out / "img_emb" / f"img_emb_{n}.npy").is_file()
        assert (out / "text_emb" / f"text_emb_{n}.npy").is_file()
        assert (out / "metadata" / f"metadata_{n}.parquet").is_file()
    import pyarrow.parquet as pq

    img = np.concatenate([np.load(out / "img_emb" / f"img_emb_{n}.npy") for n in (0, 1)])
    meta = pq.read_table(out / "metadata" / "metadata_1.parquet").to_pydict()
    assert img.shape == (10, 32) and np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    assert meta["id"] == [8, 9] and meta["caption"][0] == "a plain colour number 8"
    # the stored vectors are what the model gives for the image
    direct = tiny_model.embed_images([str(tmp_path / "imgs" / "img_003.png")]).numpy()
    assert np.allclose(img[3], direct[0], atol=1e-5)
    # same source again: nothing to do, nothing duplicated
    again = run_embedding(tmp_path / "imgs", out, tiny_model, fast_config())
    assert again.rows_written == 0 and EmbeddingStore(out).num_rows == 10
    assert json.loads((out / "shards" / "shard_1.json").read_text())["end"] == 10


def test_store_cleans_uncommitted_leftovers(tmp_path):
    store = write_vectors(tmp_path, clustered(30, 8), shard_rows=10)
    (tmp_path / "img_emb" / "img_emb_3.npy").write_bytes(b"partial")
    (tmp_path / "metadata" / ".metadata_3.parquet.abc.tmp").write_bytes(b"partial")
    removed = store.clean_uncommitted()
    assert sorted(p.name for p in removed) == [".metadata_3.parquet.abc.tmp", "img_emb_3.npy"]
    assert store.num_rows == 30 and store.next_shard_index() == 3
    ids = np.concatenate([i for i, _ in store.iter_embeddings(start_id=15)])
    assert ids.tolist() == list(range(15, 30))
