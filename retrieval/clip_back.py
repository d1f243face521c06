"""clip-retrieval back-end endpoints: clip-retrieval's `ClipClient` and its web front-end query this service unchanged
(the API of clip-retrieval 2.45 `clip_back.py`).

Endpoints::

    POST /knn-service    {"text" | "image" (base64) | "image_url" | "embedding_input", "modality": "image"|"text",
                         "num_images", "num_result_ids", "deduplicate", "indice_name"} -> a list, best first:
                         [{"url", "caption", "key", "id", "similarity"}, ...]; the first `num_images` hits carry
                         their metadata, the others (up to `num_result_ids`) only "id" and "similarity"
    POST /metadata       {"ids": [...], "indice_name"} -> [{"id", "metadata": {"url", "caption", "key"}}, ...]
    GET  /indices-list   ["<index name>"]: the one index this service serves (`ServerConfig.index_name`, else the
                         index folder's name)

As in clip_back: the body is read as JSON whatever its Content-Type (the front-end sends text/plain, ClipClient
none), `deduplicate` drops every hit whose stored embedding is within cosine 0.94 of a better-ranked one (connected
components), the query is the first given of text, image, image_url and embedding_input, and the endpoints answer
any origin (CORS, `ClipCORS`). The safety, violence, aesthetic and mclip options are accepted and ignored (no such
models here; InternVL's text tower is multilingual). On purpose unlike clip_back:

- `url` is this service's `/images/{id}` URL, absolute from the request's base URL (no stored url column, never a
  server path); a row without an image file has no `url`, a row without a caption no `caption` (clip-retrieval's
  front-end fails on a null caption). `"include_image": true` adds the file as base64 (`image`) to the hits that
  carry metadata, up to `max_upload_bytes` of files per answer.
- `image_url` is never downloaded: it may be one of this service's own `/images/{id}` URLs (what the front-end's
  "similar images" button sends), or an image file under the index's image roots (a path or a file:// URL; any
  other path gets the server's one REFUSED_IMAGE answer); another http(s) URL is refused (422).
- Limits are 4xx, never 5xx: `num_images` 1..max_k, `num_result_ids` and the ids of one /metadata call
  1..max_result_ids, an unknown `indice_name` (the answer names the served one), a body that is not a JSON object.
"""
from __future__ import annotations

import base64
import json
import os
from dataclasses import replace
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator
from starlette.middleware.cors import CORSMiddleware

from .search import Hit, normalize
from .server import _ID, _KINDS, ImageRef, Service, _limits, _resolve_under, _validated, require_key

PATHS = ("/knn-service", "/metadata", "/indices-list")
DEDUP_SIMILARITY = 0.94  # clip_back's threshold: hits at least this close to a better-ranked hit are duplicates
MODALITY_TARGET = {"image": "images", "text": "captions"}  # clip-retrieval modality -> SearchRequest target
NOT_DOWNLOADED = ("image_url: this service downloads no images; give one of its own /images/{id} URLs, an image "
                  "file under the index's image roots, or the image (base64 `image`)")


# ------------------------------------------------------------------------------------------- request models
class KnnRequest(BaseModel):
    """A /knn-service body as ClipClient and the front-end send it. Validate with `context={"config": ...}`."""

    model_config = ConfigDict(extra="ignore")  # use_safety_model, use_violence_detector, aesthetic_*, use_mclip

    text: str | None = None
    image: str | None = None
    image_url: str | None = None
    embedding_input: list[float] | None = None
    modality: Literal["image", "text"] = "image"
    num_images: int = 40
    num_result_ids: int | None = None  # None: num_images
    deduplicate: bool = False
    indice_name: str | None = None
    include_image: bool = False

    @field_validator("num_images")
    @classmethod
    def _num_images_within_limit(cls, value: int, info: ValidationInfo) -> int:
        return _within_limit(value, _limits(info).max_k)

    @field_validator("num_result_ids")
    @classmethod
    def _num_result_ids_within_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        return None if value is None else _within_limit(value, _limits(info).max_result_ids)

    @model_validator(mode="after")
    def _one_query(self) -> KnnRequest:
        if not (self.text or self.image or self.image_url or self.embedding_input is not None):
            raise ValueError("give one of text, image (base64), image_url or embedding_input")
        if self.num_result_ids is None:
            self.num_result_ids = self.num_images
        return self

    def search_fields(self, base_url: str) -> dict[str, Any]:
        """The SearchRequest fields of the query: the first given of text, image, image_url and embedding_input."""
        if self.text:
            return {"text": self.text}
        if self.image:
            return {"image": self.image}
        if self.image_url:
            return {"image": [image_url_reference(self.image_url, base_url)]}
        return {"embedding": self.embedding_input}


class MetadataRequest(BaseModel):
    """A /metadata body: the ids of earlier hits (the front-end asks for more as the page scrolls)."""

    model_config = ConfigDict(extra="ignore")

    ids: list[int]
    indice_name: str | None = None
    include_image: bool = False

    @field_validator("ids")
    @classmethod
    def _not_too_many(cls, ids: list[int], info: ValidationInfo) -> list[int]:
        limit = _limits(info).max_result_ids
        if len(ids) > limit:
            raise ValueError(f"give at most {limit} ids, got {len(ids)}")
        return ids


def _within_limit(value: int, limit: int) -> int:
    if not 1 <= value <= limit:
        raise ValueError(f"must be between 1 and {limit}, got {value}")
    return value


def image_url_reference(url: str, base_url: str) -> ImageRef:
    """The query image an `image_url` names: a row id for this service's own `/images/{id}` URL, else a path (a
    file:// URL or a plain path, checked against the index's image roots when it is read). Other URLs: 422."""
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed IPv6 bracket in the host
        raise HTTPException(422, NOT_DOWNLOADED) from None
    scheme = parts.scheme.lower()
    if scheme == "file":
        return unquote(parts.path)
    if scheme not in ("http", "https"):
        return url  # a path (or a data: URL)
    base = urlsplit(base_url)
    prefix = base.path.rstrip("/") + "/images/"
    image_id = parts.path[len(prefix):] if parts.netloc == base.netloc and parts.path.startswith(prefix) else ""
    if not _ID.fullmatch(image_id):
        raise HTTPException(422, NOT_DOWNLOADED)
    return int(image_id)


# -------------------------------------------------------------------------------------------------- helpers
def index_name(service: Service) -> str:
    """The name of the served index: `ServerConfig.index_name`, else the index folder's name."""
    return service.config.index_name or service.index.root.resolve().name or "index"


def _check_index_name(name: str | None, service: Service) -> None:
    """422 naming the served index when `name` is another one (None or "": the served one)."""
    known = index_name(service)
    if name and name != known:
        raise HTTPException(422, f"indice_name: unknown index {name[:100]!r}; this service serves {known!r}")


async def _json_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object, whatever its Content-Type (clip_back reads it with `get_json(force=True)`)."""
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):  # also bad UTF-8, ints over 4300 digits, nesting deeper than Python
        raise HTTPException(400, "body is not valid JSON (or nested too deeply)") from None
    if not isinstance(body, dict):
        raise HTTPException(422, "JSON body must be an object")
    return body


Body = Annotated[dict[str, Any], Depends(_json_body)]


def duplicate_positions(vectors: np.ndarray, threshold: float = DEDUP_SIMILARITY) -> np.ndarray:
    """Positions (rows in rank order) clip_back's deduplication drops: rows linked by a cosine above `threshold`
    form groups (connected components) and only the first row of each group stays."""
    import faiss

    vectors = normalize(vectors)
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    lims, _, neighbours = flat.range_search(vectors, threshold)
    rows = np.repeat(np.arange(len(vectors)), np.diff(lims.astype(np.int64)))
    rows, neighbours = np.concatenate([rows, neighbours]), np.concatenate([neighbours, rows])  # both directions
    group = np.arange(len(vectors))
    while True:  # each row takes the smallest position linked to it, until nothing changes: its component's first
        linked = group.copy()
        np.minimum.at(linked, rows, group[neighbours])
        linked = linked[linked]
        if np.array_equal(linked, group):
            return np.flatnonzero(group != np.arange(len(vectors)))
        group = linked


class _Metadata:
    """What clients see of a row: absolute image URL, caption, key (and the file as base64 when asked, within a
    byte budget per answer)."""

    def __init__(self, request: Request, service: Service, include_image: bool):
        self.base_url = str(request.base_url)  # ends with "/" (and holds the root path behind a proxy)
        self.roots = service.index.image_roots
        self.budget = service.config.max_upload_bytes if include_image else 0

    def __call__(self, hit: Hit) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        if hit.image_path is not None:
            meta["url"] = f"{self.base_url}images/{hit.id}"
        if hit.caption is not None:
            meta["caption"] = hit.caption
        meta["key"] = hit.key
        data = self._file(hit.image_path) if self.budget and hit.image_path else None
        if data is not None:
            self.budget -= len(data)
            meta["image"] = base64.b64encode(data).decode("ascii")
        return meta

    def _file(self, path: str) -> bytes | None:
        """The bytes of an indexed image file under the image roots that fit the budget (else None)."""
        real = _resolve_under(path, self.roots)
        try:
            if real is None or os.path.getsize(real) > self.budget:
                return None
            with open(real, "rb") as file:
                data = file.read(self.budget + 1)
        except OSError:  # removed or unreadable since it was indexed
            return None
        return data if len(data) <= self.budget else None


# ----------------------------------------------------------------------------------------------- the router
router = APIRouter(dependencies=[Depends(require_key)])


def _knn_request(body: Body, service: Service) -> KnnRequest:
    query = _validated(body, service.config, KnnRequest)
    _check_index_name(query.indice_name, service)
    return query


def _metadata_request(body: Body, service: Service) -> MetadataRequest:
    query = _validated(body, service.config, MetadataRequest)
    _check_index_name(query.indice_name, service)
    return query


@router.post("/knn-service")
def knn_service(query: Annotated[KnnRequest, Depends(_knn_request)], request: Request,
                service: Service) -> list[dict[str, Any]]:
    config = service.config
    target = MODALITY_TARGET[query.modality]
    search = _validated({**query.search_fields(str(request.base_url)), "k": query.num_result_ids, "target": target},
                        replace(config, max_k=max(config.max_k, config.max_result_ids)))
    hits = [service.index.hit(found.id, found.score) for found in service.search(search).results]
    if query.deduplicate and len(hits) > 1:
        dropped = set(duplicate_positions(service.index.stored_vectors([h.id for h in hits], _KINDS[target])))
        hits = [hit for position, hit in enumerate(hits) if position not in dropped]
    describe = _Metadata(request, service, query.include_image)
    return [{**(describe(hit) if rank < query.num_images else {}), "id": hit.id, "similarity": hit.score}
            for rank, hit in enumerate(hits)]


@router.post("/metadata")
def metadata(query: Annotated[MetadataRequest, Depends(_metadata_request)], request: Request,
             service: Service) -> list[dict[str, Any]]:
    index = service.index
    unknown = [i for i in query.ids if not 0 <= i < len(index) or index.is_deleted(i)]
    if unknown:
        raise HTTPException(422, f"ids: not rows of this index: {unknown[:10]}")
    describe = _Metadata(request, service, query.include_image)
    return [{"id": i, "metadata": describe(index.hit(i, 0.0))} for i in query.ids]


@router.get("/indices-list")
def indices_list(service: Service) -> list[str]:
    return [index_name(service)]


class ClipCORS:
    """ASGI middleware: CORS on the clip-retrieval endpoints only (any origin, no credentials, as clip_back's
    flask_cors): its front-end is served from another origin. Preflights are answered before the API key check."""

    def __init__(self, app):
        self.app = app
        self.cors = CORSMiddleware(app, allow_origins=["*"], allow_methods=["GET", "POST"], allow_headers=["*"])

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].removeprefix(scope.get("root_path", "")) in PATHS:
            return await self.cors(scope, receive, send)
        return await self.app(scope, receive, send)
