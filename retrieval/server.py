"""HTTP service over an `ImageIndex`: search by text / image / embedding, image files, health, metrics, web page.

Endpoints::

    GET  /                     web page (search box, image upload, result grid)
    GET  /search?text=..&k=..  text search (target=captions searches the caption index instead of images)
    POST /search               JSON {"text"| "embedding"| "image" (base64), "k", "target"},
                               multipart form (text / image file / k), or a raw image body (image/*, octet-stream)
    GET  /images/{id}          the indexed image file with that id (only files under the index's image roots)
    GET  /health               {"status": "ok", ...}
    GET  /metrics              Prometheus text format

Safety: binds 127.0.0.1 unless told otherwise (cli), request bodies over `max_upload_bytes` are refused with 413
before they are read, `k` is capped, an optional API key (header `X-API-Key` or `?api_key=`) guards everything
except `/health` and the page itself.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import mimetypes
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from internvl_fm.errors import ImageLoadError

from .errors import IndexStateError
from .search import Hit, ImageIndex

DEFAULT_MAX_UPLOAD = 8 * 2**20


@dataclass
class ServerConfig:
    """Limits and access control of the service."""

    max_k: int = 100
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD
    max_query_chars: int = 1000
    api_key: str | None = None


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

    def render(self, index: ImageIndex) -> str:
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


class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, by Content-Length up front or counted while streaming."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(send)
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send)

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


def _page() -> str:
    return resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(index: ImageIndex, config: ServerConfig | None = None):
    """The FastAPI application serving `index`."""
    config = config or ServerConfig()
    app = FastAPI(title="internvl-fm search", docs_url=None, redoc_url=None)
    metrics = _Metrics()
    model_lock = threading.Lock()  # one model call at a time: concurrent torch calls only oversubscribe the CPU
    page = _page()

    @lru_cache(maxsize=4096)
    def text_vector(text: str) -> np.ndarray:
        with model_lock:
            return index.embed_text(text)[0]

    def image_vector(data: bytes) -> np.ndarray:
        try:
            with model_lock:
                return index.embed_image(data)[0]
        except ImageLoadError as exc:
            raise HTTPException(400, f"cannot read the uploaded image: {exc.reason}") from exc

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("x-api-key") or request.query_params.get("api_key") or ""
        if not hmac.compare_digest(given.encode(), config.api_key.encode()):
            raise HTTPException(401, "missing or wrong API key (header X-API-Key or ?api_key=)")

    def check_k(k: Any) -> int:
        try:
            k = int(k)
        except (TypeError, ValueError) as exc:
            raise HTTPException(422, f"k must be an integer, got {k!r}") from exc
        if not 1 <= k <= config.max_k:
            raise HTTPException(422, f"k must be between 1 and {config.max_k}, got {k}")
        return k

    def run(vector: np.ndarray, k: int, target: str, started: float) -> dict:
        kind = {"images": "image", "captions": "text"}.get(target)
        if kind is None:
            raise HTTPException(422, f"target must be 'images' or 'captions', got {target!r}")
        try:
            hits = index.search_embedding(vector, k, kind=kind)
        except IndexStateError as exc:
            raise HTTPException(422, str(exc)) from exc
        return {"results": [_public(h) for h in hits], "target": target,
                "took_ms": round((time.perf_counter() - started) * 1000, 3)}

    def text_query(text: Any) -> np.ndarray:
        if not isinstance(text, str) or not text.strip():
            raise HTTPException(422, "text must be a non-empty string")
        if len(text) > config.max_query_chars:
            raise HTTPException(422, f"text longer than {config.max_query_chars} characters")
        return text_vector(text.strip())

    @app.middleware("http")
    async def observe(request: Request, call_next):
        started = time.perf_counter()
        endpoint = request.scope.get("path", "")
        endpoint = "/images" if endpoint.startswith("/images/") else endpoint
        if endpoint not in ("/", "/search", "/images", "/health", "/metrics"):
            endpoint = "other"
        response = await call_next(request)
        metrics.observe(endpoint, response.status_code, time.perf_counter() - started)
        return response

    @app.get("/", response_class=HTMLResponse)
    def home() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "rows": len(index), "deleted": len(index.deleted),
                "indexes": {kind: target.info.get("factory") for kind, target in index.indexes.items()}}

    @app.get("/metrics", response_class=PlainTextResponse)
    def get_metrics(request: Request) -> PlainTextResponse:
        check_key(request)
        return PlainTextResponse(metrics.render(index), media_type="text/plain; version=0.0.4")

    @app.get("/search")
    def search_get(request: Request, text: str = "", k: str = "10", target: str = "images") -> dict:
        check_key(request)
        started = time.perf_counter()
        return run(text_query(text), check_k(k), target, started)

    @app.post("/search")
    async def search_post(request: Request) -> JSONResponse:
        check_key(request)
        started = time.perf_counter()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        params = dict(request.query_params)
        if content_type == "application/json":
            try:
                payload = await request.json()
            except ValueError as exc:
                raise HTTPException(400, "body is not valid JSON") from exc
            if not isinstance(payload, dict):
                raise HTTPException(422, "JSON body must be an object")
            params.update(payload)
        elif content_type == "multipart/form-data":
            form = await request.form()
            for name, value in form.multi_items():
                params[name] = await value.read() if hasattr(value, "read") else value
        elif content_type.startswith("image/") or content_type == "application/octet-stream":
            params["image"] = await request.body()
        else:
            raise HTTPException(415, "send JSON, a multipart form or a raw image body")
        k, target = check_k(params.get("k", 10)), str(params.get("target", "images"))

        if params.get("image") not in (None, b"", ""):
            data = params["image"]
            if isinstance(data, str):
                try:
                    data = base64.b64decode(data, validate=True)
                except (binascii.Error, ValueError) as exc:
                    raise HTTPException(422, "image must be base64 in JSON") from exc
            vector = await run_in_threadpool(image_vector, data)
        elif params.get("embedding") is not None:
            try:
                vector = np.asarray(params["embedding"], dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise HTTPException(422, "embedding must be a list of numbers") from exc
            if vector.ndim != 1 or not np.isfinite(vector).all():
                raise HTTPException(422, "embedding must be one finite vector")
        else:
            vector = await run_in_threadpool(text_query, params.get("text"))
        return JSONResponse(await run_in_threadpool(run, vector, k, target, started))

    @app.get("/images/{image_id}")
    def get_image(request: Request, image_id: str) -> FileResponse:
        check_key(request)
        if not image_id.isdigit() or int(image_id) >= len(index) or index.is_deleted(int(image_id)):
            raise HTTPException(404, "no such image id")
        path = index.hit(int(image_id), 0.0).image_path
        if path is None or not os.path.isfile(path):
            raise HTTPException(404, "this image has no file on disk (it came from shards or a table)")
        if not _within(path, index.image_roots):
            raise HTTPException(403, "image outside the index's image roots")
        media_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return FileResponse(os.path.realpath(path), media_type=media_type)

    app.add_middleware(BodySizeLimit, max_bytes=config.max_upload_bytes)
    return app


def _public(hit: Hit) -> dict:
    """What the service tells clients about a hit (no server file paths)."""
    return {"id": hit.id, "score": round(hit.score, 6), "key": hit.key, "caption": hit.caption,
            "url": f"/images/{hit.id}", "file": Path(hit.image_path).name if hit.image_path else None}


def serve(index: ImageIndex, host: str = "127.0.0.1", port: int = 8000, config: ServerConfig | None = None) -> None:
    """Run the service with uvicorn (blocking)."""
    import uvicorn

    uvicorn.run(create_app(index, config), host=host, port=port, log_level="warning")
