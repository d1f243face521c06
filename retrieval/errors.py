"""Typed errors of the retrieval package; each names the thing that is wrong."""
from __future__ import annotations

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
