"""`internvl-fm demo`: text-to-image search in five languages with the bundled tiny InternVL-C, fully offline.

It draws a fresh set of synthetic images (coloured shapes on varied backgrounds), builds a retrieval index of them
(`ImageIndex.build`, as `internvl-fm index build` does) with the shipped model (`internvl_fm.demo_model_path()`, an
InternVL-C in the official checkpoint format), runs queries in English, Chinese, Japanese, Spanish and French,
prints the top hits with their scores and the recall@1 / recall@5 of the run (a hit is an image whose generated
attributes all match the query), and writes an HTML gallery of the results.
"""
from __future__ import annotations

import base64
import html
import io
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from internvl_fm import demo_model_path
from internvl_fm.cli_utils import add_model_options, dtype_or_none, new_parser, resolve_device

from .embed import EmbedConfig
from .errors import IndexStateError
from .index import ImageIndex

DEMO_MODEL = demo_model_path()
LANGUAGE_NAMES = {"en": "English", "zh": "Chinese", "ja": "Japanese", "es": "Spanish", "fr": "French"}
RECALL_KS = (1, 5)


@dataclass
class QueryResult:
    """One text query, its top hits (gallery indices and cosine scores) and whether each hit matches."""

    lang: str
    text: str
    attributes: dict[str, str]
    hits: list[int]
    scores: list[float]
    relevant: list[bool]


@dataclass
class DemoResult:
    """Everything one demo run produced."""

    seed: int
    num_images: int
    recall: dict[str, dict[str, float]]  # lang (and "all") -> {"r@1": ..., "r@5": ...}
    queries: list[QueryResult] = field(default_factory=list)
    seconds: float = 0.0
    index_kind: str = "exact"
    html_path: Path | None = None


def run_demo(model_path: str | Path = DEMO_MODEL, num_images: int = 300, queries_per_language: int = 40,
             seed: int | None = None, top_k: int = 5, languages: tuple[str, ...] | None = None,
             dtype: str | None = None, device: str | None = None) -> tuple[DemoResult, list[Any], list[dict[str, str]]]:
    """Generate a gallery, index it with the model and run the queries; returns (result, images, attributes)."""
    from internvl_fm.evaluation import retrieval_recall_at_k
    from internvl_fm.models.modeling_internvl import InternVLModel
    from internvl_fm.training.data import LANGUAGES, SyntheticConfig, caption, generate_samples

    languages = languages or LANGUAGES
    start = time.perf_counter()
    seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
    model = InternVLModel.from_pretrained(model_path, dtype=dtype, device=resolve_device(device)).eval()
    if model.tokenizer is None:
        raise IndexStateError(f"{model_path} has no tokenizer files; the demo needs a model folder with a tokenizer")
    samples = list(generate_samples(num_images, SyntheticConfig(image_size=model.image_size, seed=seed)))
    images = [s.image for s in samples]
    attributes = [s.attributes for s in samples]
    rng = random.Random(seed)
    queries: list[QueryResult] = []
    recall: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="internvl_fm_demo_") as tmp:
        index = _index_gallery(images, Path(tmp), model, model_path)
        k = min(max(top_k, *RECALL_KS), num_images)
        for lang in languages:
            picks = rng.sample(range(num_images), min(queries_per_language, num_images))
            targets = [attributes[i] for i in picks]
            texts = [caption(a, lang, rng=rng) for a in targets]
            hits = index.search_embedding(index.embed_text(texts), k)
            relevant = [[attributes[h.id] == target for h in row] for row, target in zip(hits, targets)]
            scores = [[h.score for h in row] for row in hits]
            recall[lang] = retrieval_recall_at_k(torch.tensor(scores), torch.tensor(relevant), RECALL_KS)
            queries += [QueryResult(lang, text, target, [h.id for h in row[:top_k]], row_scores[:top_k],
                                    row_relevant[:top_k])
                        for text, target, row, row_scores, row_relevant in zip(texts, targets, hits, scores, relevant)]
        info = index.info["image"]
        index_kind = f"ImageIndex, faiss {info['factory']}" + (" (exact)" if info["family"] == "flat" else "")
    recall["all"] = {key: sum(recall[lang][key] for lang in languages) / len(languages) for key in recall[languages[0]]}
    result = DemoResult(seed=seed, num_images=num_images, recall=recall, queries=queries,
                        seconds=time.perf_counter() - start, index_kind=index_kind)
    return result, images, attributes


def _index_gallery(images: list[Any], folder: Path, model: Any, model_path: str | Path) -> ImageIndex:
    """The gallery as PNG files (image i has row id i) indexed by `ImageIndex.build`, decoded in this process."""
    gallery = folder / "images"
    gallery.mkdir()
    width = max(5, len(str(len(images))))
    for i, image in enumerate(images):
        image.save(gallery / f"{i:0{width}d}.png")
    return ImageIndex.build(gallery, folder / "index", model, model_path=str(model_path),
                            embed=EmbedConfig(num_workers=0, captions=False, progress=False))


def _describe(attrs: dict[str, str]) -> str:
    return f"{attrs['size']} {attrs['color']} {attrs['shape']} ({attrs['position']})"


def format_report(result: DemoResult, attributes: list[dict[str, str]], examples: int = 2) -> str:
    """The text the command prints: example queries with their top hits, then recall per language."""
    lines = [f"internvl-fm demo: {result.num_images} fresh images (seed {result.seed}), "
             f"{len(result.queries)} queries, index: {result.index_kind}", ""]
    shown: dict[str, int] = {}
    for q in result.queries:
        if shown.get(q.lang, 0) >= examples:
            continue
        shown[q.lang] = shown.get(q.lang, 0) + 1
        lines.append(f"[{q.lang}] {q.text}")
        for rank, (i, score, ok) in enumerate(zip(q.hits, q.scores, q.relevant), 1):
            lines.append(f"   {rank}. image {i:4d}  score {score:+.3f}  {'HIT ' if ok else 'miss'}  "
                         f"{_describe(attributes[i])}")
    lines += ["", f"{'language':<10} {'recall@1':>9} {'recall@5':>9}"]
    for lang, r in result.recall.items():
        name = LANGUAGE_NAMES.get(lang, "mean" if lang == "all" else lang)
        lines.append(f"{name:<10} {r['r@1']:>9.3f} {r['r@5']:>9.3f}")
    lines.append(f"\ndone in {result.seconds:.1f} s")
    return "\n".join(lines)


def _data_uri(image: Any, scale: int = 2) -> str:
    from PIL import Image

    buf = io.BytesIO()
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def write_html(result: DemoResult, images: list[Any], attributes: list[dict[str, str]], path: str | Path,
               per_language: int = 6) -> Path:
    """Write a self-contained HTML gallery (images inlined) of the first queries per language and the recall table."""
    from internvl_fm.loading import atomic_write

    uris: dict[int, str] = {}
    rows = []
    shown: dict[str, int] = {}
    for q in result.queries:
        if shown.get(q.lang, 0) >= per_language:
            continue
        shown[q.lang] = shown.get(q.lang, 0) + 1
        cells = []
        for i, score, ok in zip(q.hits, q.scores, q.relevant):
            uri = uris.setdefault(i, _data_uri(images[i]))
            cells.append(f'<figure class="{"hit" if ok else "miss"}"><img src="{uri}" alt="image {i}">'
                         f'<figcaption>{score:+.3f}<br>{html.escape(_describe(attributes[i]))}</figcaption></figure>')
        rows.append(f'<tr><td class="q"><b>{q.lang}</b> {html.escape(q.text)}</td><td class="hits">{"".join(cells)}</td></tr>')
    recall_rows = "".join(
        f"<tr><td>{html.escape(LANGUAGE_NAMES.get(lang, 'mean' if lang == 'all' else lang))}</td>"
        f"<td>{r['r@1']:.3f}</td><td>{r['r@5']:.3f}</td></tr>" for lang, r in result.recall.items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>internvl-fm demo</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 4px 8px; vertical-align: middle; }}
td.q {{ max-width: 22em; }}
td.hits {{ white-space: nowrap; }}
figure {{ display: inline-block; width: 112px; margin: 2px; text-align: center; font-size: 10px; border: 3px solid;
          white-space: normal; vertical-align: top; }}
figure.hit {{ border-color: #2a2; }} figure.miss {{ border-color: #c22; }}
img {{ width: 112px; height: 112px; image-rendering: pixelated; display: block; }}
</style></head><body>
<h1>internvl-fm demo</h1>
<p>{result.num_images} freshly generated images (seed {result.seed}), {len(result.queries)} queries in
{len(result.recall) - 1} languages, {result.seconds:.1f} s. Green: all attributes match the query.</p>
<table><tr><th>language</th><th>recall@1</th><th>recall@5</th></tr>{recall_rows}</table>
<h2>Top hits</h2>
<table>{"".join(rows)}</table>
</body></html>
"""
    path = Path(path)
    with atomic_write(path) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
        os.chmod(tmp, 0o644)  # a page meant to be opened / served, not a private temp file
    return path


def main(argv: list[str] | None = None) -> int:
    """Offline demo: build an image index with the bundled tiny InternVL-C and query it in five languages."""
    from .cli import _number

    parser = new_parser("internvl-fm demo", __doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEMO_MODEL), help="InternVL-C checkpoint folder (default: bundled)")
    add_model_options(parser)
    parser.add_argument("--num-images", type=_number("--num-images", low=1), default=300, help="gallery size")
    parser.add_argument("--queries", type=_number("--queries", low=1), default=40, help="queries per language")
    parser.add_argument("--seed", type=int, default=None, help="gallery seed (default: a fresh random one)")
    parser.add_argument("--top-k", type=_number("--top-k", low=1), default=5, help="hits shown per query")
    parser.add_argument("--examples", type=int, default=2, help="queries per language printed with their hits")
    parser.add_argument("--output", default="internvl_fm_demo", help="folder for index.html")
    parser.add_argument("--no-html", action="store_true", help="do not write the HTML gallery")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result, images, attributes = run_demo(args.model, args.num_images, args.queries, args.seed, args.top_k,
                                          dtype=dtype_or_none(args.dtype), device=args.device)
    if not args.no_html:
        result.html_path = write_html(result, images, attributes, Path(args.output) / "index.html")
    print(format_report(result, attributes, args.examples))
    if result.html_path is not None:
        print(f"gallery: {result.html_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
