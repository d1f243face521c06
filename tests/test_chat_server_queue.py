"""The chat server under load, over real HTTP: one generation thread, a bounded queue, batching, requests that stop
when their client leaves, per-request caps and a health check that sees a stuck generator (issue 13, items 1-4, 6, 7).

Generation is slowed down (a pause per step) or held (a gate before ``generate``) where a test needs requests to pile
up; every request has a client timeout and every gate opens in a ``finally``, so no test can hang.
"""
from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from internvl_fm.chat.server import create_app, serve_in_thread
from internvl_fm.chat.testing import tiny_chat_config, tiny_chat_model, tiny_tokenizer

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

NAME = "tiny"
TIMEOUT = 60  # seconds, for every HTTP call: a deadlock fails the test instead of hanging it


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and the machine may be shared: keeps the step time steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model_and_tokenizer():
    tokenizer = tiny_tokenizer()
    return tiny_chat_model(tiny_chat_config(len(tokenizer)), seed=0), tokenizer


class _Pace(StoppingCriteria):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, input_ids, scores, **kwargs):
        time.sleep(self.seconds)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class Throttle:
    """Wraps ``model.generate``: counts calls and batch sizes, waits for ``gate`` (when closed) before generating and
    pauses ``seconds_per_step`` after each token."""

    def __init__(self, model, monkeypatch, seconds_per_step: float = 0.0, gated: bool = False):
        self.calls: list[int] = []
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        original = model.generate

        def generate(*args, **kwargs):
            self.calls.append(int(kwargs["input_ids"].shape[0]))
            assert self.gate.wait(TIMEOUT), "the test never opened the gate"
            if seconds_per_step:
                kwargs["stopping_criteria"] = StoppingCriteriaList(
                    [*(kwargs.get("stopping_criteria") or []), _Pace(seconds_per_step)])
            return original(*args, **kwargs)

        monkeypatch.setattr(model, "generate", generate)


@contextmanager
def running(model, tokenizer, **settings):
    app = create_app(model, tokenizer, model_name=NAME, **settings)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        yield client, app.state.service


def _body(text: str = "what is in the picture ?", max_tokens: int = 8, **extra) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, **extra}


def _post(url: str, body: dict, timeout: float = TIMEOUT) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout)


def _wait_until(condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _stream_events(response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


# ------------------------------------------------------------------------------------------------------------ item 1
def test_one_stream_and_40_concurrent_requests_all_complete(model_and_tokenizer, monkeypatch):
    """A stream in flight while 40 more requests arrive: all finish (the old server deadlocked here: every worker
    thread waited for the model lock held by the stream, which never got a thread again)."""
    model, tokenizer = model_and_tokenizer
    throttle = Throttle(model, monkeypatch, seconds_per_step=0.002)
    with running(model, tokenizer, max_new_tokens=300, max_queue=64) as (client, service):
        url = str(client.base_url).rstrip("/")
        with client.stream("POST", "/v1/chat/completions", json=_body(max_tokens=300, stream=True)) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")  # the stream is running
            with ThreadPoolExecutor(40) as pool:
                replies = list(pool.map(lambda i: _post(url, _body(f"how many legs {i} ?")), range(40)))
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert [r.status_code for r in replies] == [200] * 40
        assert all(r.json()["choices"][0]["message"]["content"] for r in replies)
        assert events[-1] == "[DONE]" and '"finish_reason": "length"' in events[-2]
        assert service.stats["largest_batch"] > 1 and max(throttle.calls) > 1  # answered together, not one by one
        assert client.get("/health").json()["status"] == "ok"


def test_full_queue_is_429_with_retry_after(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    throttle = Throttle(model, monkeypatch, gated=True)
    with running(model, tokenizer, max_queue=2) as (client, service), ThreadPoolExecutor(3) as pool:
        url = str(client.base_url).rstrip("/")
        try:
            first = pool.submit(_post, url, _body("a"))
            _wait_until(lambda: service.health()["running"] == 1, what="the first request to run")
            queued = [pool.submit(_post, url, _body(text)) for text in ("b", "c")]
            _wait_until(lambda: service.health()["queued"] == 2, what="two queued requests")
            refused = client.post("/v1/chat/completions", json=_body("d"))
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
            assert int(refused.headers["Retry-After"]) >= 1 and "max_queue" in refused.json()["error"]["message"]
        finally:
            throttle.gate.set()
        assert [f.result(TIMEOUT).status_code for f in (first, *queued)] == [200, 200, 200]
        assert service.stats["rejected"] == 1


# ------------------------------------------------------------------------------------------------------------ item 2
def test_dropped_streams_stop_generating(model_and_tokenizer, monkeypatch):
    """10 clients drop their stream after the first token: their generation stops, and a short request right after is
    answered at once (the old server kept generating them; the 7th drop wedged it)."""
    model, tokenizer = model_and_tokenizer
    Throttle(model, monkeypatch, seconds_per_step=0.005)  # 2000 tokens: >= 10 s each if nothing stopped them
    with running(model, tokenizer, max_new_tokens=2000, max_batch_size=4) as (client, service):
        url = str(client.base_url).rstrip("/")

        def drop(i: int) -> str:
            with httpx.Client(base_url=url, timeout=TIMEOUT) as own, \
                    own.stream("POST", "/v1/chat/completions", json=_body(f"describe {i}", 2000, stream=True)) as s:
                for line in s.iter_lines():
                    if '"content": "' in line and '"role"' not in line:
                        return line  # a generated piece: leave (closing the connection)
            return ""

        with ThreadPoolExecutor(10) as pool:
            assert all(pool.map(drop, range(10)))
        _wait_until(lambda: service.stats["cancelled"] == 10, what="the 10 dropped streams to be cancelled")
        began = time.monotonic()
        reply = client.post("/v1/chat/completions", json=_body("is it a cat ?", 2))
        assert reply.status_code == 200 and time.monotonic() - began < 5.0
        assert service.stats["completed"] == 1  # the short one: none of the dropped ones ran to its end


def test_abandoned_requests_are_not_generated(model_and_tokenizer, monkeypatch):
    """Non-stream clients that time out and leave: their requests are dropped (queued) or stopped (running)."""
    model, tokenizer = model_and_tokenizer
    Throttle(model, monkeypatch, seconds_per_step=0.005)
    with running(model, tokenizer, max_new_tokens=2000, max_batch_size=1) as (client, service):
        url = str(client.base_url).rstrip("/")

        def abandon(i: int) -> None:
            with pytest.raises(httpx.ReadTimeout):
                _post(url, _body(f"describe {i}", 2000), timeout=0.5)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(abandon, range(4)))
        _wait_until(lambda: service.stats["cancelled"] == 4, what="the 4 abandoned requests to be cancelled")
        began = time.monotonic()
        reply = client.post("/v1/chat/completions", json=_body("is it a cat ?", 2))
        assert reply.status_code == 200 and time.monotonic() - began < 5.0
        assert service.stats["completed"] == 1


# ------------------------------------------------------------------------------------------------------------ item 3
def test_prompt_token_cap_is_400_before_any_generation(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    throttle = Throttle(model, monkeypatch)
    buf = io.BytesIO()
    Image.new("RGB", (112, 28), "red").save(buf, format="PNG")  # 4 tiles + thumbnail: 5 image tokens
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue())
                                                .decode()}}
    with running(model, tokenizer, max_prompt_tokens=33) as (client, service):
        reply = client.post("/v1/chat/completions", json=_body("the cat " * 5000))
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "prompt_too_long"
        assert "max_prompt_tokens=33" in reply.json()["error"]["message"]
        assert throttle.calls == [] and service.stats["submitted"] == 0  # refused before it was even queued
        text_only = client.post("/v1/chat/completions", json=_body("a " * 18)).json()["usage"]["prompt_tokens"]
        assert text_only == 29  # fits; with the image it is 36 tokens (32 counted before scheduling, at one tile)
        # the text alone fits, its images do not: refused when scheduled, still before generate
        reply = client.post("/v1/chat/completions", json={**_body(), "messages": [
            {"role": "user", "content": [image, {"type": "text", "text": "a " * 18}]}]})
        assert reply.status_code == 400 and "max_prompt_tokens=33" in reply.json()["error"]["message"]
        assert len(throttle.calls) == 1


def test_wall_clock_cap_cuts_a_long_answer(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    Throttle(model, monkeypatch, seconds_per_step=0.01)  # 2000 tokens would take >= 20 s
    with running(model, tokenizer, max_new_tokens=2000, request_timeout_s=1.0) as (client, _):
        began = time.monotonic()
        reply = client.post("/v1/chat/completions", json=_body(max_tokens=2000))
        assert reply.status_code == 200 and time.monotonic() - began < 5.0
        data = reply.json()
        assert data["choices"][0]["finish_reason"] == "length" and 0 < data["usage"]["completion_tokens"] < 2000
        with client.stream("POST", "/v1/chat/completions", json=_body(max_tokens=2000, stream=True)) as s:
            events = _stream_events(s)
        assert events[-1] == "[DONE]" and '"finish_reason": "length"' in events[-2]


def test_a_request_that_waits_too_long_in_the_queue_is_503(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    throttle = Throttle(model, monkeypatch, gated=True)
    with running(model, tokenizer, request_timeout_s=0.5, max_batch_size=1) as (client, service), \
            ThreadPoolExecutor(1) as pool:
        url = str(client.base_url).rstrip("/")
        try:
            first = pool.submit(_post, url, _body("a"))
            _wait_until(lambda: service.health()["running"] == 1, what="the first request to run")
            waited = client.post("/v1/chat/completions", json=_body("b"))
            assert waited.status_code == 503 and waited.json()["error"]["code"] == "queue_timeout"
            assert "Retry-After" in waited.headers and service.health()["queued"] == 0  # it left the queue
        finally:
            throttle.gate.set()
        assert first.result(TIMEOUT).status_code == 200
        assert throttle.calls == [1]  # the timed-out request was never generated


# ------------------------------------------------------------------------------------------------------------ item 4
def test_images_are_decoded_only_when_the_request_is_scheduled(model_and_tokenizer, monkeypatch, tmp_path):
    from internvl_fm.chat import server

    decoded = []
    real_load_image = server.load_image

    def counting_load_image(data, max_pixels):
        decoded.append(len(data))
        return real_load_image(data, max_pixels)

    monkeypatch.setattr(server, "load_image", counting_load_image)
    Image.new("RGB", (56, 56), "blue").save(tmp_path / "blue.png")
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(buf, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    model, tokenizer = model_and_tokenizer
    throttle = Throttle(model, monkeypatch, gated=True)
    with running(model, tokenizer, allowed_root=tmp_path, max_batch_size=1) as (client, service), \
            ThreadPoolExecutor(4) as pool:
        url = str(client.base_url).rstrip("/")
        try:
            first = pool.submit(_post, url, _body("hold the generator"))
            _wait_until(lambda: service.health()["running"] == 1, what="the first request to run")
            queued = [pool.submit(_post, url, {**_body(), "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": source}}, {"type": "text", "text": "what ?"}]}]})
                for source in (data_url, "blue.png", data_url)]
            _wait_until(lambda: service.health()["queued"] == 3, what="three queued image requests")
            assert decoded == []  # queued requests hold bytes and paths, no pixels
        finally:
            throttle.gate.set()
        assert [f.result(TIMEOUT).status_code for f in (first, *queued)] == [200] * 4
        assert len(decoded) == 3


# ------------------------------------------------------------------------------------------------------------ item 6
def test_concurrent_requests_share_one_generate_call_and_get_their_own_answers(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    questions = [f"how many legs does the {animal} have ?" for animal in ("cat", "dog", "panda")] + \
                ["describe this image", "what is in the picture ?", "is it a red boat on the river ?"]
    with running(model, tokenizer) as (client, _):
        alone = [client.post("/v1/chat/completions", json=_body(q, 6 + i)).json() for i, q in enumerate(questions)]
    throttle = Throttle(model, monkeypatch, gated=True)
    with running(model, tokenizer) as (client, service), ThreadPoolExecutor(len(questions) + 1) as pool:
        url = str(client.base_url).rstrip("/")
        try:
            first = pool.submit(_post, url, _body("hold the generator"))
            _wait_until(lambda: service.health()["running"] == 1, what="the first request to run")
            together = [pool.submit(_post, url, _body(q, 6 + i)) for i, q in enumerate(questions)]
            _wait_until(lambda: service.health()["queued"] == len(questions), what="the queued requests")
        finally:
            throttle.gate.set()
        assert first.result(TIMEOUT).status_code == 200
        together = [f.result(TIMEOUT).json() for f in together]
    assert throttle.calls == [1, len(questions)]  # the queued requests: one generate call
    for one, batched in zip(alone, together):  # left padding changes nothing: same greedy answer, same usage
        assert batched["choices"] == one["choices"] and batched["usage"] == one["usage"]


def test_requests_that_sample_differently_are_not_batched_together(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    throttle = Throttle(model, monkeypatch, gated=True)
    with running(model, tokenizer) as (client, service), ThreadPoolExecutor(5) as pool:
        url = str(client.base_url).rstrip("/")
        try:
            first = pool.submit(_post, url, _body("hold"))
            _wait_until(lambda: service.health()["running"] == 1, what="the first request to run")
            rest = [pool.submit(_post, url, _body(str(i), temperature=t)) for i, t in enumerate((0, 0.7, 0, 0.7))]
            _wait_until(lambda: service.health()["queued"] == 4, what="the queued requests")
        finally:
            throttle.gate.set()
        assert [f.result(TIMEOUT).status_code for f in (first, *rest)] == [200] * 5
    assert throttle.calls == [1, 2, 2]


# ------------------------------------------------------------------------------------------------------------ item 7
def test_health_reports_a_stalled_generator(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    throttle = Throttle(model, monkeypatch, gated=True)
    with running(model, tokenizer, stall_timeout_s=0.3) as (client, service), ThreadPoolExecutor(1) as pool:
        url = str(client.base_url).rstrip("/")
        time.sleep(0.5)
        assert client.get("/health").status_code == 200  # idle for longer than the stall timeout is not stalled
        try:
            stuck = pool.submit(_post, url, _body())
            _wait_until(lambda: service.health()["running"] == 1, what="the request to run")
            _wait_until(lambda: client.get("/health").status_code == 503, timeout=5, what="/health to say 503")
            health = client.get("/health").json()
            assert health["status"] == "stalled" and health["running"] == 1 and health["seconds_since_progress"] > 0.3
            assert client.get("/v1/models").status_code == 200  # what the old health check looked at
        finally:
            throttle.gate.set()
        assert stuck.result(TIMEOUT).status_code == 200
        assert client.get("/health").json()["status"] == "ok"


def test_health_reports_a_dead_generator(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    with running(model, tokenizer) as (client, service):
        monkeypatch.setattr(service, "_generate", lambda batch: (_ for _ in ()).throw(SystemExit("boom")))
        reply = client.post("/v1/chat/completions", json=_body())
        assert reply.status_code == 500 and reply.json()["error"]["type"] == "server_error"
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "stopped"
        assert client.post("/v1/chat/completions", json=_body()).status_code == 503


def test_a_client_gone_while_sending_its_body_is_not_a_server_error(model_and_tokenizer):
    """Half a body, then the socket closes: nothing is logged as an error (it was 'Exception in ASGI application')."""
    import logging
    import socket

    class Errors(logging.Handler):
        def __init__(self):
            super().__init__(logging.ERROR)
            self.records: list[logging.LogRecord] = []

        def emit(self, record):
            self.records.append(record)

    errors = Errors()
    logger = logging.getLogger("uvicorn.error")
    model, tokenizer = model_and_tokenizer
    with running(model, tokenizer) as (client, service):
        logger.addHandler(errors)
        try:
            with socket.create_connection((client.base_url.host, client.base_url.port), timeout=10) as sock:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000\r\n\r\n{\"messages\": [")
                time.sleep(0.2)
            time.sleep(0.5)
            assert client.post("/v1/chat/completions", json=_body()).status_code == 200
        finally:
            logger.removeHandler(errors)
    assert [r.getMessage() for r in errors.records] == [] and service.stats["submitted"] == 1
