"""Bundled ImageNet-1K classnames / templates (five languages) and label / template validation."""
from __future__ import annotations

import pytest

from internvl_fm.classification import LANGUAGES, imagenet_classnames, zeroshot_templates
from internvl_fm.classification.errors import LabelError, TemplateError, UnknownLanguageError
from internvl_fm.classification.prompts import normalize_language, validate_labels, validate_templates

EXPECTED_TEMPLATE_COUNTS = {"en": 80, "zh": 80, "ja": 37, "ar": 55, "it": 49}


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_language_has_1000_classnames_and_templates(language):
    names = imagenet_classnames(language)
    templates = zeroshot_templates(language)
    assert len(names) == 1000
    assert all(isinstance(n, str) and n.strip() for n in names)
    assert len(templates) == EXPECTED_TEMPLATE_COUNTS[language]
    assert all("{c}" in t for t in templates)
    assert templates[0].format(c=names[1]) != templates[0]


def test_languages_differ_and_keep_the_official_order():
    en, zh, ja, ar, it = (imagenet_classnames(lang) for lang in LANGUAGES)
    assert en[:3] == ["tench", "goldfish", "great white shark"]
    assert zh[1] == "金鱼" and ja[1] == "金魚"
    assert ar[0] != en[0] and it[0] != en[0]
    assert zeroshot_templates("en")[0] == "a bad photo of a {c}."
    assert zeroshot_templates("zh")[0] == "{c}的照片。"


def test_english_data_equals_open_clip():
    meta = pytest.importorskip("open_clip.zero_shot_metadata")
    assert imagenet_classnames("en") == list(meta.IMAGENET_CLASSNAMES)
    assert zeroshot_templates("en") == [t("{c}") for t in meta.OPENAI_IMAGENET_TEMPLATES]


def test_clip_benchmark_language_aliases():
    assert normalize_language("cn") == "zh"
    assert normalize_language("JP") == "ja"
    assert imagenet_classnames("cn") == imagenet_classnames("zh")


@pytest.mark.parametrize("bad", ["xx", "english", "", "fr"])
def test_unknown_language_is_a_clear_error(bad):
    with pytest.raises(UnknownLanguageError, match="unknown language"):
        imagenet_classnames(bad)
    with pytest.raises(UnknownLanguageError):
        zeroshot_templates(bad)


def test_returned_lists_are_copies():
    names = imagenet_classnames("en")
    names[0] = "changed"
    assert imagenet_classnames("en")[0] == "tench"


def test_label_validation():
    assert validate_labels(["cat", "dog"]) == ["cat", "dog"]
    with pytest.raises(LabelError, match="empty"):
        validate_labels([])
    with pytest.raises(LabelError, match="duplicate labels: 'cat'"):
        validate_labels(["cat", "dog", "cat"])
    with pytest.raises(LabelError, match="blank"):
        validate_labels(["cat", "  "])
    with pytest.raises(LabelError, match="one string"):
        validate_labels("cat,dog")
    # the official ImageNet list has duplicates (e.g. two 'crane' classes): allowed when asked for
    names = imagenet_classnames("en")
    assert len(set(names)) < 1000
    assert validate_labels(names, allow_duplicates=True) == names
    assert isinstance(LabelError("x"), ValueError)


def test_template_validation():
    assert validate_templates("a photo of a {c}.") == ["a photo of a {c}."]
    with pytest.raises(TemplateError, match="empty"):
        validate_templates([])
    with pytest.raises(TemplateError, match="placeholder"):
        validate_templates(["a photo of a cat"])
    with pytest.raises(TemplateError, match="cannot be formatted"):
        validate_templates(["{c} and {0}"])
