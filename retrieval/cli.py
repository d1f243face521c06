"""`internvl-fm index`, `internvl-fm search` and `internvl-fm serve`.

Option values are converted when parsed and checked by the dataclass they fill (EmbedConfig, IndexOptions,
ModelSpec, ServerConfig), which the command makes before any model is loaded: a bad value ends the command in one
line naming the flag. Errors of the retrieval package (`InternVLError`) reach the `internvl-fm` entry point, which
prints them as one line.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import os
import sys
from collections.abc import Callable
from pathlib import Path

from internvl_fm.cli_utils import CLIError, HelpFormatter, add_model_options, dtype_or_none, new_parser, resolve_device
from internvl_fm.quantization import add_quantization_option
from internvl_fm.models.configuration_internvl import MODES

from .embed import STORAGE_DTYPES, EmbedConfig, EmbedReport
from .errors import OptionError
from .index import ImageIndex, IndexOptions
from .search import Hit, SearchIndex


# ------------------------------------------------------------------------------------------ option values
def _number(flag: str, kind: type = int, low: float = float("-inf"),
            high: float = float("inf")) -> Callable[[str], float]:
    """argparse `type=`: a number in [low, high], else a one-line error (CLIError) at parse time.

    Options that fill EmbedConfig / IndexOptions / ServerConfig are only converted here (no bounds): those
    dataclasses check their values when the command makes them, and `_option_error` names the flag."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            bounds = "" if low == float("-inf") else f" >= {low}" if high == float("inf") else f" in [{low}, {high}]"
            raise CLIError(f"{flag} {text!r}: expected {'an integer' if kind is int else 'a number'}{bounds}")
        return value
    return parse


_DEST = {"max_upload_bytes": "max_upload_mb"}  # option -> argparse dest, where they differ


def _option_error(exc: OptionError, args: argparse.Namespace) -> CLIError:
    """An option refused by its dataclass, as a one-line error naming the command-line flag and the value given."""
    dest = _DEST.get(exc.option, exc.option)
    converted = f" ({exc.option} = {exc.value!r})" if dest != exc.option else ""
    return CLIError(f"--{dest.replace('_', '-')} {str(getattr(args, dest, exc.value))!r}: {exc.reason}{converted}")


def _add_embed_options(parser: argparse.ArgumentParser, build: bool) -> None:
    """Options of the embedding job; `build` adds those fixed for the life of an index (saved in index.json)."""
    group = parser.add_argument_group("embedding")
    group.add_argument("--batch-size", type=_number("--batch-size"), default=64, help="images per model call")
    group.add_argument("--num-workers", type=_number("--num-workers"), default=2,
                       help="DataLoader processes decoding images")
    group.add_argument("--shard-size", type=_number("--shard-size"), default=50_000, help="records per output shard")
    if build:
        group.add_argument("--no-captions", action="store_true", help="do not embed captions")
        group.add_argument("--storage-dtype", default="float32", metavar="{" + ",".join(STORAGE_DTYPES) + "}",
                           help="dtype of the stored vectors (float16: half the disk)")
    group.add_argument("--distributed", action="store_true", help="embed with Ray Data (the [distributed] extra)")
    group.add_argument("--ray-workers", type=_number("--ray-workers", low=1), default=2,
                       help="model replicas (Ray actors) with --distributed")
    group.add_argument("--ray-address", default=None, help="Ray cluster address; None: start a local one")
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def _embed_config(args: argparse.Namespace, **saved) -> EmbedConfig:
    """The run-time options from the command line; `saved` (captions, storage dtype) from the index or the build
    options."""
    return EmbedConfig(batch_size=args.batch_size, num_workers=args.num_workers, shard_size=args.shard_size,
                       progress=not args.quiet, **saved)


def _print_report(report: EmbedReport) -> None:
    print(report.summary(), file=sys.stderr)


def _describe(index: SearchIndex) -> str:
    lines = [(f"{index.root}: {len(index)} rows ({len(index.deleted)} deleted), model {index.spec.path} "
              f"({index.spec.mode}, {index.spec.image_size}px)")]
    for kind, target in index.indexes.items():
        search = target.info.get("search") or {}
        lines.append(f"  {kind}.index: {target.info['factory']}, {target.index.ntotal} vectors, "
                     f"{search.get('parameter') or 'exact'}={search.get('value')}, "
                     f"recall@{search.get('k')}={search.get('recall', 0):.4f}, "
                     f"{search.get('latency_ms', 0):.3f} ms/query")
    return "\n".join(lines)


def _subcommand(sub, name: str, description: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=description, description=description, formatter_class=HelpFormatter)


def index_main(argv: list[str]) -> int:
    """Build, extend, describe or edit a search index (an embedding store + FAISS indexes in one folder)."""
    parser = new_parser("internvl-fm index", index_main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{build,add,info,delete}")

    build = _subcommand(sub, "build", "embed a source and build the index; re-running the same command resumes "
                                      "an interrupted build")
    build.add_argument("source", help="image folder, list file (.txt/.csv/.tsv), parquet / webdataset shards "
                                      "(file, folder or glob), a datasets folder or hf://name[:split]")
    build.add_argument("output", help="index folder to create (new or empty), or to resume")
    add_model_options(build, model="InternVL-C/G checkpoint folder or hub id")
    add_quantization_option(build)
    build.add_argument("--mode", default="InternVL-C", metavar="{" + ",".join(MODES) + "}",
                       help="which embedding head to use")
    build.add_argument("--onnx", default=None, metavar="DIR",
                       help="embed with this `internvl-fm export onnx` folder of --model (onnxruntime, float32) "
                            "instead of PyTorch; searches later load --model")
    idx = build.add_argument_group("index (saved in index.json; `index add` reuses them)")
    idx.add_argument("--max-index-memory", default="4GB", help="RAM budget of the index (e.g. 4GB, 512MB)")
    idx.add_argument("--factory", default=None,
                     help="force a FAISS factory string; None: chosen from the vector count and the budget")
    idx.add_argument("--latency-target-ms", type=_number("--latency-target-ms", float), default=10.0,
                     help="per-query latency the search knob is tuned for")
    idx.add_argument("--min-recall", type=_number("--min-recall", float), default=0.95,
                     help="recall@10 (vs exact search) the search knob must reach")
    _add_embed_options(build, build=True)

    add = _subcommand(sub, "add", "embed another source into an existing index (same model, captions and storage "
                                  "dtype as the build; new ids continue after the last one)")
    add.add_argument("index", help="index folder")
    add.add_argument("source", help="images to add (any source `index build` takes)")
    _add_embed_options(add, build=False)

    info = _subcommand(sub, "info", "describe an index: rows, model, factory, tuned knob, recall@k, latency")
    info.add_argument("index", help="index folder")

    delete = _subcommand(sub, "delete", "remove rows by id from the index (their metadata rows stay, marked "
                                        "deleted)")
    delete.add_argument("index", help="index folder")
    delete.add_argument("ids", nargs="+", type=_number("ids", low=0), help="row ids (as printed by search / info)")

    args = parser.parse_args(argv)
    try:
        _run_index_command(args)
    except OptionError as exc:
        raise _option_error(exc, args) from None
    except KeyboardInterrupt:
        if args.command not in ("build", "add"):
            raise
        print("internvl-fm index: interrupted; the embedded shards are kept: run the same command again to resume",
              file=sys.stderr)
        return 130
    return 0


def _onnx_embedder(folder: str, model: str):
    """The onnxruntime embedder of an exported folder, checked to hold an export of `model`."""
    from internvl_fm.onnx_export import OnnxEmbedder

    embedder = OnnxEmbedder(folder)
    exported = embedder.name_or_path
    if model != exported and not (os.path.exists(model) and os.path.realpath(model) == os.path.realpath(exported)):
        raise CLIError(f"--onnx {folder} is an export of {exported}, not of --model {model}")
    return embedder


def _run_index_command(args: argparse.Namespace) -> None:
    """Run one `index` command; the options are made into their dataclasses (and so checked) before any work."""
    if args.command == "build":
        config = _embed_config(args, captions=not args.no_captions, storage_dtype=args.storage_dtype)
        options = IndexOptions(max_index_memory=args.max_index_memory, factory=args.factory,
                               latency_target_ms=args.latency_target_ms, min_recall=args.min_recall)
        dtype = dtype_or_none(args.dtype)
        if args.distributed:
            from .distributed import build_distributed

            index = build_distributed(args.source, args.output, args.model, mode=args.mode, embed=config,
                                      options=options, num_workers=args.ray_workers, address=args.ray_address,
                                      dtype=dtype)
        else:
            model = _onnx_embedder(args.onnx, args.model) if args.onnx else args.model
            index = ImageIndex.build(args.source, args.output, model, mode=args.mode, embed=config,
                                     options=options, dtype=dtype, device=resolve_device(args.device),
                                     quantization=None if args.quantization == "none" else args.quantization)
        _print_report(index.last_report)
        print(_describe(index))
    elif args.command == "add":
        index = ImageIndex.load(args.index, mmap=False)
        config = _embed_config(args, **index.config.get("embed", {}))
        if args.distributed:
            from .distributed import add_distributed

            report = add_distributed(index, args.source, embed=config, num_workers=args.ray_workers,
                                     address=args.ray_address)
        else:
            report = index.add(args.source, config)
        _print_report(report)
        print(_describe(index))
    elif args.command == "info":
        print(_describe(SearchIndex.load(args.index)))
    else:
        index = ImageIndex.load(args.index, mmap=False)
        print(f"deleted {index.delete(args.ids)} row(s)")


def search_main(argv: list[str]) -> int:
    """Query a search index by text or image; prints `path<TAB>score`, best first, one hit per line."""
    parser = new_parser("internvl-fm search", search_main.__doc__)
    parser.add_argument("index", help="index folder")
    parser.add_argument("query", nargs="?", default=None, help="text query (any language); before or after options")
    parser.add_argument("--image", default=None, help="search with an image instead of text")
    parser.add_argument("--top-k", "--k", dest="top_k", metavar="K", type=_number("--top-k", low=1), default=10,
                        help="hits to print")
    parser.add_argument("--captions", action="store_true", help="search the caption index (image -> text)")
    parser.add_argument("--html", default=None, help="also write a gallery page of the hits to this file")
    add_model_options(parser)
    add_quantization_option(parser, default=None)
    args = parser.parse_intermixed_args(argv)
    if (args.query is None) == (args.image is None):
        parser.error("give a text query or --image PATH (one of them)")
    index = SearchIndex.load(args.index, device=resolve_device(args.device), dtype=dtype_or_none(args.dtype),
                             quantization=args.quantization)
    kind = "text" if args.captions else "image"
    vector = index.embed_text(args.query)[0] if args.query is not None else index.embed_image(args.image)[0]
    hits = index.search_embedding(vector, args.top_k, kind=kind)
    for hit in hits:
        name = hit.caption if args.captions else (hit.image_path or hit.key)
        print(f"{name}\t{hit.score:.4f}")
    if args.html:
        title = args.query if args.query is not None else f"image {args.image}"
        write_gallery(hits, args.html, title)
        print(f"wrote {args.html}", file=sys.stderr)
    return 0


def write_gallery(hits: list[Hit], path: str | os.PathLike, title: str, thumb_size: int = 256) -> None:
    """A self-contained HTML page (embedded JPEG thumbnails) of the hits with their scores."""
    from PIL import Image

    from internvl_fm.errors import ImageLoadError
    from internvl_fm.loading import atomic_write
    from internvl_fm.processing import load_image

    cards = []
    for rank, hit in enumerate(hits, 1):
        image_html = '<div class="missing">no image file</div>'
        if hit.image_path:
            try:
                image = load_image(hit.image_path)
                image.thumbnail((thumb_size, thumb_size), Image.Resampling.BICUBIC)
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=85)
                image_html = (f'<img src="data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}" '
                              f'alt="{html.escape(hit.key)}">')
            except ImageLoadError as exc:
                image_html = f'<div class="missing">{html.escape(exc.reason)}</div>'
        label = html.escape(hit.caption or (Path(hit.image_path).name if hit.image_path else hit.key))
        cards.append(f'<figure>{image_html}<figcaption><b>#{rank}</b> <span class="score">{hit.score:.4f}</span> '
                     f'{label}</figcaption></figure>')
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:1rem}}
.grid{{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:.8rem}}
figure{{margin:0;border:1px solid #ddd;border-radius:6px;padding:.4rem}}
img{{width:100%;height:170px;object-fit:contain;background:#eee}}
.score{{color:#06c}}.missing{{height:170px;background:#eee;color:#777;font-size:.8rem}}</style></head>
<body><h1>{html.escape(title)}</h1><div class="grid">
{chr(10).join(cards)}
</div></body></html>
"""
    with atomic_write(path) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")


def serve_main(argv: list[str]) -> int:
    """Serve a search index over HTTP (FastAPI) with a small web page."""
    from .server import DEFAULT_MAX_UPLOAD, ServerConfig, serve

    parser = new_parser("internvl-fm serve", serve_main.__doc__)
    parser.add_argument("index", help="index folder")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (127.0.0.1: this machine only)")
    parser.add_argument("--port", type=_number("--port", low=0, high=65535), default=8000, help="TCP port")
    parser.add_argument("--max-k", type=_number("--max-k"), default=100, help="largest k a request may ask for")
    parser.add_argument("--max-upload-mb", type=_number("--max-upload-mb", float), default=DEFAULT_MAX_UPLOAD / 2**20,
                        help="largest request body")
    parser.add_argument("--max-query-images", type=_number("--max-query-images"), default=8,
                        help="query images one request may give (their embeddings are averaged)")
    parser.add_argument("--max-image-pixels", type=_number("--max-image-pixels"), default=40_000_000,
                        help="largest query image (width x height) decoded")
    parser.add_argument("--api-key", default=None, help="require this key (header X-API-Key or ?api_key=); "
                                                        "None: $INTERNVL_FM_API_KEY when set, else no key")
    add_model_options(parser)
    add_quantization_option(parser, default=None)
    args = parser.parse_args(argv)
    try:
        config = ServerConfig(max_k=args.max_k, max_upload_bytes=int(args.max_upload_mb * 2**20),
                              max_query_images=args.max_query_images, max_image_pixels=args.max_image_pixels,
                              api_key=args.api_key or os.environ.get("INTERNVL_FM_API_KEY"))
    except OptionError as exc:
        raise _option_error(exc, args) from None
    index = SearchIndex.load(args.index, device=resolve_device(args.device), dtype=dtype_or_none(args.dtype),
                             quantization=args.quantization)
    index.model  # load the model before accepting requests  # noqa: B018
    print(f"serving {args.index} ({len(index)} images) on http://{args.host}:{args.port}", file=sys.stderr)
    serve(index, args.host, args.port, config)
    return 0


def serve_embed_main(argv: list[str]) -> int:
    """Serve InternVL-C/G embeddings with an OpenAI-compatible API (/v1/embeddings, /v1/models); no index needed."""
    from .embeddings_api import EmbeddingsConfig, serve_embeddings

    parser = new_parser("internvl-fm serve-embed", serve_embed_main.__doc__)
    # MODEL is positional (`internvl-fm serve-embed MODEL`); --model, the name other commands use, works too
    parser.add_argument("model", nargs="?", metavar="MODEL", default=None,
                        help="InternVL-C/G checkpoint folder or hub id")
    parser.add_argument("--model", dest="model_option", metavar="MODEL", default=None, help="the same as MODEL")
    add_model_options(parser)
    add_quantization_option(parser)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (127.0.0.1: this machine only)")
    parser.add_argument("--port", type=_number("--port", low=0, high=65535), default=8000, help="TCP port")
    parser.add_argument("--image-root", dest="image_roots", action="append", default=None, metavar="FOLDER",
                        help="inputs may name image files under this folder (repeat for more); none: image paths "
                             "are refused (data: URLs and base64: images always work)")
    parser.add_argument("--max-batch-size", type=_number("--max-batch-size"), default=32,
                        help="inputs per model call (1: no batching, one request after another)")
    parser.add_argument("--max-wait-ms", type=_number("--max-wait-ms", float), default=5.0,
                        help="how long a request waits for others to fill a batch")
    parser.add_argument("--max-queue", type=_number("--max-queue"), default=1024,
                        help="inputs waiting for the model; more get 429")
    parser.add_argument("--max-inputs", type=_number("--max-inputs"), default=256, help="inputs per request")
    parser.add_argument("--max-upload-mb", type=_number("--max-upload-mb", float), default=32.0,
                        help="largest request body")
    parser.add_argument("--max-image-pixels", type=_number("--max-image-pixels"), default=40_000_000,
                        help="largest image (width x height) decoded")
    parser.add_argument("--api-key", default=None, help="require this key (Authorization: Bearer KEY, as the openai "
                                                        "client sends it); None: $INTERNVL_FM_API_KEY when set, "
                                                        "else no key")
    args = parser.parse_args(argv)
    if args.model and args.model_option and args.model != args.model_option:
        parser.error("give MODEL once: positional or --model")
    model_path = args.model or args.model_option
    if not model_path:
        parser.error("give the model: internvl-fm serve-embed MODEL")
    try:
        config = EmbeddingsConfig(image_roots=args.image_roots or [], max_batch_size=args.max_batch_size,
                                  max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, max_inputs=args.max_inputs,
                                  max_upload_bytes=int(args.max_upload_mb * 2**20),
                                  max_image_pixels=args.max_image_pixels,
                                  api_key=args.api_key or os.environ.get("INTERNVL_FM_API_KEY"))
    except OptionError as exc:
        raise _option_error(exc, args) from None
    missing = [root for root in config.image_roots if not os.path.isdir(root)]
    if missing:
        raise CLIError(f"--image-root {missing[0]!r}: no such folder")
    from internvl_fm.models.modeling_internvl import InternVLModel

    model = InternVLModel.from_pretrained(model_path, dtype=dtype_or_none(args.dtype),
                                          device=resolve_device(args.device),
                                          quantization=None if args.quantization == "none" else args.quantization)
    if model.tokenizer is None:
        raise CLIError(f"{model_path} has no tokenizer files: texts cannot be embedded (copy the tokenizer of the "
                       "checkpoint into the folder)")
    print(f"serving {model_path} embeddings ({', '.join(MODES)}) on http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    serve_embeddings(model.eval(), args.host, args.port, config)
    return 0
