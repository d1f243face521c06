"""Retrieval FAISS layer: index choice, ANN == exact on small data, recall measured, add / delete / mmap."""
from __future__ import annotations


import numpy as np
import pytest
from internvl_fm.retrieval import IndexStateError, build_index, choose_index, exact_search, parse_memory, recall_at_k
from internvl_fm.retrieval.search import _FaissIndex, normalize, search_parameters
from test_retrieval_common import clustered, write_vectors


@pytest.fixture(autouse=True, scope="module")
def _one_faiss_thread():
    """faiss' OpenMP threads spin against each other on a busy 2-core machine; one thread is faster here."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def test_parse_memory():
    assert parse_memory("4GB") == 4 * 2**30 and parse_memory("512M") == 512 * 2**20
    assert parse_memory("1.5GiB") == int(1.5 * 2**30) and parse_memory(1000) == 1000
    with pytest.raises(ValueError, match="cannot read memory size"):
        parse_memory("lots")


def test_choice_follows_count_and_memory_budget():
    assert choose_index(10_000, 768, "4GB").factory == "Flat"
    assert choose_index(100_000, 768, "4GB").factory == "HNSW32,Flat"
    big = choose_index(1_000_000, 768, "4GB")
    assert big.factory == "IVF4096,Flat" and big.memory_bytes <= 4 * 2**30 and big.tuned_parameter == "nprobe"
    tight = choose_index(1_000_000, 768, "1GB")
    assert tight.family == "ivfpq" and tight.factory.startswith("OPQ") and tight.memory_bytes <= 2**30
    assert choose_index(100_000, 768, "100MB").family == "ivfpq"  # HNSW would not fit
    assert choose_index(10**9, 768, "64GB").memory_bytes <= 64 * 2**30
    with pytest.raises(IndexStateError, match="max-index-memory"):
        choose_index(10**9, 768, "1GB")


def _shards(vectors, size=700):
    def shards():
        for lo in range(0, len(vectors), size):
            yield np.arange(lo, lo + len(vectors[lo:lo + size])), vectors[lo:lo + size]
    return shards


def test_exact_search_streams_shards():
    x = clustered(2000, 16)
    q = clustered(20, 16, seed=5)
    distances, ids = exact_search(_shards(x)(), q, 7)
    brute = np.argsort(-(q @ x.T), axis=1)[:, :7]
    assert (ids == brute).all() and np.allclose(distances, np.take_along_axis(q @ x.T, brute, 1), atol=1e-5)
    assert recall_at_k(ids, brute, 7) == 1.0 and recall_at_k(ids[:, ::-1] * 0 - 1, brute, 7) == 0.0


@pytest.mark.parametrize("limits", [{"flat_max": 100}, {"flat_max": 100, "hnsw_max": 100}],
                         ids=["hnsw", "ivf"])
def test_chosen_ann_gives_the_same_results_as_flat(limits):
    data = clustered(3050, 32)  # same clusters for the indexed vectors and the held-out queries
    x, queries = data[:3000], data[3000:]
    shards = _shards(x)
    flat = build_index(shards, len(x), 32, progress=False, num_queries=200)
    ann = build_index(shards, len(x), 32, progress=False, num_queries=200, min_recall=1.0, **limits)
    assert flat.choice.factory == "Flat"
    assert ann.choice.family == ("hnsw" if "hnsw_max" not in limits else "ivf")
    assert ann.tuning.recall == 1.0 and ann.tuning.value is not None
    _, flat_ids = flat.index.search(queries, 10)
    _, ann_ids = ann.index.search(queries, 10, params=search_parameters(ann.choice.family, ann.tuning.value))
    assert (flat_ids == ann_ids).all()


def test_product_quantized_index_measures_its_recall():
    x = clustered(3000, 32, clusters=60)
    result = build_index(_shards(x, 1000), len(x), 32, max_memory="180KB", progress=False, num_queries=200,
                         latency_target_ms=50, opq_iterations=2)
    assert result.choice.family == "ivfpq" and result.choice.factory.startswith("OPQ")
    info = result.info()
    assert info["search"]["parameter"] == "nprobe" and 0.2 < info["search"]["recall"] <= 1.0
    assert info["search"]["curve"] and info["estimated_memory_bytes"] <= 180 * 1024
    # the saved recall is the real one: re-measure it independently
    queries = normalize(x[np.random.default_rng(3).choice(len(x), 100, replace=False)])
    _, truth = exact_search(_shards(x)(), queries, 10)
    _, found = result.index.search(queries, 10, params=search_parameters("ivfpq", info["search"]["value"]))
    assert abs(recall_at_k(found, truth, 10) - info["search"]["recall"]) < 0.15


def test_faiss_index_roundtrip_mmap_and_delete(tmp_path):
    x = clustered(3000, 32)
    result = build_index(_shards(x), len(x), 32, progress=False, flat_max=100)  # HNSW: cannot remove ids
    target = _FaissIndex(result.index, result.info())
    target.write(tmp_path / "image.index")
    assert not (tmp_path / "image.index.json").exists()  # the description goes into the manifest (index.json)
    loaded = _FaissIndex.read(tmp_path / "image.index", mmap=True, info=result.info())
    assert loaded.family == "hnsw" and loaded.index.ntotal == 3000
    _, ids = loaded.search(x[:5], 1, None)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    _, ids = loaded.search(x[:5], 3, np.array([0, 2]))
    assert 0 not in ids[0] and 2 not in ids[2] and ids[1, 0] == 1


def test_store_to_index_scales_by_shards(tmp_path):
    x = clustered(2500, 16)
    store = write_vectors(tmp_path, x, shard_rows=400)
    assert len(list((tmp_path / "img_emb").glob("*.npy"))) == 7
    result = build_index(lambda: store.iter_embeddings(), store.num_rows, 16, progress=False, flat_max=100,
                         hnsw_max=100)
    assert result.ntotal == 2500 and result.choice.factory.startswith("IVF")
    _, ids = result.index.search(x[[5, 2400]], 1, params=search_parameters("ivf", result.tuning.value))
    assert ids[:, 0].tolist() == [5, 2400]
