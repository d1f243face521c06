"""An OpenAI-compatible chat server for InternVL-Chat: ``/v1/chat/completions`` (JSON or SSE stream), ``/v1/models``,
``/health``.

The request body is validated once, at the boundary, by pydantic models (:class:`ChatCompletionRequest`); the routes
live on an ``APIRouter`` (:data:`router`) that reads the :class:`ChatService` from ``app.state``. Images come as
``image_url`` content parts: ``data:`` URLs, local files under an allowed root (plain paths or ``file://`` URLs) and,
only when enabled, ``http(s)://`` URLs; a queued request holds only their bytes or paths, and they are decoded by the
core ``internvl_fm.processing.load_image`` and tiled by the model's
:class:`~internvl_fm.processing_internvl_chat.InternVLChatProcessor` when the request is scheduled.

One generation thread owns the model (request handlers never touch it): it takes the queued requests that sample
alike, up to ``max_batch_size``, and answers them with one left-padded ``generate`` call. A stopping criterion checks
every request at every step, so a request ends on its own (end token, ``max_tokens``, the wall-clock cap, the client
gone) and its answer is sent at once. The queue is bounded (full: 429 with ``Retry-After``); request bytes, image
count and pixels, prompt tokens and time per request are capped. Errors are JSON bodies in the OpenAI shape
``{"error": {"message", "type", "code", "param"}}``.
"""
# FastAPI reads endpoint annotations at runtime: this module therefore avoids `from __future__ import annotations`
import asyncio
import base64
import binascii
import copy
import io
import json
import logging
import math
import os
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect
from transformers import StoppingCriteria, StoppingCriteriaList

from internvl_fm.chat_templates import IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, with_image_placeholders
from internvl_fm.errors import ImageLoadError
from internvl_fm.errors import ImageTooLargeError
from internvl_fm.serving import (ErrorInfo, ErrorResponse, ModelCard, ModelList, read_capped_body,
                                 wait_for_disconnect)
from internvl_fm.serving import serve_in_thread as run_in_thread
from internvl_fm.processing import load_image
from internvl_fm.processing_internvl_chat import ChatInputs

__all__ = ["ServerSettings", "ChatRequestError", "ChatCompletionRequest", "ChatCompletion", "ChatService",
           "GenerationJob", "ImageSource", "router", "create_app", "serve", "serve_in_thread"]

logger = logging.getLogger(__name__)

MAX_PATH_CHARS = 1024  # longer image paths are refused before they reach the file system


@dataclass
class ServerSettings:
    """Limits and sources of the chat server."""

    model_name: str = "internvl-chat"
    allowed_root: Optional[Path] = None  # local image files must live under it; None disables local files
    allow_http: bool = False
    max_request_bytes: int = 20 * 1024 * 1024
    max_images: int = 8
    max_image_pixels: int = 4096 * 4096
    max_new_tokens: int = 1024
    max_tiles: Optional[int] = None  # per image; default: the model config's max_dynamic_patch
    max_prompt_tokens: Optional[int] = None  # images included; default: the LLM's max_position_embeddings
    request_timeout_s: float = 300.0  # wall-clock cap from arrival: queue wait + generation
    max_queue: int = 64  # requests waiting for the generator (full: 429)
    max_batch_size: int = 16  # requests answered by one generate call (1: one after another)
    stall_timeout_s: float = 60.0  # /health answers 503 when the generator made no progress for this long with work
    shutdown_grace_s: float = 10.0  # on SIGTERM, requests in flight get this long to finish, then they are cut
    http_timeout_s: float = 10.0
    generation_defaults: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_images", "max_image_pixels", "max_new_tokens", "max_tiles",
                     "max_prompt_tokens", "max_queue", "max_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"server setting {name} must be >= 1, got {value}")
        for name in ("request_timeout_s", "stall_timeout_s", "http_timeout_s", "shutdown_grace_s"):
            value, bound = getattr(self, name), ">= 0" if name == "shutdown_grace_s" else "> 0"
            if not math.isfinite(value) or value < 0 or (value == 0 and bound == "> 0"):
                raise ValueError(f"server setting {name} must be a finite number of seconds {bound}, got {value}")


class ChatRequestError(Exception):
    """A request the server rejects: HTTP ``status``, an OpenAI-style error ``code`` and optional response headers."""

    def __init__(self, status: int, message: str, code: str = "invalid_request", param: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = "server_error" if self.status >= 500 else \
            "rate_limit_error" if self.status == 429 else "invalid_request_error"
        return ErrorResponse(error=ErrorInfo(message=self.message, type=kind, code=self.code,
                                             param=self.param)).model_dump()


def _shown(text: str, limit: int = 120) -> str:
    """``text`` for an error message: at most ``limit`` characters."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


# ---------------------------------------------------------------------------------------------------------- schema
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ImageURL(_Strict):
    url: str = ""
    detail: Optional[str] = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str = ""


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: Union[ImageURL, str]

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None

    def text_and_urls(self) -> tuple[str, list[str]]:
        if self.content is None or isinstance(self.content, str):
            return self.content or "", []
        texts = [part.text for part in self.content if isinstance(part, TextPart)]
        urls = [part.url for part in self.content if isinstance(part, ImagePart)]
        if not all(urls):
            raise ChatRequestError(400, "an image_url part has no url", code="missing_image", param="image_url")
        return "\n".join(texts), urls


@dataclass
class ParsedChat:
    """A chat request as ``chat()`` arguments: the turns with their ``<image>`` placeholders and the images, not yet
    decoded (:class:`ImageSource`)."""

    question: str
    history: list[tuple[str, str]]
    system: Optional[str]
    images: list["ImageSource"]
    generation: dict[str, Any]
    stream: bool


class ChatCompletionRequest(_Strict):
    """The body of ``POST /v1/chat/completions`` (the OpenAI fields this server uses; others are ignored)."""

    model: Optional[str] = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: Optional[float] = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    stream: bool = False

    @classmethod
    def parse(cls, raw: bytes) -> "ChatCompletionRequest":
        """Validate a raw JSON body; any problem is a :class:`ChatRequestError` naming the field."""
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            error = max(exc.errors(), key=lambda e: len(e["loc"]))  # the deepest: inside a union, the closest branch
            if error["type"] == "json_invalid" or not error["loc"]:
                raise ChatRequestError(400, f"request body is not a valid JSON object: {error['msg']}",
                                       code="invalid_json") from None
            where = ".".join(str(part) for part in _field_path(error["loc"]))
            raise ChatRequestError(400, f"{where}: {error['msg']}", param=str(error["loc"][0])) from None

    def to_chat(self, settings: ServerSettings) -> ParsedChat:
        """Check what the schema cannot (model name, turn order, images against placeholders) and find the images:
        their bytes or paths, decoded only when the request is scheduled."""
        if self.model not in (None, settings.model_name):
            raise ChatRequestError(404, f"model {_shown(self.model)!r} does not exist; this server serves "
                                        f"{settings.model_name!r}", code="model_not_found", param="model")
        system: Optional[str] = None
        turns: list[tuple[str, Optional[str]]] = []
        urls: list[str] = []
        for message in self.messages:
            text, message_urls = message.text_and_urls()
            if IMG_CONTEXT_TOKEN in text:  # would break the image splice of the whole batch
                raise ChatRequestError(400, f"the messages hold the reserved token {IMG_CONTEXT_TOKEN}; remove it",
                                       param="messages")
            if message.role == "system":
                system = text if system is None else system + "\n" + text
            elif message.role == "user":
                if turns and turns[-1][1] is None:
                    raise ChatRequestError(400, "two user messages in a row; merge them into one", param="messages")
                turns.append((with_image_placeholders(text, len(message_urls)), None))
                urls += message_urls
            else:
                if not turns or turns[-1][1] is not None:
                    raise ChatRequestError(400, "an assistant message must follow a user message", param="messages")
                turns[-1] = (turns[-1][0], text)
        if not turns or turns[-1][1] is not None:
            raise ChatRequestError(400, "the last message must come from the user", param="messages")
        if len(urls) > settings.max_images:
            raise ChatRequestError(400, f"{len(urls)} images in the request, more than the limit of "
                                        f"{settings.max_images}", code="too_many_images")
        placeholders = sum(q.count(IMAGE_PLACEHOLDER) for q, _ in turns)
        if placeholders != len(urls):
            raise ChatRequestError(400, f"the messages hold {placeholders} {IMAGE_PLACEHOLDER} placeholders but "
                                        f"{len(urls)} images", code="missing_image")
        max_tokens = self.max_completion_tokens or self.max_tokens or min(256, settings.max_new_tokens)
        generation: dict[str, Any] = {**settings.generation_defaults,
                                      "max_new_tokens": min(max_tokens, settings.max_new_tokens)}
        if self.temperature:
            generation.update(do_sample=True, temperature=self.temperature)
            if self.top_p is not None:
                generation["top_p"] = self.top_p
        else:
            generation["do_sample"] = False
        images = [image_source(url, settings) for url in urls]
        for image in images:
            image.check(settings.max_image_pixels)
        return ParsedChat(question=turns[-1][0], history=[(q, a) for q, a in turns[:-1]], system=system,
                          images=images, generation=generation, stream=self.stream)


def _field_path(loc: tuple) -> list:
    """A pydantic error location up to the first union branch label (``str``, ``list[...]``, ``ImageURL``)."""
    path = []
    for part in loc:
        if isinstance(part, str) and ("[" in part or part[:1].isupper() or part in ("str", "int", "float", "bool")):
            break
        path.append(part)
    return path


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ChunkChoice(BaseModel):
    index: int = 0
    delta: dict[str, str]
    finish_reason: Optional[Literal["stop", "length"]] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]


# ---------------------------------------------------------------------------------------------------------- images
def _decode_image(data: bytes, source: str, max_pixels: int):
    try:
        return load_image(data, max_pixels)
    except ImageTooLargeError as exc:
        raise ChatRequestError(413, f"image {source} is too large: {exc.reason}", code="image_too_large") from exc
    except ImageLoadError as exc:  # the client's bad input
        raise ChatRequestError(400, f"cannot decode image {source}: {exc.reason}", code="invalid_image") from exc


@dataclass
class ImageSource:
    """An image of a request, not decoded: its bytes (``data:`` and http(s) URLs) or a checked path under the allowed
    root. :meth:`check` reads its header when the request arrives, :meth:`load` decodes it when it is scheduled."""

    name: str
    data: Optional[bytes] = None
    path: Optional[Path] = None

    def check(self, max_pixels: int) -> None:
        """Read the header only (format, size): data that is no image is a 400, too many pixels a 413, before the
        request is queued."""
        from PIL import Image, UnidentifiedImageError

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(self.data) if self.data is not None else self.path) as image:
                    width, height = image.size
        except Image.DecompressionBombError as exc:
            raise ChatRequestError(413, f"image {self.name} is too large: {exc}", code="image_too_large") from exc
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise ChatRequestError(400, f"cannot decode image {self.name}: {exc}", code="invalid_image") from exc
        if width * height > max_pixels:
            raise ChatRequestError(413, f"image {self.name} is too large: {width}x{height} pixels exceeds the limit of "
                                        f"{max_pixels}", code="image_too_large")

    def load(self, max_pixels: int):
        """The RGB PIL image; :class:`ChatRequestError` (400 / 413) when it cannot be read or decoded."""
        data = self.data
        if data is None:
            try:
                data = self.path.read_bytes()
            except OSError as exc:
                raise ChatRequestError(400, f"cannot read image file {self.name}: {exc.strerror}",
                                       code="missing_image") from exc
        return _decode_image(data, self.name, max_pixels)


def image_source(url: str, settings: ServerSettings) -> ImageSource:
    """Resolve one ``image_url`` to its bytes or path, enforcing the server's sources and caps (nothing is decoded)."""
    if not url:
        raise ChatRequestError(400, "image_url.url is missing or empty", code="missing_image", param="image_url")
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise ChatRequestError(400, "data: image URLs must be base64 encoded", code="invalid_image")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ChatRequestError(400, f"invalid base64 image data: {exc}", code="invalid_image") from exc
        if not data:
            raise ChatRequestError(400, "the data: image URL holds no bytes", code="invalid_image")
        return ImageSource("(data URL)", data=data)
    if url.startswith(("http://", "https://")):
        return ImageSource(_shown(url), data=_fetch_http(url, settings))
    path_text = url.removeprefix("file://")
    if settings.allowed_root is None:
        raise ChatRequestError(403, "local image files are disabled on this server (start it with --allowed-root)",
                               code="path_not_allowed")
    if "\x00" in path_text or len(path_text) > MAX_PATH_CHARS:
        raise ChatRequestError(400, f"image path {_shown(path_text)!r} is not a valid path (a NUL byte or over "
                                    f"{MAX_PATH_CHARS} characters)", code="invalid_image_path", param="image_url")
    root = Path(settings.allowed_root).resolve()
    try:
        path = Path(path_text)
        path = (path if path.is_absolute() else root / path).resolve()
        if not path.is_relative_to(root):
            raise ChatRequestError(403, f"image path {_shown(path_text)} is outside the allowed root",
                                   code="path_not_allowed")
        if not path.is_file():
            raise ChatRequestError(400, f"image file not found: {_shown(path_text)}", code="missing_image")
        size = path.stat().st_size
    except OSError as exc:  # too long a component, a loop of links...
        raise ChatRequestError(400, f"image path {_shown(path_text)!r} cannot be used: {exc.strerror}",
                               code="invalid_image_path", param="image_url") from exc
    if size > settings.max_request_bytes:
        raise ChatRequestError(413, f"image file {_shown(path_text)} is too large", code="image_too_large")
    return ImageSource(_shown(path_text), path=path)


def _fetch_http(url: str, settings: ServerSettings) -> bytes:
    if not settings.allow_http:
        raise ChatRequestError(400, "http(s) image URLs are disabled on this server (start it with --allow-http)",
                               code="http_images_disabled")
    import httpx

    try:
        with httpx.stream("GET", url, timeout=settings.http_timeout_s, follow_redirects=True) as response:
            response.raise_for_status()
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > settings.max_request_bytes:
                    raise ChatRequestError(413, f"image at {url} is larger than {settings.max_request_bytes} bytes",
                                           code="image_too_large")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise ChatRequestError(400, f"cannot fetch image {url}: {exc}", code="missing_image") from exc
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------------------- jobs
def _settle(future: asyncio.Future, value: Any = None, error: Optional[BaseException] = None) -> None:
    """Resolve ``future`` unless it is resolved already (runs on the event loop)."""
    if not future.done():
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # nobody may wait any more (client gone): no "exception was never retrieved" log


class GenerationJob:
    """One request between its route (on the event loop) and the generation thread.

    The route awaits :attr:`started` (the prompt token count once the request is scheduled and its inputs built) and
    then :attr:`result` (``(text, completion_tokens, finish_reason)``) or, for a stream, the ``("delta", text)`` /
    ``("end", finish_reason)`` / ``("error", ChatRequestError)`` items of :attr:`events`. The generation thread
    resolves them through ``loop.call_soon_threadsafe``; :attr:`cancelled` tells it the client is gone.
    """

    def __init__(self, parsed: ParsedChat, loop: asyncio.AbstractEventLoop, timeout_s: float):
        self.parsed = parsed
        self.loop = loop
        self.deadline = time.monotonic() + timeout_s
        self.max_new_tokens = int(parsed.generation["max_new_tokens"])
        sampling = {k: v for k, v in parsed.generation.items() if k != "max_new_tokens"}
        self.sampling_key = repr(sorted(sampling.items()))  # requests that sample alike share a generate call
        self.started: asyncio.Future = loop.create_future()
        self.result: asyncio.Future = loop.create_future()
        for future in (self.started, self.result):
            future.add_done_callback(_retrieved)
        self.events: Optional[asyncio.Queue] = asyncio.Queue() if parsed.stream else None
        self.cancelled = False
        # generation thread only
        self.running = False
        self.finished = False
        self.stop = ""
        self.prompt_tokens = 0
        self.seen = ""  # streams: the answer decoded at the previous step
        self.sent = ""  # streams: the text already sent, a prefix of every later answer

    def _post(self, callback: Any, *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed: nobody waits for this request any more
            pass

    def begin(self, inputs: ChatInputs) -> None:
        self.running, self.stop, self.prompt_tokens = True, inputs.stop, int(inputs.input_ids.shape[1])
        self._post(_settle, self.started, self.prompt_tokens)

    def fail(self, error: ChatRequestError) -> None:
        self.finished = True
        if not self.running:
            self._post(_settle, self.started, None, error)
        elif self.events is not None:
            self._post(self.events.put_nowait, ("error", error))
        else:
            self._post(_settle, self.result, None, error)

    def send(self, answer: str) -> None:
        """Stream the part of ``answer`` (the answer so far) that the next step cannot change any more."""
        stable = os.path.commonprefix([self.seen, answer])
        self.seen = answer
        if len(stable) > len(self.sent) and stable.startswith(self.sent):
            self._post(self.events.put_nowait, ("delta", stable[len(self.sent):]))
            self.sent = stable

    def finish(self, answer: str, completion_tokens: int, reason: str) -> None:
        self.finished = True
        if self.events is None:
            self._post(_settle, self.result, (answer, completion_tokens, reason))
            return
        if answer.startswith(self.sent) and len(answer) > len(self.sent):
            self._post(self.events.put_nowait, ("delta", answer[len(self.sent):]))
        self._post(self.events.put_nowait, ("end", reason))


class _BatchMonitor(StoppingCriteria):
    """Called by ``generate`` after every step: ends each request of the batch on its own (end token, its
    ``max_tokens``, its deadline, its client gone), streams new text, and marks the generator's progress."""

    def __init__(self, service: "ChatService", jobs: list[GenerationJob], eos_token_id: int):
        self.service, self.jobs, self.eos_token_id = service, jobs, eos_token_id
        self.offset: Optional[int] = None  # where the new tokens start in the ids generate passes

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        now = self.service.beat()
        if self.offset is None:
            self.offset = input_ids.shape[1] - 1
        last = input_ids[:, -1].tolist()
        for i, job in enumerate(self.jobs):
            if job.finished:
                continue
            new_ids = input_ids[i, self.offset:]
            if last[i] == self.eos_token_id:
                self.service.finish(job, new_ids, "stop")
            elif job.cancelled:
                job.finished = True
                self.service.count("cancelled")
            elif len(new_ids) >= job.max_new_tokens or now >= job.deadline:
                self.service.finish(job, new_ids, "length")
            elif job.events is not None:
                job.send(self.service.decode(new_ids, job.stop))
        return torch.tensor([job.finished for job in self.jobs], device=input_ids.device)

    def close(self, output_ids: torch.Tensor) -> None:
        """Finish the requests still open when ``generate`` returned (its own length limit)."""
        for i, job in enumerate(self.jobs):
            if not job.finished:
                ids = output_ids[i]
                ends = (ids == self.eos_token_id).nonzero()
                if len(ends):
                    self.service.finish(job, ids[: int(ends[0]) + 1], "stop")
                else:
                    self.service.finish(job, ids, "length")


# ---------------------------------------------------------------------------------------------------------- service
class ChatService:
    """The model, its processor, the settings and the generation thread that alone runs the model.

    :meth:`submit` queues a request (bounded: 429 when full); the thread answers the queued requests that sample
    alike together, in one ``generate`` call. The model is never changed: a request's system message goes through the
    call.
    """

    def __init__(self, model, tokenizer, settings: ServerSettings):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.processor = model.get_processor(tokenizer)
        llm_context = getattr(model.config.llm_config, "max_position_embeddings", None)
        self.max_prompt_tokens = settings.max_prompt_tokens or llm_context or 32768
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else self.processor.stop_token()[1]
        try:  # handlers count prompt tokens on their own copy: the generation thread's tokenizer is never shared
            self._counter = model.get_processor(copy.deepcopy(tokenizer))
        except (TypeError, RuntimeError, copy.Error):  # uncopyable: prompts are counted when scheduled only
            self._counter = None
        self._counter_lock = threading.Lock()
        self._cond = threading.Condition()
        self._queue: deque[GenerationJob] = deque()
        self._running: list[GenerationJob] = []
        self._thread: Optional[threading.Thread] = None
        self._closing = False
        self._crash: Optional[BaseException] = None
        self._progress = time.monotonic()
        self._last_batch_s = 1.0
        self.stats = {"submitted": 0, "completed": 0, "cancelled": 0, "rejected": 0, "batches": 0,
                      "largest_batch": 0, "generated_tokens": 0}

    # ------------------------------------------------------------------------------------------------ inputs
    def pixel_values(self, images: list[Any]) -> tuple[Optional[torch.Tensor], list[int]]:
        """Tiles of decoded images (up to ``max_tiles`` each) on the model's device and dtype, and tiles per image."""
        pixel_values, num_patches = self.processor.preprocess_images(images, max_num=self.settings.max_tiles)
        if pixel_values is not None:
            pixel_values = pixel_values.to(device=self.model.device, dtype=self.model.dtype)
        return pixel_values, num_patches

    def prepare(self, parsed: ParsedChat) -> ChatInputs:
        """Decode the images and build the prompt; a prompt over ``max_prompt_tokens`` or one that holds the reserved
        image token in its text is a :class:`ChatRequestError` (400)."""
        images = [source.load(self.settings.max_image_pixels) if isinstance(source, ImageSource) else source
                  for source in parsed.images]
        pixel_values, num_patches = self.pixel_values(images)
        inputs = self.model.prepare_chat_inputs(self.tokenizer, pixel_values, parsed.question, history=parsed.history,
                                                num_patches_list=num_patches or None, system_message=parsed.system)
        self._check_prompt_tokens(int(inputs.input_ids.shape[1]))
        if self.processor.image_token_id is not None:  # a literal <IMG_CONTEXT> in the text breaks the batch
            slots = int((inputs.input_ids == self.processor.image_token_id).sum())
            if slots != self.processor.num_image_token * sum(num_patches):
                raise ChatRequestError(400, f"the messages hold the reserved token {IMG_CONTEXT_TOKEN}; remove it",
                                       param="messages")
        return inputs

    def _check_prompt_tokens(self, count: int, at_least: bool = False) -> None:
        if count > self.max_prompt_tokens:
            raise ChatRequestError(400, f"the prompt is {'at least ' if at_least else ''}{count} tokens long, over "
                                        f"the limit of max_prompt_tokens={self.max_prompt_tokens}",
                                   code="prompt_too_long", param="messages")

    def check_prompt_length(self, parsed: ParsedChat) -> None:
        """Refuse (400) a prompt over ``max_prompt_tokens`` before it is queued: its text with one tile per image,
        a lower bound of the scheduled prompt (run by request handlers, on their own tokenizer copy)."""
        if self._counter is None:
            return
        _, query = self._counter.build_query(parsed.question, [1] * len(parsed.images), parsed.history,
                                             parsed.system)
        with self._counter_lock:
            count = int(self._counter.tokenize(query)["input_ids"].shape[1])
        self._check_prompt_tokens(count, at_least=True)

    def decode(self, ids: torch.Tensor, stop: str) -> str:
        """One request's generated ids as ``chat()`` answers them."""
        return self.processor.decode(ids.unsqueeze(0), stop)[0]

    # ------------------------------------------------------------------------------------------------ queue
    def submit(self, parsed: ParsedChat) -> GenerationJob:
        """Queue a request (called on the event loop); 429 when the queue is full, 503 when shutting down."""
        job = GenerationJob(parsed, asyncio.get_running_loop(), self.settings.request_timeout_s)
        with self._cond:
            if self._closing or self._crash is not None:
                raise ChatRequestError(503, "the server is shutting down" if self._closing else
                                       "the generator stopped after an internal error", code="unavailable")
            if len(self._queue) >= self.settings.max_queue:
                self.stats["rejected"] += 1
                raise ChatRequestError(429, f"{len(self._queue)} requests are waiting, the limit of this server "
                                            "(max_queue); retry later", code="queue_full",
                                       headers={"Retry-After": str(self.retry_after())})
            if not self._queue and not self._running:
                self._progress = time.monotonic()  # idle until now: the stall clock starts here
            self._start_locked()
            self._queue.append(job)
            self.stats["submitted"] += 1
            self._cond.notify()
        return job

    def cancel(self, job: GenerationJob) -> None:
        """The client is gone (or the answer was sent): a queued request leaves the queue, a running one stops at
        the next step."""
        job.cancelled = True
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                self.stats["cancelled"] += 1

    def retry_after(self) -> int:
        """Seconds a client turned away should wait: about one batch."""
        return max(1, min(60, math.ceil(self._last_batch_s)))

    def count(self, name: str, n: int = 1) -> None:
        with self._cond:
            self.stats[name] += n

    def beat(self) -> float:
        """Mark progress of the generator; returns the time."""
        self._progress = now = time.monotonic()
        return now

    def health(self) -> dict[str, Any]:
        """``status`` ``ok``, ``stalled`` (work waits and the generator made no progress for ``stall_timeout_s``),
        ``stopped`` (the generator died) or ``shutting_down``, with the queue and batch sizes."""
        with self._cond:
            queued, running = len(self._queue), len(self._running)
            idle = time.monotonic() - self._progress
            dead = self._crash is not None or (self._thread is not None and not self._thread.is_alive()
                                               and not self._closing)
            status = "stopped" if dead else "shutting_down" if self._closing else \
                "stalled" if (queued or running) and idle > self.settings.stall_timeout_s else "ok"
        return {"status": status, "model": self.settings.model_name, "queued": queued, "running": running,
                "seconds_since_progress": round(idle, 3) if queued or running else 0.0}

    # ------------------------------------------------------------------------------------------------ thread
    def start(self) -> None:
        """Start the generation thread (done by the first request or the app's startup)."""
        with self._cond:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="internvl-chat-generator", daemon=True)
            self._thread.start()

    def begin_shutdown(self) -> None:
        """Stop taking requests: queued ones get 503, running ones ``shutdown_grace_s`` more seconds at most."""
        with self._cond:
            self._closing = True
            waiting, self._queue = list(self._queue), deque()
            cut = time.monotonic() + self.settings.shutdown_grace_s
            for job in self._running:
                job.deadline = min(job.deadline, cut)
            self._cond.notify_all()
        for job in waiting:
            job.fail(ChatRequestError(503, "the server is shutting down; retry on another instance",
                                      code="unavailable", headers={"Retry-After": "1"}))

    def close(self, timeout: Optional[float] = None) -> None:
        """:meth:`begin_shutdown` and wait for the generation thread to end."""
        self.begin_shutdown()
        if self._thread is not None:
            self._thread.join(self.settings.shutdown_grace_s + 5 if timeout is None else timeout)

    def _run(self) -> None:
        batch: Optional[list[GenerationJob]] = []
        try:
            while (batch := self._take_batch()) is not None:
                began = time.monotonic()
                self._generate(batch)
                self._last_batch_s = time.monotonic() - began
                with self._cond:
                    self._running = []
        except BaseException as exc:  # a bug: fail what waits, /health says "stopped"
            logger.exception("the chat generator stopped")
            with self._cond:
                self._crash, self._running = exc, []
                waiting, self._queue = [*(batch or []), *self._queue], deque()
            for job in waiting:
                if not job.finished:
                    job.fail(ChatRequestError(500, f"internal error in the generator: {exc!r}", code="server_error"))

    def _take_batch(self) -> Optional[list[GenerationJob]]:
        """The oldest request and the queued ones that sample alike, up to ``max_batch_size``; None when closing."""
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch, rest = [first], deque()
            for job in self._queue:
                if len(batch) < self.settings.max_batch_size and job.sampling_key == first.sampling_key:
                    batch.append(job)
                else:
                    rest.append(job)
            self._queue, self._running = rest, batch
            self._progress = time.monotonic()
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
            return batch

    def _generate(self, batch: list[GenerationJob]) -> None:
        ready: list[tuple[GenerationJob, ChatInputs]] = []
        for job in batch:  # images are decoded here, when the request is scheduled
            if job.cancelled:
                job.finished = True
                self.count("cancelled")
                continue
            try:
                inputs = self.prepare(job.parsed)
            except ChatRequestError as exc:
                job.fail(exc)
                continue
            except Exception as exc:  # the server's fault, for this request only
                logger.exception("cannot build the prompt of a request")
                job.fail(ChatRequestError(500, f"internal error building the prompt: {exc!r}", code="server_error"))
                continue
            finally:
                self.beat()
            job.begin(inputs)
            ready.append((job, inputs))
        if not ready:
            return
        jobs = [job for job, _ in ready]
        pixel_values, input_ids, attention_mask = self._collate([inputs for _, inputs in ready])
        eos_token_id = ready[0][1].eos_token_id
        generation = {"pad_token_id": self.pad_token_id, **jobs[0].parsed.generation,
                      "max_new_tokens": max(job.max_new_tokens for job in jobs), "eos_token_id": eos_token_id}
        monitor = _BatchMonitor(self, jobs, eos_token_id)
        try:
            output_ids = self.model.generate(
                pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                image_token_id=self.processor.image_token_id, stopping_criteria=StoppingCriteriaList([monitor]),
                **generation)
        except Exception as exc:  # fail this batch, keep serving
            logger.exception("generate failed for a batch of %d requests", len(jobs))
            for job in jobs:
                if not job.finished:
                    job.fail(ChatRequestError(500, f"internal error while generating: {exc!r}", code="server_error"))
            return
        monitor.close(output_ids)

    def _collate(self, prepared: list[ChatInputs]) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
        """The requests' pixels in order and their prompts left-padded into one batch."""
        pixels = [inputs.pixel_values for inputs in prepared if inputs.pixel_values is not None]
        width = max(inputs.input_ids.shape[1] for inputs in prepared)
        device = prepared[0].input_ids.device
        input_ids = torch.full((len(prepared), width), self.pad_token_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros((len(prepared), width), dtype=torch.long, device=device)
        for row, inputs in enumerate(prepared):
            length = inputs.input_ids.shape[1]
            input_ids[row, width - length:] = inputs.input_ids[0]
            attention_mask[row, width - length:] = inputs.attention_mask[0]
        return (torch.cat(pixels) if pixels else None), input_ids, attention_mask

    def finish(self, job: GenerationJob, ids: torch.Tensor, reason: str) -> None:
        """Send a request its answer (generation thread)."""
        answer = self.decode(ids, job.stop)
        with self._cond:  # counted before the client can see the answer
            self.stats["completed"] += 1
            self.stats["generated_tokens"] += len(ids)
        job.finish(answer, len(ids), reason)


# ---------------------------------------------------------------------------------------------------------- routes
router = APIRouter()


def get_service(request: Request) -> ChatService:
    """The app's :class:`ChatService` (a FastAPI dependency)."""
    return request.app.state.service


Service = Annotated[ChatService, Depends(get_service)]


class _ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


async def _wait(future: asyncio.Future, gone: asyncio.Future, timeout: Optional[float] = None) -> Any:
    """The result of ``future``; :class:`_ClientGone` if ``gone`` ends first, ``TimeoutError`` after ``timeout``."""
    done, _ = await asyncio.wait((future, gone), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if future in done:
        return future.result()
    if gone in done:
        raise _ClientGone
    raise TimeoutError


class _JobStream(StreamingResponse):
    """An event stream that cancels its request however it ends (sent, client gone, server shutting down)."""

    def __init__(self, service: ChatService, job: GenerationJob, content: AsyncIterator[str]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.service, self.job = service, job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.service.cancel(self.job)


@router.get("/v1/models", response_model=ModelList)
async def list_models(service: Service) -> ModelList:
    return ModelList(data=[ModelCard(id=service.settings.model_name)])


@router.get("/health")
async def health(service: Service) -> JSONResponse:
    """200 while the generator works; 503 when it is stalled (``stall_timeout_s``), stopped or shutting down."""
    state = service.health()
    return JSONResponse(state, status_code=200 if state["status"] == "ok" else 503)


@router.post("/v1/chat/completions", response_model=ChatCompletion,
             responses={code: {"model": ErrorResponse} for code in (400, 403, 404, 413, 429, 503)})
async def chat_completions(request: Request, service: Service):
    """A chat completion: JSON, or Server-Sent Events of ``chat.completion.chunk`` objects with ``"stream": true``."""
    settings = service.settings
    try:
        raw = await read_capped_body(request, settings.max_request_bytes)
        if raw is None:
            raise ChatRequestError(413, f"request body over {settings.max_request_bytes} bytes",
                                  code="request_too_large")
    except ClientDisconnect:  # gone while sending its body
        return Response(status_code=499)
    body = ChatCompletionRequest.parse(raw)
    parsed = await run_in_threadpool(body.to_chat, settings)  # finds the images (decoded later, when scheduled)
    await run_in_threadpool(service.check_prompt_length, parsed)
    job = service.submit(parsed)
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    streaming = False
    try:
        try:  # errors found when the request is scheduled come before any 200 status line, streams included
            prompt_tokens = await _wait(job.started, gone, max(0.0, job.deadline - time.monotonic()))
        except TimeoutError:
            raise ChatRequestError(503, f"the request waited {settings.request_timeout_s:g} s in the queue "
                                        "(request_timeout_s); retry later", code="queue_timeout",
                                   headers={"Retry-After": str(service.retry_after())}) from None
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if parsed.stream:
            gone.cancel()  # from here on the response watches the connection
            streaming = True
            return _JobStream(service, job, _events(job, settings.model_name, completion_id, created))
        text, completion_tokens, reason = await _wait(job.result, gone)
        return ChatCompletion(
            id=completion_id, created=created, model=settings.model_name,
            choices=[Choice(message=AssistantMessage(content=text), finish_reason=reason)],
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens))
    except _ClientGone:
        return Response(status_code=499)  # nobody reads it
    finally:
        if not streaming:
            gone.cancel()
            service.cancel(job)


async def _events(job: GenerationJob, model_name: str, completion_id: str, created: int) -> AsyncIterator[str]:
    def event(delta: dict[str, str], reason: Optional[str] = None) -> str:
        chunk = ChatCompletionChunk(id=completion_id, created=created, model=model_name,
                                    choices=[ChunkChoice(delta=delta, finish_reason=reason)])
        return f"data: {json.dumps(chunk.model_dump(), ensure_ascii=False)}\n\n"

    yield event({"role": "assistant", "content": ""})
    done = False
    while not done:
        items = [await job.events.get()]
        while not job.events.empty():  # what piled up while the client read goes out in one write
            items.append(job.events.get_nowait())
        chunk = []
        for kind, value in items:
            if kind == "delta":
                chunk.append(event({"content": value}))
            elif kind == "end":
                chunk += [event({}, value), "data: [DONE]\n\n"]
                done = True
            else:  # the status line is sent: the error goes in the stream
                chunk += [f"data: {json.dumps(value.body(), ensure_ascii=False)}\n\n", "data: [DONE]\n\n"]
                done = True
        yield "".join(chunk)
        await asyncio.sleep(0)  # let a lost connection be noticed before the next write


async def _chat_error(_: Request, exc: ChatRequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@asynccontextmanager
async def _lifespan(app: FastAPI):
    service: ChatService = app.state.service
    service.start()
    try:
        yield
    finally:
        await run_in_threadpool(service.close)


def create_app(model, tokenizer=None, settings: Optional[ServerSettings] = None, **kwargs: Any) -> FastAPI:
    """The FastAPI app. ``tokenizer`` defaults to ``model.tokenizer``; ``kwargs`` override :class:`ServerSettings`.

    The generation thread starts with the app (or with the first request); the app's shutdown stops it.
    """
    settings = settings or ServerSettings()
    unknown = sorted(set(kwargs) - set(ServerSettings.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown server setting {unknown[0]!r}")
    settings = ServerSettings(**{**settings.__dict__, **kwargs})  # validated again, the caller's object untouched
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("the chat server needs a tokenizer (the checkpoint folder has none; pass one)")
    app = FastAPI(title="internvl-fm chat", version="1", lifespan=_lifespan)
    app.state.service = ChatService(model, tokenizer, settings)
    app.add_exception_handler(ChatRequestError, _chat_error)
    app.include_router(router)
    return app


def serve(model, tokenizer=None, host: str = "127.0.0.1", port: int = 8000, settings: Optional[ServerSettings] = None,
          **overrides: Any) -> None:
    """Run the server with uvicorn (binds 127.0.0.1 unless told otherwise).

    SIGTERM / Ctrl-C stop it gracefully: no new connections, queued requests get 503, requests in flight finish
    within ``shutdown_grace_s`` (then are cut, ``finish_reason: "length"``), and the process exits.
    """
    import uvicorn

    app = create_app(model, tokenizer, settings, **overrides)
    service: ChatService = app.state.service

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # a signal handler may interrupt the event loop inside the queue's lock: shut down from another thread
            threading.Thread(target=service.begin_shutdown, name="internvl-chat-shutdown", daemon=True).start()
            super().handle_exit(sig, frame)

    grace = service.settings.shutdown_grace_s
    GracefulServer(uvicorn.Config(app, host=host, port=port, log_level="info",
                                  timeout_graceful_shutdown=math.ceil(grace) + 5)).run()


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                    start_timeout_s: float = 30.0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread (tests, benchmarks, notebooks): yields its base URL
    (``port=0``: a free port) and, on exit, stops it as SIGTERM does (queued requests get 503, running ones are cut
    after ``shutdown_grace_s``)."""
    def begin_shutdown() -> None:
        service = getattr(app.state, "service", None)
        if service is not None:
            service.begin_shutdown()

    with run_in_thread(app, host, port, start_timeout_s, name="internvl-chat-uvicorn",
                       before_stop=begin_shutdown) as url:
        yield url
