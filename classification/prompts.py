"""Bundled ImageNet-1K classnames and zero-shot prompt templates in five languages.

English comes from open_clip (`IMAGENET_CLASSNAMES`, `OPENAI_IMAGENET_TEMPLATES`, the OpenAI CLIP set); Chinese,
Japanese, Arabic and Italian from the CLIP_benchmark package data used for the InternVL paper's multilingual
ImageNet numbers. The lists are stored as JSON under `data/` and keep the official order (class index = position).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from importlib import resources

from .errors import LabelError, TemplateError, UnknownLanguageError

LANGUAGES: tuple[str, ...] = ("en", "zh", "ja", "ar", "it")
# CLIP_benchmark spells Chinese / Japanese as `cn` / `jp`; accept both spellings.
LANGUAGE_ALIASES: dict[str, str] = {"cn": "zh", "jp": "ja", "zh-cn": "zh", "zh_cn": "zh"}


def normalize_language(language: str) -> str:
    """Return the canonical code (`en`, `zh`, `ja`, `ar`, `it`) of `language`, raising `UnknownLanguageError`."""
    if not isinstance(language, str):
        raise UnknownLanguageError(f"language must be a string, got {type(language).__name__}")
    code = language.strip().lower()
    code = LANGUAGE_ALIASES.get(code, code)
    if code not in LANGUAGES:
        raise UnknownLanguageError(
            f"unknown language {language!r}: bundled languages are {', '.join(LANGUAGES)} "
            f"(aliases: {', '.join(sorted(LANGUAGE_ALIASES))})"
        )
    return code


@cache
def _read_list(filename: str) -> tuple[str, ...]:
    text = resources.files(__package__).joinpath("data", filename).read_text(encoding="utf-8")
    return tuple(json.loads(text))


def imagenet_classnames(language: str = "en") -> list[str]:
    """The 1000 ImageNet-1K classnames in `language`, in class-index order (duplicates kept, as upstream)."""
    return list(_read_list(f"{normalize_language(language)}_classnames.json"))


def zeroshot_templates(language: str = "en") -> list[str]:
    """The zero-shot prompt templates of `language` (`{c}` marks the classname; 80 for en / zh)."""
    return list(_read_list(f"{normalize_language(language)}_templates.json"))


def validate_labels(labels: Sequence[str], *, allow_duplicates: bool = False) -> list[str]:
    """Check a label list: non-empty, only non-blank strings, and (unless allowed) no duplicates."""
    if isinstance(labels, str):
        raise LabelError("labels must be a list of strings, not one string (split 'cat,dog' first)")
    labels = list(labels)
    if not labels:
        raise LabelError("the label list is empty: give at least one label")
    for i, label in enumerate(labels):
        if not isinstance(label, str):
            raise LabelError(f"label #{i} is {type(label).__name__}, expected str")
        if not label.strip():
            raise LabelError(f"label #{i} is blank")
    if not allow_duplicates:
        seen: dict[str, int] = {}
        dups = []
        for i, label in enumerate(labels):
            if label in seen:
                dups.append(f"{label!r} (positions {seen[label]} and {i})")
            seen.setdefault(label, i)
        if dups:
            raise LabelError(f"duplicate labels: {', '.join(dups)}")
    return labels


def validate_templates(templates: Sequence[str]) -> list[str]:
    """Check a template list: non-empty strings, each containing the `{c}` placeholder and formattable."""
    if isinstance(templates, str):
        templates = [templates]
    templates = list(templates)
    if not templates:
        raise TemplateError("the template list is empty: give at least one template such as 'a photo of a {c}.'")
    for tpl in templates:
        if not isinstance(tpl, str) or "{c}" not in tpl:
            raise TemplateError(f"template {tpl!r} has no '{{c}}' placeholder for the classname")
        try:
            tpl.format(c="x")
        except (IndexError, KeyError, ValueError) as err:
            raise TemplateError(f"template {tpl!r} cannot be formatted with c=...: {err}") from err
    return templates
