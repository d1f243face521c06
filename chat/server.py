"""An OpenAI-compatible chat server for InternVL-Chat: ``/v1/chat/completions`` (JSON or SSE stream), ``/v1/models``.

The request body is validated once, at the boundary, by pydantic models (:class:`ChatCompletionRequest`); the routes
live on an ``APIRouter`` (:data:`router`) that reads the :class:`ChatService` from ``app.state``. Images come as
``image_url`` content parts: ``data:`` URLs, local files under an allowed root (plain paths or ``file://`` URLs) and,
only when enabled, ``http(s)://`` URLs; they are decoded by the core ``internvl_fm.processing.load_image`` and tiled by
the model's :class:`~internvl_fm.processing_internvl_chat.InternVLChatProcessor`. Request bytes, image count and
image pixels are capped. Errors are 4xx JSON bodies in the OpenAI shape ``{"error": {"message", "type", "code"}}``.
"""
# FastAPI reads endpoint annotations at runtime: this module therefore avoids `from __future__ import annotations`
import base64
import binascii
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from internvl_fm.chat_templates import IMAGE_PLACEHOLDER, with_image_placeholders
from internvl_fm.errors import ImageLoadError
from internvl_fm.errors import ImageTooLargeError
from internvl_fm.processing import load_image
from internvl_fm.processing_internvl_chat import ChatInputs

__all__ = ["ServerSettings", "ChatRequestError", "ChatCompletionRequest", "ChatCompletion", "ChatService", "router",
           "create_app", "serve"]


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
    http_timeout_s: float = 10.0
    generation_defaults: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_images", "max_image_pixels", "max_new_tokens", "max_tiles"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"server setting {name} must be >= 1, got {value}")


class ChatRequestError(Exception):
    """A request the server rejects: HTTP ``status`` and an OpenAI-style error ``code``."""

    def __init__(self, status: int, message: str, code: str = "invalid_request", param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=ErrorInfo(message=self.message, code=self.code, param=self.param)).model_dump()


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
    """A chat request as ``chat()`` arguments: the turns with their ``<image>`` placeholders, decoded images."""

    question: str
    history: list[tuple[str, str]]
    system: Optional[str]
    images: list[Any]
    generation: dict[str, Any]
    stream: bool


class ChatCompletionRequest(_Strict):
    """The body of ``POST /v1/chat/completions`` (the OpenAI fields this server uses; others are ignored)."""

    model: Optional[str] = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
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
        """Check what the schema cannot (model name, turn order, images against placeholders) and fetch the images."""
        if self.model not in (None, settings.model_name):
            raise ChatRequestError(404, f"model {self.model!r} does not exist; this server serves "
                                        f"{settings.model_name!r}", code="model_not_found", param="model")
        system: Optional[str] = None
        turns: list[tuple[str, Optional[str]]] = []
        urls: list[str] = []
        for message in self.messages:
            text, message_urls = message.text_and_urls()
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
        images = [fetch_image(url, settings) for url in urls]
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


class ErrorInfo(BaseModel):
    message: str
    type: str = "invalid_request_error"
    code: str
    param: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "internvl-fm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


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


def fetch_image(url: str, settings: ServerSettings):
    """Resolve one ``image_url`` to a PIL image, enforcing the server's sources and caps."""
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
        return _decode_image(data, "(data URL)", settings.max_image_pixels)
    if url.startswith(("http://", "https://")):
        return _decode_image(_fetch_http(url, settings), url, settings.max_image_pixels)
    path_text = url.removeprefix("file://")
    if settings.allowed_root is None:
        raise ChatRequestError(403, "local image files are disabled on this server (start it with --allowed-root)",
                               code="path_not_allowed")
    root = Path(settings.allowed_root).resolve()
    path = Path(path_text)
    path = (path if path.is_absolute() else root / path).resolve()
    if not path.is_relative_to(root):
        raise ChatRequestError(403, f"image path {path_text} is outside the allowed root", code="path_not_allowed")
    if not path.is_file():
        raise ChatRequestError(400, f"image file not found: {path_text}", code="missing_image")
    if path.stat().st_size > settings.max_request_bytes:
        raise ChatRequestError(413, f"image file {path_text} is too large", code="image_too_large")
    return _decode_image(path.read_bytes(), path_text, settings.max_image_pixels)


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


# ---------------------------------------------------------------------------------------------------------- service
class ChatService:
    """The model, its processor and the settings; runs one request at a time (generation is not re-entrant).

    The model is never changed: the request's system message goes through the call.
    """

    def __init__(self, model, tokenizer, settings: ServerSettings):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.processor = model.get_processor(tokenizer)
        self.lock = threading.Lock()

    def pixel_values(self, images: list[Any]) -> tuple[Optional[torch.Tensor], list[int]]:
        """Tiles of decoded images (up to ``max_tiles`` each) on the model's device and dtype, and tiles per image."""
        pixel_values, num_patches = self.processor.preprocess_images(images, max_num=self.settings.max_tiles)
        if pixel_values is not None:
            pixel_values = pixel_values.to(device=self.model.device, dtype=self.model.dtype)
        return pixel_values, num_patches

    def prepare(self, parsed: ParsedChat) -> ChatInputs:
        pixel_values, num_patches = self.pixel_values(parsed.images)
        inputs = self.model.prepare_chat_inputs(self.tokenizer, pixel_values, parsed.question, history=parsed.history,
                                                num_patches_list=num_patches or None, system_message=parsed.system)
        return inputs

    def complete(self, parsed: ParsedChat) -> tuple[str, int, int, str]:
        with self.lock:
            inputs = self.prepare(parsed)
            output_ids = self.model.generate(
                pixel_values=inputs.pixel_values, input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                image_token_id=inputs.image_token_id, **{**parsed.generation, "eos_token_id": inputs.eos_token_id})
        text = self.processor.decode(output_ids, inputs.stop)[0]
        return text, inputs.input_ids.shape[1], output_ids.shape[1], _finish_reason(output_ids, inputs.eos_token_id)

    def stream(self, parsed: ParsedChat) -> Iterator[tuple[Optional[str], Optional[str]]]:
        """Yields ``(text_piece, None)`` while generating, then ``(None, finish_reason)``."""
        with self.lock:
            inputs = self.prepare(parsed)
            finished: list[torch.Tensor] = []
            yield from ((piece, None) for piece in self.model.stream_generate(
                self.tokenizer, inputs.pixel_values, inputs, parsed.generation, on_finish=finished.append))
        yield None, _finish_reason(finished[0], inputs.eos_token_id) if finished else "stop"


def _finish_reason(output_ids: torch.Tensor, eos_token_id: int) -> str:
    return "stop" if bool((output_ids == eos_token_id).any()) else "length"


# ---------------------------------------------------------------------------------------------------------- routes
router = APIRouter()


def get_service(request: Request) -> ChatService:
    """The app's :class:`ChatService` (a FastAPI dependency)."""
    return request.app.state.service


Service = Annotated[ChatService, Depends(get_service)]


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ChatRequestError(413, f"request body over {limit} bytes", code="request_too_large")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ChatRequestError(413, f"request body over {limit} bytes", code="request_too_large")
    return bytes(raw)


@router.get("/v1/models", response_model=ModelList)
async def list_models(service: Service) -> ModelList:
    return ModelList(data=[ModelCard(id=service.settings.model_name)])


@router.get("/health")
async def health(service: Service) -> dict[str, str]:
    return {"status": "ok", "model": service.settings.model_name}


@router.post("/v1/chat/completions", response_model=ChatCompletion,
             responses={400: {"model": ErrorResponse}, 403: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
                        413: {"model": ErrorResponse}})
async def chat_completions(request: Request, service: Service):
    """A chat completion: JSON, or Server-Sent Events of ``chat.completion.chunk`` objects with ``"stream": true``."""
    settings = service.settings
    body = ChatCompletionRequest.parse(await _read_body(request, settings.max_request_bytes))
    parsed = await run_in_threadpool(body.to_chat, settings)  # fetches / decodes the images
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not parsed.stream:
        text, prompt_tokens, completion_tokens, reason = await run_in_threadpool(service.complete, parsed)
        return ChatCompletion(
            id=completion_id, created=created, model=settings.model_name,
            choices=[Choice(message=AssistantMessage(content=text), finish_reason=reason)],
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens))
    pieces = service.stream(parsed)
    # fail before the 200 status line if the prompt cannot be built (bad placeholders...)
    first = await run_in_threadpool(next, pieces, (None, "stop"))

    def event(delta: dict[str, str], reason: Optional[str] = None) -> str:
        chunk = ChatCompletionChunk(id=completion_id, created=created, model=settings.model_name,
                                    choices=[ChunkChoice(delta=delta, finish_reason=reason)])
        return f"data: {json.dumps(chunk.model_dump(), ensure_ascii=False)}\n\n"

    def events() -> Iterator[str]:
        yield event({"role": "assistant", "content": ""})
        item = first
        while item[0] is not None:
            yield event({"content": item[0]})
            item = next(pieces, (None, "stop"))
        yield event({}, item[1])
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _chat_error(_: Request, exc: ChatRequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def create_app(model, tokenizer=None, settings: Optional[ServerSettings] = None, **kwargs: Any) -> FastAPI:
    """The FastAPI app. ``tokenizer`` defaults to ``model.tokenizer``; ``kwargs`` override :class:`ServerSettings`."""
    settings = settings or ServerSettings()
    unknown = sorted(set(kwargs) - set(ServerSettings.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown server setting {unknown[0]!r}")
    settings = ServerSettings(**{**settings.__dict__, **kwargs})  # validated again, the caller's object untouched
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("the chat server needs a tokenizer (the checkpoint folder has none; pass one)")
    app = FastAPI(title="internvl-fm chat", version="1")
    app.state.service = ChatService(model, tokenizer, settings)
    app.add_exception_handler(ChatRequestError, _chat_error)
    app.include_router(router)
    return app


def serve(model, tokenizer=None, host: str = "127.0.0.1", port: int = 8000, settings: Optional[ServerSettings] = None,
          **overrides: Any) -> None:
    """Run the server with uvicorn (binds 127.0.0.1 unless told otherwise)."""
    import uvicorn

    uvicorn.run(create_app(model, tokenizer, settings, **overrides), host=host, port=port, log_level="info")
