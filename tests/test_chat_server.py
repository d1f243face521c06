"""The OpenAI-compatible chat server, exercised over real HTTP (uvicorn on a free local port, httpx client)."""
from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import pytest
import torch
from PIL import Image

from conftest import spy_on_writes
from internvl_fm.chat.server import ServerSettings, create_app
from internvl_fm.chat.testing import tiny_chat_config, tiny_chat_model, tiny_tokenizer

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

NAME = "tiny-internvl"


def _data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (60, 40), (200, 30, 30)).save(folder / "red.png")
    Image.new("RGB", (200, 200), (0, 0, 0)).save(folder / "big.png")
    (tmp_path_factory.getbasetemp() / "secret.png").write_bytes((folder / "red.png").read_bytes())
    return folder


@pytest.fixture(scope="module")
def server(root):
    tokenizer = tiny_tokenizer()
    model = tiny_chat_model(tiny_chat_config(len(tokenizer)), seed=0)
    settings = ServerSettings(model_name=NAME, allowed_root=root, max_request_bytes=100_000, max_images=2,
                              max_image_pixels=100 * 100, max_new_tokens=8)
    app = create_app(model, tokenizer, settings)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "server did not start"
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client, app, model, tokenizer
    srv.should_exit = True
    thread.join(timeout=10)


def _body(content, **kw):
    return {"model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **kw}


def _image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def test_models_endpoint(server):
    client, *_ = server
    r = client.get("/v1/models")
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [NAME]


def test_completion_matches_chat_and_stream_matches_completion(server):
    client, app, model, tokenizer = server
    image = Image.new("RGB", (60, 40), (20, 120, 220))
    content = [{"type": "text", "text": "what is in the picture ?"}, _image_part(_data_url(image))]
    r = client.post("/v1/chat/completions", json=_body(content))
    assert r.status_code == 200, r.text
    data = r.json()
    text = data["choices"][0]["message"]["content"]
    pixel_values, num_patches = app.state.service.pixel_values([image])
    assert num_patches == [5]  # 60x40 at 28 px tiles, max 4: 2x2 grid (tie with 1x1 / 2x1, enough pixels) + thumb
    assert text == model.chat(tokenizer, pixel_values, "what is in the picture ?", dict(max_new_tokens=8,
                                                                                        do_sample=False))
    assert data["usage"]["completion_tokens"] >= 1 and data["choices"][0]["finish_reason"] in ("stop", "length")

    pieces, events = [], []
    with client.stream("POST", "/v1/chat/completions", json=_body(content, stream=True)) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        for line in s.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert "".join(pieces) == text
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_local_file_under_root_and_history(server, root):
    client, *_ = server
    r = client.post("/v1/chat/completions", json={"model": NAME, "messages": [
        {"role": "system", "content": "you are a test"},
        {"role": "user", "content": [_image_part(str(root / "red.png")), {"type": "text", "text": "what ?"}]},
        {"role": "assistant", "content": "a red photo"},
        {"role": "user", "content": "is it a cat ?"}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    r = client.post("/v1/chat/completions", json=_body([_image_part("file://red.png"),
                                                        {"type": "text", "text": "relative ?"}]))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("content,status,code", [
    ([_image_part("../secret.png"), {"type": "text", "text": "x"}], 403, "path_not_allowed"),
    ([_image_part("/etc/passwd"), {"type": "text", "text": "x"}], 403, "path_not_allowed"),
    ([_image_part("nope.png"), {"type": "text", "text": "x"}], 400, "missing_image"),
    ([{"type": "image_url", "image_url": {}}, {"type": "text", "text": "x"}], 400, "missing_image"),
    ([_image_part("big.png"), {"type": "text", "text": "x"}], 413, "image_too_large"),
    ([_image_part("http://127.0.0.1:9/cat.png"), {"type": "text", "text": "x"}], 400, "http_images_disabled"),
    ([_image_part("red.png")] * 3 + [{"type": "text", "text": "x"}], 400, "too_many_images"),
    ([_image_part("data:image/png;base64,!!notbase64"), {"type": "text", "text": "x"}], 400, "invalid_image"),
    ("<image>\nwhere is the picture ?", 400, "missing_image"),
])
def test_bad_input_is_rejected_with_json(server, content, status, code):
    client, *_ = server
    r = client.post("/v1/chat/completions", json=_body(content))
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


def test_unknown_model_oversize_and_malformed_requests(server):
    client, *_ = server
    r = client.post("/v1/chat/completions", json={**_body("hi"), "model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = client.post("/v1/chat/completions", json=_body("hi " * 50_000))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = client.post("/v1/chat/completions", json={"model": NAME, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    assert r.status_code == 400 and "last message" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"model": NAME, "messages": []})
    assert r.status_code == 400
    # a streaming request that cannot be built fails before the event stream starts, with a JSON error
    r = client.post("/v1/chat/completions", json=_body("<image>\nwhere is the picture ?", stream=True))
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_image"
    # the server keeps working after the rejections
    assert client.post("/v1/chat/completions", json=_body("hi")).status_code == 200


def test_create_app_needs_a_tokenizer_and_known_settings():
    model = tiny_chat_model(tiny_chat_config(80), seed=0)
    with pytest.raises(ValueError, match="tokenizer"):
        create_app(model)
    with pytest.raises(TypeError, match="unknown server setting"):
        create_app(model, tiny_tokenizer(), max_imagez=3)
    assert torch.is_tensor(next(model.parameters()))


def test_system_message_goes_through_the_call_not_the_model(server, root, monkeypatch):
    """A request's system message reaches the prompt while the model is never written to (the server used to set
    and restore model.system_message around each request)."""
    from internvl_fm.chat.server import ChatCompletionRequest

    client, app, model, tokenizer = server
    service = app.state.service
    body = {"model": NAME, "max_tokens": 8, "messages": [
        {"role": "system", "content": "you are a test"},
        {"role": "user", "content": [_image_part("red.png"), {"type": "text", "text": "what ?"}]}]}
    parsed = ChatCompletionRequest.parse(json.dumps(body).encode()).to_chat(service.settings)
    inputs = service.prepare(parsed)
    assert inputs.query.startswith("<|im_start|>system\nyou are a test<|im_end|>")
    assert model.system_message not in inputs.query

    default = model.system_message
    writes = spy_on_writes(monkeypatch, model)
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert writes == [] and model.system_message == default
    pixel_values, num_patches = service.pixel_values([Image.open(root / "red.png")])
    want = model.chat(tokenizer, pixel_values, "<image>\nwhat ?", dict(max_new_tokens=8, do_sample=False),
                      system_message="you are a test")
    assert r.json()["choices"][0]["message"]["content"] == want


def test_request_fields_are_validated_at_the_boundary(server):
    client, *_ = server
    for extra, param in (({"temperature": "hot"}, "temperature"), ({"top_p": 3}, "top_p"),
                         ({"max_tokens": 0}, "max_tokens"), ({"stream": "yes"}, "stream")):
        r = client.post("/v1/chat/completions", json={**_body("hi"), **extra})
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"model": NAME, "messages": [{"role": "tool", "content": "x"}]})
    assert r.status_code == 400 and "messages.0.role" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json=_body([{"type": "input_audio", "input_audio": {}}]))
    assert r.status_code == 400 and "input_audio" in r.json()["error"]["message"]
    # unknown OpenAI fields are ignored, as OpenAI-compatible servers do
    assert client.post("/v1/chat/completions", json={**_body("hi"), "n": 1, "user": "u"}).status_code == 200


def test_settings_validate_themselves():
    with pytest.raises(ValueError, match="max_images"):
        ServerSettings(max_images=0)
    with pytest.raises(ValueError, match="max_tiles"):
        create_app(tiny_chat_model(tiny_chat_config(80), seed=0), tiny_tokenizer(), max_tiles=0)
