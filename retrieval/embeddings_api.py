"""OpenAI-compatible embeddings over HTTP: ``POST /v1/embeddings`` and ``GET /v1/models``, on the search service
(``internvl-fm serve INDEX``, with the index's model) and on its own (``internvl-fm serve-embed MODEL``, no index).

Request: the OpenAI body ``{"input", "model", "encoding_format", "dimensions", "user"}``:

- ``input``: one string or a list of strings (token-id lists are refused: 400). Each string is an image when it is
    * a ``data:image/<type>;base64,<data>`` URL,
    * ``base64:<data>`` (the raw base64 of an image file; the prefix tells it from text),
    * a path: a string that starts with ``/``, ``./``, ``../`` or ``file://`` and holds no line break. It must name an
      image file under one of the server's image roots (symlinks resolved; ``./x.png`` is relative to each root in
      turn); every other path gets one and the same 400 (missing, outside the roots, not an image: no oracle of
      which files exist). The search service's roots are its index's image roots; ``serve-embed`` takes
      ``--image-root`` (none by default: paths are refused);
  anything else is text. (To embed a text that starts like a path, put a space before it.)
- ``model``: ``InternVL-C`` or ``InternVL-G`` (case-insensitive; another name is a 404 that lists both). Texts embed
  alike in both modes (C and G share the text tower); images differ.
- ``encoding_format``: ``float`` (default) or ``base64`` (the little-endian float32 bytes of each vector, as OpenAI
  sends them); ``dimensions``: accepted only when equal to the model's; ``user``: ignored.

Response: one ``{"object": "embedding", "index", "embedding"}`` per input, in order; every vector is L2-normalised
(float32), so a dot product is the cosine similarity. ``usage.prompt_tokens`` (= ``total_tokens``) counts the tokens
the model read for the texts (the model's tokenizer: BOS, the ``summarize:`` prefix, the text truncated to the
tokenizer's ``max_length``, EOS); an image counts 0.

Errors are OpenAI-shaped (``{"error": {"message", "type", "code", "param"}}``) and client input never causes a 5xx:
malformed, nested too deeply or non-Unicode JSON, a bad field, an unreadable image is a 400, a body or an image too
large a 413, a wrong API key a 401 (``Authorization: Bearer KEY``, as the openai client sends it; ``X-API-Key`` or
``?api_key=`` work too), a full queue a 429 with ``Retry-After``.

Batching: handlers decode and preprocess images (at most ``decode_threads`` at a time) and queue the request; one
worker thread owns the model. It waits for the oldest queued request at most ``max_wait_ms`` for others to come,
takes queued inputs up to ``max_batch_size`` and embeds the texts of all of them in one tokenizer + forward call and
the images of each mode in one forward call, then answers each request. The queue is bounded in inputs
(``max_queue``); a request whose client went away leaves the queue and is never embedded.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from internvl_fm.errors import ImageLoadError, ImageTooLargeError
from internvl_fm.models.configuration_internvl import MODES
from internvl_fm.serving import ModelCard, ModelList, read_capped_body, wait_for_disconnect
from internvl_fm.serving import serve_in_thread as run_in_thread
from internvl_fm.processing import load_image

from .embed import Embedder
from .errors import OptionError, check_int, check_number
from .server import _resolve_under

__all__ = ["EmbeddingsConfig", "EmbeddingsAPIError", "EmbeddingRequest", "EmbeddingResponse", "EmbeddingService",
           "router", "add_embeddings_api", "add_to_search_service", "create_embeddings_app", "serve_embeddings",
           "serve_in_thread"]

logger = logging.getLogger(__name__)

MODEL_NAMES = {mode.lower(): mode for mode in MODES}  # what `model` may say (any case) -> the embedding mode
BASE64_PREFIX = "base64:"  # raw base64 image data
PATH_PREFIXES = ("/", "./", "../", "file://")  # a string starting so (one line) is an image path
MAX_PATH_CHARS = 4096
REFUSED_PATH = "must name an image file under the server's image roots"


@dataclass
class EmbeddingsConfig:
    """Image roots, batching and limits of the embeddings API (checked when made)."""

    image_roots: list[str] = field(default_factory=list)  # image paths must lie under one of them; []: no paths
    max_batch_size: int = 32  # inputs per model call (1: one request after another)
    max_wait_ms: float = 5.0  # how long the oldest queued request waits for others to fill a batch
    max_queue: int = 1024  # inputs waiting for the model (more: 429)
    max_inputs: int = 256  # inputs per request
    max_input_chars: int = 20_000  # characters per text input
    max_image_pixels: int = 40_000_000  # a larger image is refused (413) before it is decoded
    max_upload_bytes: int = 32 * 2**20  # request body
    decode_threads: int = 4  # images decoded and preprocessed at once (each holds a decoded image in memory)
    request_timeout_s: float = 300.0  # a request not answered by then gets 503
    api_key: str | None = None

    def __post_init__(self):
        for name in ("max_batch_size", "max_queue", "max_inputs", "max_input_chars", "max_image_pixels",
                     "max_upload_bytes", "decode_threads"):
            check_int(name, getattr(self, name), 1)
        check_number("max_wait_ms", self.max_wait_ms, 0, 60_000)
        check_number("request_timeout_s", self.request_timeout_s, 0.001)
        if self.max_inputs > self.max_queue:
            raise OptionError("max_inputs", self.max_inputs, f"must be at most max_queue ({self.max_queue})")
        self.image_roots = [os.fspath(root) for root in self.image_roots]


class EmbeddingsAPIError(Exception):
    """A request the API refuses: HTTP ``status``, an OpenAI error ``code``, the ``param`` at fault, headers."""

    def __init__(self, status: int, message: str, code: str = "invalid_request", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers or {}

    def body(self) -> dict[str, Any]:
        kind = ("server_error" if self.status >= 500 else "rate_limit_error" if self.status == 429 else
                "authentication_error" if self.status == 401 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "code": self.code, "param": self.param}}


# ----------------------------------------------------------------------------------------------------- schema
def _config(info: ValidationInfo) -> EmbeddingsConfig:
    return (info.context or {}).get("config") or EmbeddingsConfig()


class EmbeddingRequest(BaseModel):
    """The body of ``POST /v1/embeddings`` (validate with ``context={"config": ...}``); ``input`` becomes a list."""

    model_config = ConfigDict(extra="ignore")

    input: list[str]
    model: str
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None
    user: str | None = None  # accepted, ignored

    @field_validator("input", mode="before")
    @classmethod
    def _strings(cls, value: Any, info: ValidationInfo) -> list[str]:
        config = _config(info)
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not values:
            raise ValueError("must be a string or a non-empty list of strings")
        if not all(isinstance(item, str) for item in values):
            if all(isinstance(item, (int, list)) and not isinstance(item, bool) for item in values):
                raise ValueError("token-id inputs are not supported by this server: send the texts as strings")
            raise ValueError("each input must be a string")
        if len(values) > config.max_inputs:
            raise ValueError(f"{len(values)} inputs, more than the limit of {config.max_inputs} per request")
        for i, item in enumerate(values):
            if not item:
                raise ValueError(f"input[{i}] is an empty string")
            if len(item) > config.max_input_chars and not item.startswith(("data:", "base64:")):
                raise ValueError(f"input[{i}] has {len(item)} characters, more than the limit of "
                                 f"{config.max_input_chars}")
        return values

    @classmethod
    def parse(cls, raw: bytes, config: EmbeddingsConfig) -> EmbeddingRequest:
        """Validate a raw JSON body; any problem is a 400 :class:`EmbeddingsAPIError` naming the field."""
        try:
            return cls.model_validate_json(raw, context={"config": config})
        except ValidationError as exc:
            error = exc.errors()[0]
            if error["type"] == "json_invalid" or not error["loc"]:
                raise EmbeddingsAPIError(400, f"the body is not a valid JSON object: {error['msg']}",
                                         code="invalid_json") from None
            where = str(error["loc"][0])
            raise EmbeddingsAPIError(400, f"{where}: {error['msg'].removeprefix('Value error, ')}",
                                     param=where) from None

    def mode(self) -> str:
        """The embedding mode ``model`` names (404 listing the valid names for any other)."""
        mode = MODEL_NAMES.get(self.model.lower())
        if mode is None:
            shown = self.model if len(self.model) <= 80 else self.model[:80] + "..."
            raise EmbeddingsAPIError(404, f"model {shown!r} does not exist here; use one of {', '.join(MODES)}",
                                     code="model_not_found", param="model")
        return mode


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


# ----------------------------------------------------------------------------------------------------- inputs
@dataclass
class InputItem:
    """One input, ready for the model: a text, or an image's pixel tensor [3, S, S]."""

    text: str | None = None
    pixels: torch.Tensor | None = None


def input_kind(value: str) -> Literal["text", "data_url", "base64", "path"]:
    """What an input string is (by its prefix only; nothing is decoded or opened here)."""
    if value[:11].lower() == "data:image/":
        return "data_url"
    if value.startswith(BASE64_PREFIX):
        return "base64"
    if value.startswith(PATH_PREFIXES) and "\n" not in value and "\r" not in value:
        return "path"
    return "text"


def _image_bytes(value: str, kind: str, position: int) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URL or of ``base64:...`` (400 when they are not base64)."""
    if kind == "data_url":
        header, comma, payload = value.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise EmbeddingsAPIError(400, f"input[{position}]: a data:image URL must be base64 "
                                          "(data:image/png;base64,...)", code="invalid_image", param="input")
    else:
        payload = value[len(BASE64_PREFIX):]
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise EmbeddingsAPIError(400, f"input[{position}]: the image is not valid base64", code="invalid_image",
                                 param="input") from None
    if not data:
        raise EmbeddingsAPIError(400, f"input[{position}]: the image holds no bytes", code="invalid_image",
                                 param="input")
    return data


# ----------------------------------------------------------------------------------------------------- service
def _settle(future: asyncio.Future, value: Any = None, error: BaseException | None = None) -> None:
    if not future.done():
        future.set_exception(error) if error is not None else future.set_result(value)


class EmbeddingJob:
    """One request between its handler (on the event loop) and the worker: its inputs and the future that gets
    ``(vectors [n, D] float32, text tokens)``."""

    def __init__(self, items: list[InputItem], mode: str, loop: asyncio.AbstractEventLoop):
        self.items, self.mode, self.loop = items, mode, loop
        self.arrived = time.monotonic()
        self.future: asyncio.Future = loop.create_future()
        self.future.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "not retrieved"
        self.cancelled = False

    def __len__(self) -> int:
        return len(self.items)

    def resolve(self, value: Any = None, error: BaseException | None = None) -> None:
        """Answer the handler (any thread)."""
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(_settle, self.future, value, error)


class EmbeddingService:
    """The model, the limits, the queue and the worker thread that alone runs the model.

    ``model`` is an InternVL-C/G model (``InternVLModel``: ``tokenizer``, ``encode_text``, ``embed_images``,
    ``image_processor``, ``embed_dim``) or a function returning one (called once, on first use). ``model_lock`` is
    held while a batch is embedded (the search service shares its own: one model call at a time across its routes).
    """

    def __init__(self, model: Embedder | Callable[[], Embedder], config: EmbeddingsConfig | None = None,
                 model_lock: threading.Lock | None = None):
        self.config = config or EmbeddingsConfig()
        self._source = model if callable(model) and not isinstance(model, torch.nn.Module) else (lambda: model)
        self._model: Any = None
        self._load_lock = threading.Lock()
        self._model_lock = model_lock if model_lock is not None else contextlib.nullcontext()
        self._decode = threading.BoundedSemaphore(self.config.decode_threads)
        self._cond = threading.Condition()
        self._queue: deque[EmbeddingJob] = deque()
        self._queued = 0  # inputs in the queue
        self._thread: threading.Thread | None = None
        self._closing = False
        self._last_batch_s = 0.1
        self.stats = {"requests": 0, "inputs": 0, "embedded_inputs": 0, "batches": 0, "model_calls": 0,
                      "largest_batch": 0, "cancelled": 0, "rejected": 0, "failed": 0}

    @property
    def model(self) -> Any:
        if self._model is None:
            with self._load_lock:
                if self._model is None:
                    self._model = self._source()
        return self._model

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    # ------------------------------------------------------------------------------------------- inputs
    def prepare(self, values: list[str]) -> list[InputItem]:
        """The inputs of one request, their images decoded and preprocessed (run in a handler thread when the
        request has images); 400 / 413 for a bad one."""
        items = []
        for position, value in enumerate(values):
            kind = input_kind(value)
            items.append(InputItem(text=value) if kind == "text" else
                         InputItem(pixels=self._pixels(value, kind, position)))
        return items

    def _pixels(self, value: str, kind: str, position: int) -> torch.Tensor:
        max_pixels, processor = self.config.max_image_pixels, self.model.image_processor
        if kind == "path":
            refused = EmbeddingsAPIError(400, f"input[{position}]: an image path {REFUSED_PATH}", code="invalid_image",
                                         param="input")
            if not self.config.image_roots:
                raise EmbeddingsAPIError(400, f"input[{position}]: image paths are disabled on this server (it has "
                                              "no image roots)", code="invalid_image", param="input")
            path = value.removeprefix("file://")
            path = _resolve_under(path, self.config.image_roots) if len(path) <= MAX_PATH_CHARS else None
            if path is None:
                raise refused
            with self._decode:
                try:
                    return processor.preprocess(load_image(path, max_pixels))
                except (ImageLoadError, OSError, ValueError, RuntimeError, SyntaxError):
                    raise refused from None
        data = _image_bytes(value, kind, position)
        with self._decode:
            try:
                return processor.preprocess(load_image(data, max_pixels))
            except ImageTooLargeError as exc:
                raise EmbeddingsAPIError(413, f"input[{position}]: the image is too large: {exc.reason}",
                                         code="image_too_large", param="input") from None
            except (ImageLoadError, OSError, ValueError, RuntimeError, SyntaxError) as exc:
                reason = exc.reason if isinstance(exc, ImageLoadError) else f"{type(exc).__name__}: {exc}"
                raise EmbeddingsAPIError(400, f"input[{position}]: cannot decode the image: {reason}",
                                         code="invalid_image", param="input") from None

    # ------------------------------------------------------------------------------------------- queue
    def check_room(self, inputs: int) -> None:
        """429 (with ``Retry-After``) when ``inputs`` more do not fit in the queue; 503 when closing."""
        if self._closing:
            raise EmbeddingsAPIError(503, "the server is shutting down", code="unavailable")
        if self._queued + inputs > self.config.max_queue:
            with self._cond:
                self.stats["rejected"] += 1
            raise EmbeddingsAPIError(429, f"{self._queued} inputs are waiting, the limit of this server is "
                                          f"{self.config.max_queue} (max_queue); retry later", code="queue_full",
                                     headers={"Retry-After": str(self.retry_after())})

    def submit(self, items: list[InputItem], mode: str) -> EmbeddingJob:
        """Queue a request (on the event loop)."""
        job = EmbeddingJob(items, mode, asyncio.get_running_loop())
        with self._cond:
            self.check_room(len(job))
            self._start_locked()
            self._queue.append(job)
            self._queued += len(job)
            self.stats["requests"] += 1
            self.stats["inputs"] += len(job)
            self._cond.notify()
        return job

    def cancel(self, job: EmbeddingJob) -> None:
        """The client is gone (or was answered): a queued request leaves the queue; a taken one is skipped unless the
        model has started on it."""
        if job.future.done():
            return
        job.cancelled = True
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                self._queued -= len(job)
                self.stats["cancelled"] += 1

    def retry_after(self) -> int:
        """Seconds a turned-away client should wait: about the time the queue takes to drain."""
        batches = max(1, self._queued // self.config.max_batch_size)
        return max(1, min(60, math.ceil(batches * self._last_batch_s)))

    def health(self) -> dict[str, Any]:
        with self._cond:
            alive = self._thread is None or self._thread.is_alive()
            status = "shutting_down" if self._closing else "ok" if alive else "stopped"
            return {"status": status, "models": list(MODES), "queued_inputs": self._queued, **self.stats}

    # ------------------------------------------------------------------------------------------- worker
    def start(self) -> None:
        with self._cond:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="internvl-embed-batcher", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker: queued requests get 503, the batch in hand finishes."""
        with self._cond:
            self._closing = True
            waiting, self._queue, self._queued = list(self._queue), deque(), 0
            self._cond.notify_all()
        for job in waiting:
            job.resolve(error=EmbeddingsAPIError(503, "the server is shutting down", code="unavailable"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            started = time.monotonic()
            try:
                self._embed(batch)
            except Exception as exc:  # the server's fault: fail this batch, keep serving
                logger.exception("embedding a batch of %d requests failed", len(batch))
                error = EmbeddingsAPIError(500, f"internal error while embedding: {exc!r}", code="server_error")
                with self._cond:
                    self.stats["failed"] += len(batch)
                for job in batch:
                    job.resolve(error=error)
            self._last_batch_s = time.monotonic() - started

    def _take(self) -> list[EmbeddingJob] | None:
        """The oldest queued requests, up to ``max_batch_size`` inputs (at least one request), once the batch is full
        or the oldest has waited ``max_wait_ms``; None when closing."""
        limit, wait = self.config.max_batch_size, self.config.max_wait_ms / 1000
        with self._cond:
            while True:
                while not self._queue:
                    if self._closing:
                        return None
                    self._cond.wait()
                deadline = self._queue[0].arrived + wait
                while self._queue and self._queued < limit and not self._closing:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._queue:
                    break
            batch, size = [], 0
            while self._queue and (not batch or size + len(self._queue[0]) <= limit):
                batch.append(self._queue.popleft())
                size += len(batch[-1])
            self._queued -= size
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], size)
            return batch

    @torch.inference_mode()
    def _embed(self, batch: list[EmbeddingJob]) -> None:
        """Embed the inputs of the batch's live requests (those whose client is still there once the model is free),
        texts together and images by mode, in chunks of ``max_batch_size`` (one model call each); answer each."""
        model, limit = self.model, self.config.max_batch_size
        with self._model_lock:
            jobs = [job for job in batch if not job.cancelled]
            with self._cond:
                self.stats["cancelled"] += len(batch) - len(jobs)
            vectors = [np.zeros((len(job), self.embed_dim), np.float32) for job in jobs]
            tokens = [0] * len(jobs)
            groups: dict[str | None, list[tuple[int, int, InputItem]]] = {}  # None: texts (alike in every mode)
            for j, job in enumerate(jobs):
                for i, item in enumerate(job.items):
                    groups.setdefault(None if item.text is not None else job.mode, []).append((j, i, item))
            for mode, entries in groups.items():
                for start in range(0, len(entries), limit):
                    chunk = entries[start:start + limit]
                    if mode is None:
                        out, counts = _embed_texts(model, [item.text for _, _, item in chunk])
                    else:
                        pixels = torch.stack([item.pixels for _, _, item in chunk])
                        out = model.embed_images(pixels, mode=mode, batch_size=len(chunk)).float().numpy()
                        counts = [0] * len(chunk)
                    for (j, i, _), row, count in zip(chunk, out, counts):
                        vectors[j][i] = row
                        tokens[j] += count
                    with self._cond:
                        self.stats["model_calls"] += 1
        with self._cond:
            self.stats["embedded_inputs"] += sum(len(job) for job in jobs)
        for job, rows, count in zip(jobs, vectors, tokens):
            job.resolve((rows, count))


def _embed_texts(model: Any, texts: list[str]) -> tuple[np.ndarray, list[int]]:
    """L2-normalised embeddings of ``texts`` (one tokenizer call, one forward) and the tokens each one used."""
    ids = model.tokenizer(texts, padding="longest")["input_ids"]
    counts = (ids > 0).sum(1).tolist()
    out = F.normalize(model.encode_text(ids.to(model.text_projection.device)).float(), dim=-1)
    return out.cpu().numpy(), counts


# ----------------------------------------------------------------------------------------------------- routes
async def _service(request: Request) -> EmbeddingService:  # async: FastAPI runs a sync dependency in a thread
    return request.app.state.embeddings


Service = Annotated[EmbeddingService, Depends(_service)]


async def require_key(request: Request, service: Service) -> None:
    """401 unless the request carries the API key (when the service has one)."""
    key = service.config.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = (token.strip() if scheme.lower() == "bearer" else "") or request.headers.get("x-api-key") or \
        request.query_params.get("api_key") or ""
    if not hmac.compare_digest(given.encode("utf-8", "replace"), key.encode()):
        raise EmbeddingsAPIError(401, "missing or wrong API key (header Authorization: Bearer KEY)",
                                 code="invalid_api_key")


router = APIRouter(dependencies=[Depends(require_key)])


@router.get("/v1/models", response_model=ModelList)
async def list_models() -> ModelList:
    return ModelList(data=[ModelCard(id=mode) for mode in MODES])


@router.post("/v1/embeddings", response_model=EmbeddingResponse,
             responses={code: {"description": "OpenAI-shaped error"} for code in (400, 401, 404, 413, 429, 503)})
async def create_embeddings(request: Request, service: Service) -> Response:
    """Embeddings of texts and images (see the module docstring for what counts as an image)."""
    config = service.config
    try:
        raw = await read_capped_body(request, config.max_upload_bytes)
        if raw is None:
            raise EmbeddingsAPIError(413, f"request body over {config.max_upload_bytes} bytes",
                                    code="request_too_large")
    except ClientDisconnect:
        return Response(status_code=499)
    body = EmbeddingRequest.parse(raw, config)
    mode = body.mode()
    if body.dimensions is not None and body.dimensions != service.embed_dim:
        raise EmbeddingsAPIError(400, f"dimensions: this model's embeddings have {service.embed_dim} dimensions, "
                                      f"got {body.dimensions}", param="dimensions")
    texts = sum(input_kind(value) == "text" for value in body.input)
    if texts and getattr(service.model, "tokenizer", None) is None:
        raise EmbeddingsAPIError(400, "this model has no tokenizer: it embeds images only", param="input")
    service.check_room(len(body.input))  # before any image is decoded
    if texts == len(body.input):
        items = [InputItem(text=value) for value in body.input]
    else:
        items = await run_in_threadpool(service.prepare, body.input)
    job = service.submit(items, mode)
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait((job.future, gone), timeout=config.request_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if job.future not in done:
            if gone in done:
                return Response(status_code=499)  # nobody reads it
            raise EmbeddingsAPIError(503, f"no answer within {config.request_timeout_s:g} s (request_timeout_s); "
                                          "retry later", code="timeout",
                                     headers={"Retry-After": str(service.retry_after())})
        vectors, tokens = job.future.result()
    finally:
        gone.cancel()
        service.cancel(job)
    if body.encoding_format == "base64":
        embeddings: list[Any] = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in vectors]
    else:
        embeddings = vectors.tolist()
    response = EmbeddingResponse(data=[EmbeddingData(index=i, embedding=e) for i, e in enumerate(embeddings)],
                                 model=mode, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
    return Response(response.model_dump_json(), media_type="application/json")


async def _api_error(_: Request, exc: EmbeddingsAPIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def add_embeddings_api(app: FastAPI, model: Embedder | Callable[[], Embedder], config: EmbeddingsConfig | None = None,
                       model_lock: threading.Lock | None = None) -> EmbeddingService:
    """Mount ``/v1/embeddings`` and ``/v1/models`` on ``app`` (its service is ``app.state.embeddings``; the worker
    starts with the first request)."""
    service = EmbeddingService(model, config, model_lock)
    app.state.embeddings = service
    app.add_exception_handler(EmbeddingsAPIError, _api_error)
    app.include_router(router)
    return service


def add_to_search_service(app: FastAPI) -> EmbeddingService:
    """Mount the API on a search service (``server.create_app``): the index's model (loaded on first use), its image
    roots, the service's API key, upload and pixel limits, and its model lock."""
    search = app.state.service
    index, limits = search.index, search.config
    config = EmbeddingsConfig(image_roots=index.image_roots, api_key=limits.api_key,
                              max_image_pixels=limits.max_image_pixels, max_upload_bytes=limits.max_upload_bytes)
    return add_embeddings_api(app, lambda: index.model, config, model_lock=search.model_lock)


# ----------------------------------------------------------------------------------------------------- serving
@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    app.state.embeddings.start()
    try:
        yield
    finally:
        await run_in_threadpool(app.state.embeddings.close)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing errors (404, 405) in the OpenAI shape."""
    error = EmbeddingsAPIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else
                               "invalid_request")
    return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


def create_embeddings_app(model: Embedder | Callable[[], Embedder], config: EmbeddingsConfig | None = None,
                          model_lock: threading.Lock | None = None) -> FastAPI:
    """The FastAPI app of ``internvl-fm serve-embed``: the embeddings API and ``GET /health`` (no key needed)."""
    app = FastAPI(title="internvl-fm embeddings", docs_url=None, redoc_url=None, lifespan=_lifespan)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    service = add_embeddings_api(app, model, config, model_lock)

    @app.get("/health")
    def health() -> JSONResponse:
        state = service.health()
        return JSONResponse(state, status_code=200 if state["status"] == "ok" else 503)

    return app


def serve_embeddings(model: Embedder, host: str = "127.0.0.1", port: int = 8000,
                     config: EmbeddingsConfig | None = None) -> None:
    """Run the embeddings server with uvicorn (blocking; binds 127.0.0.1 unless told otherwise)."""
    import uvicorn

    uvicorn.run(create_embeddings_app(model, config), host=host, port=port, log_level="warning")


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                    start_timeout_s: float = 60.0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread (tests, benchmarks, notebooks) and yield its base URL
    (``port=0``: a free port); on exit the server stops and the embeddings worker with it."""
    def close_worker() -> None:
        service = getattr(app.state, "embeddings", None)
        if service is not None:
            service.close()

    with run_in_thread(app, host, port, start_timeout_s, name="internvl-embed-uvicorn",
                       after_stop=close_worker) as url:
        yield url
