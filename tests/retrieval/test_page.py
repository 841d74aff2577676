"""The web page in a real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium):
what it shows is what the API answers, for typed queries, uploaded and dropped images, and clicked results.

Set ITM_SCREENSHOTS=DIR to keep the screenshots (benchmarks/results/serve_page.png comes from here).
"""
import base64
import os
import shutil
import urllib.parse
from pathlib import Path

import pytest

from itm.indexer.build import BuildOptions, build_index
from itm.models.registry import resolve_model
from itm.retrieval.service import SearchService
from tests.conftest import write_images
from tests.serving import get, post_form, running

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "data" / "samples"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,900")
QUERY = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:  # a failure, not a skip: .ci/run installs them
        pytest.fail(f"{', '.join(missing)} missing; install them with: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with the driver's path below, Selenium Manager is never asked
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    """The bundled demo model over the committed sample corpus: 300 images, 300 captions."""
    index = tmp_path_factory.mktemp("samples") / "idx"
    spec = resolve_model("demo")
    build_index(SAMPLES / "images", index, spec, BuildOptions(workers=1))
    build_index(SAMPLES / "captions.txt", index, spec, BuildOptions(workers=1))
    with running(SearchService(index)) as u:
        yield u


def wait(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def shown(driver) -> dict:
    """What the page shows: image ids in grid order (thumbnails loaded), text ids and texts in list order."""
    return driver.execute_script("""
        const figures = [...document.querySelectorAll('#images figure')];
        return {
          images: figures.map(f => Number(f.dataset.id)),
          loaded: figures.every(f => { const i = f.querySelector('img'); return i.complete && i.naturalWidth > 0; }),
          texts: [...document.querySelectorAll('#texts li')].map(li => Number(li.dataset.id)),
          words: [...document.querySelectorAll('#texts .text-hit')].map(b => b.textContent),
          scores: [...document.querySelectorAll('.scores')].map(s => s.textContent),
          status: document.getElementById('status').textContent,
          statusClass: document.getElementById('status').className,
        };""")


def expected(reply) -> dict:
    hits = reply.json()["hits"]
    return {"images": [h["id"] for h in hits if h["kind"] == "image"],
            "texts": [h["id"] for h in hits if h["kind"] == "text"],
            "words": [h["text"] for h in hits if h["kind"] == "text"]}


def showing(driver, want: dict) -> bool:
    now = shown(driver)
    return all(now[k] == v for k, v in want.items()) and now["loaded"] and not now["status"].startswith("Searching")


def screenshot(driver, tmp_path, name: str) -> Path:
    folder = Path(os.environ.get("ITM_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    driver.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path


def test_a_typed_query_shows_the_thumbnails_the_api_ranks_first(browser, url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(url + "/")
    wait(browser, lambda d: "300 images" in d.find_element(By.ID, "about").text)
    box = browser.find_element(By.ID, "q")
    box.send_keys(QUERY, Keys.ENTER)
    want = expected(get(url, "/api/search?" + urllib.parse.urlencode({"q": QUERY})))
    assert len(want["images"]) == 10
    wait(browser, lambda d: showing(d, want))
    page = shown(browser)
    assert page["texts"] == [] and "reranked by the fusion model" in page["status"]
    assert all(" · match " in s for s in page["scores"])  # recall score and match score, when reranked
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(browser.current_url).query) == {"q": [QUERY]}
    screenshot(browser, tmp_path, "serve_page.png")


def test_an_uploaded_image_shows_its_texts(browser, url, tmp_path):
    from selenium.webdriver.common.by import By

    photo = SAMPLES / "images" / "test_000042.png"
    browser.get(url + "/")
    wait(browser, lambda d: "300 images" in d.find_element(By.ID, "about").text)
    browser.find_element(By.ID, "file").send_keys(str(photo))
    want = expected(post_form(url, "/api/search/upload", {}, {"image": (photo.name, photo.read_bytes())}))
    assert len(want["texts"]) == 10 and len(want["images"]) == 10
    wait(browser, lambda d: showing(d, want))
    assert f"Texts and images like {photo.name}" in browser.find_element(By.ID, "query").text
    screenshot(browser, tmp_path, "serve_page_image_query.png")


def test_a_dropped_image_is_searched_like_an_upload(browser, url):
    from selenium.webdriver.common.by import By

    browser.get(url + "/?k=3&kind=text")
    wait(browser, lambda d: "300 images" in d.find_element(By.ID, "about").text)
    photo = SAMPLES / "images" / "test_000007.png"
    want = expected(post_form(url, "/api/search/upload", {"k": "3", "kind": "text"},
                              {"image": (photo.name, photo.read_bytes())}))
    browser.execute_script("""  // a drop, as a drag from the file manager makes it
        const [name, b64] = arguments;
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], name, {type: 'image/png'}));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));
        """, photo.name, base64.b64encode(photo.read_bytes()).decode())
    wait(browser, lambda d: showing(d, {**want, "images": []}))
    assert len(shown(browser)["texts"]) == 3 and "Texts and images like test_000007.png" in \
        browser.find_element(By.ID, "query").text


def test_clicking_a_result_searches_with_it(browser, url):
    from selenium.webdriver.common.by import By

    browser.get(url + "/?" + urllib.parse.urlencode({"q": QUERY, "kind": "all", "k": "4"}))
    want = expected(get(url, "/api/search?" + urllib.parse.urlencode({"q": QUERY, "kind": "all", "k": 4})))
    wait(browser, lambda d: showing(d, want))

    first = want["images"][0]
    browser.find_element(By.CSS_SELECTOR, f'#images figure[data-id="{first}"] button').click()  # more like this
    like = expected(get(url, f"/api/search?image_id={first}&kind=all&k=4"))
    wait(browser, lambda d: showing(d, like))
    assert f"image={first}" in browser.current_url and like["images"][0] == first  # it finds itself first

    text = like["words"][0]
    browser.find_elements(By.CSS_SELECTOR, "#texts .text-hit")[0].click()  # search with this text
    wait(browser, lambda d: showing(d, expected(get(url, "/api/search?" + urllib.parse.urlencode(
        {"q": text, "kind": "all", "k": 4})))))
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(browser.current_url).query)["q"] == [text]

    browser.back()  # the previous search, from the URL
    wait(browser, lambda d: showing(d, like))


def test_a_bookmarked_search_with_its_controls(browser, url):
    from selenium.webdriver.common.by import By

    browser.get(url + "/?" + urllib.parse.urlencode({"q": QUERY, "k": "3", "rerank": "0"}))
    want = expected(get(url, "/api/search?" + urllib.parse.urlencode({"q": QUERY, "k": 3, "rerank": "false"})))
    wait(browser, lambda d: showing(d, want))
    page = shown(browser)
    assert len(page["images"]) == 3 and all(s.startswith("recall ") and "match" not in s for s in page["scores"])
    assert "by recall alone" in page["status"]
    assert browser.find_element(By.ID, "k").get_attribute("value") == "3"
    assert not browser.find_element(By.ID, "rerank").is_selected()
    browser.find_element(By.ID, "rerank").click()  # rerank again, and search from the form
    browser.find_element(By.ID, "go").click()
    reranked = expected(get(url, "/api/search?" + urllib.parse.urlencode({"q": QUERY, "k": 3})))
    wait(browser, lambda d: showing(d, reranked) and " · match " in shown(d)["scores"][0])
    assert "rerank" not in urllib.parse.parse_qs(urllib.parse.urlsplit(browser.current_url).query)


def test_an_empty_index_and_a_query_nothing_matches_say_so(browser, tmp_path, tiny_spec):
    from selenium.webdriver.common.by import By

    (tmp_path / "photos").mkdir()
    build_index(tmp_path / "photos", tmp_path / "idx", tiny_spec)
    with running(SearchService(tmp_path / "idx")) as u:
        browser.get(u + "/?q=anything")
        wait(browser, lambda d: "The index is empty" in d.find_element(By.ID, "status").text)
        write_images(tmp_path / "photos", 2)
        build_index(tmp_path / "photos", tmp_path / "idx", tiny_spec)  # taken without a restart
        browser.get(u + "/?q=anything&kind=text")  # no texts in this index
        wait(browser, lambda d: shown(d)["statusClass"] == "empty" and "Nothing matches" in shown(d)["status"])
        browser.get(u + "/?q=anything")
        wait(browser, lambda d: len(shown(d)["images"]) == 2 and shown(d)["loaded"])
        browser.get(u + "/?q=%20")
        wait(browser, lambda d: shown(d)["statusClass"] == "error" and "the query is empty" in shown(d)["status"])
