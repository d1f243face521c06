"""What the task packages' HTTP servers share (the chat server's `/v1/chat/completions`, the embeddings service's
`/v1/embeddings`): the OpenAI error body and `/v1/models` list, a size-capped body read, a disconnect wait, and
uvicorn in a background thread for tests, benchmarks and notebooks."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from pydantic import BaseModel

__all__ = ["ErrorInfo", "ErrorResponse", "ModelCard", "ModelList", "read_capped_body", "serve_in_thread",
           "wait_for_disconnect"]


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


@contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 30.0,
                    name: str = "internvl-fm-uvicorn", before_stop: Callable[[], None] | None = None,
                    after_stop: Callable[[], None] | None = None) -> Iterator[str]:
    """Run the ASGI `app` with uvicorn in a background thread and yield its base URL (`port=0`: a free port); on
    exit call `before_stop`, stop the server (waiting up to `start_timeout_s`), then call `after_stop`."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        if before_stop is not None:
            before_stop()
        server.should_exit = True
        thread.join(start_timeout_s)
        if after_stop is not None:
            after_stop()
