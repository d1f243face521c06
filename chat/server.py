"""An OpenAI-compatible chat server for InternVL-Chat: ``/v1/chat/completions`` (JSON or SSE stream), ``/v1/models``.

Images come as ``image_url`` content parts: ``data:`` URLs, local files under an allowed root (plain paths or
``file://`` URLs) and, only when enabled, ``http(s)://`` URLs. Request bytes, image count and image pixels are capped.
Errors are 4xx JSON bodies in the OpenAI shape ``{"error": {"message", "type", "code"}}``.
"""
import base64
import binascii
import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from internvl_fm.chat_templates import IMAGE_PLACEHOLDER
from internvl_fm.tiling import build_transform, dynamic_preprocess

__all__ = ["ServerSettings", "ChatRequestError", "create_app", "serve"]


@dataclass
class ServerSettings:
    """Limits and sources of the chat server."""

    model_name: str = "internvl-chat"
    allowed_root: Path | None = None  # local image files must live under it; None disables local files
    allow_http: bool = False
    max_request_bytes: int = 20 * 1024 * 1024
    max_images: int = 8
    max_image_pixels: int = 4096 * 4096
    max_new_tokens: int = 1024
    max_tiles: int | None = None  # per image; default: the model config's max_dynamic_patch
    http_timeout_s: float = 10.0
    generation_defaults: dict[str, Any] = field(default_factory=dict)


class ChatRequestError(Exception):
    """A request the server rejects: HTTP ``status`` and an OpenAI-style error ``code``."""

    def __init__(self, status: int, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": "invalid_request_error", "code": self.code,
                          "param": self.param}}


# ---------------------------------------------------------------------------------------------------------- images
def _decode_image(data: bytes, source: str, max_pixels: int):
    from PIL import Image

    from internvl_fm.processing import to_rgb

    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        width, height = image.size
        if width * height > max_pixels:
            raise ChatRequestError(413, f"image {source} has {width}x{height} pixels, more than the limit of "
                                        f"{max_pixels}", code="image_too_large")
        image.load()
        return to_rgb(image)
    except ChatRequestError:
        raise
    except Image.DecompressionBombError as exc:
        raise ChatRequestError(413, f"image {source} is too large: {exc}", code="image_too_large") from exc
    except Exception as exc:  # any decoder failure is the client's bad input
        raise ChatRequestError(400, f"cannot decode image {source}: {exc}", code="invalid_image") from exc


def fetch_image(url: str, settings: ServerSettings):
    """Resolve one ``image_url`` to a PIL image, enforcing the server's sources and caps."""
    if not isinstance(url, str) or not url:
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
        if not settings.allow_http:
            raise ChatRequestError(400, "http(s) image URLs are disabled on this server (start it with "
                                        "--allow-http)", code="http_images_disabled")
        import httpx

        try:
            with httpx.stream("GET", url, timeout=settings.http_timeout_s, follow_redirects=True) as response:
                response.raise_for_status()
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > settings.max_request_bytes:
                        raise ChatRequestError(413, f"image at {url} is larger than {settings.max_request_bytes} "
                                                    "bytes", code="image_too_large")
                    chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise ChatRequestError(400, f"cannot fetch image {url}: {exc}", code="missing_image") from exc
        return _decode_image(b"".join(chunks), url, settings.max_image_pixels)
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


# ---------------------------------------------------------------------------------------------------------- requests
@dataclass
class ParsedChat:
    """An OpenAI chat request turned into ``chat()`` arguments."""

    question: str
    history: list[tuple[str, str]]
    system: str | None
    images: list[Any]
    generation: dict[str, Any]
    stream: bool


def _content_parts(content: Any, role: str) -> tuple[str, list[str]]:
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ChatRequestError(400, f"{role} message content must be a string or a list of parts")
    texts, urls = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not url:
                raise ChatRequestError(400, "an image_url part has no url", code="missing_image", param="image_url")
            urls.append(url)
        else:
            raise ChatRequestError(400, f"unsupported content part type {kind!r} (use 'text' or 'image_url')")
    return "\n".join(texts), urls


def _with_placeholders(text: str, num_images: int) -> str:
    if num_images == 0 or IMAGE_PLACEHOLDER in text:
        return text
    if num_images == 1:
        return f"{IMAGE_PLACEHOLDER}\n{text}"
    return "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(num_images)) + text


def parse_chat_request(body: dict[str, Any], settings: ServerSettings) -> ParsedChat:
    """Validate an OpenAI ``chat.completions`` body (model, messages, sampling) and collect its images."""
    if body.get("model") not in (None, settings.model_name):
        raise ChatRequestError(404, f"model {body.get('model')!r} does not exist; this server serves "
                                    f"{settings.model_name!r}", code="model_not_found", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ChatRequestError(400, "messages must be a non-empty list", param="messages")
    system: str | None = None
    turns: list[tuple[str, str | None]] = []
    urls: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            raise ChatRequestError(400, "each message must be an object", param="messages")
        role = message.get("role")
        text, message_urls = _content_parts(message.get("content"), str(role))
        if role == "system":
            system = text if system is None else system + "\n" + text
        elif role == "user":
            if turns and turns[-1][1] is None:
                raise ChatRequestError(400, "two user messages in a row; merge them into one", param="messages")
            turns.append((_with_placeholders(text, len(message_urls)), None))
            urls += message_urls
        elif role == "assistant":
            if not turns or turns[-1][1] is not None:
                raise ChatRequestError(400, "an assistant message must follow a user message", param="messages")
            turns[-1] = (turns[-1][0], text)
        else:
            raise ChatRequestError(400, f"unsupported message role {role!r}", param="messages")
    if not turns or turns[-1][1] is not None:
        raise ChatRequestError(400, "the last message must come from the user", param="messages")
    if len(urls) > settings.max_images:
        raise ChatRequestError(400, f"{len(urls)} images in the request, more than the limit of "
                                    f"{settings.max_images}", code="too_many_images")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or min(256, settings.max_new_tokens)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ChatRequestError(400, "max_tokens must be a positive integer", param="max_tokens")
    generation: dict[str, Any] = {**settings.generation_defaults, "max_new_tokens": min(max_tokens,
                                                                                       settings.max_new_tokens)}
    temperature = body.get("temperature")
    if temperature is not None and not isinstance(temperature, (int, float)):
        raise ChatRequestError(400, "temperature must be a number", param="temperature")
    if temperature:
        generation.update(do_sample=True, temperature=float(temperature))
        if body.get("top_p") is not None:
            generation["top_p"] = float(body["top_p"])
    else:
        generation["do_sample"] = False
    images = [fetch_image(url, settings) for url in urls]
    question = turns[-1][0]
    history = [(q, a) for q, a in turns[:-1]]
    return ParsedChat(question=question, history=history, system=system, images=images, generation=generation,
                      stream=bool(body.get("stream", False)))


# ---------------------------------------------------------------------------------------------------------- app
class ChatService:
    """Runs one request at a time on the model (generation is not re-entrant)."""

    def __init__(self, model, tokenizer, settings: ServerSettings):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.lock = threading.Lock()
        config = model.config
        self.max_tiles = settings.max_tiles or config.max_dynamic_patch
        self.transform = build_transform(config.image_size)

    def pixel_values(self, images: list[Any]) -> tuple[torch.Tensor | None, list[int]]:
        if not images:
            return None, []
        config = self.model.config
        per_image = []
        for image in images:
            tiles = dynamic_preprocess(image, min_num=config.min_dynamic_patch, max_num=self.max_tiles,
                                       image_size=config.image_size, use_thumbnail=config.use_thumbnail)
            per_image.append(torch.stack([self.transform(t) for t in tiles]))
        pixel_values = torch.cat(per_image).to(device=self.model.device, dtype=self.model.dtype)
        return pixel_values, [t.shape[0] for t in per_image]

    def prepare(self, parsed: ParsedChat):
        pixel_values, num_patches = self.pixel_values(parsed.images)
        model = self.model
        placeholders = sum(q.count(IMAGE_PLACEHOLDER) for q, _ in [*parsed.history, (parsed.question, None)])
        if placeholders != len(num_patches):
            raise ChatRequestError(400, f"the messages hold {placeholders} {IMAGE_PLACEHOLDER} placeholders but "
                                        f"{len(num_patches)} images", code="missing_image")
        system = model.system_message
        try:
            if parsed.system is not None:
                model.system_message = parsed.system
            inputs = model.prepare_chat_inputs(self.tokenizer, pixel_values, parsed.question,
                                               history=parsed.history, num_patches_list=num_patches)
        finally:
            model.system_message = system
        return pixel_values, inputs

    def complete(self, parsed: ParsedChat) -> tuple[str, int, int, str]:
        with self.lock:
            pixel_values, inputs = self.prepare(parsed)
            output_ids = self.model.generate(pixel_values=pixel_values, input_ids=inputs.input_ids,
                                             attention_mask=inputs.attention_mask,
                                             **{**parsed.generation, "eos_token_id": inputs.eos_token_id})
        text = self.model.decode_response(self.tokenizer, output_ids, inputs.stop)[0]
        return text, inputs.input_ids.shape[1], output_ids.shape[1], _finish_reason(output_ids, inputs.eos_token_id)

    def stream(self, parsed: ParsedChat) -> Iterator[tuple[str | None, str | None]]:
        """Yields ``(text_piece, None)`` while generating, then ``(None, finish_reason)``."""
        with self.lock:
            pixel_values, inputs = self.prepare(parsed)
            finished: list[torch.Tensor] = []
            yield from ((piece, None) for piece in self.model.stream_generate(
                self.tokenizer, pixel_values, inputs, parsed.generation, on_finish=finished.append))
        yield None, _finish_reason(finished[0], inputs.eos_token_id) if finished else "stop"


def _finish_reason(output_ids: torch.Tensor, eos_token_id: int) -> str:
    return "stop" if bool((output_ids == eos_token_id).any()) else "length"


def create_app(model, tokenizer=None, settings: ServerSettings | None = None, **kwargs: Any):
    """The FastAPI app. ``tokenizer`` defaults to ``model.tokenizer``; ``kwargs`` override :class:`ServerSettings`."""
    # FastAPI reads endpoint annotations at runtime: this module therefore avoids `from __future__ import annotations`
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, StreamingResponse

    settings = settings or ServerSettings()
    for key, value in kwargs.items():
        if not hasattr(settings, key):
            raise TypeError(f"unknown server setting {key!r}")
        setattr(settings, key, value)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("the chat server needs a tokenizer (the checkpoint folder has none; pass one)")
    service = ChatService(model, tokenizer, settings)
    app = FastAPI(title="internvl-fm chat", version="1")
    app.state.service = service

    @app.exception_handler(ChatRequestError)
    async def _chat_error(_: Request, exc: ChatRequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "internvl-fm"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_request_bytes:
            raise ChatRequestError(413, f"request body over {settings.max_request_bytes} bytes",
                                   code="request_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > settings.max_request_bytes:
                raise ChatRequestError(413, f"request body over {settings.max_request_bytes} bytes",
                                       code="request_too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ChatRequestError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
        if not isinstance(body, dict):
            raise ChatRequestError(400, "request body must be a JSON object", code="invalid_json")
        parsed = await run_in_threadpool(parse_chat_request, body, settings)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if not parsed.stream:
            text, prompt_tokens, completion_tokens, reason = await run_in_threadpool(service.complete, parsed)
            return {
                "id": completion_id, "object": "chat.completion", "created": created, "model": settings.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
            }
        pieces = service.stream(parsed)
        # fail before the 200 status line if the prompt cannot be built (bad placeholders...)
        first = await run_in_threadpool(next, pieces, (None, "stop"))

        def chunk(delta: dict[str, Any], reason: str | None = None) -> str:
            data = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": settings.model_name, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        def events() -> Iterator[str]:
            yield chunk({"role": "assistant", "content": ""})
            item = first
            while True:
                piece, reason = item
                if piece is not None:
                    yield chunk({"content": piece})
                else:
                    yield chunk({}, reason)
                    break
                item = next(pieces, (None, "stop"))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def serve(model, tokenizer=None, host: str = "127.0.0.1", port: int = 8000, settings: ServerSettings | None = None,
          **overrides: Any) -> None:
    """Run the server with uvicorn (binds 127.0.0.1 unless told otherwise)."""
    import uvicorn

    uvicorn.run(create_app(model, tokenizer, settings, **overrides), host=host, port=port, log_level="info")
