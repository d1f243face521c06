"""What the OpenAI-compatible task servers share (the chat server's `/v1/chat/completions`, the embeddings
service's `/v1/embeddings`): the error body, the `/v1/models` list, a size-capped body read and a disconnect wait."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

__all__ = ["ErrorInfo", "ErrorResponse", "ModelCard", "ModelList", "read_capped_body", "wait_for_disconnect"]


class ErrorInfo(BaseModel):
    message: str
    type: str = "invalid_request_error"
    code: str
    param: str | None = None


class ErrorResponse(BaseModel):
    """`{"error": {"message", "type", "code", "param"}}`, as OpenAI answers a refused request."""

    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "internvl-fm"


class ModelList(BaseModel):
    """The `/v1/models` answer."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


async def read_capped_body(request: Any, limit: int) -> bytes | None:
    """The body of a Starlette `request`, or None when it is over `limit` bytes: by Content-Length up front, or once
    a chunked body passes the cap (reading stops there)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


async def wait_for_disconnect(request: Any) -> None:
    """Returns when the client of `request` disconnects (call it once the body has been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
