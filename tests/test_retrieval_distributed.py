"""Retrieval on Ray Data: the distributed embedding job writes what the local job writes."""
from __future__ import annotations

import numpy as np
import pytest
from internvl_fm.retrieval import EmbeddingStore, run_embedding
from test_retrieval_common import fast_config, make_images, tiny_model  # noqa: F401  (fixture)

ray = pytest.importorskip("ray")  # the [distributed] extra


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def test_ray_path_writes_the_same_output_as_the_local_path(tmp_path, tiny_clip_path, tiny_model, local_ray):  # noqa: F811
    from internvl_fm.retrieval import ImageIndex
    from internvl_fm.retrieval.distributed import build_distributed

    make_images(tmp_path / "imgs", 18)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG not really")
    config = fast_config(batch_size=4, shard_size=8)
    local = run_embedding(tmp_path / "imgs", tmp_path / "local", tiny_model, config)
    index = build_distributed(tmp_path / "imgs", tmp_path / "ray", tiny_clip_path, embed=fast_config(), num_workers=2)
    report = index.last_report
    assert report.rows_written == local.rows_written == 18 and report.shards_written == local.shards_written == 3
    assert [f.source for f in report.failures] == [f.source for f in local.failures] == [
        str((tmp_path / "imgs" / "broken.png").resolve())]
    a, b = EmbeddingStore(tmp_path / "local"), EmbeddingStore(tmp_path / "ray")
    for kind in ("image", "text"):
        (ids_a, va), (ids_b, vb) = ([np.concatenate(x) for x in zip(*s.iter_embeddings(kind))] for s in (a, b))
        assert (ids_a == ids_b).all() and np.allclose(va, vb, atol=1e-5)
    meta_a, meta_b = a.read_metadata().to_pydict(), b.read_metadata().to_pydict()
    for column in ("id", "key", "image_path", "caption", "position"):
        assert meta_a[column] == meta_b[column]
    assert [(s.start, s.end, s.rows) for s in a.shards()] == [(s.start, s.end, s.rows) for s in b.shards()]
    # the Ray-built index searches like any other (its model comes from the saved spec)
    loaded = ImageIndex.load(tmp_path / "ray")
    assert loaded.search_image(tmp_path / "imgs" / "img_005.png", 1)[0].id == 5
