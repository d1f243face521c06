"""Search service under hostile input (issue 13, items 6 and 7), against a real `internvl-fm serve` process on
127.0.0.1 (tiny golden checkpoint): query images by path only inside the index's roots, one identical refusal for
every other path, a cap on query images and on their pixels; no 5xx from any client input, and the next request on
the same keep-alive client still works."""
from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from internvl_fm.retrieval import ImageIndex
from PIL import Image
from test_retrieval_common import fast_config, make_images, tiny_model  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
N = 8
MAX_IMAGES = 4
MAX_UPLOAD = 2**20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(index: Path, *flags: str, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """`internvl-fm serve INDEX` on a free 127.0.0.1 port; returns once /health answers (or fails the test)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "internvl_fm.cli", "serve", str(index), "--port", str(port),
                             "--device", "cpu", *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read().decode()}")
        time.sleep(0.25)
    proc.kill()
    pytest.fail("server did not answer /health in time")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_clip_path, tiny_model):  # noqa: F811
    root = tmp_path_factory.mktemp("hostile")
    paths = make_images(root / "imgs", N)
    ImageIndex.build(root / "imgs", root / "index", tiny_model, model_path=str(tiny_clip_path), embed=fast_config())
    (root / "imgs" / "notes.png").write_text("not an image, inside the roots (added after the build)")
    (root / "secret.txt").write_text("root:x:0:0 not for the web")
    shutil.copy(paths[3], root / "outside.png")  # a real image, but outside the index's roots
    (root / "imgs" / "link.png").symlink_to(root / "outside.png")  # inside by name, outside once resolved
    return root, paths


@pytest.fixture(scope="module")
def server(built):
    proc, url = start_server(built[0] / "index", "--max-query-images", str(MAX_IMAGES), "--max-upload-mb",
                             str(MAX_UPLOAD / 2**20), "--max-image-pixels", "1000000")
    yield url
    stop_server(proc)


def _ids(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [hit["id"] for hit in response.json()["results"]]


def test_query_images_by_path_only_inside_the_index_roots(server, built):
    """Before: any server path opened as a query image, and a missing path and a non-image answered differently
    (a file-existence oracle). Now every refused path gets byte-identical answers."""
    root, paths = built
    with httpx.Client(base_url=server, timeout=60) as client:
        refused = [str(root / "secret.txt"), str(root / "outside.png"), str(root / "missing.png"),
                   str(root / "imgs" / "missing.png"), str(root / "imgs" / "notes.png"), str(root / "imgs" / "link.png"),
                   str(root / "imgs" / ".." / "outside.png"), "../outside.png", "/etc/passwd", "/etc", "/dev/zero",
                   "/proc/self/environ", "a\0b", "x" * 5000, "/" + "a/" * 3000, 10**6, -1]
        answers = {(r.status_code, r.content) for r in (client.post("/search", json={"image": [ref], "k": 1})
                                                         for ref in refused)}
        assert len(answers) == 1, answers
        status, body = answers.pop()
        assert status == 422 and b"image roots" in body and b"root:" not in body
        # inside the roots: absolute, relative to a root, or by row id (its stored vector)
        assert _ids(client.post("/search", json={"image": [str(paths[5])], "k": 1})) == [5]
        assert _ids(client.post("/search", json={"image": [paths[6].name], "k": 1})) == [6]
        assert _ids(client.post("/search", json={"image": [2], "k": 1})) == [2]
        data_url = "data:image/png;base64," + base64.b64encode(paths[1].read_bytes()).decode()
        assert _ids(client.post("/search", json={"image": [data_url], "k": 1})) == [1]
        # several images: their mean embedding; both rank above the rest
        assert set(_ids(client.post("/search", json={"image": [0, str(paths[4])], "k": 2}))) == {0, 4}


def test_query_image_count_and_size_are_capped(server, built):
    _, paths = built
    with httpx.Client(base_url=server, timeout=60) as client:
        ok = client.post("/search", json={"image": [str(paths[0])] * MAX_IMAGES, "k": 1})
        assert _ids(ok) == [0]
        for count in (0, MAX_IMAGES + 1, 80):
            response = client.post("/search", json={"image": [str(paths[0])] * count, "k": 1})
            assert response.status_code == 422, response.text
            assert response.json()["detail"] == f"image: give between 1 and {MAX_IMAGES} images, got {count}"
        buffer = io.BytesIO()
        Image.new("RGB", (1500, 1000), (200, 10, 10)).save(buffer, format="PNG")  # 1.5 MP over the 1 MP cap
        big = client.post("/search?k=1", content=buffer.getvalue(), headers={"Content-Type": "image/png"})
        assert big.status_code == 400 and "exceeds the limit of 1000000" in big.json()["detail"]


def _chunks(total: int, sent: list[int], size: int = 2**16):
    while sent[0] < total:
        sent[0] += size
        yield b"\0" * size


def test_client_input_never_gets_a_5xx_and_the_connection_stays_usable(server):
    """Before: 500 for each of these (and a reset keep-alive connection after it). Each bad request is followed by
    a good one on the same client."""
    json_type = {"Content-Type": "application/json"}
    bad: list[tuple[str, str, dict]] = [
        ("POST", "/search", {"json": {"image": []}}),
        ("POST", "/search", {"json": {"image": [[]]}}),
        ("POST", "/search", {"json": {"image": {"path": "/etc/passwd"}}}),
        ("POST", "/search", {"content": b'{"text": "x", "k": Infinity}', "headers": json_type}),
        ("POST", "/search", {"content": b'{"text": "x", "k": -Infinity}', "headers": json_type}),
        ("POST", "/search", {"content": b'{"text": "x", "k": 1e309}', "headers": json_type}),
        ("POST", "/search", {"content": b'{"text": "x", "k": ' + b"9" * 5000 + b"}", "headers": json_type}),
        ("POST", "/search", {"content": b'{"embedding": [NaN, 1e400]}', "headers": json_type}),
        ("GET", "/images/\u00b2", {}),
        ("GET", "/images/\u00b3", {}),
        ("GET", "/images/" + "9" * 5000, {}),
        ("GET", "/images/%00", {}),
        ("POST", "/search", {"content": b'{"text": "a \\ud800 b"}', "headers": json_type}),
        ("POST", "/search", {"content": b'{"text": "x", "target": "\\udfff"}', "headers": json_type}),
        ("GET", "/search?text=%ED%A0%80&k=\u00b2", {}),
        ("POST", "/search", {"content": b"[" * 100_000 + b"]" * 100_000, "headers": json_type}),
        ("POST", "/search", {"content": b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "headers": json_type}),
        ("POST", "/search", {"content": b"\xff\xfe{", "headers": json_type}),
        ("POST", "/search", {"content": b"--x\r\n", "headers": {"Content-Type": "multipart/form-data; boundary=x"}}),
        ("POST", "/search", {"content": b"GIF89a" + b"\0" * 100, "headers": {"Content-Type": "image/gif"}}),
    ]
    with httpx.Client(base_url=server, timeout=60) as client:
        for method, path, kwargs in bad:
            response = client.request(method, path, **kwargs)
            assert 400 <= response.status_code < 500, (path, kwargs, response.status_code, response.text[:200])
            assert _ids(client.get("/search", params={"text": "stripes", "k": 1})), path

        sent = [0]  # 64 MiB, chunked (no Content-Length): 413, and the server stops reading near the cap
        total = 64 * 2**20
        response = client.post("/search", content=_chunks(total, sent),
                               headers={"Content-Type": "application/octet-stream"})
        assert response.status_code == 413 and str(MAX_UPLOAD) in response.json()["detail"]
        assert sent[0] < total // 2, f"the server read {sent[0]} bytes of a body refused at {MAX_UPLOAD}"
        assert _ids(client.get("/search", params={"text": "stripes", "k": 1}))

        huge = client.post("/search", content=b"\0" * (MAX_UPLOAD + 1), headers={"Content-Type": "image/png"})
        assert huge.status_code == 413
        assert _ids(client.get("/search", params={"text": "stripes", "k": 1}))
        assert client.get("/health").json()["status"] == "ok"
