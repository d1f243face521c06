"""The OpenAI API shapes the task servers share (the chat server's `/v1/chat/completions`, the embeddings
service's `/v1/embeddings`): the error body and the `/v1/models` list."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

__all__ = ["ErrorInfo", "ErrorResponse", "ModelCard", "ModelList"]


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
