"""Synthetic multilingual shapes dataset: determinism, metadata faithful to the pixels, captions, folder layout."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from internvl_fm.training import data as D


def test_generation_is_deterministic_and_seed_dependent():
    a = list(D.generate_samples(6, D.SyntheticConfig(image_size=32, seed=3)))
    b = list(D.generate_samples(6, D.SyntheticConfig(image_size=32, seed=3)))
    c = list(D.generate_samples(6, D.SyntheticConfig(image_size=32, seed=4)))
    assert [s.attributes for s in a] == [s.attributes for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert [s.captions for s in a] == [s.captions for s in b]
    assert any(not np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, c))


@pytest.mark.parametrize("position", list(D.POSITIONS))
@pytest.mark.parametrize("color", ["red", "blue", "yellow"])
def test_rendered_object_has_the_attribute_colour_at_its_position(position, color):
    attrs = {"shape": "circle", "color": color, "size": "large", "position": position}
    img = np.asarray(D.render(attrs, image_size=64, background="solid", rng=random.Random(0))).astype(int)
    fx, fy = D.POSITIONS[position]
    centre = img[int(fy * 64), int(fx * 64)]
    assert np.abs(centre - np.array(D.COLORS[color])).max() <= 20
    # the opposite corner region is background, not the object colour
    far = img[int((1 - fy) * 63) if position != "center" else 2, int((1 - fx) * 63) if position != "center" else 2]
    assert np.abs(far - np.array(D.COLORS[color])).max() > 40


def test_sizes_differ_in_area():
    def area(size: str) -> int:
        attrs = {"shape": "square", "color": "green", "size": size, "position": "center"}
        img = np.asarray(D.render(attrs, 64, "solid", random.Random(1))).astype(int)
        return int((np.abs(img - np.array(D.COLORS["green"])).max(-1) < 40).sum())

    assert area("large") > 2.5 * area("small") > 0


def test_captions_in_five_languages_name_every_attribute():
    attrs = {"shape": "star", "color": "yellow", "size": "small", "position": "left"}
    expected = {"en": ["star", "yellow", "small", "left"], "zh": ["星形", "黄色", "小", "左边"],
                "ja": ["星", "黄色い", "小さい", "左側"], "es": ["estrella", "amarilla", "pequeña", "izquierda"],
                "fr": ["étoile", "jaune", "petite", "gauche"]}
    for lang, words in expected.items():
        for t in range(len(D.TEMPLATES[lang])):
            text = D.caption(attrs, lang, t)
            assert all(w in text for w in words), (lang, text)
    assert D.caption({"shape": "circle", "color": "green", "size": "large", "position": "top"}, "fr", 0) == \
        "un grand cercle vert en haut"
    with pytest.raises(ValueError, match="unknown language"):
        D.caption(attrs, "de")
    with pytest.raises(ValueError, match="needs attributes"):
        D.caption({"shape": "star"}, "en")


def test_attribute_space_and_tokenizer_corpus():
    space = D.attribute_space()
    assert len(space) == len(D.SHAPES) * len(D.COLORS) * len(D.SIZES) * len(D.POSITIONS)
    corpus = D.tokenizer_corpus()
    assert "红色" in corpus and "赤い" in corpus  # CJK attribute words are separate lines
    assert not any("红色圆形" in line for line in corpus)


def test_write_and_read_dataset_folder(tmp_path):
    out = D.write_dataset(tmp_path / "ds", 12, D.SyntheticConfig(image_size=32, seed=5), progress=False)
    records = D.read_metadata(out)
    assert len(records) == 12
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    rec = records[0]
    assert (out / rec["image"]).is_file()
    assert set(rec["captions"]) == set(D.LANGUAGES) and rec["text"] == rec["captions"][rec["lang"]]
    assert set(rec["attributes"]) == set(D.ATTRIBUTES)
    assert len(list(D.iter_texts(records))) == 12 * 5
    assert json.loads((out / "dataset.json").read_text())["num_images"] == 12


def test_read_metadata_names_the_bad_line(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"image": "a.png", "text": "x"}\n{"image": "b.png"}\n')
    with pytest.raises(D.DatasetFormatError, match=r"metadata.jsonl:2"):
        D.read_metadata(tmp_path)
    with pytest.raises(D.DatasetFormatError, match="no metadata.jsonl"):
        D.read_metadata(tmp_path / "missing")


def test_dataset_format_error_is_a_typed_internvl_error(tmp_path):
    from internvl_fm.errors import InternVLError

    with pytest.raises(InternVLError) as info:  # the CLI prints any InternVLError as one line
        D.read_metadata(tmp_path / "missing")
    assert isinstance(info.value, D.DatasetFormatError) and isinstance(info.value, ValueError)
