"""Image-text search: embed a collection with InternVL-C/G, index it with FAISS, search it and serve it.

    from internvl_fm.retrieval import ImageIndex
    index = ImageIndex.build("photos/", "photos_index", model="OpenGVLab/InternVL-14B-224px")
    index.search_text("a dog on a beach", k=5)

An image's way into an index: `sources` (records) -> `embed` (decode with the model's processor, embed, write
shards of the store) -> `index` (FAISS choice, training, tuning; `ImageIndex.build` / `add` / `delete`).
`search` answers queries (`SearchIndex`, which `ImageIndex` extends); `server` serves them over HTTP.
"""
from internvl_fm.evaluation import neighbor_recall_at_k as recall_at_k  # the name this package used to define

from .embed import EmbedConfig, EmbeddingStore, EmbedReport, Failure, ModelSpec, ShardInfo, run_embedding
from .errors import IndexNotFoundError, IndexStateError, OptionError, RetrievalError, SourceError, StoreError
from .index import IndexChoice, ImageIndex, IndexOptions, build_index, choose_index, parse_memory
from .search import Hit, SearchIndex, exact_search
from .sources import Record, Source, open_source

__all__ = [
    "EmbedConfig", "EmbedReport", "EmbeddingStore", "Failure", "Hit", "ImageIndex", "IndexChoice",
    "IndexNotFoundError", "IndexOptions", "IndexStateError", "ModelSpec", "OptionError", "Record", "RetrievalError",
    "SearchIndex", "ShardInfo", "Source", "SourceError", "StoreError", "build_index", "choose_index", "exact_search",
    "open_source", "parse_memory", "recall_at_k", "run_embedding",
]
