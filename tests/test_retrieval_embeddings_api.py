"""OpenAI-compatible `/v1/embeddings` (issue 14 item 2), exercised with the official `openai` client against real
uvicorn servers on 127.0.0.1 (the bundled demo model): texts and images (data URLs, `base64:`, paths under the image
roots) in both modes against `InternVLModel.encode_text` / `encode_image`, base64 encoding, usage, model names,
dynamic batching of concurrent requests, the bounded queue (429), clients that go away, hostile input (4xx, never
5xx), the API key, the search service's mount and `serve-embed`."""
from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

openai = pytest.importorskip("openai")

from internvl_fm import InternVLModel, demo_model_path  # noqa: E402
from internvl_fm.cli_utils import CLIError  # noqa: E402
from internvl_fm.errors import CheckpointNotFoundError  # noqa: E402
from internvl_fm.retrieval.cli import serve_embed_main  # noqa: E402
from internvl_fm.retrieval.embeddings_api import EmbeddingsConfig, create_embeddings_app, serve_in_thread  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a red circle", "two small blue squares at the top left", "ein Hund am Strand", "x"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return InternVLModel.from_pretrained(demo_model_path()).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An image root with three PNGs (a symlink to an image outside it, a non-image), and an image outside it."""
    base = tmp_path_factory.mktemp("embed")
    root = base / "pictures"
    root.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 45, 3)).astype(np.uint8)).save(root / f"img{i}.png")
    shutil.copy(root / "img0.png", base / "outside.png")
    (root / "link.png").symlink_to(base / "outside.png")
    (root / "notes.png").write_text("not an image")
    (base / "secret.txt").write_text("root:x:0:0 not for the web")
    return base, root


def text_vectors(model, texts: list[str]) -> np.ndarray:
    with torch.no_grad():
        ids = model.tokenizer(texts, padding="longest")["input_ids"]
        return F.normalize(model.encode_text(ids).float(), dim=-1).numpy()


def image_vector(model, path: Path, mode: str) -> np.ndarray:
    with torch.no_grad():
        pixels = model.image_processor([Image.open(path)])
        return F.normalize(model.encode_image(pixels, mode=mode).float(), dim=-1)[0].numpy()


def token_count(model, text: str) -> int:
    return int((model.tokenizer([text], padding="longest")["input_ids"] > 0).sum())


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def vectors(response) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.asarray([d.embedding for d in response.data], dtype=np.float32)


def client_for(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def server(model, files):
    app = create_embeddings_app(model, EmbeddingsConfig(image_roots=[str(files[1])], max_inputs=16, max_queue=64,
                                                        max_upload_bytes=2**20, max_image_pixels=1_000_000))
    with serve_in_thread(app) as url:
        yield url, app.state.embeddings


# --------------------------------------------------------------------------------------------------- answers
def test_texts_match_the_model_with_usage(server, model):
    url, _ = server
    client = client_for(url)
    one = client.embeddings.create(input=TEXTS[0], model="InternVL-C", encoding_format="float")
    assert one.object == "list" and one.model == "InternVL-C" and len(one.data) == 1
    np.testing.assert_allclose(vectors(one)[0], text_vectors(model, TEXTS[:1])[0], atol=1e-5)
    assert one.usage.prompt_tokens == one.usage.total_tokens == token_count(model, TEXTS[0])

    many = client.embeddings.create(input=TEXTS, model="internvl-g", encoding_format="float")  # any case
    got, expected = vectors(many), np.stack([text_vectors(model, [t])[0] for t in TEXTS])
    np.testing.assert_allclose(got, expected, atol=1e-5)  # one padded batch == one text at a time
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    assert many.model == "InternVL-G"  # texts embed alike in both modes
    assert many.usage.prompt_tokens == many.usage.total_tokens == sum(token_count(model, t) for t in TEXTS)


def test_images_by_data_url_base64_and_path_in_both_modes(server, model, files):
    url, _ = server
    _, root = files
    client = client_for(url)
    image = root / "img1.png"
    raw = base64.b64encode(image.read_bytes()).decode()
    refs = [data_url(image), "base64:" + raw, str(image), "./img1.png", "file://" + str(image)]
    results = {}
    for mode in ("InternVL-C", "InternVL-G"):
        response = client.embeddings.create(input=refs + [TEXTS[1]], model=mode, encoding_format="float")
        got = vectors(response)
        expected = image_vector(model, image, mode)
        for row in got[:len(refs)]:
            np.testing.assert_allclose(row, expected, atol=1e-5)
        np.testing.assert_allclose(got[-1], text_vectors(model, TEXTS[1:2])[0], atol=1e-5)
        assert response.usage.prompt_tokens == token_count(model, TEXTS[1])  # images count 0
        results[mode] = got[0]
    assert float(results["InternVL-C"] @ results["InternVL-G"]) < 0.999  # the modes differ for images


def test_base64_encoding_matches_float(server, model, files):
    url, _ = server
    client = client_for(url)
    inputs = [TEXTS[2], data_url(files[1] / "img2.png")]
    floats = vectors(client.embeddings.create(input=inputs, model="InternVL-C", encoding_format="float"))
    decoded = vectors(client.embeddings.create(input=inputs, model="InternVL-C"))  # the client asks base64, decodes
    np.testing.assert_array_equal(decoded, floats)
    explicit = client.embeddings.create(input=inputs, model="InternVL-C", encoding_format="base64")
    assert all(isinstance(d.embedding, str) for d in explicit.data)  # asked for: left to the caller
    rows = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in explicit.data])
    np.testing.assert_array_equal(rows, floats)


def test_model_names_models_list_and_dimensions(server, model):
    url, _ = server
    client = client_for(url)
    assert sorted(m.id for m in client.models.list()) == ["InternVL-C", "InternVL-G"]
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(input="x", model="text-embedding-3-small")
    assert "InternVL-C" in info.value.message and "InternVL-G" in info.value.message
    assert info.value.body["code"] == "model_not_found"
    ok = client.embeddings.create(input="x", model="InternVL-C", dimensions=model.embed_dim, user="someone")
    assert len(ok.data[0].embedding) == model.embed_dim
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(input="x", model="InternVL-C", dimensions=model.embed_dim // 2)


def test_paths_outside_the_roots_get_one_identical_refusal(server, files):
    url, _ = server
    base, root = files
    refused = [str(base / "secret.txt"), str(base / "outside.png"), str(root / "missing.png"),
               str(root / "notes.png"), str(root / "link.png"), str(root / ".." / "outside.png"), "../outside.png",
               "./../secret.txt", "/etc/passwd", "/etc", "/dev/zero", "/proc/self/environ", "/a\0b",
               "file:///etc/hostname", "/" + "a/" * 3000]
    with httpx.Client(base_url=url, timeout=60) as http:
        answers = {(r.status_code, r.content) for r in (
            http.post("/v1/embeddings", json={"input": ref, "model": "InternVL-C"}) for ref in refused)}
    assert len(answers) == 1, answers
    status, body = answers.pop()
    assert status == 400 and b"image roots" in body and b"root:" not in body
    with pytest.raises(openai.BadRequestError):
        client_for(url).embeddings.create(input=str(base / "outside.png"), model="InternVL-C")


def test_hostile_input_is_4xx_and_the_server_keeps_serving(server, files):
    url, service = server
    buffer = io.BytesIO()
    Image.new("RGB", (1500, 1000), (9, 9, 9)).save(buffer, format="PNG")  # 1.5 MP, over the 1 MP cap
    bomb = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    good = {"model": "InternVL-C"}
    bad = [
        (b"not json", 400), (b"[" * 100_000 + b"]" * 100_000, 400), (b'{"input": "\\ud800", "model": "x"}', 400),
        (b'{"input": "\xff\xfe", "model": "InternVL-C"}', 400), (b"[]", 400), (b"null", 400),
        ({"input": 5, **good}, 400), ({"input": [1, 2, 3], **good}, 400), ({"input": [[1, 2], [3]], **good}, 400),
        ({"input": [], **good}, 400), ({"input": "", **good}, 400), ({"input": ["a", None], **good}, 400),
        ({"input": ["x"] * 17, **good}, 400), ({"input": "y" * 20_001, **good}, 400), ({"input": "x"}, 400),
        ({"input": "x", "model": 7}, 400), ({"input": "x", **good, "encoding_format": "hex"}, 400),
        ({"input": "x", **good, "dimensions": "many"}, 400),
        (b'{"input": "x", "model": "InternVL-C", "dimensions": 1e400}', 400),
        ({"input": "data:image/png;base64,@@@", **good}, 400), ({"input": "data:image/png,rawbytes", **good}, 400),
        ({"input": "data:image/png;base64,", **good}, 400), ({"input": "base64:aGVsbG8=", **good}, 400),
        ({"input": "base64:" + "A" * 100, **good}, 400), ({"input": bomb, **good}, 413),
        (b'{"input": "' + b"z" * (2**20) + b'", "model": "InternVL-C"}', 413),
    ]
    with httpx.Client(base_url=url, timeout=60) as http:
        for body, status in bad:
            kwargs = {"json": body} if isinstance(body, dict) else {"content": body}
            response = http.post("/v1/embeddings", **kwargs, headers={"Content-Type": "application/json"})
            assert response.status_code == status, (str(body)[:80], response.text[:300])
            error = response.json()["error"]
            assert error["message"] and error["type"] == "invalid_request_error"
            after = http.post("/v1/embeddings", json={"input": "still fine", **good})  # same keep-alive client
            assert after.status_code == 200
        assert http.get("/v1/nothing").status_code == 404
        assert http.get("/v1/embeddings").status_code == 405
        assert http.get("/health").json()["failed"] == 0


def test_a_data_url_that_is_not_an_image_names_the_input(server):
    url, _ = server
    with pytest.raises(openai.BadRequestError, match=r"input\[1\]: cannot decode the image"):
        client_for(url).embeddings.create(input=["fine", "data:image/png;base64,aGVsbG8="], model="InternVL-C")


# --------------------------------------------------------------------------------------------------- batching
def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def run_clients(url: str, texts: list[str], key: str = "unused") -> tuple[list, list]:
    """One thread per text, all released at once; returns their responses (and errors) in text order."""
    results, errors = [None] * len(texts), []
    barrier = threading.Barrier(len(texts))

    def one(i: int) -> None:
        client = client_for(url, key)
        barrier.wait()
        try:
            results[i] = client.embeddings.create(input=texts[i], model="InternVL-C", encoding_format="float")
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for thread in threads:
        thread.start()
    return threads, (results, errors)


@pytest.mark.parametrize("max_batch_size", [32, 1])
def test_concurrent_requests_are_batched(model, max_batch_size):
    """16 concurrent requests while the model is busy: batched, they take at most 2 model calls (those the worker
    took before the lock, then all the others together); with max_batch_size 1 one call each. Every answer is its
    own text's."""
    lock = threading.Lock()
    app = create_embeddings_app(model, EmbeddingsConfig(max_batch_size=max_batch_size, max_wait_ms=0), lock)
    texts = [f"request number {i} about {TEXTS[i % 4]}" for i in range(16)]
    with serve_in_thread(app) as url:
        service = app.state.embeddings
        with lock:  # the model is busy: the requests pile up
            threads, (results, errors) = run_clients(url, texts)
            wait_for(lambda: service.stats["requests"] == 16)
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        for text, response in zip(texts, results):
            np.testing.assert_allclose(vectors(response)[0], text_vectors(model, [text])[0], atol=1e-5)
            assert response.usage.prompt_tokens == token_count(model, text)
        stats = service.stats
        assert stats["embedded_inputs"] == 16
        if max_batch_size == 1:
            assert stats["model_calls"] == 16 and stats["largest_batch"] == 1
        else:
            assert stats["model_calls"] <= 2 and stats["batches"] <= 2 and stats["largest_batch"] >= 8


def test_full_queue_answers_429_and_gone_clients_are_dropped(model):
    lock = threading.Lock()
    app = create_embeddings_app(model, EmbeddingsConfig(max_queue=4, max_inputs=4, max_wait_ms=0), lock)
    with serve_in_thread(app) as url:
        service = app.state.embeddings
        with lock:
            threads, (results, errors) = run_clients(url, ["first"])  # taken by the worker, which waits for the lock
            wait_for(lambda: service.stats["batches"] == 1)
            four = threading.Thread(target=lambda: results.append(client_for(url).embeddings.create(
                input=["a", "b", "c", "d"], model="InternVL-C", encoding_format="float")))
            four.start()
            wait_for(lambda: service.health()["queued_inputs"] == 4)  # the queue is full
            with httpx.Client(base_url=url, timeout=60) as http:
                full = http.post("/v1/embeddings", json={"input": "one more", "model": "InternVL-C"})
            assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
            assert full.json()["error"]["code"] == "queue_full"
            with pytest.raises(openai.RateLimitError):
                client_for(url).embeddings.create(input="one more", model="InternVL-C")
            assert service.stats["rejected"] == 2
        for thread in (*threads, four):
            thread.join(120)
        assert not errors and len(results) == 2 and len(results[1].data) == 4
        assert service.stats["embedded_inputs"] == 5

        # a client that sends its request and goes away before the model is free: dropped, never embedded
        with lock:
            threads, (results, errors) = run_clients(url, ["busy"])
            wait_for(lambda: service.stats["batches"] == 3)
            send_and_leave(url, service)
        for thread in threads:
            thread.join(120)
        assert not errors and results[0] is not None
        assert service.stats["embedded_inputs"] == 6 and service.stats["batches"] == 3


def send_and_leave(url: str, service, headers: bytes = b"") -> None:
    """Send a whole request on a raw connection, wait until it is queued, close the connection; returns once the
    server has taken it out of the queue."""
    cancelled = service.stats["cancelled"]
    body = b'{"input": "never embedded", "model": "InternVL-C"}'
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s"
                     b"Content-Length: %d\r\n\r\n%s" % (headers, len(body), body))
        wait_for(lambda: service.health()["queued_inputs"] == 1)
    wait_for(lambda: service.stats["cancelled"] == cancelled + 1 and service.health()["queued_inputs"] == 0)


def test_api_key(model):
    app = create_embeddings_app(model, EmbeddingsConfig(api_key="s3cret"))
    with serve_in_thread(app) as url:
        with pytest.raises(openai.AuthenticationError):
            client_for(url, key="wrong").embeddings.create(input="x", model="InternVL-C")
        assert len(client_for(url, key="s3cret").embeddings.create(input="x", model="InternVL-C").data) == 1
        assert httpx.get(url + "/v1/models", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/health").status_code == 200  # no key needed


# --------------------------------------------------------------------------------------------------- mounts
def test_the_search_service_serves_embeddings_with_its_index_model(tmp_path, files):
    from internvl_fm.retrieval import EmbedConfig, ImageIndex, SearchIndex
    from internvl_fm.retrieval.server import ServerConfig, create_app

    _, pictures = files
    root = tmp_path / "photos"
    shutil.copytree(pictures, root, ignore=shutil.ignore_patterns("link.png", "notes.png"))
    ImageIndex.build(root, tmp_path / "index", demo_model_path(), mode="InternVL-G",
                     embed=EmbedConfig(batch_size=4, num_workers=0, progress=False))
    index = SearchIndex.load(tmp_path / "index")
    paths = [index.hit(i, 0.0).image_path for i in range(len(index))]
    app = create_app(index, ServerConfig(api_key="k"))
    with serve_in_thread(app) as url:
        client = client_for(url, key="k")
        response = client.embeddings.create(input=[paths[1], "a red circle"], model="InternVL-G",
                                            encoding_format="float")
        got = vectors(response)
        np.testing.assert_allclose(got[0], index.stored_vector(1), atol=1e-5)  # the vector the index holds
        np.testing.assert_allclose(got[1], index.embed_text("a red circle")[0], atol=1e-5)
        with pytest.raises(openai.BadRequestError, match="image roots"):
            client.embeddings.create(input=str(files[0] / "outside.png"), model="InternVL-G")
        with pytest.raises(openai.AuthenticationError):
            client_for(url, key="wrong").embeddings.create(input="x", model="InternVL-G")
        hits = httpx.get(url + "/search", params={"text": "a red circle", "k": 2}, headers={"X-API-Key": "k"})
        assert hits.status_code == 200 and len(hits.json()["results"]) == 2

        service = app.state.embeddings
        requests, embedded = service.stats["requests"], service.stats["embedded_inputs"]
        with app.state.service.model_lock:  # a /search holds the model: the embeddings worker waits for it
            threads, (results, errors) = run_clients(url, ["waits for the search"], key="k")
            wait_for(lambda: service.stats["requests"] == requests + 1 and service.health()["queued_inputs"] == 0)
            time.sleep(0.3)
            assert results[0] is None and service.stats["embedded_inputs"] == embedded
            send_and_leave(url, service, b"X-API-Key: k\r\n")  # through the search service's middlewares too
        for thread in threads:
            thread.join(120)
        assert not errors and len(results[0].data) == 1 and service.stats["embedded_inputs"] == embedded + 1


def test_serve_embed_refuses_bad_options_in_one_line(tmp_path):
    """Each is an InternVLError with a one-line message (what `internvl-fm` prints), raised before serving."""
    demo = str(demo_model_path())
    refused = [([demo, "--max-batch-size", "0"], CLIError, r"--max-batch-size '0': expected an integer >= 1"),
               ([demo, "--max-inputs", "2000", "--max-queue", "100"], CLIError, r"--max-inputs '2000'.*max_queue"),
               ([demo, "--max-wait-ms", "-1"], CLIError, r"--max-wait-ms '-1.0'"),
               ([demo, "--image-root", str(tmp_path / "missing")], CLIError, "no such folder"),
               ([str(tmp_path / "no_model"), "--device", "cpu"], CheckpointNotFoundError, "no_model")]
    for argv, error, message in refused:
        with pytest.raises(error, match=message) as info:
            serve_embed_main(argv)
        assert "\n" not in str(info.value)
    with pytest.raises(SystemExit):
        serve_embed_main([demo, "--model", str(tmp_path)])  # two different models


def test_serve_embed_process(files):
    base, root = files
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = ("import sys; from internvl_fm.retrieval.cli import serve_embed_main; "
            "sys.exit(serve_embed_main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(demo_model_path()), "--port", str(port), "--device",
                             "cpu", "--image-root", str(root), "--api-key", "k"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is not None or _answers(url + "/health"), timeout=180)
        assert proc.poll() is None, proc.stdout.read().decode()
        response = client_for(url, key="k").embeddings.create(input=[str(root / "img0.png"), "x"],
                                                               model="InternVL-C")
        assert len(response.data) == 2 and response.usage.prompt_tokens > 0
        with pytest.raises(openai.BadRequestError, match="image roots"):
            client_for(url, key="k").embeddings.create(input=str(base / "outside.png"), model="InternVL-C")
    finally:
        proc.terminate()  # uvicorn shuts down gracefully, then ends by the signal
        log = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in log, log
    assert f"on http://127.0.0.1:{port}/v1" in log


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
