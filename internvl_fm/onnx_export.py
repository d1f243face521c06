"""ONNX export of the InternVL-C/G towers, and an onnxruntime embedder with the `embed_images` / `embed_texts` API.

`export_onnx(model, "vision" | "text", folder)` writes `folder/vision.onnx` or `folder/text.onnx` (weights as
external data when over 2 GB) and `folder/onnx_config.json`, which says what a user needs to run the graphs with
onnxruntime alone: input names and shapes, the image size / mean / std, the tokenizer contract (the tokenizer files
are copied beside the text graph), the embedding dimension and the mode. Both graphs have a dynamic batch axis (the
text graph a dynamic length too) and give the raw embeddings of `encode_image` / `encode_text`: L2-normalise them
before comparing.

- vision, InternVL-C: pixel_values [B, 3, S, S] float32 -> InternViT -> attention pooling -> image_embeds [B, D].
- vision, InternVL-G: the same plus the 96 query tokens through QLLaMA (cross-attending to the ViT tokens):
  normalize(C) + normalize(clip_projector2(queries)), as `encode_image(mode="InternVL-G")`.
- text (both modes share it): input_ids [B, T] int64 (right padded with 0; BOS ... EOS) -> causal QLLaMA -> the
  state at the EOS position `(input_ids > 0).sum(1) - 1` -> text_projection -> text_embeds [B, D].

The graphs are traced with `torch.onnx.export(dynamo=True)` from the plain PyTorch path (autograd on during the
trace: no fused oneDNN kernels, no per-sample attention loop) in float32 on the CPU. Writing is atomic: the folder
is rebuilt beside the target (the other tower's files hard-linked) and swapped in.

    internvl-fm export onnx MODEL --tower vision --output DIR [--mode InternVL-G] [--opset 18] [--verify]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from internvl_fm.errors import InternVLError
from internvl_fm.loading import _link_or_copy, atomic_directory
from internvl_fm.models.configuration_internvl import MODES
from internvl_fm.models.modeling_qllama import rotary_cos_sin

TOWERS = ("vision", "text")
CONFIG_NAME = "onnx_config.json"
FORMAT = "internvl-fm-onnx"
INPUT_NAMES = {"vision": "pixel_values", "text": "input_ids"}
OUTPUT_NAMES = {"vision": "image_embeds", "text": "text_embeds"}
INSTALL_HINT = "pip install 'internvl-fm[onnx]'"
VERIFY_TOLERANCE = 1e-3  # `--verify`: relative error of onnxruntime vs PyTorch (float32) above which export fails


class OnnxExportError(InternVLError, ValueError):
    """An ONNX export (or an exported folder) that cannot be done / used as asked: names the problem."""


def require_packages(*names: str) -> None:
    """Raise OnnxExportError naming the missing packages (and the install command) unless all import."""
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise OnnxExportError(f"ONNX export needs the package(s) {', '.join(missing)}: {INSTALL_HINT}")


def check_tower(tower: str, mode: str = "InternVL-C") -> None:
    if tower not in TOWERS:
        raise OnnxExportError(f"unknown tower {tower!r}; use one of {', '.join(TOWERS)}")
    if mode not in MODES:
        raise OnnxExportError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")


# ---------------------------------------------------------------------------------------------------- the graphs
def run_qllama_layers(qllama: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None,
                      vision_states: torch.Tensor | None = None) -> torch.Tensor:
    """QLlamaModel.forward for a fresh (cache-less) pass at positions 0..T-1: decoder layers + final norm, with
    the additive `mask` given as it is (the model's own forward skips an all-zero mask, a data-dependent branch
    that torch.export cannot trace)."""
    batch, seq, _ = hidden.shape
    positions = torch.arange(seq, device=hidden.device)[None].expand(batch, -1)
    cos_sin = rotary_cos_sin(positions, qllama.layers[0].self_attn.head_dim, hidden.dtype)
    if vision_states is not None:
        vision_states = vision_states.to(hidden.dtype)
    for layer in qllama.layers:
        hidden = layer(hidden, cos_sin, mask, None, vision_states)
    return qllama.norm(hidden)


class VisionCGraph(nn.Module):
    """pixel_values -> InternVL-C image embedding (`encode_image(mode="InternVL-C")`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_model = model.vision_model
        self.clip_projector = model.clip_projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.clip_projector(self.vision_model(pixel_values).last_hidden_state)


class VisionGGraph(VisionCGraph):
    """pixel_values -> InternVL-G image embedding (`encode_image(mode="InternVL-G")`)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.qllama = model.qllama.model
        self.query_tokens = model.query_tokens
        self.clip_projector2 = model.clip_projector2

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        backbone = self.vision_model(pixel_values).last_hidden_state
        queries = self.query_tokens.expand(backbone.shape[0], -1, -1)
        queries = run_qllama_layers(self.qllama, queries, None, backbone)  # bidirectional: no mask
        return (F.normalize(self.clip_projector(backbone), dim=-1)
                + F.normalize(self.clip_projector2(queries), dim=-1))


class TextGraph(nn.Module):
    """input_ids (right padded with 0) -> EOS-pooled, projected text embedding (`encode_text`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.qllama = model.qllama.model
        self.text_projection = model.text_projection

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        keep = input_ids > 0
        hidden = self.qllama.embed_tokens(input_ids)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        blocked = (pos[None, :] > pos[:, None])[None, None] | ~keep[:, None, None, :]  # causal + padding
        mask = torch.zeros_like(blocked, dtype=hidden.dtype).masked_fill(blocked, torch.finfo(hidden.dtype).min)
        hidden = run_qllama_layers(self.qllama, hidden, mask)
        eos = keep.sum(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), eos] @ self.text_projection


def tower_graph(model: nn.Module, tower: str, mode: str = "InternVL-C") -> nn.Module:
    """The module that `export_onnx` traces for `tower` (it shares the model's weights; no copy)."""
    from internvl_fm.models.modeling_internvl import InternVLModel, InternVLTextModel

    check_tower(tower, mode)
    if tower == "text" and isinstance(model, (InternVLModel, InternVLTextModel)):
        return TextGraph(model)
    if tower == "vision" and isinstance(model, InternVLModel):
        return (VisionCGraph if mode == "InternVL-C" else VisionGGraph)(model)
    supported = "InternVLModel (vision: InternVL-C / InternVL-G; text) and InternVLTextModel (text)"
    raise OnnxExportError(f"cannot export the {tower} tower of {type(model).__name__}: ONNX export supports "
                          f"{supported}")


def example_input(model: nn.Module, tower: str, batch: int = 2, length: int = 8,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """A random valid input of `tower`: normalised-looking pixels, or BOS + tokens + EOS rows right padded with 0
    (row i keeps `length - i` tokens, so the rows have different EOS positions)."""
    generator = generator or torch.Generator().manual_seed(0)
    if tower == "vision":
        size = model.config.image_size
        return torch.randn(batch, 3, size, size, generator=generator)
    qllama_config = model.qllama.config
    low = 3  # above pad (0), BOS (1), EOS (2)
    ids = torch.randint(low, max(qllama_config.vocab_size, low + 1), (batch, length), generator=generator)
    ids[:, 0] = qllama_config.bos_token_id if qllama_config.bos_token_id is not None else 1
    for row in range(batch):
        keep = max(2, length - row % (length - 1))
        ids[row, keep - 1] = qllama_config.eos_token_id if qllama_config.eos_token_id is not None else 2
        ids[row, keep:] = 0
    return ids


@contextlib.contextmanager
def plain_path(graph: nn.Module) -> Iterator[None]:
    """Trace the plain PyTorch inference path: eval mode, dense ViT weights (the fused CPU path packs them in
    place), SDPA attention, and autograd on, which keeps the fused oneDNN kernels and the per-sample eager
    attention loop out of the graph (both are taken only without autograd). Settings are restored afterwards."""
    training = [(module, module.training) for module in graph.modules()]
    vision = getattr(graph, "vision_model", None)
    attention = []
    if vision is not None:
        vision.release_inference_cache()
        attention = [(layer.attn, layer.attn.attn_implementation) for layer in vision.encoder.layers]
        vision.set_attn_implementation("sdpa")
    graph.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for attn, impl in attention:
            attn.attn_implementation = impl
        for module, mode in training:
            module.training = mode


def _check_exportable(graph: nn.Module) -> None:
    tensors = [*graph.parameters(), *graph.buffers()]
    if any(t.is_meta for t in tensors):
        raise OnnxExportError("the model has weights on the meta device (not loaded): load it with from_pretrained")
    bad = sorted({f"{t.dtype}".removeprefix("torch.") + f" on {t.device}" for t in tensors
                  if t.is_floating_point() and (t.dtype != torch.float32 or t.device.type != "cpu")})
    if bad:
        raise OnnxExportError(f"ONNX export needs float32 weights on the CPU, the model has {', '.join(bad)}: load it "
                              "with dtype='float32' (or call model.float().cpu())")


def trace_to_onnx(graph: nn.Module, tower: str, example: torch.Tensor, opset: int | None = None):
    """torch.onnx.export(dynamo=True) of `graph` with a dynamic batch axis (and length for text) -> ONNXProgram."""
    require_packages("onnx", "onnxscript")
    _check_exportable(graph)
    name = INPUT_NAMES[tower]
    dims = {0: torch.export.Dim("batch")}
    if tower == "text":
        dims[1] = torch.export.Dim("length")
    with plain_path(graph):
        try:
            return torch.onnx.export(graph, (example,), input_names=[name], output_names=[OUTPUT_NAMES[tower]],
                                     dynamic_shapes={name: dims}, opset_version=opset, dynamo=True,
                                     verbose=False)
        except Exception as err:  # noqa: BLE001 - the exporter raises many kinds; say what failed in one line
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # the exporter colours its messages
            reason = text.splitlines()[0] if text else type(err).__name__
            raise OnnxExportError(f"torch.onnx.export of the {tower} tower failed: {reason}") from err


# ---------------------------------------------------------------------------------------------------- metadata
def tower_metadata(model: nn.Module, tower: str, mode: str, opset: int) -> dict[str, Any]:
    """What onnx_config.json says about one exported tower."""
    if tower == "vision":
        from internvl_fm.processing import IMAGENET_MEAN, IMAGENET_STD

        size = int(model.config.image_size)
        return {"file": "vision.onnx", "mode": mode, "opset": opset,
                "inputs": {"pixel_values": {"shape": ["batch", 3, size, size], "dtype": "float32"}},
                "outputs": {"image_embeds": {"shape": ["batch", model.config.clip_embed_dim], "dtype": "float32"}},
                "image_size": size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "resize": "bicubic to image_size x image_size, RGB, scaled to [0, 1], then (x - mean) / std"}
    from internvl_fm.tokenization import MAX_LENGTH, PREFIX

    tokenizer = getattr(model, "tokenizer", None)
    qllama_config = model.qllama.config
    return {"file": "text.onnx", "mode": "InternVL-C and InternVL-G (one text tower)", "opset": opset,
            "inputs": {"input_ids": {"shape": ["batch", "length"], "dtype": "int64"}},
            "outputs": {"text_embeds": {"shape": ["batch", model.config.clip_embed_dim], "dtype": "float32"}},
            "max_length": int(getattr(tokenizer, "max_length", MAX_LENGTH)),
            "prefix": getattr(tokenizer, "prefix", PREFIX), "bos_token_id": qllama_config.bos_token_id,
            "eos_token_id": qllama_config.eos_token_id, "pad_token_id": 0,
            "tokenizer": "the transformers tokenizer files beside this file (AutoTokenizer.from_pretrained(folder, "
                         "add_bos_token=True, add_eos_token=True)): ids = [BOS] + tokens(prefix + text) + [EOS], "
                         "truncated to max_length, right padded with 0" if tokenizer is not None else None,
            "pooling": "hidden state at (input_ids > 0).sum(1) - 1 (the EOS), then text_projection"}


def model_reference(source: str | os.PathLike | None) -> str | None:
    """How onnx_config.json names the model: a local folder as an absolute path, a hub id as given."""
    if source is not None and Path(source).expanduser().exists():
        return str(Path(source).expanduser().resolve())
    return None if source is None else str(source)


def model_metadata(model: nn.Module) -> dict[str, Any]:
    """The model-wide part of onnx_config.json."""
    from internvl_fm import __version__

    logit_scale = getattr(model, "logit_scale", None)
    return {"format": FORMAT, "format_version": 1, "model": model_reference(getattr(model, "name_or_path", None)),
            "architecture": "InternVLModel",
            "embed_dim": int(model.config.clip_embed_dim), "normalized": False,
            "logit_scale": float(logit_scale.detach().float().exp()) if logit_scale is not None else None,
            "note": "outputs are raw embeddings: L2-normalise them; similarity = logit_scale * cosine",
            "exported_with": {"internvl_fm": __version__, "torch": torch.__version__.split("+")[0]}, "towers": {}}


def read_onnx_config(folder: str | os.PathLike) -> dict[str, Any]:
    """onnx_config.json of an exported folder (OnnxExportError when the folder holds none)."""
    file = Path(folder) / CONFIG_NAME
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise OnnxExportError(f"{folder} is not an internvl-fm ONNX export (no {CONFIG_NAME})") from None
    except json.JSONDecodeError as err:
        raise OnnxExportError(f"{file} is not valid JSON: {err}") from err
    if data.get("format") != FORMAT:
        raise OnnxExportError(f"{file} is not an internvl-fm ONNX config (format {data.get('format')!r})")
    return data


def _tower_files(folder: Path, tower: str) -> list[Path]:
    return sorted(folder.glob(f"{tower}.onnx*"))


def _plan_folder(folder: Path, tower: str, model: str | None, embed_dim: int, overwrite: bool
                 ) -> dict[str, Any] | None:
    """The existing config whose other towers are kept, None for a fresh folder; refuses to clobber without
    `overwrite`."""
    if not folder.exists():
        return None
    if not folder.is_dir():
        raise OnnxExportError(f"{folder} is a file: give a folder")
    if not (folder / CONFIG_NAME).is_file():
        if any(folder.iterdir()) and not overwrite:
            raise OnnxExportError(f"{folder} exists and is not an internvl-fm ONNX export: pass --overwrite to "
                                  "replace it, or choose another --output")
        return None
    old = read_onnx_config(folder)
    same = (old.get("model"), old.get("embed_dim")) == (model, embed_dim)
    if tower in old.get("towers", {}) and not overwrite:
        raise OnnxExportError(f"{folder} already holds the {tower} tower: pass --overwrite to replace it")
    if not same and not overwrite:
        raise OnnxExportError(f"{folder} holds an export of another model ({old.get('model')}, embed dim "
                              f"{old.get('embed_dim')}): pass --overwrite to replace it, or choose another --output")
    return old if same else None


def write_export(program: Any, meta: dict[str, Any], tower_meta: dict[str, Any], tower: str,
                 output_dir: str | os.PathLike, overwrite: bool = False, tokenizer: Any = None) -> Path:
    """Write an exported program (and the tokenizer for the text tower) into `output_dir` atomically, keeping the
    other tower of the same model that the folder already holds."""
    folder = Path(output_dir)
    old = _plan_folder(folder, tower, meta["model"], meta["embed_dim"], overwrite)
    with atomic_directory(folder) as tmp:
        program.save(str(tmp / tower_meta["file"]))  # weights as external data when over 2 GB
        entry = dict(tower_meta, files=sorted(p.name for p in _tower_files(tmp, tower)))
        if tower == "text" and tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            entry["tokenizer_files"] = sorted(set(os.listdir(tmp)) - set(entry["files"]))
        config = dict(meta, towers={})
        if old is not None:  # keep the other tower and any other file (hard links, never written to)
            config.update({k: v for k, v in old.items() if config.get(k) is None})  # e.g. logit_scale
            config["towers"] = {name: e for name, e in old.get("towers", {}).items() if name != tower}
            replaced = {CONFIG_NAME, *old.get("towers", {}).get(tower, {}).get("tokenizer_files", [])}
            for item in folder.iterdir():
                if item.is_file() and item.name not in replaced and not item.name.startswith(f"{tower}.onnx") \
                        and not (tmp / item.name).exists():
                    _link_or_copy(item, tmp / item.name)
        config["towers"][tower] = entry
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _saved_opset(program: Any, asked: int | None) -> int:
    for entry in program.model_proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return int(asked or 0)


def export_onnx(model: nn.Module, tower: str, output_dir: str | os.PathLike, mode: str = "InternVL-C",
                opset: int | None = None, overwrite: bool = False) -> Path:
    """Export the `tower` ("vision" | "text") of a float32 CPU InternVLModel (InternVLTextModel: text) to
    `output_dir/{tower}.onnx` + `output_dir/onnx_config.json`; returns the folder. `mode` picks the image
    embedding (InternVL-C, or InternVL-G through QLLaMA); `opset` the ONNX opset (None: the exporter's default).
    An existing folder keeps the other tower of the same model; replacing a tower needs `overwrite=True`."""
    graph = tower_graph(model, tower, mode)
    return _export_graph(graph, model, tower, output_dir, mode, opset, overwrite)


def _export_graph(graph: nn.Module, model: nn.Module, tower: str, output_dir: str | os.PathLike, mode: str,
                  opset: int | None, overwrite: bool) -> Path:
    meta = model_metadata(model)
    _plan_folder(Path(output_dir), tower, meta["model"], meta["embed_dim"], overwrite)  # before the (long) trace
    program = trace_to_onnx(graph, tower, example_input(model, tower), opset)
    return write_export(program, meta, tower_metadata(model, tower, mode, _saved_opset(program, opset)), tower,
                        output_dir, overwrite, tokenizer=getattr(model, "tokenizer", None) if tower == "text" else None)


# ---------------------------------------------------------------------------------------------------- running
def onnx_session(path: str | os.PathLike, threads: int | None = None, providers: Sequence[str] | None = None,
                 spin: bool = False):
    """An onnxruntime InferenceSession (CPU by default; `threads` intra-op threads, None: onnxruntime's choice).
    `spin=False` stops its idle threads from busy-waiting after each run: they would take the cores from whatever
    runs next in the process (image decoding, PyTorch)."""
    require_packages("onnxruntime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))


def verify_onnx(model: nn.Module, tower: str, output_dir: str | os.PathLike, mode: str = "InternVL-C",
                batch: int = 3, seed: int = 0) -> float:
    """Relative error max |onnxruntime - PyTorch| / max |PyTorch| of `tower`'s raw embeddings on a random batch
    (PyTorch: the model's own encode_image / encode_text, in the model's current dtype and device)."""
    entry = read_onnx_config(output_dir)["towers"].get(tower)
    if entry is None:
        raise OnnxExportError(f"{output_dir} holds no {tower} tower")
    x = example_input(model, tower, batch=batch, generator=torch.Generator().manual_seed(seed))
    session = onnx_session(Path(output_dir) / entry["file"])
    got = session.run(None, {INPUT_NAMES[tower]: x.numpy()})[0]
    with torch.no_grad():
        if tower == "vision":
            ref = model.encode_image(x.to(model.device, model.dtype), mode=entry["mode"])
        else:
            ref = model.encode_text(x.to(model.text_projection.device))
    ref = ref.float().cpu().numpy()
    return float(np.abs(ref - got).max() / max(float(np.abs(ref).max()), 1e-12))


def load_onnx_tokenizer(folder: str | os.PathLike, text_entry: dict[str, Any]):
    """The InternVLTokenizer saved beside the text graph, with BOS and EOS added explicitly (a transformers
    tokenizer saved by save_pretrained and reloaded with only add_eos_token=True loses its BOS); checked."""
    from transformers import AutoTokenizer

    from internvl_fm.tokenization import InternVLTokenizer

    tokenizer = InternVLTokenizer(AutoTokenizer.from_pretrained(str(folder), add_bos_token=True, add_eos_token=True),
                                  prefix=text_entry["prefix"], max_length=int(text_entry["max_length"]))
    ids = tokenizer(["a"], padding="longest")["input_ids"][0].tolist()
    if ids[0] != text_entry["bos_token_id"] or ids[-1] != text_entry["eos_token_id"]:
        raise OnnxExportError(f"the tokenizer in {folder} gives {ids} for 'a', not BOS ... EOS "
                              f"({text_entry['bos_token_id']} ... {text_entry['eos_token_id']})")
    return tokenizer


class OnnxEmbedder:
    """An exported folder run by onnxruntime, with the embedding API of InternVLModel: `encode_image` /
    `encode_text` (raw), `embed_images` / `embed_texts` (L2-normalised float32 [N, D]), `image_processor`,
    `tokenizer`, `image_size`, `embed_dim`, `name_or_path`. It is the retrieval `Embedder` (`ImageIndex.build`
    takes it as its model); no PyTorch weights are loaded."""

    dtype = torch.float32

    def __init__(self, folder: str | os.PathLike, threads: int | None = None,
                 providers: Sequence[str] | None = None):
        self.folder = Path(folder)
        self.config = read_onnx_config(self.folder)
        towers = self.config["towers"]
        self.embed_dim = int(self.config["embed_dim"])
        self.logit_scale = self.config.get("logit_scale")
        self.name_or_path = self.config.get("model") or str(self.folder)
        self._sessions = {name: onnx_session(self.folder / entry["file"], threads, providers)
                          for name, entry in towers.items()}
        self.image_processor = None
        self.tokenizer = None
        if "vision" in towers:
            from internvl_fm.processing import InternVLImageProcessor

            self.image_processor = InternVLImageProcessor(int(towers["vision"]["image_size"]))
        if "text" in towers and towers["text"].get("tokenizer"):
            self.tokenizer = load_onnx_tokenizer(self.folder, towers["text"])

    @property
    def image_size(self) -> int:
        return int(self._entry("vision")["image_size"])

    @property
    def mode(self) -> str:
        """The image embedding of the exported vision tower (InternVL-C or InternVL-G)."""
        return self._entry("vision")["mode"]

    def _entry(self, tower: str) -> dict[str, Any]:
        entry = self.config["towers"].get(tower)
        if entry is None:
            raise OnnxExportError(f"{self.folder} holds no {tower} tower: export it with `internvl-fm export onnx "
                                  f"MODEL --tower {tower} --output {self.folder}`")
        return entry

    def _run(self, tower: str, array: np.ndarray) -> torch.Tensor:
        self._entry(tower)
        return torch.from_numpy(self._sessions[tower].run(None, {INPUT_NAMES[tower]: array})[0])

    def _check_mode(self, mode: str) -> None:
        if mode != self.mode:
            raise OnnxExportError(f"{self.folder} holds the {self.mode} vision tower, not {mode}")

    def encode_image(self, pixel_values: torch.Tensor, mode: str = "InternVL-C") -> torch.Tensor:
        """Raw image embeddings [B, D] of pre-processed pixels [B, 3, S, S] (`mode` must be the exported one)."""
        self._check_mode(mode)
        return self._run("vision", pixel_values.detach().float().cpu().numpy())

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Raw text embeddings [B, D] of right-padded (pad id 0) token ids [B, T]."""
        return self._run("text", input_ids.detach().cpu().long().numpy())

    def embed_images(self, images: Any, mode: str = "InternVL-C", batch_size: int = 32) -> torch.Tensor:
        """L2-normalised image embeddings [N, D] of PIL images, paths or a pre-processed [N, 3, S, S] tensor."""
        self._check_mode(mode)
        if isinstance(images, torch.Tensor):
            batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
        else:
            single = isinstance(images, (str, os.PathLike)) or hasattr(images, "convert")
            items = [images] if single else list(images)
            batches = (self.image_processor(items[i:i + batch_size]) for i in range(0, len(items), batch_size))
        chunks = [F.normalize(self.encode_image(pixels, mode), dim=-1) for pixels in batches]
        return torch.cat(chunks) if chunks else torch.empty(0, self.embed_dim)

    def embed_texts(self, texts: Sequence[str] | str, mode: str = "InternVL-C", batch_size: int = 64
                    ) -> torch.Tensor:
        """L2-normalised text embeddings [N, D] (both modes share the text tower)."""
        self._entry("text")
        if self.tokenizer is None:
            raise OnnxExportError(f"{self.folder} has no tokenizer files: pass token ids to encode_text")
        texts = [texts] if isinstance(texts, str) else list(texts)
        chunks = [F.normalize(self.encode_text(self.tokenizer(texts[i:i + batch_size], padding="longest")
                                               ["input_ids"]), dim=-1)
                  for i in range(0, len(texts), batch_size)]
        return torch.cat(chunks) if chunks else torch.empty(0, self.embed_dim)


# ---------------------------------------------------------------------------------------------------- the CLI
def _load_tower(path: str, tower: str, mode: str) -> tuple[nn.Module, nn.Module]:
    """(model, float32 graph of `tower`) loaded for export. The text tower loads InternVLTextModel (no ViT);
    the InternVL-C vision tower loads in the stored dtype and casts only the ViT + pooling to float32, so the
    QLLaMA weights are never held in float32."""
    from internvl_fm.models.modeling_internvl import InternVLModel, InternVLTextModel

    if tower == "text":
        model = InternVLTextModel.from_pretrained(path, dtype="float32")
        return model, tower_graph(model, tower, mode)
    model = InternVLModel.from_pretrained(path, load_tokenizer=False)
    graph = tower_graph(model, tower, mode)
    if mode == "InternVL-C":
        model.qllama = None  # only the graph's modules are exported: free QLLaMA before the cast
    return model, graph.float()


def export_main(argv: list[str] | None = None) -> int:
    """Export a model's vision or text tower to ONNX (onnxruntime-ready folder with a JSON description)."""
    from internvl_fm.cli_utils import CLIError, new_parser

    parser = new_parser("internvl-fm export", export_main.__doc__)
    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    onnx = formats.add_parser("onnx", help="ONNX graphs for onnxruntime (float32, dynamic batch)",
                              description="Export one tower of an InternVL-C/G checkpoint to ONNX: DIR/vision.onnx or "
                                          "DIR/text.onnx plus DIR/onnx_config.json (inputs, image size / mean / std, "
                                          "tokenizer contract, embedding dim). Traced in float32 on the CPU.",
                              formatter_class=parser.formatter_class)
    onnx.add_argument("model", nargs="?", metavar="MODEL", help="InternVL-C/G checkpoint folder or hub id")
    onnx.add_argument("--model", dest="model_option", help=argparse.SUPPRESS)  # the same, as other commands name it
    onnx.add_argument("--tower", required=True, metavar="{vision,text}",
                      help="vision (pixel_values -> image_embeds) or text (input_ids -> EOS-pooled, projected "
                           "text_embeds)")
    onnx.add_argument("--output", required=True, metavar="DIR",
                      help="output folder (it may already hold the other tower of the same model)")
    onnx.add_argument("--mode", default="InternVL-C", metavar="{" + ",".join(MODES) + "}",
                      help="image embedding of the vision tower (the text tower is the same for both)")
    onnx.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's own)")
    onnx.add_argument("--overwrite", action="store_true",
                      help="replace the tower if DIR holds it, or DIR itself if it holds something else")
    onnx.add_argument("--verify", action="store_true",
                      help="afterwards, compare onnxruntime with PyTorch on a random batch of 3; fail above "
                           f"{VERIFY_TOLERANCE:g} relative error")
    args = parser.parse_args(argv)
    model_path = args.model or args.model_option
    if not model_path:
        raise CLIError("name the model: internvl-fm export onnx MODEL --tower vision|text --output DIR")
    if args.model and args.model_option and args.model != args.model_option:
        raise CLIError(f"two models given ({args.model} and --model {args.model_option}): give one")
    check_tower(args.tower, args.mode)
    require_packages("onnx", "onnxscript", *(("onnxruntime",) if args.verify else ()))
    if args.opset is not None and not 7 <= args.opset <= 30:
        raise CLIError(f"--opset {args.opset} is not an ONNX opset (use e.g. 17 or 18)")
    output = Path(args.output)
    from internvl_fm.models.modeling_internvl import InternVLModel

    config = InternVLModel.config_from_checkpoint(model_path)  # a wrong folder fails before any weight is read
    _plan_folder(output, args.tower, model_reference(model_path), config.clip_embed_dim, args.overwrite)
    model, graph = _load_tower(model_path, args.tower, args.mode)
    _export_graph(graph, model, args.tower, output, args.mode, args.opset, args.overwrite)
    print(f"wrote {output / (args.tower + '.onnx')} and {output / CONFIG_NAME}")
    if args.verify:
        error = verify_onnx(model, args.tower, output, args.mode)
        print(f"verify: max |onnxruntime - pytorch| / max |pytorch| = {error:.1e} (random batch of 3, float32)")
        if error > VERIFY_TOLERANCE:
            raise OnnxExportError(f"the exported {args.tower} graph differs from PyTorch: relative error {error:.1e} "
                                  f"> {VERIFY_TOLERANCE:g}")
    return 0
