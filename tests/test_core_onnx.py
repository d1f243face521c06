"""ONNX export of the InternVL-C/G towers (internvl_fm.onnx_export): onnxruntime against PyTorch at batch 1 and 3,
the JSON description, the onnxruntime embedder, atomic writes, and the `internvl-fm export onnx` command."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import internvl_fm
from internvl_fm import cli
from internvl_fm.models.modeling_internvl import InternVLModel, InternVLTextModel
from internvl_fm.onnx_export import (CONFIG_NAME, FORMAT, OnnxEmbedder, OnnxExportError, example_input, export_main,
                                     export_onnx, onnx_session, read_onnx_config, tower_graph, write_export)

HAVE_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="needs onnx, onnxscript and onnxruntime (the [onnx] extra)")
ATOL = 1e-4


def run(folder, tower: str, x: torch.Tensor) -> np.ndarray:
    entry = read_onnx_config(folder)["towers"][tower]
    session = onnx_session(folder / entry["file"], threads=1)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def text_ids(model, batch: int, length: int, seed: int) -> torch.Tensor:
    return example_input(model, "text", batch=batch, length=length, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny(tiny_clip_path):
    return InternVLModel.from_pretrained(tiny_clip_path, dtype="float32").eval()


@pytest.fixture(scope="module")
def tiny_export(tiny, tmp_path_factory):
    """The tiny InternVL-C vision and text towers exported into one folder."""
    if not HAVE_ONNX:
        pytest.skip("needs the [onnx] extra")
    folder = tmp_path_factory.mktemp("onnx") / "tiny"
    export_onnx(tiny, "vision", folder)
    export_onnx(tiny, "text", folder)
    return folder


@needs_onnx
def test_vision_tower_matches_pytorch_at_batch_1_and_3(tiny, tiny_export):
    size = tiny.image_size
    for batch in (1, 3):
        pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = tiny.encode_image(pixels, mode="InternVL-C").numpy()
        got = run(tiny_export, "vision", pixels)
        assert got.shape == expected.shape == (batch, tiny.embed_dim)
        assert np.abs(got - expected).max() <= ATOL


@needs_onnx
def test_text_tower_pools_the_eos_of_each_row_at_any_batch_and_length(tiny, tiny_export):
    for batch, length in ((1, 5), (3, 12), (3, 80)):  # traced at batch 2, length 8
        ids = text_ids(tiny, batch, length, seed=length)
        assert len(set((ids > 0).sum(1).tolist())) == batch  # every row ends (EOS) somewhere else
        with torch.no_grad():
            expected = tiny.encode_text(ids).numpy()
        got = run(tiny_export, "text", ids)
        assert got.shape == (batch, tiny.embed_dim)
        assert np.abs(got - expected).max() <= ATOL
    # padding after the EOS does not change a row's embedding (the graph pools the EOS, not the last position)
    ids = text_ids(tiny, 1, 6, seed=1)
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=ids.dtype)], dim=1)
    assert np.abs(run(tiny_export, "text", padded) - run(tiny_export, "text", ids)).max() <= ATOL


@needs_onnx
def test_onnx_config_describes_the_graphs(tiny, tiny_export, tiny_clip_path):
    config = json.loads((tiny_export / CONFIG_NAME).read_text())
    assert config["format"] == FORMAT and config["embed_dim"] == tiny.embed_dim == 32
    assert config["model"] == str(tiny_clip_path.resolve())
    assert config["logit_scale"] == pytest.approx(tiny.logit_scale.exp().item())
    vision, text = config["towers"]["vision"], config["towers"]["text"]
    assert vision["mode"] == "InternVL-C" and vision["image_size"] == tiny.image_size == 28
    assert vision["mean"] == [0.485, 0.456, 0.406] and vision["std"] == [0.229, 0.224, 0.225]
    assert text["max_length"] == tiny.tokenizer.max_length == 80 and text["prefix"] == "summarize:"
    assert text["eos_token_id"] == 2 and text["pad_token_id"] == 0 and text["tokenizer_files"]
    for entry, tower in ((vision, "vision"), (text, "text")):
        files = [entry["file"], *entry["files"], *entry.get("tokenizer_files", [])]
        assert all((tiny_export / name).is_file() for name in files)
        session = onnx_session(tiny_export / entry["file"], threads=1)
        (name, spec), = entry["inputs"].items()
        assert [i.name for i in session.get_inputs()] == [name]
        assert session.get_inputs()[0].shape[0] == "batch" and session.get_inputs()[0].shape[1:] == spec["shape"][1:]
        (out_name, out_spec), = entry["outputs"].items()
        assert session.get_outputs()[0].name == out_name and out_spec["shape"] == ["batch", 32]
        assert entry["opset"] >= 17


@needs_onnx
def test_internvl_g_vision_tower_matches_pytorch_and_leaves_the_model_as_it_was(tiny, tmp_path):
    folder = tmp_path / "g"
    folder.mkdir()
    (folder / "junk.txt").write_text("not an export")
    layers = tiny.vision_model.encoder.layers
    tiny.vision_model.set_attn_implementation("eager")
    tiny.train()  # traced in eval mode all the same (drop-path / dropout off), then put back
    try:
        with torch.no_grad():
            export_onnx(tiny, "vision", folder, mode="InternVL-G", overwrite=True)
            assert not torch.is_grad_enabled()  # the export's autograd switch is undone
        assert [layer.attn.attn_implementation for layer in layers] == ["eager"] * len(layers)
        assert all(m.training for m in tiny.modules()) and all(p.requires_grad for p in tiny.parameters())
    finally:
        tiny.vision_model.set_attn_implementation("auto")
        tiny.eval()
    assert not (folder / "junk.txt").exists()  # --overwrite replaced the foreign folder
    assert read_onnx_config(folder)["towers"]["vision"]["mode"] == "InternVL-G"
    for batch in (1, 3):
        pixels = torch.randn(batch, 3, 28, 28, generator=torch.Generator().manual_seed(10 + batch))
        with torch.no_grad():
            expected = tiny.encode_image(pixels, mode="InternVL-G").numpy()
        assert np.abs(run(folder, "vision", pixels) - expected).max() <= ATOL


def test_unsupported_models_towers_and_dtypes_are_refused(tiny, tiny_clip_path, tmp_path):
    with pytest.raises(OnnxExportError, match="unknown tower 'audio'; use one of vision, text"):
        tower_graph(tiny, "audio")
    with pytest.raises(OnnxExportError, match="unknown mode 'InternVL-X'"):
        tower_graph(tiny, "vision", mode="InternVL-X")
    with pytest.raises(OnnxExportError, match="vision tower of InternVisionModel: ONNX export supports InternVLModel"):
        tower_graph(tiny.vision_model, "vision")
    text_only = InternVLTextModel.from_pretrained(tiny_clip_path, load_tokenizer=False)
    with pytest.raises(OnnxExportError, match="vision tower of InternVLTextModel"):
        tower_graph(text_only, "vision")
    assert tower_graph(text_only, "text").text_projection is text_only.text_projection
    bf16 = InternVLModel.from_pretrained(tiny_clip_path, dtype="bfloat16", load_tokenizer=False)
    if HAVE_ONNX:
        with pytest.raises(OnnxExportError, match="needs float32 weights on the CPU, the model has bfloat16 on cpu"):
            export_onnx(bf16, "text", tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _FailingProgram:
    def save(self, path):
        Path(path).write_text("half a graph")
        raise OSError("disk full")


@needs_onnx
def test_a_failed_write_leaves_the_folder_as_it_was(tiny, tiny_export, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(tiny_export, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    meta = read_onnx_config(folder)
    with pytest.raises(OSError, match="disk full"):
        write_export(_FailingProgram(), meta, meta["towers"]["vision"], "vision", folder, overwrite=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # no temporary folder left behind


def _export_command(monkeypatch):
    """`internvl-fm` with the `export` entry point (as pyproject registers it)."""
    registered = dict(cli.commands())
    registered["export"] = importlib.metadata.EntryPoint("export", "internvl_fm.onnx_export:export_main",
                                                         cli.COMMAND_GROUP)
    monkeypatch.setattr(cli, "commands", lambda: registered)


@needs_onnx
def test_cli_exports_the_demo_model_and_the_onnx_embedder_matches_pytorch(tmp_path, capsys):
    from PIL import Image

    demo = internvl_fm.demo_model_path()
    out = tmp_path / "demo-onnx"
    assert export_main(["onnx", str(demo), "--tower", "vision", "--output", str(out)]) == 0
    vision_file = (out / "vision.onnx").stat()
    # the text tower loads without the ViT (InternVLTextModel), into the same folder
    assert export_main(["onnx", "--model", str(demo), "--tower", "text", "--output", str(out), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "verify: max |onnxruntime - pytorch|" in printed
    model = InternVLModel.from_pretrained(demo).eval()
    config = read_onnx_config(out)
    assert set(config["towers"]) == {"vision", "text"} and config["embed_dim"] == 64
    assert (out / "vision.onnx").stat().st_ino == vision_file.st_ino  # the vision tower was kept, not rewritten
    assert config["logit_scale"] == pytest.approx(model.logit_scale.exp().item())  # kept from the vision export

    embedder = OnnxEmbedder(out, threads=1)
    assert embedder.image_processor.image_size == model.image_size == 56
    images = [Image.new("RGB", (70, 50), color) for color in ("red", "green", "blue")]
    texts = ["a red square", "a photo of a green field", "blue"]
    for got, expected in ((embedder.embed_images(images, batch_size=2), model.embed_images(images)),
                          (embedder.embed_texts(texts, batch_size=2), model.embed_texts(texts))):
        assert got.shape == expected.shape == (3, 64) and got.dtype == torch.float32
        assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert (got - expected).abs().max() <= ATOL
    with pytest.raises(OnnxExportError, match="holds the InternVL-C vision tower, not InternVL-G"):
        embedder.embed_images(images, mode="InternVL-G")

    # the embedder is a retrieval Embedder: `index build` embeds with onnxruntime, the index remembers the checkpoint
    from internvl_fm.retrieval import ImageIndex
    from internvl_fm.retrieval.embed import EmbedConfig, EmbeddingStore

    (tmp_path / "images").mkdir()
    for i, image in enumerate(images):
        image.save(tmp_path / "images" / f"{i}.png")
    index = ImageIndex.build(tmp_path / "images", tmp_path / "index", embedder,
                             embed=EmbedConfig(num_workers=0, progress=False))
    assert index.spec.path == str(demo.resolve()) and index.spec.mode == "InternVL-C"
    store = EmbeddingStore(tmp_path / "index")
    stored = np.concatenate([store.read_image_embeddings(shard) for shard in store.shards()])
    expected = model.embed_images(sorted((tmp_path / "images").iterdir())).numpy()
    assert stored.shape == (3, 64) and np.abs(stored - expected).max() <= ATOL


def _fake_export_folder(folder, model_path, towers=("vision",)):
    folder.mkdir()
    (folder / CONFIG_NAME).write_text(json.dumps({"format": FORMAT, "model": str(model_path.resolve()),
                                                  "embed_dim": 32, "towers": {t: {} for t in towers}}))
    return folder


@pytest.mark.parametrize("case", ["tower", "mode", "no-model", "kind", "exists", "foreign", "other-model", "no-onnx"])
def test_cli_errors_are_one_line(case, tiny_clip_path, tiny_vit_path, tmp_path, monkeypatch, capsys):
    _export_command(monkeypatch)
    out = tmp_path / "out"
    args = ["export", "onnx", str(tiny_clip_path), "--tower", "vision", "--output", str(out)]
    expected = {
        "tower": "unknown tower 'audio'; use one of vision, text",
        "mode": "unknown mode 'InternVL-X'; use one of InternVL-C, InternVL-G",
        "no-model": "name the model: internvl-fm export onnx MODEL",
        "kind": "holds an InternViT vision encoder, not an InternVL-C/G model",
        "exists": "already holds the vision tower: pass --overwrite to replace it",
        "foreign": "exists and is not an internvl-fm ONNX export: pass --overwrite",
        "other-model": "holds an export of another model",
        "no-onnx": "ONNX export needs the package(s) onnx: pip install 'internvl-fm[onnx]'",
    }[case]
    if case == "tower":
        args[4] = "audio"
    elif case == "mode":
        args += ["--mode", "InternVL-X"]
    elif case == "no-model":
        del args[2]
    elif case == "kind":
        args[2] = str(tiny_vit_path)
    elif case == "exists":
        _fake_export_folder(out, tiny_clip_path)
    elif case == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "other-model":
        _fake_export_folder(out, tmp_path, towers=("text",))
    elif case == "no-onnx":
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    if case in ("kind", "exists", "foreign", "other-model") and not HAVE_ONNX:
        pytest.skip("the folder is checked after the package check")
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("internvl-fm export: error: ") and expected in err and "\n" not in err
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else None) == before  # nothing written
