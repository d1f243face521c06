"""clip-retrieval compatibility of `internvl-fm serve`: the real `ClipClient` (clip-retrieval 2.45, installed with
`pip install --no-deps clip-retrieval==2.45.0`) and its web front-end in headless Chromium query a live service
(uvicorn in a thread): /knn-service, /metadata, /indices-list, CORS, and hostile input (always a 4xx)."""
from __future__ import annotations

import base64
import importlib.util
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from internvl_fm.retrieval import ImageIndex
from internvl_fm.retrieval.server import ServerConfig, create_app
from test_retrieval_common import fast_config, make_images, tiny_model  # noqa: F401  (fixture)
from conftest import headless_chromium

requests = pytest.importorskip("requests")


def _clip_client_module():
    """clip-retrieval's `clip_client.py`, loaded from its file: `import clip_retrieval` would run the package's
    `__init__`, which imports the back-end's dependencies (flask, h5py, ...; numpy<2) that the client does not use."""
    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("clip-retrieval is not installed (pip install --no-deps clip-retrieval==2.45.0)",
                    allow_module_level=True)
    path = Path(next(iter(spec.submodule_search_locations))) / "clip_client.py"
    module_spec = importlib.util.spec_from_file_location("clip_retrieval_clip_client", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


clip = _clip_client_module()
N = 12  # distinct images; row N is an exact copy of row 6
NAME = "gallery_index"
FRONT_END_KEYS = {"url", "caption", "key", "id", "similarity"}


@contextmanager
def serving(app) -> Iterator[str]:
    """`app` served by uvicorn in a thread on a free port of 127.0.0.1; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                pytest.fail("uvicorn did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_clip_path, tiny_model):  # noqa: F811
    root = tmp_path_factory.mktemp("clip")
    paths = make_images(root / "imgs", N)
    paths.append(root / "imgs" / f"img_{N:03d}.png")
    shutil.copy(paths[6], paths[N])
    paths[N].with_suffix(".txt").write_text("a copy of checkerboard number 6")
    shutil.copy(paths[3], root / "outside.png")  # a readable image outside the index's image roots
    (root / "secret.txt").write_text("root:x:0:0 not for the web")
    index = ImageIndex.build(root / "imgs", root / NAME, tiny_model, model_path=str(tiny_clip_path),
                             embed=fast_config())
    return SimpleNamespace(root=root, paths=paths, index=index)


@pytest.fixture(scope="module")
def url(built) -> Iterator[str]:
    with serving(create_app(built.index)) as base:
        yield base


def client(url: str, **options) -> clip.ClipClient:
    return clip.ClipClient(f"{url}/knn-service", indice_name=options.pop("indice_name", NAME), **options)


def post(url: str, path: str, body: dict) -> requests.Response:
    """A POST as clip-retrieval's front-end sends it (a JSON text, Content-Type text/plain)."""
    return requests.post(url + path, data=json.dumps(body), headers={"Content-Type": "text/plain;charset=UTF-8"},
                         timeout=60)


def caption(path: Path) -> str:
    return path.with_suffix(".txt").read_text()


# ------------------------------------------------------------------------------------------------ queries
def test_text_query_answers_like_clip_back(url, built):
    got = client(url, num_images=5, deduplicate=False).query(text="a checkerboard")
    assert isinstance(got, list) and len(got) == 5
    assert all(set(row) == FRONT_END_KEYS for row in got), got[0]
    ours = requests.get(url + "/search", params={"text": "a checkerboard", "k": 5}, timeout=60).json()["results"]
    assert [row["id"] for row in got] == [hit["id"] for hit in ours]
    assert [row["similarity"] for row in got] == pytest.approx([hit["score"] for hit in ours], abs=1e-5)
    similarities = [row["similarity"] for row in got]
    assert similarities == sorted(similarities, reverse=True)
    for row in got:
        path = built.paths[row["id"]]
        assert row["url"] == f"{url}/images/{row['id']}" and row["key"] == path.name
        assert row["caption"] == caption(path)
        assert requests.get(row["url"], timeout=60).content == path.read_bytes()  # the url is fetchable as given


def test_image_file_embedding_and_own_image_url_queries(url, built):
    near = client(url, num_images=3, deduplicate=False)
    by_file = near.query(image=str(built.paths[6]))  # ClipClient sends the file as base64 `image`
    assert {by_file[0]["id"], by_file[1]["id"]} == {6, N}  # the image and its copy
    assert by_file[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert by_file[1]["similarity"] == pytest.approx(1.0, abs=1e-4)
    vector = built.index.embed_image(built.paths[9])[0].tolist()
    assert near.query(embedding_input=vector)[0]["id"] == 9
    # the front-end's "similar images" button sends a hit's url as image_url: this service's own image URL
    by_url = near.query(image=f"{url}/images/9")
    assert by_url[0]["id"] == 9 and by_url[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    # files under the index's image roots: a path, a path relative to a root, a file:// URL
    for reference in (str(built.paths[9]), built.paths[9].name, "file://" + quote(str(built.paths[9]))):
        assert post(url, "/knn-service", {"image_url": reference, "num_images": 1}).json()[0]["id"] == 9


def test_modality_text_searches_the_captions(url, built):
    captions = client(url, modality=clip.Modality.TEXT, num_images=4, deduplicate=False)
    got = captions.query(text="random noise")
    ours = requests.get(url + "/search", params={"text": "random noise", "k": 4, "target": "captions"},
                        timeout=60).json()["results"]
    assert [row["id"] for row in got] == [hit["id"] for hit in ours]
    assert all(row["caption"] == caption(built.paths[row["id"]]) for row in got)
    image = base64.b64encode(built.paths[3].read_bytes()).decode()
    from_image = captions.query(image=str(built.paths[3]))
    ours = requests.post(url + "/search", json={"image": image, "k": 4, "target": "captions"},
                         timeout=60).json()["results"]
    assert [row["id"] for row in from_image] == [hit["id"] for hit in ours]


def test_num_images_num_result_ids_and_metadata(url, built):
    assert len(client(url, num_images=7, deduplicate=False).query(text="stripes")) == 7
    body = {"text": "stripes", "modality": "image", "num_images": 3, "num_result_ids": 10, "indice_name": NAME,
            "deduplicate": False, "use_mclip": False, "use_safety_model": True, "use_violence_detector": True,
            "aesthetic_score": "", "aesthetic_weight": "0.5"}  # what the front-end sends
    got = post(url, "/knn-service", body).json()
    assert len(got) == 10
    assert all(set(row) == FRONT_END_KEYS for row in got[:3])
    assert all(set(row) == {"id", "similarity"} for row in got[3:])  # ids only beyond num_images, as clip_back
    full = post(url, "/knn-service", {**body, "num_images": 10}).json()
    assert [row["id"] for row in full] == [row["id"] for row in got]
    rest = [row["id"] for row in got[3:]]
    metadata = post(url, "/metadata", {"ids": rest, "indice_name": NAME}).json()
    assert [item["id"] for item in metadata] == rest
    assert [item["metadata"] for item in metadata] == [
        {k: v for k, v in row.items() if k not in ("id", "similarity")} for row in full[3:]]
    assert post(url, "/metadata", {"ids": [], "indice_name": NAME}).json() == []


def _components_first(vectors: np.ndarray, threshold: float = 0.94) -> list[int]:
    """Positions kept by clip_back's dedup, found independently: breadth-first search over cosine > threshold
    links; each component keeps its first position."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    linked = unit @ unit.T > threshold
    seen: set[int] = set()
    kept = []
    for start in range(len(unit)):
        if start in seen:
            continue
        kept.append(start)
        frontier = [start]
        seen.add(start)
        while frontier:
            node = frontier.pop()
            for other in np.flatnonzero(linked[node]):
                if int(other) not in seen:
                    seen.add(int(other))
                    frontier.append(int(other))
    return kept


def test_deduplicate_drops_near_duplicates_by_stored_embedding(url, built):
    every = client(url, num_images=N + 1, deduplicate=False).query(image=str(built.paths[6]))
    unique = client(url, num_images=N + 1, deduplicate=True).query(image=str(built.paths[6]))
    order = [row["id"] for row in every]
    assert sorted(order) == list(range(N + 1))
    vectors = np.stack([built.index.stored_vector(i) for i in order])
    assert [row["id"] for row in unique] == [order[p] for p in _components_first(vectors)]
    assert len({6, N} & {row["id"] for row in unique}) == 1  # the exact copy is gone
    assert len(unique) < N  # and some near duplicates of the tiny model's embeddings too


def test_indices_list_and_index_names(url, built):
    assert requests.get(url + "/indices-list", timeout=60).json() == [NAME]
    refused = client(url, indice_name="laion5B", num_images=2).query(text="x")
    assert refused == {"detail": f"indice_name: unknown index 'laion5B'; this service serves '{NAME}'"}
    named = TestClient(create_app(built.index, ServerConfig(index_name="photos")))
    assert named.get("/indices-list").json() == ["photos"]
    ok = named.post("/knn-service", content=json.dumps({"text": "x", "num_images": 2, "indice_name": "photos"}))
    assert ok.status_code == 200 and len(ok.json()) == 2
    assert named.post("/knn-service", content=json.dumps({"text": "x", "indice_name": NAME})).status_code == 422


def test_include_image_adds_the_files_within_a_budget(built):
    first = built.paths[0].stat().st_size
    app = TestClient(create_app(built.index, ServerConfig(max_upload_bytes=first + 10)))
    got = app.post("/knn-service", content=json.dumps({"image_url": str(built.paths[0]), "num_images": 3,
                                                       "include_image": True})).json()
    assert got[0]["id"] == 0 and base64.b64decode(got[0]["image"]) == built.paths[0].read_bytes()
    assert all("image" not in row for row in got[1:])  # over the budget (max_upload_bytes per answer)
    metadata = app.post("/metadata", content=json.dumps({"ids": [0], "include_image": True})).json()
    assert base64.b64decode(metadata[0]["metadata"]["image"]) == built.paths[0].read_bytes()
    assert "image" not in app.post("/metadata", content=json.dumps({"ids": [0]})).json()[0]["metadata"]


# ------------------------------------------------------------------------------------------- hostile input
def test_image_url_outside_the_roots_gets_the_answer_of_a_missing_file(url, built):
    root = built.root

    def answer(image_url: str) -> tuple[int, str]:
        response = post(url, "/knn-service", {"image_url": image_url, "num_images": 1})
        return response.status_code, response.text

    missing = answer(str(root / "imgs" / "no_such.png"))
    assert missing[0] == 422
    for image_url in (str(root / "outside.png"), "../outside.png", "file://" + str(root / "outside.png"),
                      str(root / "secret.txt"), "/etc/passwd", str(root / "imgs"), "imgs/../../outside.png"):
        assert answer(image_url) == missing, image_url
    downloaded = client(url, num_images=1).query(image="http://example.invalid/cat.jpg")  # never fetched
    assert "downloads no images" in downloaded["detail"]
    for image_url in ("http://[::1/x.png", f"{url}/images/../secret.txt", url.replace("127.0.0.1", "localhost")
                      + "/images/3"):  # malformed; not an id; another host's /images/
        status, text = answer(image_url)
        assert status == 422 and "downloads no images" in text, image_url
    assert answer(f"{url}/images/{10**6}") == missing  # this service's URL, but no such row


def test_hostile_bodies_are_4xx(url):
    huge = client(url, num_images=10**6).query(text="x")["detail"]  # ClipClient sends num_result_ids = num_images
    assert huge == "num_images: must be between 1 and 100, got 1000000; num_result_ids: must be between 1 and 3000, " \
                   "got 1000000"
    bad = {
        "num_result_ids": {"text": "x", "num_images": 2, "num_result_ids": 10**9},
        "num_images: Input should be a finite": '{"text": "x", "num_images": 1e309}',
        "num_images: Input should be a valid integer": {"text": "x", "num_images": "many"},
        "modality": {"text": "x", "modality": "video"},
        "give one of": {"num_images": 3},
        "text: must be valid Unicode": '{"text": "\\ud800"}',
        "embedding must be one finite vector": '{"embedding_input": [NaN, 1.0]}',
        "query dimension 2": {"embedding_input": [1.0, 2.0]},
        "image: must be base64": {"image": "@@not base64@@"},
        "cannot read the uploaded image": {"image": base64.b64encode(b"not an image").decode()},
        "not valid JSON": "{",
        "JSON body must be an object": "[1, 2]",
    }
    for expected, body in bad.items():
        response = requests.post(url + "/knn-service", data=body if isinstance(body, str) else json.dumps(body),
                                 timeout=60)
        assert 400 <= response.status_code < 500 and expected in response.json()["detail"], (body, response.text)
    for ids in ([-1], [N + 1], list(range(3001)), ["x"]):
        response = post(url, "/metadata", {"ids": ids})
        assert response.status_code == 422 and response.json()["detail"].startswith("ids"), response.text
    assert requests.get(url + "/health", timeout=60).json()["status"] == "ok"


# --------------------------------------------------------------------------------------- CORS and /search
def test_cors_on_the_clip_endpoints_only(url):
    origin = {"Origin": "http://front.example"}
    preflight = requests.options(url + "/knn-service", headers={**origin, "Access-Control-Request-Method": "POST",
                                                                "Access-Control-Request-Headers": "x-api-key"},
                                 timeout=60)
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "*"
    assert "x-api-key" in preflight.headers["access-control-allow-headers"].lower()
    answered = requests.post(url + "/knn-service", data=json.dumps({"text": "x", "num_images": 1}),
                             headers={**origin, "Content-Type": "text/plain"}, timeout=60)
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == "*"
    refused = requests.post(url + "/knn-service", data="{", headers=origin, timeout=60)
    assert refused.status_code == 400 and refused.headers["access-control-allow-origin"] == "*"
    for path in ("/indices-list",):
        assert requests.get(url + path, headers=origin, timeout=60).headers["access-control-allow-origin"] == "*"
    for path in ("/search?text=x", "/images/0", "/health"):
        assert "access-control-allow-origin" not in requests.get(url + path, headers=origin, timeout=60).headers


def test_post_search_reads_json_sent_without_its_content_type(url):
    expected = [hit["id"] for hit in requests.post(url + "/search", json={"text": "stripes", "k": 3},
                                                   timeout=60).json()["results"]]
    body = json.dumps({"text": "stripes", "k": 3})
    bare = requests.post(url + "/search", data=body, timeout=60)  # requests sends no Content-Type here
    assert "content-type" not in bare.request.headers
    curl = requests.post(url + "/search", data=body, timeout=60,  # curl -d '{...}' without -H
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    form = requests.post(url + "/search", data={"text": "stripes", "k": "3"}, timeout=60)  # a real form
    for response in (bare, curl, form):
        assert response.status_code == 200, response.text
        assert [hit["id"] for hit in response.json()["results"]] == expected
    plain = requests.post(url + "/search", data=body, headers={"Content-Type": "text/plain"}, timeout=60)
    assert plain.status_code == 415


def test_api_key_guards_the_clip_endpoints(built):
    with serving(create_app(built.index, ServerConfig(api_key="s3cret"))) as keyed:
        assert client(keyed, num_images=1).query(text="x") == {
            "detail": "missing or wrong API key (header X-API-Key or ?api_key=)"}
        assert requests.get(keyed + "/indices-list", timeout=60).status_code == 401
        got = clip.ClipClient(f"{keyed}/knn-service?api_key=s3cret", indice_name=NAME, num_images=2,
                              deduplicate=False).query(text="x")
        assert len(got) == 2 and got[0]["url"].startswith(keyed + "/images/")


# ------------------------------------------------------------------------------------ the real front-end
def test_clip_front_end_in_headless_chromium(url, built, tmp_path):
    """clip-retrieval's own web page, served from another origin, searches this service, shows its images and runs
    its "similar images" button (an image_url search with one of this service's image URLs)."""
    front = Path(next(iter(importlib.util.find_spec("clip_retrieval").submodule_search_locations))).parent
    front = front / "front" / "build"
    if not (front / "index.html").is_file():
        pytest.skip(f"clip-retrieval's front-end build is not installed at {front}")
    from fastapi import FastAPI
    from fastapi.staticfiles import StaticFiles
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page = FastAPI()
    page.get("/config.json")(lambda: {"defaultBackend": url, "defaultIndex": NAME, "urlColumn": "url"})
    page.mount("/", StaticFiles(directory=front, html=True))
    expected = client(url, num_images=40, deduplicate=True).query(text="a checkerboard")
    with serving(page) as front_url:
        driver = headless_chromium(tmp_path / "chromium-profile")
        try:
            driver.get(f"{front_url}/?query={quote('a checkerboard')}")
            wait = WebDriverWait(driver, 60, ignored_exceptions=(StaleElementReferenceException,))

            def pictures():
                return driver.find_element(By.TAG_NAME, "clip-front").shadow_root.find_elements(By.CSS_SELECTOR,
                                                                                               "img.pic")

            def loaded(d):
                images = pictures()
                return images if images and all(d.execute_script("return arguments[0].complete && "
                                                                 "arguments[0].naturalWidth", i) for i in images) \
                    else False

            shown = [img.get_attribute("src") for img in wait.until(loaded)]
            assert shown == [row["url"] for row in expected]
            target = next(src for src in shown if not src.endswith(("/images/6", f"/images/{N}")))
            button = driver.find_element(By.TAG_NAME, "clip-front").shadow_root.find_elements(
                By.CSS_SELECTOR, "figure img.subImageSearch")[shown.index(target)]
            driver.execute_script("arguments[0].click()", button)  # the button shows on hover only
            wait.until(lambda d: (found := loaded(d)) and found[0].get_attribute("src") == target)
        finally:
            driver.quit()
