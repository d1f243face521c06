"""``internvl-fm serve-chat`` stops gracefully on SIGTERM (issue 13, item 3): it stops accepting, answers queued
requests with 503, cuts the generation in flight after ``--shutdown-grace`` seconds and exits, in a real subprocess.
The old server waited for the generation in flight to end, however long (a 400 KB prompt kept it alive for 14
minutes). Also: the serve-chat options that set the queue, batch and caps reach the server's settings."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from internvl_fm.chat.testing import save_tiny_chat_checkpoint

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until(condition, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the server exited early:\n{proc.stderr.read()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_sigterm_cuts_the_generation_in_flight_refuses_the_queue_and_exits(tmp_path):
    folder = save_tiny_chat_checkpoint(tmp_path / "tiny-chat")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    body = {"messages": [{"role": "user", "content": "describe this image"}]}
    proc = subprocess.Popen(
        [sys.executable, "-m", "internvl_fm.cli", "serve-chat", str(folder), "--port", str(port), "--dtype", "float32",
         "--device", "cpu", "--max-new-tokens", "100000", "--batch-size", "1", "--shutdown-grace", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _wait_until(lambda: _healthy(url), 120, "the server to start", proc)
        events: list[str] = []
        queued: dict = {}

        def stream() -> None:  # 100000 tokens: it would run for hours
            with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "max_tokens": 100000,
                                                                          "stream": True}, timeout=60) as s:
                events.extend(line[6:] for line in s.iter_lines() if line.startswith("data: "))

        def wait_in_queue() -> None:
            reply = httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=60)
            queued.update(status=reply.status_code, body=reply.json())

        threads = [threading.Thread(target=stream, daemon=True)]
        threads[0].start()
        _wait_until(lambda: len(events) >= 3, 60, "the stream to produce text", proc)
        threads.append(threading.Thread(target=wait_in_queue, daemon=True))
        threads[1].start()
        _wait_until(lambda: httpx.get(url + "/health", timeout=2).json()["queued"] == 1, 30, "a queued request", proc)

        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        elapsed = time.monotonic() - began
        for thread in threads:
            thread.join(30)
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert elapsed < 15, f"took {elapsed:.1f} s to stop"
    assert proc.returncode in (0, -signal.SIGTERM), stderr  # uvicorn re-raises the signal once it has shut down
    assert "Finished server process" in stderr, stderr  # the graceful path, not a kill
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert queued["status"] == 503 and queued["body"]["error"]["code"] == "unavailable"
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)


def test_serve_chat_options_reach_the_settings(tmp_path, monkeypatch, capsys):
    from internvl_fm.chat.cli import serve_main

    folder = save_tiny_chat_checkpoint(tmp_path / "tiny-chat")
    seen = {}
    monkeypatch.setattr("internvl_fm.chat.server.serve", lambda model, tokenizer, host, port, settings: seen.update(
        settings=settings))
    assert serve_main([str(folder), "--dtype", "float32", "--max-prompt-tokens", "512", "--request-timeout", "30",
                       "--max-queue", "8", "--batch-size", "4", "--stall-timeout", "5", "--shutdown-grace", "0"]) == 0
    settings = seen["settings"]
    assert (settings.max_prompt_tokens, settings.request_timeout_s, settings.max_queue, settings.max_batch_size,
            settings.stall_timeout_s, settings.shutdown_grace_s) == (512, 30.0, 8, 4, 5.0, 0.0)
    for bad in (["--batch-size", "0"], ["--request-timeout", "nan"], ["--max-queue", "-1"], ["--stall-timeout", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            serve_main([str(folder), *bad])
        assert exit_info.value.code == 2
    assert "max_batch_size must be >= 1" in capsys.readouterr().err
