"""Retrieval service: endpoints, limits and access control (in-process), then the real `internvl-fm serve`
process: the shared probe script (traversal, 64 MiB upload, 32 concurrent clients) and headless Chromium."""
from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from internvl_fm.retrieval import ImageIndex
from internvl_fm.retrieval.server import ServerConfig, create_app
from test_retrieval_common import fast_config, make_images, tiny_model  # noqa: F401  (fixture)
from conftest import headless_chromium

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "tools" / "probe_server.py"  # copy of the reviewers' probe (shared/tools)
N = 12


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_clip_path, tiny_model):  # noqa: F811
    root = tmp_path_factory.mktemp("server")
    paths = make_images(root / "imgs", N)
    (root / "secret.txt").write_text("root:x:0:0 not for the web")
    index = ImageIndex.build(root / "imgs", root / "index", tiny_model, model_path=str(tiny_clip_path),
                             embed=fast_config())
    return root, paths, index


@pytest.fixture(scope="module")
def client(built):
    return TestClient(create_app(built[2], ServerConfig(max_k=20, max_upload_bytes=2**20)))


def test_health_page_and_metrics(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["rows"] == N and health["indexes"]["image"] == "Flat"
    page = client.get("/")
    assert page.status_code == 200 and 'id="search-form"' in page.text and "/search" in page.text
    client.get("/search", params={"text": "stripes", "k": 2})
    metrics = client.get("/metrics").text
    assert 'internvl_fm_requests_total{endpoint="/search",status="200"}' in metrics
    assert f"internvl_fm_index_rows {N}" in metrics


def test_search_by_text_image_and_embedding(client, built):
    _, paths, index = built
    got = client.get("/search", params={"text": "a checkerboard", "k": 4}).json()
    assert len(got["results"]) == 4 and got["results"][0]["url"] == f"/images/{got['results'][0]['id']}"
    assert "image_path" not in got["results"][0]  # no server paths leak
    posted = client.post("/search", json={"text": "a checkerboard", "k": 4}).json()
    assert [r["id"] for r in posted["results"]] == [r["id"] for r in got["results"]]
    data = paths[6].read_bytes()
    upload = client.post("/search", files={"image": ("x.png", data, "image/png")}, data={"k": "3"}).json()
    assert upload["results"][0]["id"] == 6 and upload["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    raw = client.post("/search?k=2", content=data, headers={"Content-Type": "image/png"}).json()
    assert raw["results"][0]["id"] == 6
    b64 = client.post("/search", json={"image": base64.b64encode(data).decode(), "k": 1}).json()
    assert b64["results"][0]["id"] == 6
    vector = index.embed_image(paths[9])[0].tolist()
    assert client.post("/search", json={"embedding": vector, "k": 1}).json()["results"][0]["id"] == 9
    captions = client.get("/search", params={"text": "noise", "k": 2, "target": "captions"}).json()
    assert all(r["caption"] for r in captions["results"])


def test_bad_requests_are_refused(client):
    assert client.get("/search", params={"text": "x", "k": 21}).status_code == 422  # over max_k
    assert client.get("/search", params={"text": "x", "k": "many"}).status_code == 422
    assert client.get("/search", params={"text": ""}).status_code == 422
    assert client.post("/search", json={"embedding": [1.0, 2.0], "k": 1}).status_code == 422  # wrong dimension
    assert client.post("/search", content=b"not an image", headers={"Content-Type": "image/png"}).status_code == 400
    assert client.post("/search", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 415
    big = client.post("/search", content=b"\0" * (2**20 + 1), headers={"Content-Type": "application/octet-stream"})
    assert big.status_code == 413


def test_each_request_field_is_refused_once_with_a_message_naming_it(client):
    """The pydantic request model checks every field where the request comes in; `detail` stays one string (the
    web page shows it)."""
    refused = {
        "k: must be between 1 and 20, got 21": client.get("/search", params={"text": "x", "k": 21}),
        "k: Input should be a valid integer": client.post("/search", json={"text": "x", "k": "many"}),
        "target: Input should be 'images' or 'captions'": client.get("/search", params={"text": "x",
                                                                                          "target": "both"}),
        "text longer than 1000 characters": client.post("/search", json={"text": "x" * 1001}),
        "text: Input should be a valid string": client.post("/search", json={"text": 5}),
        "image: must be base64 in JSON": client.post("/search", json={"image": "@@not base64@@"}),
        "embedding must be one finite vector": client.post("/search", json={"embedding": [1e39, 0.0]}),
        "embedding.0: Input should be a valid number": client.post("/search", json={"embedding": [[1.0]]}),
    }
    for message, response in refused.items():
        assert response.status_code == 422 and isinstance(response.json()["detail"], str), response.text
        assert response.json()["detail"].startswith(message), response.text
    # an empty image is no image: the text is the query
    ok = client.post("/search", json={"image": base64.b64encode(b"").decode(), "embedding": None, "text": "stripes",
                                      "k": 2, "api_key": "unused"})
    assert ok.status_code == 200 and len(ok.json()["results"]) == 2


def test_images_are_served_only_from_the_index_roots(client, built):
    root, paths, _ = built
    response = client.get("/images/3")
    assert response.status_code == 200 and response.content == paths[3].read_bytes()
    assert response.headers["content-type"] == "image/png"
    for path in ("/images/../secret.txt", "/images/..%2fsecret.txt", "/images/%2e%2e/secret.txt", "/images/-1",
                 f"/images/{N}", "/images/999999999", "/images/0x1"):
        response = client.get(path)
        assert response.status_code in (403, 404), path
        assert b"root:" not in response.content
    # a file replaced by a symlink pointing outside the roots is refused
    victim = paths[11]
    victim.unlink()
    victim.symlink_to(root / "secret.txt")
    try:
        assert client.get("/images/11").status_code == 403
    finally:
        victim.unlink()
        make_images(root / "regen", N)
        shutil.copy(root / "regen" / victim.name, victim)


def test_api_key(built):
    keyed = TestClient(create_app(built[2], ServerConfig(api_key="s3cret")))
    assert keyed.get("/health").status_code == 200
    assert keyed.get("/search", params={"text": "x"}).status_code == 401
    assert keyed.get("/search", params={"text": "x", "api_key": "wrong"}).status_code == 401
    assert keyed.get("/search", params={"text": "x"}, headers={"X-API-Key": "s3cret"}).status_code == 200
    assert keyed.get("/images/0", params={"api_key": "s3cret"}).status_code == 200
    assert keyed.get("/images/0").status_code == 401


# ------------------------------------------------------------------------------- the real `internvl-fm serve`
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(built):
    root = built[0]
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "internvl_fm.cli", "serve", str(root / "index"), "--port",
                             str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    import httpx

    for _ in range(240):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read().decode()}")
        time.sleep(0.25)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_probe_script_passes(server):
    assert PROBE.is_file(), f"probe script missing at {PROBE}"
    result = subprocess.run([sys.executable, str(PROBE), server], capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failures" in result.stdout and "with 0 errors" in result.stdout


def test_web_page_in_headless_chromium(server, tmp_path):
    driver = headless_chromium(tmp_path / "chromium-profile")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        driver.get(server + "/")
        box = driver.find_element(By.ID, "query")
        box.send_keys("a checkerboard")
        driver.find_element(By.ID, "go").click()
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "figure.result img")) > 0)
        wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
                                 for img in d.find_elements(By.CSS_SELECTOR, "figure.result img")))
        images = driver.find_elements(By.CSS_SELECTOR, "figure.result img")
        assert len(images) == N  # k defaults to 12 on the page
        assert all(int(driver.execute_script("return arguments[0].naturalWidth", img)) > 0 for img in images)
        assert "results in" in driver.find_element(By.ID, "status").text
    finally:
        driver.quit()
