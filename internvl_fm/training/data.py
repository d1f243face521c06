"""Synthetic multilingual image-text data: coloured shapes on varied backgrounds, captions in five languages.

Every generated image keeps its attributes (shape, color, size, position) as metadata, so retrieval can be scored
exactly: a retrieved image is a hit for a query when all the query's attributes match.  The on-disk layout is the
one `internvl-fm train-clip` reads::

    DATA/metadata.jsonl      one JSON object per image: {"image": "images/000000.png", "text": ..., "captions":
                             {"en": ..., "zh": ..., ...}, "attributes": {...}, "lang": ..., "background": ...}
    DATA/images/000000.png

Run ``python -m internvl_fm.training.data OUT --num-images 20000`` to write a set.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from PIL import Image, ImageDraw

from internvl_fm.errors import InternVLError
from internvl_fm.loading import atomic_directory

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 175, 60),
    "blue": (40, 85, 230),
    "yellow": (240, 215, 35),
    "purple": (145, 50, 200),
    "orange": (250, 135, 20),
}
SIZES: dict[str, tuple[float, float]] = {"small": (0.12, 0.15), "large": (0.22, 0.26)}  # radius / image side
POSITIONS: dict[str, tuple[float, float]] = {  # object centre (x, y) as a fraction of the image side
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
BACKGROUNDS: tuple[str, ...] = ("solid", "gradient", "noise", "stripes", "checker")
LANGUAGES: tuple[str, ...] = ("en", "zh", "ja", "es", "fr")
ATTRIBUTES: tuple[str, ...] = ("shape", "color", "size", "position")


class DatasetFormatError(InternVLError, ValueError):
    """A dataset folder or one of its records does not have the expected layout (names the file and line)."""


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary and caption templates
# ----------------------------------------------------------------------------------------------------------------

# Grammatical gender of each shape noun in Spanish / French (adjectives agree with it).
_GENDER = {
    "es": {"circle": "m", "square": "m", "triangle": "m", "star": "f"},
    "fr": {"circle": "m", "square": "m", "triangle": "m", "star": "f"},
}
_WORDS: dict[str, dict[str, dict[str, str | tuple[str, str]]]] = {
    "en": {
        "shape": {"circle": "circle", "square": "square", "triangle": "triangle", "star": "star"},
        "color": {c: c for c in COLORS},
        "size": {"small": "small", "large": "large"},
        "position": {"left": "on the left", "right": "on the right", "top": "at the top",
                     "bottom": "at the bottom", "center": "in the center"},
    },
    "zh": {
        "shape": {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形"},
        "color": {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色"},
        "size": {"small": "小", "large": "大"},
        "position": {"left": "左边", "right": "右边", "top": "上方", "bottom": "下方", "center": "中间"},
    },
    "ja": {
        "shape": {"circle": "円", "square": "四角形", "triangle": "三角形", "star": "星"},
        "color": {"red": "赤い", "green": "緑の", "blue": "青い", "yellow": "黄色い", "purple": "紫の",
                  "orange": "オレンジ色の"},
        "size": {"small": "小さい", "large": "大きい"},
        "position": {"left": "左側", "right": "右側", "top": "上部", "bottom": "下部", "center": "中央"},
    },
    "es": {  # (masculine, feminine)
        "shape": {"circle": "círculo", "square": "cuadrado", "triangle": "triángulo", "star": "estrella"},
        "color": {"red": ("rojo", "roja"), "green": ("verde", "verde"), "blue": ("azul", "azul"),
                  "yellow": ("amarillo", "amarilla"), "purple": ("morado", "morada"),
                  "orange": ("naranja", "naranja")},
        "size": {"small": ("pequeño", "pequeña"), "large": ("grande", "grande")},
        "position": {"left": "a la izquierda", "right": "a la derecha", "top": "arriba", "bottom": "abajo",
                     "center": "en el centro"},
    },
    "fr": {
        "shape": {"circle": "cercle", "square": "carré", "triangle": "triangle", "star": "étoile"},
        "color": {"red": ("rouge", "rouge"), "green": ("vert", "verte"), "blue": ("bleu", "bleue"),
                  "yellow": ("jaune", "jaune"), "purple": ("violet", "violette"), "orange": ("orange", "orange")},
        "size": {"small": ("petit", "petite"), "large": ("grand", "grande")},
        "position": {"left": "à gauche", "right": "à droite", "top": "en haut", "bottom": "en bas",
                     "center": "au centre"},
    },
}
_ARTICLES = {"es": {"m": "un", "f": "una"}, "fr": {"m": "un", "f": "une"}}

# Templates use {shape} {color} {size} {position} and, for es/fr, {art} (indefinite article agreeing with the shape).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "en": (
        "a {size} {color} {shape} {position}",
        "a photo of a {size} {color} {shape} {position}",
        "{position}, a {size} {color} {shape}",
        "a picture showing a {size} {color} {shape} {position}",
        "there is a {size} {color} {shape} {position}",
    ),
    "zh": (
        "{position}有一个{size}{color}{shape}",
        "一个{size}的{color}{shape}，位于{position}",
        "图片{position}是一个{size}{color}{shape}",
        "一张照片：{position}的{size}{color}{shape}",
    ),
    "ja": (
        "{position}に{size}{color}{shape}",
        "{position}にある{size}{color}{shape}の写真",
        "{size}{color}{shape}が{position}にあります",
        "画像の{position}に{size}{color}{shape}がある",
    ),
    "es": (
        "{art} {shape} {color} {size} {position}",
        "una foto de {art} {shape} {color} {size} {position}",
        "{position} hay {art} {shape} {color} {size}",
        "una imagen con {art} {shape} {size} y {color} {position}",
    ),
    "fr": (
        "{art} {size} {shape} {color} {position}",
        "une photo d'{art} {size} {shape} {color} {position}",
        "{position}, {art} {size} {shape} {color}",
        "une image avec {art} {size} {shape} {color} {position}",
    ),
}


def _word(lang: str, attribute: str, value: str, gender: str) -> str:
    word = _WORDS[lang][attribute][value]
    if isinstance(word, tuple):
        return word[0] if gender == "m" else word[1]
    return word


def caption(attributes: dict[str, str], lang: str = "en", template: int | None = None,
            rng: random.Random | None = None) -> str:
    """Render a caption for `attributes` (shape, color, size, position) in `lang` with one of its templates.

    `template` picks a template by index; when None one is drawn from `rng` (or the first template if no rng).
    """
    if lang not in TEMPLATES:
        raise ValueError(f"unknown language {lang!r}; choose one of {', '.join(LANGUAGES)}")
    missing = [a for a in ATTRIBUTES if a not in attributes]
    if missing:
        raise ValueError(f"caption needs attributes {missing} (got {sorted(attributes)})")
    templates = TEMPLATES[lang]
    if template is None:
        template = rng.randrange(len(templates)) if rng is not None else 0
    if not 0 <= template < len(templates):
        raise ValueError(f"template index {template} out of range for {lang!r} ({len(templates)} templates)")
    gender = _GENDER.get(lang, {}).get(attributes["shape"], "m")
    values = {a: _word(lang, a, attributes[a], gender) for a in ATTRIBUTES}
    if lang in _ARTICLES:
        values["art"] = _ARTICLES[lang][gender]
    return templates[template].format(**values)


def all_captions(attributes: dict[str, str]) -> list[str]:
    """Every caption of every template in every language for `attributes` (used to train the tokenizer)."""
    return [caption(attributes, lang, t) for lang in LANGUAGES for t in range(len(TEMPLATES[lang]))]


def tokenizer_corpus() -> list[str]:
    """Text to train a tokenizer for these captions: every caption of the space-separated languages, and for
    Chinese / Japanese each template fragment and attribute word on its own line.

    Training on whole CJK captions would let BPE merge across attribute boundaries (one piece for "小红色圆形"),
    which a small model then has to learn combination by combination; word-sized pieces keep captions compositional.
    """
    import re

    lines: list[str] = []
    for lang in LANGUAGES:
        if lang in ("zh", "ja"):
            for template in TEMPLATES[lang]:
                lines += [part for part in re.split(r"\{\w+\}", template) if part]
            for attribute in ATTRIBUTES:
                lines += [w for w in _WORDS[lang][attribute].values() if isinstance(w, str)]
        else:
            lines += [caption(a, lang, t) for a in attribute_space() for t in range(len(TEMPLATES[lang]))]
    return lines


def attribute_space() -> list[dict[str, str]]:
    """All attribute combinations the generator can produce."""
    return [{"shape": s, "color": c, "size": z, "position": p}
            for s in SHAPES for c in COLORS for z in SIZES for p in POSITIONS]


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


def _jitter(rgb: Sequence[int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in rgb)  # type: ignore[return-value]


def _muted(rng: random.Random) -> tuple[int, int, int]:
    """A low-saturation background colour (grey with a slight tint) that never looks like an object colour."""
    grey = rng.randint(25, 205)
    return _jitter((grey, grey, grey), rng, 18)


def _draw_background(kind: str, size: int, rng: random.Random) -> Image.Image:
    a, b = _muted(rng), _muted(rng)
    if kind == "solid":
        return Image.new("RGB", (size, size), a)
    if kind == "gradient":
        img = Image.new("RGB", (size, size))
        vertical = rng.random() < 0.5
        px = img.load()
        for i in range(size):
            t = i / max(1, size - 1)
            colour = tuple(int(round(a[k] * (1 - t) + b[k] * t)) for k in range(3))
            for j in range(size):
                px[(j, i) if vertical else (i, j)] = colour
        return img
    if kind == "noise":
        cell = rng.choice((2, 4))
        small = Image.new("RGB", (size // cell, size // cell))
        small.putdata([_jitter(a, rng, 22) for _ in range(small.width * small.height)])
        return small.resize((size, size), Image.NEAREST)
    if kind in ("stripes", "checker"):
        img = Image.new("RGB", (size, size), a)
        draw = ImageDraw.Draw(img)
        period = rng.choice((6, 8, 12))
        horizontal = rng.random() < 0.5
        for i in range(0, size, period):
            for j in range(0, size, period) if kind == "checker" else (0,):
                if kind == "checker" and ((i + j) // period) % 2:
                    continue
                if kind == "checker":
                    draw.rectangle([i, j, i + period // 2 * 2 - 1, j + period - 1], fill=b)
                elif horizontal:
                    draw.rectangle([0, i, size, i + period // 2 - 1], fill=b)
                else:
                    draw.rectangle([i, 0, i + period // 2 - 1, size], fill=b)
        return img
    raise ValueError(f"unknown background {kind!r}; choose one of {', '.join(BACKGROUNDS)}")


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.cos(angle + math.pi / 4 + k * math.pi / 2) * r, math.sin(angle + math.pi / 4 + k * math.pi / 2) * r)
               for k in range(4)]
    elif shape == "triangle":
        pts = [(math.cos(angle - math.pi / 2 + k * 2 * math.pi / 3) * r * 1.1,
                math.sin(angle - math.pi / 2 + k * 2 * math.pi / 3) * r * 1.1 + r * 0.15) for k in range(3)]
    elif shape == "star":
        pts = []
        for k in range(10):
            radius = r * 1.1 if k % 2 == 0 else r * 0.45
            theta = angle - math.pi / 2 + k * math.pi / 5
            pts.append((math.cos(theta) * radius, math.sin(theta) * radius))
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return [(cx + x, cy + y) for x, y in pts]


def render(attributes: dict[str, str], image_size: int = 64, background: str = "solid",
           rng: random.Random | None = None, supersample: int = 4) -> Image.Image:
    """Draw one shape with `attributes` on a `background` of the given kind; jitter comes from `rng`."""
    rng = rng or random.Random(0)
    for name, table in (("shape", SHAPES), ("color", COLORS), ("size", SIZES), ("position", POSITIONS)):
        if attributes.get(name) not in table:
            raise ValueError(f"unknown {name} {attributes.get(name)!r}; choose one of {', '.join(table)}")
    big = image_size * supersample
    img = _draw_background(background, image_size, rng).resize((big, big), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    fx, fy = POSITIONS[attributes["position"]]
    fx += rng.uniform(-0.05, 0.05)
    fy += rng.uniform(-0.05, 0.05)
    lo, hi = SIZES[attributes["size"]]
    r = rng.uniform(lo, hi) * big
    cx, cy = fx * big, fy * big
    fill = _jitter(COLORS[attributes["color"]], rng, 15)
    if attributes["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        angle = math.radians(rng.uniform(-12, 12))
        draw.polygon(_shape_polygon(attributes["shape"], cx, cy, r, angle), fill=fill)
    return img.resize((image_size, image_size), Image.LANCZOS)


# ----------------------------------------------------------------------------------------------------------------
# Samples and dataset folders
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SyntheticSample:
    """One generated image with its attributes and captions (one per language)."""

    index: int
    image: Image.Image
    attributes: dict[str, str]
    background: str
    captions: dict[str, str]
    lang: str = "en"

    @property
    def text(self) -> str:
        """The primary caption (in `lang`)."""
        return self.captions[self.lang]


@dataclass
class SyntheticConfig:
    """What to generate: image size, seed and which attribute values / languages to draw from."""

    image_size: int = 64
    seed: int = 0
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(COLORS)
    sizes: tuple[str, ...] = tuple(SIZES)
    positions: tuple[str, ...] = tuple(POSITIONS)
    backgrounds: tuple[str, ...] = BACKGROUNDS
    languages: tuple[str, ...] = LANGUAGES


def generate_samples(num_images: int, config: SyntheticConfig | None = None) -> Iterator[SyntheticSample]:
    """Yield `num_images` samples; the stream is a pure function of `config` (same seed -> same images)."""
    config = config or SyntheticConfig()
    for index in range(num_images):
        rng = random.Random(f"{config.seed}:{index}")
        attributes = {
            "shape": rng.choice(config.shapes),
            "color": rng.choice(config.colors),
            "size": rng.choice(config.sizes),
            "position": rng.choice(config.positions),
        }
        background = rng.choice(config.backgrounds)
        image = render(attributes, config.image_size, background, rng)
        captions = {lang: caption(attributes, lang, rng=rng) for lang in config.languages}
        yield SyntheticSample(index, image, attributes, background, captions, lang=rng.choice(config.languages))


def write_dataset(out_dir: str | os.PathLike, num_images: int, config: SyntheticConfig | None = None,
                  progress: bool = True) -> Path:
    """Generate `num_images` samples into `out_dir` (images/*.png + metadata.jsonl), atomically.

    The folder is built next to its destination and renamed into place at the end, so an interrupted run never leaves
    a half-written dataset behind.  An existing `out_dir` is replaced.
    """
    from tqdm.auto import tqdm

    config = config or SyntheticConfig()
    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "metadata.jsonl", "w", encoding="utf-8") as meta:
            samples = generate_samples(num_images, config)
            for sample in tqdm(samples, total=num_images, desc="generate", disable=not progress):
                rel = f"images/{sample.index:06d}.png"
                sample.image.save(tmp / rel)
                meta.write(json.dumps({
                    "image": rel, "text": sample.text, "lang": sample.lang, "captions": sample.captions,
                    "attributes": sample.attributes, "background": sample.background,
                }, ensure_ascii=False) + "\n")
        with open(tmp / "dataset.json", "w", encoding="utf-8") as f:
            json.dump({"generator": "internvl_fm.training.data", "num_images": num_images,
                       "image_size": config.image_size, "seed": config.seed, "languages": list(config.languages)},
                      f, indent=2)
    return out


def read_metadata(data_dir: str | os.PathLike) -> list[dict]:
    """Read `data_dir/metadata.jsonl` (or a .jsonl file path); each record needs "image" and "text" or "captions"."""
    path = Path(data_dir)
    meta = path / "metadata.jsonl" if path.is_dir() else path
    if not meta.is_file():
        raise DatasetFormatError(f"no metadata.jsonl in {path} (expected one JSON object per line with "
                                 f'"image" and "text")')
    records = []
    with open(meta, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetFormatError(f"{meta}:{lineno}: invalid JSON ({e.msg})") from None
            if "image" not in rec or not ("text" in rec or "captions" in rec):
                raise DatasetFormatError(f'{meta}:{lineno}: record needs "image" and "text" (or "captions")')
            records.append(rec)
    if not records:
        raise DatasetFormatError(f"{meta} holds no records")
    return records


def iter_texts(records: Iterable[dict]) -> Iterator[str]:
    """All caption strings of `records` ("text" and every entry of "captions")."""
    for rec in records:
        caps = rec.get("captions")
        if isinstance(caps, dict):
            yield from caps.values()
        elif isinstance(caps, list):
            yield from caps
        elif "text" in rec:
            yield rec["text"]


def main(argv: list[str] | None = None) -> int:
    """Write a synthetic multilingual shapes dataset (images/ + metadata.jsonl)."""
    parser = argparse.ArgumentParser(prog="python -m internvl_fm.training.data", description=main.__doc__)
    parser.add_argument("out", help="output folder (replaced if it exists)")
    parser.add_argument("--num-images", type=int, default=20000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_dataset(args.out, args.num_images, SyntheticConfig(image_size=args.image_size, seed=args.seed))
    print(f"wrote {args.num_images} images to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
