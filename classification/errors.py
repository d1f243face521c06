"""Typed errors of the classification package. Each one names the offending input."""
from __future__ import annotations

from internvl_fm.errors import InternVLError


class ClassificationError(InternVLError, ValueError):
    """Base class of the errors raised on purpose by `internvl_fm.classification` (all are bad-input errors)."""


class LabelError(ClassificationError):
    """A label list that cannot define a classifier: empty, blank entries or duplicates."""


class UnknownLanguageError(ClassificationError):
    """A language code with no bundled classnames / templates."""


class TemplateError(ClassificationError):
    """A prompt template list that is empty or whose templates lack the `{c}` placeholder."""


class FeatureDimError(ClassificationError):
    """Features whose width (or count) does not match what a head, cache or classifier expects."""


class MissingDependencyError(InternVLError, ImportError):
    """An optional dependency a requested feature needs is not installed (names the feature and the extra)."""
