"""Hostile and malformed client input is a 4xx JSON error naming the problem, never a 5xx (issue 13, item 5): every
sampling field, image paths, JSON nesting, lone surrogates, reserved tokens in the text, undecodable images."""
from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_fm.chat.server import ChatRequestError, ParsedChat, create_app, serve_in_thread
from internvl_fm.chat.testing import tiny_chat_config, tiny_chat_model, tiny_tokenizer

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

NAME = "tiny"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is fastest, and the machine may be shared
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (40, 40), "red").save(root / "red.png")
    tokenizer = tiny_tokenizer()
    app = create_app(tiny_chat_model(tiny_chat_config(len(tokenizer))), tokenizer, model_name=NAME, allowed_root=root,
                     max_new_tokens=8)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client, app.state.service
    torch.set_num_threads(threads)


def _body(**fields) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": "what is in the picture ?"}], "max_tokens": 4,
            **fields}


def _with_image(url: str, text: str = "what ?") -> dict:
    return _body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                         {"type": "text", "text": text}]}])


def _raw(body: dict) -> bytes:
    return json.dumps(body).encode()  # json.dumps writes NaN / Infinity / -Infinity literals


def _truncated_png() -> str:
    """A PNG whose header reads fine and whose pixels are cut off: found when the image is decoded (scheduled)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()[:200]).decode()


NESTED = b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
BAD_BODIES = {  # name: (raw body, status, text the message must hold)
    "temperature -1": (_raw(_body(temperature=-1)), 400, "temperature"),
    "temperature NaN": (_raw(_body(temperature=float("nan"))), 400, "finite number"),
    "temperature -Infinity": (_raw(_body(temperature=float("-inf"))), 400, "finite number"),
    "temperature Infinity": (_raw(_body(temperature=float("inf"))), 400, "finite number"),
    "temperature 3": (_raw(_body(temperature=3)), 400, "temperature"),
    "temperature string": (_raw(_body(temperature="hot")), 400, "temperature"),
    "top_p x": (_raw(_body(top_p="x")), 400, "top_p"),
    "top_p [1]": (_raw(_body(top_p=[1])), 400, "top_p"),
    "top_p -1": (_raw(_body(top_p=-1)), 400, "top_p"),
    "top_p NaN": (_raw(_body(temperature=1, top_p=float("nan"))), 400, "finite number"),
    "max_tokens 0": (_raw(_body(max_tokens=0)), 400, "max_tokens"),
    "max_completion_tokens 0": (_raw(_body(max_completion_tokens=0)), 400, "max_completion_tokens"),
    "max_tokens -5": (_raw(_body(max_tokens=-5)), 400, "max_tokens"),
    "max_tokens 1.5": (_raw(_body(max_tokens=1.5)), 400, "max_tokens"),
    "max_tokens true": (_raw(_body(max_tokens=True)), 400, "max_tokens"),
    "stream 1": (_raw(_body(stream=1)), 400, "stream"),
    "image path with NUL": (_raw(_with_image("red\x00.png")), 400, "not a valid path"),
    "file URL with NUL": (_raw(_with_image("file://red.png\x00")), 400, "not a valid path"),
    "image path of 5000 characters": (_raw(_with_image("a" * 5000)), 400, "not a valid path"),
    "image path with a 300-character name": (_raw(_with_image("a" * 300 + ".png")), 400, "cannot be used"),
    "image path outside the root": (_raw(_with_image("../../../etc/passwd")), 403, "outside the allowed root"),
    "deeply nested JSON": (NESTED, 400, "not a valid JSON"),
    "lone surrogate": (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\ud800"}]}', 400, "JSON"),
    "lone surrogate in a system message": (
        b'{"messages": [{"role": "system", "content": "\\udc00"}, {"role": "user", "content": "hi"}]}', 400, "JSON"),
    "invalid UTF-8": (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "JSON"),
    "not an object": (b"[1, 2]", 400, "JSON object"),
    "empty body": (b"", 400, "JSON"),
    "reserved image token in the text": (_raw(_body(messages=[{"role": "user", "content": "<IMG_CONTEXT> what ?"}])),
                                         400, "<IMG_CONTEXT>"),
    "undecodable image": (_raw(_with_image("data:image/png;base64,AAAAAAAA")), 400, "cannot decode image"),
    "undecodable image, streamed": (_raw({**_with_image("data:image/png;base64,AAAAAAAA"), "stream": True}), 400,
                                    "cannot decode image"),
    "empty data URL": (_raw(_with_image("data:image/png;base64,")), 400, "no bytes"),
    "truncated image": (_raw(_with_image(_truncated_png())), 400, "cannot decode image"),
    "truncated image, streamed": (_raw({**_with_image(_truncated_png()), "stream": True}), 400,
                                  "cannot decode image"),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_input_is_a_4xx_naming_the_problem(server, name):
    client, _ = server
    raw, status, text = BAD_BODIES[name]
    reply = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert text in error["message"] and error["type"] == "invalid_request_error", error
    assert len(error["message"]) < 400  # a 5000-character path is not echoed whole


def test_bad_requests_mixed_with_good_ones_never_5xx_and_never_hurt_their_batch(server):
    """All of the above at once, with valid requests: the valid ones are answered (a bad request scheduled in the
    same batch, e.g. one with a literal <IMG_CONTEXT>, fails alone) and nothing is a 5xx."""
    client, _ = server
    good = _raw(_body())
    bodies = [raw for raw, _, _ in BAD_BODIES.values()] + [good] * 12

    def post(raw: bytes) -> tuple[bytes, int]:
        reply = httpx.post(str(client.base_url).rstrip("/") + "/v1/chat/completions", content=raw, timeout=60,
                           headers={"content-type": "application/json"})
        return raw, reply.status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(post, bodies))
    assert all(status < 500 for _, status in statuses)
    assert [status for raw, status in statuses if raw is good] == [200] * 12
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/v1/chat/completions", json=_body()).status_code == 200


def test_max_tokens_is_capped_by_the_server(server):
    client, _ = server
    reply = client.post("/v1/chat/completions", json=_body(max_tokens=10**9))
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 8  # max_new_tokens=8


def test_a_reserved_image_token_that_reaches_the_scheduler_fails_alone(server):
    """The request check refuses a literal <IMG_CONTEXT>; the scheduler checks the tokenized prompt again (it would
    break the image splice of every request in the batch)."""
    _, service = server
    parsed = ParsedChat(question="<IMG_CONTEXT> what ?", history=[], system=None, images=[],
                        generation={"max_new_tokens": 4, "do_sample": False}, stream=False)
    with pytest.raises(ChatRequestError, match="reserved token <IMG_CONTEXT>") as info:
        service.prepare(parsed)
    assert info.value.status == 400
