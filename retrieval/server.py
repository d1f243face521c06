"""HTTP service over a search index: search by text / image / embedding, image files, health, metrics, web page.

Endpoints::

    GET  /                     web page (search box, image upload, result grid)
    GET  /search?text=..&k=..  text search (target=captions searches the caption index instead of images)
    POST /search               JSON {"text"| "embedding"| "image", "k", "target"}: "image" is one base64 image, or
                               a list of up to `max_query_images` references (an indexed row id, a data: URL, or
                               the path of an image file under the index's image roots) whose embeddings are
                               averaged; a multipart form (text / image file / k), or a raw image body
    GET  /images/{id}          the indexed image file with that id (only files under the index's image roots)
    GET  /health               {"status": "ok", "rows", "deleted", "indexes", "model"}
    GET  /metrics              Prometheus text format
    POST /knn-service, /metadata, GET /indices-list   clip-retrieval's back-end API (clip_back.py)
    POST /v1/embeddings, GET /v1/models               OpenAI-compatible embeddings (embeddings_api.py)

Safety: binds 127.0.0.1 unless told otherwise (cli), request bodies over `max_upload_bytes` are refused with 413
(by Content-Length up front, or once a chunked body passes the cap: reading stops there), `k` and the number of
query images are capped, a query image is decoded only under the model lock (one decoded image in memory at a time)
and refused above `max_image_pixels`; a path that is not a readable image under the index's image roots gets one
and the same 422 whether it is missing, not an image or outside the roots (no file-existence oracle). Client input
never causes a 5xx: malformed, non-finite, deeply nested or non-Unicode input is a 4xx. An optional API key (header
`X-API-Key` or `?api_key=`) guards everything except `/health` and the page itself.

Layout: `ServerConfig` (limits, checked when made); the pydantic models `SearchRequest` (every field of a query
checked once, where the request comes in) and `SearchResponse` / `SearchHit` / `Health`; `SearchService` (the
index, one model call at a time, the text-embedding cache, the metrics); the routers `public` (page, health) and
`api` (search, images, metrics; behind the API key), which `create_app` mounts.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import mimetypes
import os
import re
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from internvl_fm.errors import ImageLoadError
from internvl_fm.processing import load_image

from .errors import IndexStateError, check_int
from .search import Hit, SearchIndex, normalize

DEFAULT_MAX_UPLOAD = 8 * 2**20
# the one answer to a path or id that may not be used as a query image (missing, not an image, outside the roots)
REFUSED_IMAGE = "image: each reference must be an indexed row id or an image file under the index's image roots"
_ID = re.compile(r"[0-9]{1,18}")  # ASCII digits only ("²".isdigit() is True), short enough for int()
_KINDS = {"images": "image", "captions": "text"}  # request target -> index kind


@dataclass
class ServerConfig:
    """Limits and access control of the service (checked when made)."""

    max_k: int = 100
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD
    max_query_chars: int = 1000
    max_query_images: int = 8  # query images per request (their embeddings are averaged)
    max_image_pixels: int = 40_000_000  # a larger query image is refused (400) before it is decoded
    api_key: str | None = None
    index_name: str | None = None  # the name clip-retrieval clients give (/indices-list); None: the folder's name
    max_result_ids: int = 3000  # ids per /knn-service or /metadata request (clip-retrieval's front-end asks 3000)

    def __post_init__(self):
        check_int("max_k", self.max_k, 1)
        check_int("max_result_ids", self.max_result_ids, 1)
        check_int("max_upload_bytes", self.max_upload_bytes, 1)
        check_int("max_query_chars", self.max_query_chars, 1)
        check_int("max_query_images", self.max_query_images, 1)
        check_int("max_image_pixels", self.max_image_pixels, 1)


# -------------------------------------------------------------------------------------- request / response models
def _limits(info: ValidationInfo) -> ServerConfig:
    """The service's limits, passed as validation context (defaults without one)."""
    return (info.context or {}).get("config") or ServerConfig()


ImageRef = bytes | int | str  # image bytes, an indexed row id, or a path under the index's image roots


def _base64(value: str) -> bytes:
    """Base64 text, or a `data:...;base64,` URL, as bytes."""
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be base64 in JSON") from None


def _reference(item: Any) -> ImageRef:
    """One item of an image list: an int id, a data: URL (-> bytes) or a path (str); anything else is refused."""
    if isinstance(item, bytes):
        return item
    if isinstance(item, int) and not isinstance(item, bool):
        return item
    if isinstance(item, str) and item:
        return _base64(item) if item.startswith("data:") else item
    raise ValueError("each image must be a row id, a data: URL or a path")


class SearchRequest(BaseModel):
    """One search. The query is the image(s) when given, else the embedding, else the text; `k` hits (1..max_k)
    from the image or the caption index. `image` is one image (bytes; base64 in JSON) or a list of 1..
    max_query_images references (row ids, data: URLs, paths under the index's roots), whose embeddings are averaged.
    Validate with `context={"config": ...}`."""

    model_config = ConfigDict(extra="ignore")

    text: str | None = None
    image: list[ImageRef] | None = None
    embedding: list[float] | None = None
    k: int = 10
    target: Literal["images", "captions"] = "images"

    @field_validator("image", mode="before")
    @classmethod
    def _read_images(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):  # JSON carries one image as base64 (or a data: URL)
            value = _base64(value) if value else b""
        if isinstance(value, (bytes, bytearray)):
            return [bytes(value)] if value else None  # an empty upload is no image
        if value is None:
            return None
        if not isinstance(value, list):
            raise ValueError("must be base64 text or a list of images")
        limit = _limits(info).max_query_images
        if not 1 <= len(value) <= limit:
            raise ValueError(f"give between 1 and {limit} images, got {len(value)}")
        return [_reference(item) for item in value]

    @field_validator("text")
    @classmethod
    def _unicode_text(cls, text: str | None) -> str | None:
        if text is not None:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("must be valid Unicode (it holds a lone surrogate)") from None
        return text

    @field_validator("k")
    @classmethod
    def _k_within_limit(cls, k: int, info: ValidationInfo) -> int:
        max_k = _limits(info).max_k
        if not 1 <= k <= max_k:
            raise ValueError(f"must be between 1 and {max_k}, got {k}")
        return k

    @model_validator(mode="after")
    def _check_query(self, info: ValidationInfo) -> SearchRequest:
        if self.image is not None:
            return self
        if self.embedding is not None:
            with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused here
                finite = bool(self.embedding) and np.isfinite(np.asarray(self.embedding, dtype=np.float32)).all()
            if not finite:
                raise ValueError("embedding must be one finite vector")
            return self
        if self.text is None or not self.text.strip():
            raise ValueError("text must be a non-empty string")
        max_chars = _limits(info).max_query_chars
        if len(self.text) > max_chars:
            raise ValueError(f"text longer than {max_chars} characters")
        self.text = self.text.strip()
        return self


class SearchHit(BaseModel):
    """A hit as clients see it: id, score, key, caption, image URL and file name (never a server path)."""

    id: int
    score: float
    key: str
    caption: str | None
    url: str
    file: str | None

    @classmethod
    def of(cls, hit: Hit) -> SearchHit:
        return cls(id=hit.id, score=round(hit.score, 6), key=hit.key, caption=hit.caption, url=f"/images/{hit.id}",
                   file=Path(hit.image_path).name if hit.image_path else None)


class SearchResponse(BaseModel):
    results: list[SearchHit]
    target: str
    took_ms: float


class ModelInfo(BaseModel):
    """The index's model as clients see it: a hub id, or a local checkpoint folder's name (never a server path)."""

    name: str
    mode: str
    dtype: str | None  # None: the checkpoint's own (not loaded yet)
    image_size: int | None
    quantization: str | None


class Health(BaseModel):
    status: str
    rows: int
    deleted: int
    indexes: dict[str, str | None]
    model: ModelInfo


def _validated(params: dict[str, Any], config: ServerConfig, model: type[BaseModel] = SearchRequest) -> Any:
    """`params` as a `model` (a SearchRequest by default) validated under `config`'s limits, or a 422 naming each
    refused field in one string."""
    try:
        return model.model_validate(params, context={"config": config})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
        raise HTTPException(422, "; ".join(problems)) from None


# ------------------------------------------------------------------------------------------------- the service
class _Metrics:
    """Request counters and latency sums, rendered in the Prometheus text format."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.seconds[endpoint] += seconds
            self.counts[endpoint] += 1

    def render(self, index: SearchIndex) -> str:
        with self._lock:
            lines = ["# HELP internvl_fm_requests_total HTTP requests by endpoint and status.",
                     "# TYPE internvl_fm_requests_total counter"]
            lines += [f'internvl_fm_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP internvl_fm_request_seconds Time spent answering requests.",
                      "# TYPE internvl_fm_request_seconds summary"]
            for endpoint in sorted(self.counts):
                lines.append(f'internvl_fm_request_seconds_sum{{endpoint="{endpoint}"}} {self.seconds[endpoint]:.6f}')
                lines.append(f'internvl_fm_request_seconds_count{{endpoint="{endpoint}"}} {self.counts[endpoint]}')
        lines += ["# HELP internvl_fm_index_rows Rows in the embedding store.", "# TYPE internvl_fm_index_rows gauge",
                  f"internvl_fm_index_rows {len(index)}",
                  "# HELP internvl_fm_index_deleted Deleted rows.", "# TYPE internvl_fm_index_deleted gauge",
                  f"internvl_fm_index_deleted {len(index.deleted)}"]
        return "\n".join(lines) + "\n"


class BodySizeLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, by Content-Length up front; a body without one (chunked)
    is read here first, at most `max_bytes` + one chunk, and handed to the app only when it fits (reading stops at
    the cap; the app never sees a half-read body)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await self._refuse(send)
            return await self.app(scope, receive, send)  # the server holds the body to its Content-Length
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if received > self.max_bytes:
                return await self._refuse(send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send):
        body = f'{{"detail": "request body larger than {self.max_bytes} bytes"}}'.encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _within(path: str, roots: list[str]) -> bool:
    """True when `path` (symlinks resolved) lies inside one of `roots`."""
    real = os.path.realpath(path)
    for root in roots:
        root_real = os.path.realpath(root)
        if os.path.commonpath([real, root_real]) == root_real:
            return True
    return False


def _resolve_under(path: str, roots: list[str]) -> str | None:
    """The real path of the regular file `path` names inside one of `roots` (a relative path is taken relative to
    each root in turn), or None: missing, not a file, outside every root, or not a valid path at all."""
    try:
        candidates = [path] if os.path.isabs(path) else [os.path.join(root, path) for root in roots]
        for candidate in candidates:
            real = os.path.realpath(candidate)
            if os.path.isfile(real) and _within(real, roots):
                return real
    except (OSError, ValueError):  # NUL bytes, lone surrogates, names too long
        pass
    return None


def _page() -> str:
    return resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")


class SearchService:
    """What the routes share: the index, its limits, one model call at a time (concurrent torch calls only
    oversubscribe the CPU), a cache of text embeddings, the metrics and the page."""

    def __init__(self, index: SearchIndex, config: ServerConfig):
        self.index, self.config = index, config
        self.metrics = _Metrics()
        self.page = _page()
        self.model_lock = threading.Lock()
        self.text_vector = lru_cache(maxsize=4096)(self._embed_text)

    def _embed_text(self, text: str) -> np.ndarray:
        with self.model_lock:
            return self.index.embed_text(text)[0]

    def image_vector(self, data: bytes) -> np.ndarray:
        """The embedding of uploaded image bytes (400 when they are not a readable image)."""
        try:
            with self.model_lock:  # decoded here: one decoded query image in memory at a time
                return self.index.embed_image(load_image(data, self.config.max_image_pixels))[0]
        except ImageLoadError as exc:
            raise HTTPException(400, f"cannot read the uploaded image: {exc.reason}") from exc

    def reference_vector(self, ref: ImageRef) -> np.ndarray:
        """The embedding of one query image: uploaded bytes, an indexed row (its stored vector) or a path under the
        index's image roots. Every refused id or path gets the same 422 (REFUSED_IMAGE)."""
        if isinstance(ref, bytes):
            return self.image_vector(ref)
        index = self.index
        if isinstance(ref, int):
            if not 0 <= ref < len(index) or index.is_deleted(ref):
                raise HTTPException(422, REFUSED_IMAGE)
            return index.stored_vector(ref)
        path = _resolve_under(ref, index.image_roots)
        if path is None:
            raise HTTPException(422, REFUSED_IMAGE)
        try:
            with self.model_lock:
                return index.embed_image(load_image(path, self.config.max_image_pixels))[0]
        except ImageLoadError:
            raise HTTPException(422, REFUSED_IMAGE) from None

    def search(self, query: SearchRequest) -> SearchResponse:
        started = time.perf_counter()
        if query.image is not None:
            vectors = [self.reference_vector(ref) for ref in query.image]
            vector = normalize(np.stack(vectors)).mean(axis=0) if len(vectors) > 1 else vectors[0]
        elif query.embedding is not None:
            vector = np.asarray(query.embedding, dtype=np.float32)
        else:
            vector = self.text_vector(query.text)
        try:
            hits = self.index.search_embedding(vector, query.k, kind=_KINDS[query.target])
        except IndexStateError as exc:
            raise HTTPException(422, str(exc)) from exc
        return SearchResponse(results=[SearchHit.of(h) for h in hits], target=query.target,
                              took_ms=round((time.perf_counter() - started) * 1000, 3))


def _service(request: Request) -> SearchService:
    return request.app.state.service


Service = Annotated[SearchService, Depends(_service)]


def require_key(request: Request, service: Service) -> None:
    """401 unless the request carries the API key (when the service has one)."""
    if service.config.api_key is None:
        return
    given = request.headers.get("x-api-key") or request.query_params.get("api_key") or ""
    if not hmac.compare_digest(given.encode(), service.config.api_key.encode()):
        raise HTTPException(401, "missing or wrong API key (header X-API-Key or ?api_key=)")


def _get_query(request: Request, service: Service) -> SearchRequest:
    """A GET search: text, k and target from the query string."""
    params = {name: request.query_params[name] for name in ("text", "k", "target") if name in request.query_params}
    return _validated(params, service.config)


async def _post_query(request: Request, service: Service) -> SearchRequest:
    """A POST search: a JSON object, a multipart form or a raw image body (plus the query string). A body without
    a Content-Type (python `requests.post(url, data=json_text)`) or sent as a form but holding a JSON object
    (`curl -d '{...}'`) is read as JSON."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    params: dict[str, Any] = dict(request.query_params)
    if content_type == "application/x-www-form-urlencoded" and (await request.body()).lstrip().startswith(b"{"):
        content_type = "application/json"
    if content_type in ("application/json", ""):
        try:
            payload = await request.json()
        except (ValueError, RecursionError):  # also bad UTF-8, ints over 4300 digits, nesting deeper than Python
            raise HTTPException(400, "body is not valid JSON (or nested too deeply)") from None
        if not isinstance(payload, dict):
            raise HTTPException(422, "JSON body must be an object")
        params.update(payload)
    elif content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form()
        for name, value in form.multi_items():
            params[name] = await value.read() if hasattr(value, "read") else value
    elif content_type.startswith("image/") or content_type == "application/octet-stream":
        params["image"] = await request.body()
    else:
        raise HTTPException(415, "send JSON, a form or a raw image body")
    return _validated(params, service.config)


# ------------------------------------------------------------------------------------------------- the routers
public = APIRouter()
api = APIRouter(dependencies=[Depends(require_key)])


@public.get("/", response_class=HTMLResponse)
def home(service: Service) -> HTMLResponse:
    return HTMLResponse(service.page)


@public.get("/health", response_model=Health)
def health(service: Service) -> Health:
    index = service.index
    spec = index.spec
    model = ModelInfo(name=Path(spec.path).name if os.path.isabs(spec.path) else spec.path, mode=spec.mode,
                      dtype=index._dtype or spec.dtype, image_size=spec.image_size, quantization=spec.quantization)
    return Health(status="ok", rows=len(index), deleted=len(index.deleted),
                  indexes={kind: target.info.get("factory") for kind, target in index.indexes.items()}, model=model)


@api.get("/metrics", response_class=PlainTextResponse)
def get_metrics(service: Service) -> PlainTextResponse:
    return PlainTextResponse(service.metrics.render(service.index), media_type="text/plain; version=0.0.4")


@api.get("/search", response_model=SearchResponse)
def search_get(query: Annotated[SearchRequest, Depends(_get_query)], service: Service) -> SearchResponse:
    return service.search(query)


@api.post("/search", response_model=SearchResponse)
def search_post(query: Annotated[SearchRequest, Depends(_post_query)], service: Service) -> SearchResponse:
    return service.search(query)


@api.get("/images/{image_id}")
def get_image(image_id: str, service: Service) -> FileResponse:
    index = service.index
    if not _ID.fullmatch(image_id) or int(image_id) >= len(index) or index.is_deleted(int(image_id)):
        raise HTTPException(404, "no such image id")
    path = index.hit(int(image_id), 0.0).image_path
    if path is None or not os.path.isfile(path):
        raise HTTPException(404, "this image has no file on disk (it came from shards or a table)")
    if not _within(path, index.image_roots):
        raise HTTPException(403, "image outside the index's image roots")
    media_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return FileResponse(os.path.realpath(path), media_type=media_type)


_ENDPOINTS = ("/", "/search", "/images", "/health", "/metrics", "/knn-service", "/metadata", "/indices-list",
              "/v1/embeddings", "/v1/models")


async def _observe(request: Request, call_next):
    """Middleware: count every request by endpoint and status, with its latency."""
    started = time.perf_counter()
    path = request.scope.get("path", "")
    endpoint = "/images" if path.startswith("/images/") else path if path in _ENDPOINTS else "other"
    response = await call_next(request)
    request.app.state.service.metrics.observe(endpoint, response.status_code, time.perf_counter() - started)
    return response


class _AsciiJSON(JSONResponse):
    """JSON with non-ASCII escaped: an error message can never fail to encode (lone surrogates included)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _AsciiJSON({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


def create_app(index: SearchIndex, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI application serving `index`."""
    app = FastAPI(title="internvl-fm search", docs_url=None, redoc_url=None)
    app.add_exception_handler(StarletteHTTPException, _http_error)  # fastapi's HTTPException and routing 404/405
    app.state.service = SearchService(index, config or ServerConfig())
    app.include_router(public)
    app.include_router(api)
    from .clip_back import ClipCORS, router as clip_router  # clip-retrieval's back-end API (imports this module)

    app.include_router(clip_router)
    from .embeddings_api import add_to_search_service  # OpenAI /v1/embeddings with the index's model (imports this)

    add_to_search_service(app)
    app.middleware("http")(_observe)
    app.add_middleware(BodySizeLimit, max_bytes=app.state.service.config.max_upload_bytes)
    app.add_middleware(ClipCORS)  # outermost: preflights are answered before anything else
    return app


def serve(index: SearchIndex, host: str = "127.0.0.1", port: int = 8000, config: ServerConfig | None = None) -> None:
    """Run the service with uvicorn (blocking)."""
    import uvicorn

    uvicorn.run(create_app(index, config), host=host, port=port, log_level="warning")
