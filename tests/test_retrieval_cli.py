"""Retrieval from the command line: the text_emb/ contract as embedding-reader reads it, options checked when parsed
and saved for `index add`, refusals before any work (empty or swapped folders, missing model), Ctrl-C, help, docs."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from internvl_fm.cli import main
from internvl_fm.retrieval import (EmbedConfig, ImageIndex, IndexOptions, IndexStateError, StoreError,
                                   run_embedding)
from internvl_fm.retrieval.embed import model_reference
from test_retrieval_common import make_images, tiny_model  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "retrieval.md"
FAST = ["--batch-size", "2", "--shard-size", "2", "--num-workers", "0", "--quiet"]


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(err: str, *words: str) -> None:
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err


# ------------------------------------------------------------------------------------------ data contract (#3)
def test_text_emb_stays_row_aligned_for_embedding_reader(tmp_path, tiny_clip_path, tiny_model, capsys):  # noqa: F811
    from embedding_reader import EmbeddingReader

    make_images(tmp_path / "plain", 5, captions=False)  # shards 0-2 (2 + 2 + 1 rows), no caption at all
    captioned = make_images(tmp_path / "captioned", 6, seed=3)
    captioned[4].with_suffix(".txt").unlink()  # an uncaptioned image among captioned ones
    for name in ("a_empty_1.png", "a_empty_2.png"):  # sorted first: shard 3 of the index holds no row
        (tmp_path / "captioned" / name).write_bytes(b"")
    out = tmp_path / "index"
    code, _, err = _cli(capsys, "index", "build", tmp_path / "plain", out, "--model", tiny_clip_path,
                        "--factory", "HNSW32,Flat", "--storage-dtype", "float16", "--min-recall", "0.9", *FAST)
    assert code == 0, err
    assert not (out / "text_emb").exists()  # no caption yet
    code, _, err = _cli(capsys, "index", "add", out, tmp_path / "captioned", *FAST)
    assert code == 0, err

    # the saved options were reused: the caption index (first built by `add`) is HNSW, the vectors float16
    saved = json.loads((out / "index.json").read_text())
    assert saved["options"]["factory"] == "HNSW32,Flat" and saved["options"]["min_recall"] == 0.9
    assert saved["embed"] == {"captions": True, "storage_dtype": "float16"}
    assert saved["indexes"]["text"]["info"]["factory"] == "HNSW32,Flat"
    assert np.load(out / "img_emb" / "img_emb_6.npy").dtype == np.float16

    numbers = {folder: sorted(int(re.findall(r"\d+", p.name)[0]) for p in (out / folder).iterdir())
               for folder in ("img_emb", "text_emb", "metadata")}
    assert numbers["img_emb"] == numbers["text_emb"] == numbers["metadata"] == [0, 1, 2, 4, 5, 6]

    def read(kind: str):
        reader = EmbeddingReader(str(out / kind), file_format="parquet_npy", metadata_folder=str(out / "metadata"),
                                 meta_columns=["id", "image_path", "caption"])
        vectors, meta = zip(*reader(batch_size=1000, show_progress=False))
        return np.concatenate(vectors), [row for table in meta for row in table.itertuples()]

    images, rows = read("img_emb")
    assert len(rows) == 5 + 6 and sorted(r.id for r in rows) == list(range(11))
    expected = tiny_model.embed_images([r.image_path for r in rows]).numpy()
    assert np.allclose(images, expected, atol=3e-3)  # each image vector beside its own metadata row
    texts, rows = read("text_emb")
    uncaptioned = {r.id for r in rows if not isinstance(r.caption, str)}
    assert len(uncaptioned) == 5 + 1
    assert all(not texts[i].any() for i, r in enumerate(rows) if r.id in uncaptioned)  # zero rows, nothing else
    captions = [(i, r.caption) for i, r in enumerate(rows) if r.id not in uncaptioned]
    expected = tiny_model.embed_texts([c for _, c in captions]).numpy()
    assert np.allclose(texts[[i for i, _ in captions]], expected, atol=3e-3)
    assert {Path(r.image_path).name for r in rows if r.caption == "random noise number 3"} == {"img_003.png"}

    # an uncaptioned image is never a caption hit
    index = ImageIndex.load(out, model=tiny_model)
    hits = index.image_to_text(tmp_path / "plain" / "img_000.png", k=11)
    assert len(hits) == 5 and all(h.caption for h in hits) and not {h.id for h in hits} & uncaptioned
    with pytest.raises(StoreError, match="float16"):  # one storage dtype per store
        run_embedding(tmp_path / "plain", out, tiny_model, EmbedConfig(storage_dtype="float32", num_workers=0))


# ------------------------------------------------------------------------------------------ fail fast (#4)
@pytest.mark.parametrize("option", [["--max-index-memory", "4 gigs"], ["--factory", "PCA64,Flat"],
                                    ["--min-recall", "1.5"], ["--latency-target-ms", "fast"],
                                    ["--batch-size", "0"], ["--num-workers", "-1"]])
def test_bad_build_option_fails_in_one_line_before_any_work(tmp_path, capsys, option):
    make_images(tmp_path / "imgs", 2)
    # the model does not exist either: the option must be refused first, before anything is loaded
    code, _, err = _cli(capsys, "index", "build", tmp_path / "imgs", tmp_path / "out", "--model",
                        tmp_path / "no-model", *option)
    assert code == 2 and not (tmp_path / "out").exists()
    _one_line_error(err, "internvl-fm index: error:", option[0], option[1])


@pytest.mark.parametrize("command,option", [
    ("index build", ["--mode", "InternVL-X"]), ("index build", ["--storage-dtype", "float64"]),
    ("index build", ["--shard-size", "0"]), ("serve", ["--max-k", "0"]), ("serve", ["--max-upload-mb", "0"])])
def test_options_checked_by_their_dataclass_fail_in_one_line_naming_the_flag(tmp_path, capsys, command, option):
    make_images(tmp_path / "imgs", 2)
    argv = ([*command.split(), tmp_path / "imgs", tmp_path / "out", "--model", tmp_path / "no-model"]
            if command == "index build" else [command, tmp_path / "no-index"])
    code, _, err = _cli(capsys, *argv, *option)  # refused before the model (or the index) is looked for
    assert code == 2 and not (tmp_path / "out").exists()
    _one_line_error(err, f"internvl-fm {command.split()[0]}: error:", f"{option[0]} '{option[1]}")
    assert "not found" not in err and "no search index" not in err


def test_index_options_are_checked_when_made():
    for bad in ({"max_index_memory": "4 gigs"}, {"factory": "PCA64,Flat"}, {"min_recall": 2.0}):
        with pytest.raises(IndexStateError):
            IndexOptions(**bad)
    saved = asdict(IndexOptions(max_index_memory="512MB", factory="IVF64,Flat"))
    assert IndexOptions.from_dict({**saved, "from_a_later_version": 1}) == IndexOptions(**saved)


def test_missing_model_path_or_unreachable_hub_id_is_one_line(tmp_path, tiny_clip_path, capsys):
    make_images(tmp_path / "imgs", 2)
    code, _, err = _cli(capsys, "index", "build", tmp_path / "imgs", tmp_path / "out", "--model",
                        tmp_path / "no-model", *FAST)
    assert code == 2 and not (tmp_path / "out").exists()
    _one_line_error(err, "checkpoint folder not found", str(tmp_path / "no-model"))
    # an index whose model folder went away
    shutil.copytree(tiny_clip_path, tmp_path / "model")
    assert _cli(capsys, "index", "build", tmp_path / "imgs", tmp_path / "idx", "--model", tmp_path / "model",
                *FAST)[0] == 0
    shutil.rmtree(tmp_path / "model")
    code, _, err = _cli(capsys, "search", tmp_path / "idx", "stripes")
    assert code == 2
    _one_line_error(err, "internvl-fm search: error:", str(tmp_path / "model"))
    # a hub id that cannot be fetched (offline)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "internvl_fm.cli", "index", "build", str(tmp_path / "imgs"),
                           str(tmp_path / "out"), "--model", "nobody/no-such-model", *FAST],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    _one_line_error(proc.stderr, "internvl-fm index: error:", "nobody/no-such-model")


def test_relative_model_path_is_saved_absolute(tmp_path, tiny_clip_path, capsys, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(tiny_clip_path, work / "model")
    make_images(work / "imgs", 4)
    monkeypatch.chdir(work)
    assert _cli(capsys, "index", "build", "imgs", "idx", "--model", "model", *FAST)[0] == 0
    assert json.loads((work / "idx" / "index.json").read_text())["model"]["path"] == str((work / "model").resolve())
    monkeypatch.chdir(tmp_path)  # search from another folder
    code, out, err = _cli(capsys, "search", "work/idx", "stripes", "--top-k", "2")
    assert code == 0 and len(out.strip().splitlines()) == 2, err
    assert model_reference("OpenGVLab/InternVL-14B-224px") == "OpenGVLab/InternVL-14B-224px"  # hub id as given


def test_build_refuses_empty_source_and_swapped_folders(tmp_path, tiny_clip_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = _cli(capsys, "index", "build", tmp_path / "empty", tmp_path / "out", "--model", tiny_clip_path,
                        *FAST)
    assert code == 2 and not (tmp_path / "out").exists()
    _one_line_error(err, "holds no images")

    photos = tmp_path / "photos"
    make_images(photos, 4)
    assert _cli(capsys, "index", "build", photos, tmp_path / "idx", "--model", tiny_clip_path, *FAST)[0] == 0
    before = sorted(os.listdir(photos))
    code, _, err = _cli(capsys, "index", "build", tmp_path / "idx", photos, "--model", tiny_clip_path, *FAST)
    assert code == 2
    _one_line_error(err, "is a search index", "swap")
    code, _, err = _cli(capsys, "index", "build", tmp_path / "empty", photos, "--model", tiny_clip_path, *FAST)
    assert code == 2
    _one_line_error(err, "not empty and holds no search index")
    assert sorted(os.listdir(photos)) == before  # nothing written into the photo folder

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"")
    code, _, err = _cli(capsys, "index", "build", tmp_path / "broken", tmp_path / "out2", "--model", tiny_clip_path,
                        *FAST)
    assert code == 2
    _one_line_error(err, "could be read", "x.png")
    code, _, err = _cli(capsys, "index", "add", tmp_path / "idx", tmp_path / "empty", *FAST)
    assert code == 2
    _one_line_error(err, "holds no images")


_SLOW_CLI = textwrap.dedent("""
    import sys, time
    from internvl_fm.cli import main
    from internvl_fm.models.modeling_internvl import InternVLModel

    embed_images = InternVLModel.embed_images

    def slow(self, *args, **kwargs):  # slow enough to be interrupted in the middle
        time.sleep(0.2)
        return embed_images(self, *args, **kwargs)

    InternVLModel.embed_images = slow
    sys.exit(main(sys.argv[1:]))
""")


def test_ctrl_c_during_build_is_one_line_and_the_build_resumes(tmp_path, tiny_clip_path, capsys):
    n = 30
    make_images(tmp_path / "imgs", n)
    out = tmp_path / "idx"
    argv = ["index", "build", str(tmp_path / "imgs"), str(out), "--model", str(tiny_clip_path), "--batch-size", "2",
            "--shard-size", "2", "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CLI, *argv, "--num-workers", "1"], env=env,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not (out / "shards" / "shard_1.json").exists():
            time.sleep(0.05)
        assert proc.poll() is None, "the build ended before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground group (with the loader)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130
    _one_line_error(err, "interrupted", "run the same command again to resume")
    code, out_text, err = _cli(capsys, *argv, "--num-workers", "0")
    assert code == 0 and "resumed at record" in err and f"{n} rows" in out_text


def test_search_takes_the_query_before_or_after_options(tmp_path, tiny_clip_path, capsys):
    make_images(tmp_path / "imgs", 6)
    idx = tmp_path / "idx"
    assert _cli(capsys, "index", "build", tmp_path / "imgs", idx, "--model", tiny_clip_path, *FAST)[0] == 0
    results = []
    for argv in ([idx, "--k", "3", "a checkerboard"], [idx, "a checkerboard", "--top-k", "3"],
                 ["--top-k", "3", idx, "a checkerboard"]):
        code, out, err = _cli(capsys, "search", *argv)
        assert code == 0, err
        results.append(out)
    assert len(results[0].strip().splitlines()) == 3 and results[0] == results[1] == results[2]
    code, out, _ = _cli(capsys, "search", idx, "--captions", "--k", "2", "stripes")
    assert code == 0 and all("number" in line for line in out.strip().splitlines())
    code, _, err = _cli(capsys, "search", idx, "--top-k", "0", "x")
    assert code == 2
    _one_line_error(err, "--top-k '0'")


# ------------------------------------------------------------------------------------------ conventions (#5)
def test_help_shows_defaults_and_describes_every_index_command(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # no line wrapping inside the checked phrases

    def help_of(*argv) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--help"])
        assert exit_info.value.code == 0
        return capsys.readouterr().out

    top = help_of("index")
    for command in ("build", "add", "info", "delete"):
        assert re.search(rf"^\s+{command}\s+\w", top, flags=re.M), top  # each with its own help text
    build = help_of("index", "build")
    assert "(default: 4GB)" in build and "(default: auto)" in build and "--dtype {auto,bfloat16,float32,float16}" \
        in build
    assert "describe an index" in help_of("index", "info") and "remove rows by id" in help_of("index", "delete")
    assert "same model, captions and storage dtype" in help_of("index", "add")
    search = help_of("search")
    assert "--top-k K, --k K" in search and "(default: 10)" in search and "--device" in search
    serve = help_of("serve")
    assert "(default: 127.0.0.1)" in serve and "(default: 8000)" in serve and "--dtype" in serve


# ------------------------------------------------------------------------------------------ docs
def test_docs_state_what_was_run_and_point_inside_the_repository():
    """(tests/test_docs.py runs the examples of docs/retrieval.md and checks that every file it names exists in the
    repository.)"""
    text = DOC.read_text()
    assert "tests/tools/probe_server.py" in text
    assert (ROOT / "tests" / "tools" / "probe_server.py").is_file()
    assert "was not done" not in text and "| 54x |" in text  # the 1M run is reported, as in docs/benchmarks.md


# ------------------------------------------------------------------------------------------------- --onnx backend
def test_index_build_with_an_onnx_export_embeds_like_pytorch(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import internvl_fm
    from internvl_fm import InternVLModel
    from internvl_fm.onnx_export import export_onnx
    from internvl_fm.retrieval.embed import EmbeddingStore

    demo = internvl_fm.demo_model_path()
    model = InternVLModel.from_pretrained(demo, dtype="float32").eval()
    for tower in ("vision", "text"):
        export_onnx(model, tower, tmp_path / "onnx")
    make_images(tmp_path / "images", 4)
    code, out, err = _cli(capsys, "index", "build", tmp_path / "images", tmp_path / "index", "--model", demo,
                          "--onnx", tmp_path / "onnx", *FAST)
    assert code == 0, err
    store = EmbeddingStore(tmp_path / "index")
    images = np.concatenate([store.read_image_embeddings(s) for s in store.shards()])
    texts = np.concatenate([store.read_text_embeddings(s) for s in store.shards()])
    keys = store.read_metadata(["image_path", "caption"]).to_pylist()
    np.testing.assert_allclose(images, model.embed_images([k["image_path"] for k in keys]).numpy(), atol=1e-4)
    np.testing.assert_allclose(texts, model.embed_texts([k["caption"] for k in keys]).numpy(), atol=1e-4)
    assert ImageIndex.load(tmp_path / "index").spec.path == str(Path(demo).resolve())  # searches load the model

    code, out, err = _cli(capsys, "index", "build", tmp_path / "images", tmp_path / "other", "--model",
                          tmp_path / "images", "--onnx", tmp_path / "onnx", *FAST)
    assert code == 2
    _one_line_error(err, "is an export of", "not of --model")
