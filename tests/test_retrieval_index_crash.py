"""Index writes cannot be torn (issue 13, item 9): the FAISS files and their description (the manifest index.json)
are committed as one step. Before, a crash between the two renames left an index whose next `add` inserted the same
rows again (463 vectors for 363 rows). kill -9 at random moments during repeated `index add`, and the exact crash
window, simulated in-process."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from internvl_fm.retrieval import ImageIndex, IndexStateError, SearchIndex
from internvl_fm.retrieval import index as index_module
from test_retrieval_common import fast_config, make_images, tiny_model  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
_write = index_module._write_json
FAST = ["--batch-size", "2", "--shard-size", "2", "--num-workers", "0", "--quiet"]


def check_consistent(folder: Path) -> int:
    """The folder opens, the image index holds one vector per row, no id twice, ids 0..rows-1; returns rows."""
    index = SearchIndex.load(folder)
    rows = len(index)
    target = index.indexes["image"].index
    ids = np.sort(faiss.vector_to_array(target.id_map))
    assert target.ntotal == rows and ids.tolist() == list(range(rows)), (target.ntotal, rows)
    return rows


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".old")) or
                  (p.name.endswith(".index") and p.name not in _named(folder)))


def _named(folder: Path) -> set[str]:
    return {entry["file"] for entry in json.loads((folder / "index.json").read_text())["indexes"].values()}


@pytest.fixture
def folders(tmp_path, tiny_clip_path, tiny_model):  # noqa: F811
    """An index over 6 images, and four more folders of 4 images each to add."""
    base = make_images(tmp_path / "base", 6, seed=1)
    extra = [tmp_path / f"more{i}" for i in range(4)]
    for i, folder in enumerate(extra):
        make_images(folder, 4, seed=10 + i)
    ImageIndex.build(tmp_path / "base", tmp_path / "index", tiny_model, model_path=str(tiny_clip_path),
                     embed=fast_config())
    return tmp_path / "index", extra, len(base)


def test_a_crash_between_faiss_write_and_manifest_keeps_the_old_state(folders, tiny_model, monkeypatch):  # noqa: F811
    out, extra, rows = folders
    index = ImageIndex.load(out, model=tiny_model, mmap=False)

    def crash_at_commit(path, data):  # the new FAISS files are written; the manifest rename never happens
        if data.get("generation", 0) > 1:
            raise KeyboardInterrupt
        _write(path, data)

    with monkeypatch.context() as patch:
        patch.setattr(index_module, "_write_json", crash_at_commit)
        with pytest.raises(KeyboardInterrupt):
            index.add(extra[0], fast_config())
    assert check_consistent(out) == rows  # the store holds 4 more rows, not yet committed to the index
    assert SearchIndex.load(out).store.num_rows == rows + 4
    assert any(name.startswith("image.2.") for name in leftovers(out))  # the orphaned new FAISS file
    reopened = ImageIndex.load(out, model=tiny_model, mmap=False)
    reopened.add(extra[0], fast_config())  # resumes: indexes the 4 stored rows once, embeds nothing again
    assert check_consistent(out) == rows + 4 and leftovers(out) == []


def test_a_torn_folder_of_the_older_layout_is_refused_with_a_clear_error(folders):
    """The older layout (image.index + image.index.json, renamed one after the other) torn between the renames."""
    out, _, rows = folders
    config = json.loads((out / "index.json").read_text())
    entry = config.pop("indexes")["image"]
    (out / entry["file"]).rename(out / "image.index")
    (out / "image.index.json").write_text(json.dumps(entry["info"]))
    (out / "index.json").write_text(json.dumps(config))
    for name in [p.name for p in out.glob("text.*.index")]:
        (out / name).unlink()
    assert check_consistent(out) == rows  # the older layout still opens
    index = faiss.read_index(str(out / "image.index"))
    index.add_with_ids(np.eye(1, index.d, dtype=np.float32), np.array([rows], dtype=np.int64))  # vectors > rows
    faiss.write_index(index, str(out / "image.index"))
    with pytest.raises(IndexStateError, match=f"holds {rows + 1} vectors but its description says {rows}"):
        SearchIndex.load(out)
    info = json.loads((out / "image.index.json").read_text())
    (out / "image.index.json").write_text(json.dumps({**info, "ntotal": rows + 1}))
    with pytest.raises(IndexStateError, match=f"holds {rows + 1} vectors for {rows} rows"):
        SearchIndex.load(out)


def test_leftover_temporaries_are_removed_on_the_next_write(folders, tiny_model):  # noqa: F811
    out, _, rows = folders
    for name in (".index.json.abc.tmp", ".image.7.index.x1.tmp", "image.9.index", ".text.3.index.q.tmp"):
        (out / name).write_bytes(b"junk")
    assert check_consistent(out) == rows  # leftovers do not disturb reading
    index = ImageIndex.load(out, model=tiny_model)
    index.delete([1])
    assert leftovers(out) == [] and sorted(p.name for p in out.glob("*.index")) == sorted(_named(out))
    reopened = SearchIndex.load(out)
    assert reopened.is_deleted(1) and reopened.indexes["image"].index.ntotal == rows - 1


def _add(out: Path, folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "internvl_fm.cli", "index", "add", str(out), str(folder),
                             *FAST], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def test_kill_9_at_random_moments_during_repeated_index_add(folders):
    """Each `index add` runs in a subprocess killed with SIGKILL after a random delay (at most 6 kills, at most 2
    per folder, then it runs to the end); after every kill the folder opens and rows == vectors, no id twice."""
    out, extra, rows = folders
    rng = random.Random(13)
    start = time.monotonic()
    first = _add(out, extra[0])  # one uninterrupted run measures how long an add takes
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()
    duration = time.monotonic() - start
    rows += 4
    assert check_consistent(out) == rows
    kills = 0
    for folder in extra[1:]:
        for attempt in range(3):
            proc = _add(out, folder)
            if attempt < 2 and kills < 6:
                try:
                    proc.wait(timeout=rng.uniform(0.2, 0.8) * duration)  # a loaded machine runs later adds faster than the first
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    kills += 1
                proc.wait(timeout=60)
                if proc.returncode == -signal.SIGKILL:
                    assert check_consistent(out) in (rows, rows + 4)  # the old state or the new one
                    continue
            assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
            break
        rows += 4
        assert check_consistent(out) == rows
    assert kills >= 3, f"only {kills} add(s) were killed before finishing"
    print(f"{kills} kills; an add takes {duration:.1f}s; {rows} rows == vectors after each")
    assert leftovers(out) == []
    hits = SearchIndex.load(out).search_embedding(SearchIndex.load(out).stored_vector(rows - 1), k=rows)
    assert len({hit.id for hit in hits}) == len(hits) == rows
