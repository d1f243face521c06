"""Image-text search: embed a collection with InternVL-C/G, index it with FAISS, search it and serve it.

    from internvl_fm.retrieval import ImageIndex
    index = ImageIndex.build("photos/", "photos_index", model="OpenGVLab/InternVL-14B-224px")
    index.search_text("a dog on a beach", k=5)
"""
from .embed import EmbedConfig, EmbedReport, ModelSpec, run_embedding
from .errors import IndexNotFoundError, IndexStateError, RetrievalError, SourceError, StoreError
from .index import IndexChoice, build_index, choose_index, exact_search, parse_memory, recall_at_k
from .search import Hit, ImageIndex, IndexOptions
from .sources import Record, Source, open_source
from .store import EmbeddingStore, Failure, ShardInfo

__all__ = [
    "EmbedConfig", "EmbedReport", "EmbeddingStore", "Failure", "Hit", "ImageIndex", "IndexChoice",
    "IndexNotFoundError", "IndexOptions", "IndexStateError", "ModelSpec", "Record", "RetrievalError", "ShardInfo",
    "Source", "SourceError", "StoreError", "build_index", "choose_index", "exact_search", "open_source",
    "parse_memory", "recall_at_k", "run_embedding",
]
