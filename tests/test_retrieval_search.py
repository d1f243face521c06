"""Retrieval end to end with the tiny InternVL-C/G checkpoint: build -> search round trip, add, delete, CLI."""
from __future__ import annotations

import json
from itertools import pairwise

import numpy as np
import pytest
from internvl_fm.retrieval import ImageIndex, IndexNotFoundError, IndexOptions, IndexStateError, SearchIndex
from internvl_fm.cli import main
from internvl_fm.retrieval.cli import index_main, search_main
from test_retrieval_common import fast_config, make_images, tiny_model  # noqa: F401  (fixture)

N = 24


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_clip_path, tiny_model):  # noqa: F811
    root = tmp_path_factory.mktemp("search")
    paths = make_images(root / "imgs", N)
    index = ImageIndex.build(root / "imgs", root / "index", tiny_model, model_path=str(tiny_clip_path),
                             embed=fast_config())
    return root, paths, index


def test_each_image_is_its_own_top1(built):
    _, paths, index = built
    assert len(index) == N and index.ntotal == N
    for i, path in enumerate(paths):
        hit = index.search_image(path, k=3)[0]
        assert hit.id == i and hit.image_path == str(path.resolve()) and hit.score == pytest.approx(1.0, abs=1e-4)


def test_text_search_any_language_and_image_to_text(built):
    _, paths, index = built
    for query in ("a checkerboard", "一个棋盘", "ein Schachbrett", "échiquier"):
        hits = index.search_text(query, k=5)
        assert len(hits) == 5 and all(a.score >= b.score for a, b in pairwise(hits))
    batch = index.search_text(["stripes", "noise"], k=2)
    assert len(batch) == 2 and all(len(b) == 2 for b in batch)
    vector = index.embed_text("stripes")[0]
    assert [(h.id, round(h.score, 5)) for h in index.search_embedding(vector, 2)] == [
        (h.id, round(h.score, 5)) for h in batch[0]]
    captions = index.image_to_text(paths[5], k=3)
    assert captions and all(h.caption for h in captions)
    # the caption index scores captions by their embedding against the image embedding
    img = index.embed_image(paths[5])[0]
    scores = index.embed_text([index.hit(i, 0).caption for i in range(N)]) @ img
    assert captions[0].score == pytest.approx(float(scores.max()), abs=1e-4)
    assert [h.score for h in captions] == pytest.approx(sorted(scores.tolist(), reverse=True)[:3], abs=1e-4)


def test_saved_index_remembers_model_and_recall(built, tiny_clip_path):
    root, paths, _ = built
    config = json.loads((root / "index" / "index.json").read_text())
    assert config["model"] == {"path": str(tiny_clip_path), "mode": "InternVL-C", "image_size": 28,
                               "dtype": "float32"}
    entry = config["indexes"]["image"]  # the manifest names the FAISS file and holds its description
    assert (root / "index" / entry["file"]).is_file()
    info = entry["info"]
    assert info["factory"] == "Flat" and info["search"]["recall"] == 1.0 and info["model"]["image_size"] == 28
    assert info["ntotal"] == N and str((root / "imgs").resolve()) in config["image_roots"]
    loaded = ImageIndex.load(root / "index")  # no model given: loaded from the spec on first query
    assert loaded.search_image(paths[7], 1)[0].id == 7
    with pytest.raises(IndexNotFoundError):
        ImageIndex.load(root / "imgs")
    with pytest.raises(IndexStateError, match="dimension"):
        loaded.search_embedding(np.ones(5), 1)


def test_search_index_only_answers_queries(built):
    root, paths, index = built
    reader = SearchIndex.load(root / "index", model=index.model)
    assert not any(hasattr(reader, name) for name in ("build", "add", "delete", "save"))
    assert [h.id for h in reader.search_image(paths[3], k=3)] == [h.id for h in index.search_image(paths[3], k=3)]
    with pytest.raises(IndexStateError, match="k 0"):
        reader.search_embedding(reader.embed_text("stripes")[0], 0)


def test_add_then_delete(tmp_path, tiny_clip_path, tiny_model):  # noqa: F811
    first = make_images(tmp_path / "a", 8)
    second = make_images(tmp_path / "b", 6, seed=3)
    index = ImageIndex.build(tmp_path / "a", tmp_path / "idx", tiny_model, model_path=str(tiny_clip_path),
                             embed=fast_config(), options=IndexOptions(flat_max=4))  # force HNSW
    assert index.info["image"]["factory"] == "HNSW32,Flat"
    report = index.add(tmp_path / "b", fast_config())
    assert report.rows_written == 6 and len(index) == 14
    hit = index.search_image(second[2], 1)[0]
    assert hit.id == 10 and hit.image_path == str(second[2].resolve())
    assert index.delete([10, 3]) == 2
    assert index.search_image(second[2], 1)[0].id != 10 and all(h.id not in (3, 10)
                                                                 for h in index.search_image(first[3], 14))
    reloaded = ImageIndex.load(tmp_path / "idx")
    assert reloaded.deleted.tolist() == [3, 10] and reloaded.ntotal == 12
    assert all(h.id not in (3, 10) for h in reloaded.search_image(first[3], 14))
    assert len(reloaded.search_image(first[0], 14)) == 12
    with pytest.raises(IndexStateError, match="not in the index"):
        reloaded.delete([99])


def test_cli_build_search_html_add(tmp_path, tiny_clip_path, capsys):
    paths = make_images(tmp_path / "imgs", 10)
    more = make_images(tmp_path / "more", 3, seed=11)
    out = tmp_path / "out"
    assert index_main(["build", str(tmp_path / "imgs"), str(out), "--model", str(tiny_clip_path), "--batch-size",
                       "4", "--num-workers", "0", "--max-index-memory", "1GB", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "Flat" in captured.out and "skipped 0 unreadable" in captured.err
    assert search_main([str(out), "--image", str(paths[4]), "--k", "3", "--html", str(tmp_path / "r.html")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].split("\t")[0] == str(paths[4].resolve())
    scores = [float(line.split("\t")[1]) for line in lines]
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(1.0, abs=1e-3)
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 3 and f"{scores[0]:.4f}" in page
    assert search_main([str(out), "vertical stripes", "--k", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert search_main([str(out), "stripes", "--captions", "--k", "2"]) == 0
    assert "number" in capsys.readouterr().out
    assert index_main(["add", str(out), str(tmp_path / "more"), "--num-workers", "0", "--quiet"]) == 0
    capsys.readouterr()
    assert search_main([str(out), "--image", str(more[1]), "--k", "1"]) == 0
    assert capsys.readouterr().out.startswith(str(more[1].resolve()))
    assert index_main(["info", str(out)]) == 0
    assert "13 rows" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        search_main([str(out)])  # neither a query nor --image
    capsys.readouterr()
    assert main(["search", str(tmp_path / "imgs"), "x"]) == 2  # not an index: one line, not a traceback
    err = capsys.readouterr().err
    assert "no search index" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad.png").write_bytes(b"")
    assert main(["search", str(out), "--image", str(tmp_path / "bad.png")]) == 2
    assert "empty file" in capsys.readouterr().err
