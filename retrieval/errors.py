"""Typed errors of the retrieval package; each names the thing that is wrong."""
from __future__ import annotations

from numbers import Integral, Real

from internvl_fm.errors import InternVLError


class RetrievalError(InternVLError):
    """Base class of the errors raised by `internvl_fm.retrieval`."""


class SourceError(RetrievalError, ValueError):
    """A data source (folder, list file, shards, table) that cannot be read or is not understood."""


class StoreError(RetrievalError, ValueError):
    """An embedding output folder whose shards are inconsistent (or a shard written wrongly)."""


class IndexNotFoundError(RetrievalError, FileNotFoundError):
    """A folder that holds no search index (no `index.json`)."""


class IndexStateError(RetrievalError, ValueError):
    """An index operation that does not fit the index: wrong vector dimension, no captions, no model, ..."""


class OptionError(IndexStateError):
    """An option value that is out of range or not understood, refused when its dataclass is made (names the option,
    the value and what is expected)."""

    def __init__(self, option: str, value: object, reason: str):
        self.option, self.value, self.reason = option, value, reason
        super().__init__(f"{option} {value!r}: {reason}")


def check_int(option: str, value: object, low: int) -> None:
    """Raise OptionError unless `value` is an integer >= `low`."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise OptionError(option, value, f"expected an integer >= {low}")


def check_number(option: str, value: object, low: float, high: float = float("inf")) -> None:
    """Raise OptionError unless `value` is a number in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, Real) or not low <= value <= high:
        bounds = f">= {low}" if high == float("inf") else f"in [{low}, {high}]"
        raise OptionError(option, value, f"expected a number {bounds}")
