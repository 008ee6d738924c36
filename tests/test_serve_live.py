"""A real ``imgsearch serve --workers 2`` over the real sample catalog (pretrained model) on loopback:
the bad-input suite over real HTTP, live updates and reload across workers, and the web page
in real headless Chromium."""

import base64
import http.client as httplib
import io
import json
import struct
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from index.ann.limits import MAX_K
from tests.test_serve_shards import ServerProcess, http

TOKEN = "live-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from serve.demo import prepare_demo

    return prepare_demo(tmp_path_factory.mktemp("live") / "demo", limit_products=12)


@pytest.fixture(scope="module")
def server(demo, tmp_path_factory):
    log = tmp_path_factory.mktemp("live-logs") / "server.log"
    proc = ServerProcess(["--index-root", str(demo.index_root), "--store", str(demo.store_path), "--workers", "2",
                          "--threads", "4", "--watch-current", "0.5", "--batch-window-ms", "2"], log, env={"IMGSEARCH_ADMIN_TOKEN": TOKEN})
    try:
        yield proc.wait_ready()
    finally:
        proc.kill()


def _queries(demo) -> list[dict]:
    root = Path(demo.queries_dir).parent
    return [json.loads(line) for line in (root / "queries.jsonl").read_text().splitlines()]


def _photo(demo, n=0) -> tuple[bytes, str]:
    q = _queries(demo)[n]
    return (Path(demo.queries_dir).parent / q["image"]).read_bytes(), q["product_id"]


def raw(server, method, path, body: bytes = b"", content_type: str | None = "application/json", headers=None):
    conn = httplib.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.putrequest(method, path)
        if content_type:
            conn.putheader("Content-Type", content_type)
        conn.putheader("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        conn.endheaders()
        try:
            for start in range(0, len(body), 1 << 20):
                conn.send(body[start:start + (1 << 20)])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered before reading it all (e.g. 413): read that answer
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    boundary = "imgsearchtestboundary"
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _png_claiming(width, height) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _jpeg(size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buffer, "JPEG")
    return buffer.getvalue()


def _image(data: bytes):
    return multipart({}, {"image": ("q.jpg", data)})


BAD_INPUTS = [
    # (name, method, path, body, content type, headers, status, code, fragment)
    ("0-byte body", "POST", "/v1/search", b"", "application/json", {}, 400, "bad_json", "JSON object"),
    ("0-byte image", "POST", "/v1/search", *_image(b""), {}, 422, "undecodable_image", "empty (0 bytes)"),
    ("truncated JPEG", "POST", "/v1/search", *_image(_jpeg()[:150]), {}, 422, "undecodable_image", ""),
    ("PNG claiming 50,000x50,000", "POST", "/v1/search", *_image(_png_claiming(50_000, 50_000)), {}, 413, "image_too_large", "limit"),
    ("20 MB body", "POST", "/v1/search", b"x" * (20 << 20), "application/octet-stream", {}, 413, "body_too_large", "20971520"),
    ("text/plain", "POST", "/v1/search", b"hello", "text/plain", {}, 415, "unsupported_media_type", "'text/plain'"),
    ("k=0", "POST", "/v1/search", b'{"vector": [0.1], "k": 0}', "application/json", {}, 400, "k_out_of_range", "got 0"),
    ("k=10001", "POST", "/v1/search", b'{"vector": [0.1], "k": 10001}', "application/json", {}, 400, "k_out_of_range", "got 10001"),
    ("k=ten", "POST", "/v1/search", b'{"vector": [0.1], "k": "ten"}', "application/json", {}, 400, "bad_k", "'ten'"),
    ("wrong vector length", "POST", "/v1/search", b'{"vector": [0.1, 0.2, 0.3]}', "application/json", {}, 400, "bad_vector_length", "got 3"),
    ("NaN in vector", "POST", "/v1/search", b'{"vector": [NaN' + b", 0.0" * 127 + b"]}", "application/json", {}, 400, "bad_vector_value", "vector[0]"),
    ("unknown JSON field", "POST", "/v1/search", b'{"vector": [0.1], "colour": "red"}', "application/json", {}, 400, "unknown_field", "'colour'"),
    ("admin without token", "POST", "/v1/admin/reload", b"", None, {}, 401, "missing_token", "Authorization"),
    ("admin with wrong token", "DELETE", "/v1/products/x", b"", None, {"Authorization": "Bearer wrong"}, 403, "wrong_token", ""),
    ("path-traversal product id", "GET", "/v1/products/../../etc/passwd", b"", None, {}, 404, "unknown_product", "'../../etc/passwd'"),
    ("path-traversal image", "GET", "/v1/products/x/image?image=../../../etc/passwd", b"", None, {}, 404, "unknown_product", "'x'"),
    ("admin delete of a traversal id", "DELETE", "/v1/products/../../etc/passwd", b"", None, AUTH, 404, "unknown_product", "'../../etc/passwd'"),
]


@pytest.mark.parametrize("name, method, path, body, ctype, headers, status, code, fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_its_documented_error_and_the_server_answers_the_next_query(
        server, demo, name, method, path, body, ctype, headers, status, code, fragment):
    got_status, got = raw(server, method, path, body, ctype, headers)
    assert got_status == status, got
    assert set(got) == {"error"} and got["error"]["code"] == code and fragment in got["error"]["message"], got
    photo, product = _photo(demo)
    good_body, good_type = multipart({"k": "3"}, {"image": ("q.jpg", photo)})
    good_status, good = raw(server, "POST", "/v1/search", good_body, good_type)
    assert good_status == 200 and product in [r["product_id"] for r in good["results"]]


def test_live_updates_are_seen_by_every_worker_and_reload_switches_all(server, demo, tmp_path):
    photo, product = _photo(demo)
    image = base64.b64encode(photo).decode()
    status, added = http("POST", server.url + "/v1/products",
                         {"product_id": "shopper-upload", "image_base64": image, "category": "new", "metadata": {"title": "Upload"}},
                         headers=AUTH)
    assert status == 201, added
    for _ in range(8):  # two workers: every one of them must see it at once
        status, body = http("POST", server.url + "/v1/search", {"image_base64": image, "k": 1})
        assert status == 200 and body["results"][0]["product_id"] == "shopper-upload"
    status, _ = http("DELETE", server.url + "/v1/products/shopper-upload", headers=AUTH)
    assert status == 200
    for _ in range(8):
        status, body = http("POST", server.url + "/v1/search", {"image_base64": image, "k": 3})
        assert status == 200 and "shopper-upload" not in [r["product_id"] for r in body["results"]]
        assert body["results"][0]["product_id"] == product

    # A new version published by a job: reload answers from the new one at once, and the
    # other worker follows (it watches CURRENT).
    from index.ann.build import build_version
    from index.ann.sources import store_source
    from index.store import CatalogStore

    with CatalogStore.open_readonly(demo.store_path) as store:
        build_version(store_source(store), str(demo.index_root), factory="auto", version="v-next")
    status, body = http("POST", server.url + "/v1/admin/reload", headers=AUTH)
    assert status == 200 and body["index_version"] == "v-next"
    deadline = time.monotonic() + 20
    while True:
        seen = {http("POST", server.url + "/v1/search", {"image_base64": image, "k": 1})[1]["index_version"] for _ in range(6)}
        if seen == {"v-next"} or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert seen == {"v-next"}


needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists(),
    reason=f"needs Debian chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): apt-get install -y chromium chromium-driver")


def _chromium(tmp_path):
    """A headless Chromium (selenium) with no network but loopback."""
    pytest.importorskip("selenium", reason="needs the selenium package: pip install selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    return driver


@needs_chromium
def test_web_page_in_headless_chromium_shows_the_right_product(server, demo, tmp_path):
    driver = _chromium(tmp_path)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    q = _queries(demo)[0]
    photo_path = Path(demo.queries_dir).parent / q["image"]
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 90)
        wait.until(lambda d: "vectors" in d.find_element(By.ID, "ready").text)
        k_input = driver.find_element(By.ID, "k")
        k_input.clear()
        k_input.send_keys("3")
        driver.find_element(By.ID, "file").send_keys(str(photo_path))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results img"))
        shown = [img.get_attribute("data-product-id") for img in driver.find_elements(By.CSS_SELECTOR, "#results img")]
        assert q["product_id"] in shown, (q, shown)
        # The product's picture really loaded from the image endpoint.
        img = next(i for i in driver.find_elements(By.CSS_SELECTOR, "#results img") if i.get_attribute("data-product-id") == q["product_id"])
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img))
        assert "/v1/products/" in img.get_attribute("src")
        assert driver.find_elements(By.CSS_SELECTOR, "#boxes rect[stroke='#12b76a']"), "the answering region is drawn"
        assert "products in" in driver.find_element(By.ID, "status").text
    finally:
        driver.quit()


@needs_chromium
def test_web_page_shows_only_the_message_for_a_file_that_is_no_image(server, tmp_path):
    driver = _chromium(tmp_path)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bad = tmp_path / "holiday.jpg"
    bad.write_bytes(b"these bytes are not a photo\n" * 40)
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 90)
        wait.until(lambda d: "vectors" in d.find_element(By.ID, "ready").text)
        driver.find_element(By.ID, "file").send_keys(str(bad))
        wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("class") == "error")
        body, content_type = multipart({"k": "12"}, {"image": (bad.name, bad.read_bytes())})
        code, answer = raw(server, "POST", "/v1/search", body, content_type)
        assert code == 422
        assert driver.find_element(By.ID, "status").text == answer["error"]["message"]  # the server's message, as is
        assert not driver.find_element(By.ID, "preview").is_displayed(), "no preview (broken image) above the message"
        broken = driver.execute_script(
            "return [...document.images].filter(i => i.offsetParent !== null && i.getAttribute('src')"
            " && (!i.complete || i.naturalWidth === 0)).length")
        assert broken == 0
        assert not driver.find_elements(By.CSS_SELECTOR, "#results img")
    finally:
        driver.quit()


@needs_chromium
def test_docs_page_renders_the_openapi_document(server, tmp_path):
    driver = _chromium(tmp_path)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        driver.get(server.url + "/docs")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "article.op[data-path='/v1/search'][data-method='post']"))
        search = driver.find_element(By.CSS_SELECTOR, "article.op[data-path='/v1/search'][data-method='post']")
        assert "multipart/form-data" in search.text and "application/json" in search.text
        assert f"maximum: {MAX_K}" in search.text  # k's limit, from the document
        paths = {e.get_attribute("data-path") for e in driver.find_elements(By.CSS_SELECTOR, "article.op[data-path]")}
        assert {"/v1/products", "/v1/admin/reload", "/readyz", "/openapi.json"} <= paths
        assert driver.find_element(By.ID, "schema-Error").is_displayed()
        assert driver.find_element(By.ID, "error").text == ""
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def detector_server(tmp_path_factory):
    """A server whose model has a detector (:func:`tests.test_serve_box.prepare_detector_demo`):
    three real detector boxes on every photo."""
    from tests.test_serve_box import prepare_detector_demo

    demo = prepare_detector_demo(tmp_path_factory.mktemp("live-box") / "demo")
    log = tmp_path_factory.mktemp("live-box-logs") / "server.log"
    proc = ServerProcess(["--index-root", str(demo.index_root), "--store", str(demo.store_path), "--model", str(demo.checkpoint),
                          "--workers", "1", "--threads", "4", "--batch-window-ms", "2"], log)
    try:
        yield demo, proc.wait_ready()
    finally:
        proc.kill()


@needs_chromium
def test_web_page_draws_the_detected_boxes_and_a_click_searches_that_region(detector_server, tmp_path):
    demo, server = detector_server
    driver = _chromium(tmp_path)
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    q = _queries(demo)[1]  # a held-out shopper photo: the catalog holds only the product's cut-out
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 90)
        wait.until(lambda d: "vectors" in d.find_element(By.ID, "ready").text)
        # Record the box each search request carries.
        driver.execute_script("window.sentBoxes = []; const f = window.fetch; window.fetch = (url, opts) => {"
                              " if (opts && opts.body instanceof FormData) window.sentBoxes.push(opts.body.get('box'));"
                              " return f(url, opts); };")
        driver.find_element(By.ID, "file").send_keys(str(Path(demo.queries_dir).parent / q["image"]))
        wait.until(lambda d: "products in" in d.find_element(By.ID, "status").text)
        answered = driver.find_element(By.ID, "region").get_attribute("data-box")
        picks = driver.find_elements(By.CSS_SELECTOR, "#boxes rect.pick")
        drawn = {r.get_attribute("data-box") for r in picks} | {answered}
        # Every detection the server answered with is drawn, the answering region in green.
        body, content_type = multipart({"k": "12"}, {"image": ("q.jpg", (Path(demo.queries_dir).parent / q["image"]).read_bytes())})
        status, answer = raw(server, "POST", "/v1/search", body, content_type)
        assert status == 200 and len(answer["detections"]) >= 2
        assert {",".join(map(str, d["box"])) for d in answer["detections"]} <= drawn
        assert driver.find_element(By.CSS_SELECTOR, "#boxes rect.chosen").get_attribute("data-box") == answered
        assert driver.execute_script("return window.sentBoxes") == [None]

        target = picks[-1]  # drawn last: the smallest, on top of the others
        box = target.get_attribute("data-box")
        assert box != answered
        ActionChains(driver).move_to_element(target).click().perform()
        wait.until(lambda d: d.find_element(By.ID, "region").get_attribute("data-box") == box
                   and "products in" in d.find_element(By.ID, "status").text)
        assert driver.execute_script("return window.sentBoxes") == [None, "[" + box + "]"]
        assert "your pick" in driver.find_element(By.ID, "region").text
        assert driver.find_element(By.CSS_SELECTOR, "#boxes rect.chosen").get_attribute("data-box") == box
        assert driver.find_elements(By.CSS_SELECTOR, "#results img") and driver.find_element(By.ID, "preview").is_displayed()
        # The page shows the server's answer for that region.
        body, content_type = multipart({"k": "12", "box": "[" + box + "]"}, {"image": ("q.jpg", (Path(demo.queries_dir).parent / q["image"]).read_bytes())})
        status, answer = raw(server, "POST", "/v1/search", body, content_type)
        assert status == 200 and answer["region"]["box"] == [int(v) for v in box.split(",")]
        shown = [img.get_attribute("data-product-id") for img in driver.find_elements(By.CSS_SELECTOR, "#results img")]
        assert shown == [r["product_id"] for r in answer["results"]]
    finally:
        driver.quit()
