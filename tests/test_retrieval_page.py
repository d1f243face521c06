"""The search page (retrieval/static/index.html) in real headless Chromium: index and model info on the landing
page, text / caption / by-result / uploaded-image searches, the query in the URL (and back / forward), the
full-size view, the text-after-file regression and captions shown as text, never as HTML."""
from __future__ import annotations

import socket
import threading
import time
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from internvl_fm.retrieval import ImageIndex
from internvl_fm.retrieval.server import create_app
from test_retrieval_common import fast_config, make_images

from internvl_fm import InternVLModel, demo_model_path
from conftest import headless_chromium

webdriver = pytest.importorskip("selenium.webdriver")
By = pytest.importorskip("selenium.webdriver.common.by").By
Keys = pytest.importorskip("selenium.webdriver.common.keys").Keys
WebDriverWait = pytest.importorskip("selenium.webdriver.support.ui").WebDriverWait

N = 8
INJECTED = 5  # the row whose caption is HTML
PAYLOAD = '<img src=x onerror="window.__pwned=1"><b>bold</b> & <script>window.__pwned=2</script>'

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    paths = make_images(root / "imgs", N)
    paths[INJECTED].with_suffix(".txt").write_text(PAYLOAD)
    model = InternVLModel.from_pretrained(demo_model_path())
    index = ImageIndex.build(root / "imgs", root / "index", model, model_path=str(demo_model_path()),
                             embed=fast_config())
    return paths, index


@pytest.fixture(scope="module")
def server(built):
    """The app over the demo-model index, served by uvicorn in a thread of this process."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    uv = uvicorn.Server(uvicorn.Config(create_app(built[1]), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if uv.started:
            break
        time.sleep(0.05)
    assert uv.started, "uvicorn did not start"
    yield url
    uv.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = headless_chromium(tmp_path_factory.mktemp("chromium-profile"), browser_log=True)
    yield driver
    driver.quit()


@pytest.fixture(autouse=True)
def no_page_errors(browser):
    """Every test ends without a script error or a failed load in the browser console."""
    browser.get_log("browser")  # drop what earlier tests left
    yield
    severe = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not severe, severe


# ------------------------------------------------------------------------------------------------------ helpers
def api(server: str, **query) -> list[dict]:
    """The hits the API gives for `query` (GET for text, POST JSON otherwise)."""
    if "text" in query:
        response = httpx.get(server + "/search", params=query)
    else:
        response = httpx.post(server + "/search", json=query)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def ids(hits: list[dict]) -> list[int]:
    return [hit["id"] for hit in hits]


def shown(driver) -> list[int]:
    """Ids of the result cards on the page, once no search is in flight."""
    return driver.execute_script(
        "if (document.getElementById('results').hasAttribute('aria-busy')) return null;"
        "return [...document.querySelectorAll('figure.result')].map(f => Number(f.dataset.id));")


def wait_for(driver, condition, what: str, timeout: float = 30):
    return WebDriverWait(driver, timeout).until(lambda d: condition(d), message=f"timed out waiting for {what}")


def wait_ids(driver, expected: list[int]) -> None:
    wait_for(driver, lambda d: shown(d) == expected, f"results {expected}")


def url_query(driver) -> dict[str, list[str]]:
    return parse_qs(urlparse(driver.current_url).query)


def card_texts(driver) -> list[str]:
    return [e.get_attribute("textContent") for e in driver.find_elements(By.CSS_SELECTOR, "figure.result .text")]


# -------------------------------------------------------------------------------------------------------- tests
def test_landing_shows_index_and_model_info(browser, server, built):
    health = httpx.get(server + "/health").json()
    assert health["model"] == {"name": "demo_model", "mode": "InternVL-C", "dtype": "float32",
                               "image_size": built[1].spec.image_size, "quantization": None}
    browser.get(server + "/")
    info = browser.find_element(By.ID, "info")
    wait_for(browser, lambda d: "demo_model" in info.text, "the index description")
    text = info.text
    for part in (f"{N} images", "images: Flat", "captions: Flat", "demo_model", "InternVL-C", "float32",
                 f"{health['model']['image_size']} px"):
        assert part in text, (part, text)
    assert browser.find_element(By.ID, "landing").is_displayed()
    assert browser.find_elements(By.CSS_SELECTOR, "figure.result") == []
    assert browser.find_element(By.ID, "target-captions").is_enabled()


def test_text_search_updates_the_url_and_history(browser, server):
    first, second = ids(api(server, text="a checkerboard", k=12)), ids(api(server, text="random noise", k=12))
    assert first != second and len(first) == N
    browser.get(server + "/")
    box = browser.find_element(By.ID, "query")
    box.send_keys("a checkerboard", Keys.ENTER)
    wait_ids(browser, first)
    assert url_query(browser) == {"q": ["a checkerboard"]}
    assert "results in" in browser.find_element(By.ID, "status").text
    assert not browser.find_element(By.ID, "landing").is_displayed()
    box.clear()
    box.send_keys("random noise")
    browser.find_element(By.ID, "go").click()
    wait_ids(browser, second)
    assert url_query(browser) == {"q": ["random noise"]}
    browser.back()
    wait_ids(browser, first)
    assert box.get_attribute("value") == "a checkerboard"
    browser.forward()
    wait_ids(browser, second)
    assert box.get_attribute("value") == "random noise"


def test_query_in_the_url_runs_on_load(browser, server):
    browser.get(server + "/?q=vertical%20stripes&k=3")
    wait_ids(browser, ids(api(server, text="vertical stripes", k=3)))
    assert browser.find_element(By.ID, "query").get_attribute("value") == "vertical stripes"
    assert browser.find_element(By.ID, "k").get_attribute("value") == "3"
    assert "vertical stripes" in browser.title


def test_captions_toggle_searches_captions(browser, server):
    browser.get(server + "/?q=a%20checkerboard&k=5")
    wait_ids(browser, ids(api(server, text="a checkerboard", k=5)))
    browser.find_element(By.ID, "target-captions").click()
    expected = api(server, text="a checkerboard", k=5, target="captions")
    wait_ids(browser, ids(expected))
    assert url_query(browser) == {"q": ["a checkerboard"], "target": ["captions"], "k": ["5"]}
    assert "captions" in browser.find_element(By.ID, "results").get_attribute("class").split()
    assert card_texts(browser) == [hit["caption"] for hit in expected]
    links = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "figure.result a.open")]
    assert links == [server + hit["url"] for hit in expected]  # each caption still links its image
    browser.find_element(By.ID, "target-images").click()
    wait_ids(browser, ids(api(server, text="a checkerboard", k=5)))
    assert "target" not in url_query(browser)


def test_clicking_a_result_searches_by_it(browser, server):
    browser.get(server + "/?q=a%20plain%20colour")
    wait_ids(browser, ids(api(server, text="a plain colour", k=12)))
    card = browser.find_elements(By.CSS_SELECTOR, "figure.result")[2]
    row = int(card.get_attribute("data-id"))
    card.find_element(By.CSS_SELECTOR, "button.thumb").click()
    expected = api(server, image=[row], k=12)
    assert expected[0]["id"] == row and expected[0]["score"] == pytest.approx(1.0, abs=1e-4)
    wait_ids(browser, ids(expected))
    assert url_query(browser) == {"id": [str(row)]}
    assert browser.find_element(By.ID, "query").get_attribute("value") == ""
    chip = browser.find_element(By.ID, "query-image")
    assert chip.is_displayed() and f"#{row}" in chip.text
    browser.back()  # back to the text search
    wait_ids(browser, ids(api(server, text="a plain colour", k=12)))
    assert not chip.is_displayed()


def test_full_size_view_opens_and_closes(browser, server):
    hit = api(server, text="random noise", k=4)[0]
    browser.get(server + "/?q=random%20noise&k=4")
    wait_ids(browser, ids(api(server, text="random noise", k=4)))
    viewer = browser.find_element(By.ID, "viewer")
    assert not viewer.is_displayed()
    browser.find_element(By.CSS_SELECTOR, "figure.result button.view").click()
    assert viewer.is_displayed()
    image = browser.find_element(By.ID, "viewer-img")
    wait_for(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image),
             "the full-size image")
    assert image.get_attribute("src") == server + hit["url"]
    assert browser.find_element(By.ID, "viewer-caption").text == hit["caption"]
    meta = browser.find_element(By.ID, "viewer-meta").text
    assert hit["key"] in meta and f"id {hit['id']}" in meta and f"{hit['score']:.4f}" in meta
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    assert not viewer.is_displayed()
    browser.find_element(By.CSS_SELECTOR, "figure.result button.view").click()
    assert viewer.is_displayed()
    browser.find_element(By.ID, "viewer-close").click()
    assert not viewer.is_displayed()
    assert shown(browser) == ids(api(server, text="random noise", k=4))  # closing changed nothing else
    browser.find_element(By.CSS_SELECTOR, "figure.result button.view").click()
    browser.find_element(By.ID, "viewer-similar").click()  # from the view: search by the image shown
    wait_ids(browser, ids(api(server, image=[hit["id"]], k=4)))
    assert not viewer.is_displayed() and url_query(browser) == {"id": [str(hit["id"])], "k": ["4"]}


def test_typing_after_choosing_a_file_searches_the_text(browser, server, built):
    paths = built[0]
    browser.get(server + "/")
    box, chip = browser.find_element(By.ID, "query"), browser.find_element(By.ID, "query-image")
    box.send_keys("some text first")
    browser.find_element(By.ID, "image").send_keys(str(paths[6]))  # choosing a file searches it at once
    wait_for(browser, lambda d: (shown(d) or [None])[0] == 6, "the uploaded image's search")
    assert chip.is_displayed() and paths[6].name in chip.text
    assert box.get_attribute("value") == ""  # the file replaced the text
    box.send_keys("vertical stripes")
    assert not chip.is_displayed()  # typing replaced the file
    box.send_keys(Keys.ENTER)
    wait_ids(browser, ids(api(server, text="vertical stripes", k=12)))
    assert url_query(browser) == {"q": ["vertical stripes"]}
    browser.find_element(By.ID, "image").send_keys(str(paths[6]))  # the same file again: searched again
    wait_for(browser, lambda d: (shown(d) or [None])[0] == 6, "the second upload's search")
    browser.find_element(By.ID, "clear-image").click()
    assert not chip.is_displayed()
    browser.find_element(By.ID, "go").click()
    assert browser.find_element(By.ID, "status").text == "type a query or choose an image"


def test_html_in_a_caption_is_shown_as_text(browser, server):
    browser.get(server + f"/?id={INJECTED}&k=3")
    wait_for(browser, lambda d: (shown(d) or [None])[0] == INJECTED, "the search by the injected row")
    assert card_texts(browser)[0] == PAYLOAD
    results = browser.find_element(By.ID, "results")
    assert results.find_elements(By.CSS_SELECTOR, "b, script") == []
    assert len(results.find_elements(By.TAG_NAME, "img")) == len(results.find_elements(By.TAG_NAME, "figure"))
    browser.find_element(By.CSS_SELECTOR, "figure.result button.view").click()
    caption = browser.find_element(By.ID, "viewer-caption")
    assert caption.get_attribute("textContent") == PAYLOAD and caption.find_elements(By.XPATH, "./*") == []
    assert browser.execute_script("return window.__pwned") is None
