"""`internvl-fm index`, `internvl-fm search` and `internvl-fm serve`."""
from __future__ import annotations

import argparse
import base64
import html
import io
import os
import sys
from pathlib import Path

from internvl_fm.errors import InternVLError

from .embed import MODES, EmbedConfig, EmbedReport
from .search import Hit, ImageIndex, IndexOptions


def _fail(prog: str, exc: Exception) -> int:
    """Typed errors (missing index, unreadable query image, ...) end the command with a message, not a trace."""
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 2


def _add_embed_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("embedding")
    group.add_argument("--batch-size", type=int, default=64)
    group.add_argument("--num-workers", type=int, default=2, help="DataLoader processes decoding images")
    group.add_argument("--shard-size", type=int, default=50_000, help="records per output shard")
    group.add_argument("--no-captions", action="store_true", help="do not embed captions")
    group.add_argument("--storage-dtype", choices=["float32", "float16"], default="float32")
    group.add_argument("--distributed", action="store_true", help="embed with Ray Data (the [distributed] extra)")
    group.add_argument("--ray-workers", type=int, default=2, help="model replicas (Ray actors) with --distributed")
    group.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local one)")
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def _embed_config(args: argparse.Namespace, mode: str) -> EmbedConfig:
    return EmbedConfig(mode=mode, batch_size=args.batch_size, num_workers=args.num_workers,
                       shard_size=args.shard_size, captions=not args.no_captions,
                       storage_dtype=args.storage_dtype, progress=not args.quiet)


def _print_report(report: EmbedReport) -> None:
    print(report.summary(), file=sys.stderr)


def _describe(index: ImageIndex) -> str:
    lines = [(f"{index.root}: {len(index)} rows ({len(index.deleted)} deleted), model {index.spec.path} "
              f"({index.spec.mode}, {index.spec.image_size}px)")]
    for kind, target in index.indexes.items():
        search = target.info.get("search") or {}
        lines.append(f"  {kind}.index: {target.info['factory']}, {target.index.ntotal} vectors, "
                     f"{search.get('parameter') or 'exact'}={search.get('value')}, "
                     f"recall@{search.get('k')}={search.get('recall', 0):.4f}, "
                     f"{search.get('latency_ms', 0):.3f} ms/query")
    return "\n".join(lines)


def index_main(argv: list[str]) -> int:
    """Build or extend a search index."""
    parser = argparse.ArgumentParser(prog="internvl-fm index", description=index_main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="embed a source and build the index (resumes an interrupted build)")
    build.add_argument("source", help="image folder, list file (.txt/.csv/.tsv), parquet / webdataset shards "
                                      "(file, folder or glob), a datasets folder or hf://name[:split]")
    build.add_argument("out", help="output folder")
    build.add_argument("--model", required=True, help="InternVL-C/G checkpoint folder or hub id")
    build.add_argument("--mode", choices=MODES, default="InternVL-C")
    build.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model dtype")
    build.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    idx = build.add_argument_group("index")
    idx.add_argument("--max-index-memory", default="4GB", help="RAM budget of the index (e.g. 4GB, 512MB)")
    idx.add_argument("--factory", default=None, help="force a FAISS factory string (default: chosen)")
    idx.add_argument("--latency-target-ms", type=float, default=10.0)
    idx.add_argument("--min-recall", type=float, default=0.95)
    _add_embed_options(build)

    add = sub.add_parser("add", help="embed another source into an existing index")
    add.add_argument("out", help="index folder")
    add.add_argument("source")
    _add_embed_options(add)

    info = sub.add_parser("info", help="describe an index (factory, recall, latency)")
    info.add_argument("out")

    delete = sub.add_parser("delete", help="remove rows by id")
    delete.add_argument("out")
    delete.add_argument("ids", nargs="+", type=int)

    args = parser.parse_args(argv)
    try:
        _run_index_command(args)
    except (InternVLError, FileNotFoundError) as exc:
        return _fail(parser.prog, exc)
    return 0


def _run_index_command(args: argparse.Namespace) -> None:
    if args.command == "build":
        config = _embed_config(args, args.mode)
        options = IndexOptions(max_index_memory=args.max_index_memory, factory=args.factory,
                               latency_target_ms=args.latency_target_ms, min_recall=args.min_recall)
        if args.distributed:
            from .distributed import build_distributed

            index = build_distributed(args.source, args.out, args.model, mode=args.mode, embed=config,
                                      options=options, num_workers=args.ray_workers, address=args.ray_address,
                                      dtype=args.dtype)
        else:
            index = ImageIndex.build(args.source, args.out, args.model, mode=args.mode, embed=config,
                                     options=options, dtype=args.dtype, device=args.device)
        _print_report(index.last_report)
        print(_describe(index))
    elif args.command == "add":
        index = ImageIndex.load(args.out, mmap=False)
        if args.distributed:
            from .distributed import add_distributed

            report = add_distributed(index, args.source, embed=_embed_config(args, index.spec.mode),
                                     num_workers=args.ray_workers, address=args.ray_address)
        else:
            report = index.add(args.source, _embed_config(args, index.spec.mode))
        _print_report(report)
        print(_describe(index))
    elif args.command == "info":
        print(_describe(ImageIndex.load(args.out)))
    else:
        index = ImageIndex.load(args.out, mmap=False)
        print(f"deleted {index.delete(args.ids)} row(s)")


def search_main(argv: list[str]) -> int:
    """Query a search index by text or image; prints `path<TAB>score`, best first, one hit per line."""
    parser = argparse.ArgumentParser(prog="internvl-fm search", description=search_main.__doc__)
    parser.add_argument("out", help="index folder")
    parser.add_argument("query", nargs="?", default=None, help="text query (any language)")
    parser.add_argument("--image", default=None, help="search with an image instead of text")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--captions", action="store_true", help="search the caption index (image -> text)")
    parser.add_argument("--html", default=None, help="also write a gallery page of the hits")
    args = parser.parse_args(argv)
    if (args.query is None) == (args.image is None):
        parser.error("give a text query or --image PATH (one of them)")
    try:
        index = ImageIndex.load(args.out)
        kind = "text" if args.captions else "image"
        vector = index.embed_text(args.query)[0] if args.query is not None else index.embed_image(args.image)[0]
        hits = index.search_embedding(vector, args.k, kind=kind)
    except (InternVLError, ValueError) as exc:
        return _fail(parser.prog, exc)
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

    parser = argparse.ArgumentParser(prog="internvl-fm serve", description=serve_main.__doc__)
    parser.add_argument("out", help="index folder")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-k", type=int, default=100)
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD / 2**20)
    parser.add_argument("--api-key", default=os.environ.get("INTERNVL_FM_API_KEY"),
                        help="require this key (header X-API-Key or ?api_key=); default $INTERNVL_FM_API_KEY")
    args = parser.parse_args(argv)
    try:
        index = ImageIndex.load(args.out)
        index.model  # load the model before accepting requests  # noqa: B018
    except InternVLError as exc:
        return _fail(parser.prog, exc)
    config = ServerConfig(max_k=args.max_k, max_upload_bytes=int(args.max_upload_mb * 2**20), api_key=args.api_key)
    print(f"serving {args.out} ({len(index)} images) on http://{args.host}:{args.port}", file=sys.stderr)
    serve(index, args.host, args.port, config)
    return 0
