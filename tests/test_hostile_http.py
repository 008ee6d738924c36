"""Hostile HTTP clients against a real ``imgsearch serve`` (gunicorn) on loopback, and the decode
budget in process: every answer in the JSON error shape, slow clients and decode bombs bounded,
no server path told to an unauthenticated caller."""

import base64
import io
import json
import select
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from index.ann.build import build_version
from index.ann.sources import store_source
from index.store import CatalogStore
from index.store.ingest import ingest_catalog
from serve.app import DEFAULT_MAX_BODY_BYTES, create_app
from serve.decode_budget import DecodeBudget
from serve.service import SearchService
from tests.test_serve import COLOURS, DIM, assert_error, colour_embed
from tests.test_serve_shards import ServerProcess
from tests.test_serve_updates import AUTH, TOKEN, ColourPipeline

VECTOR = json.dumps({"vector": [0.1] * DIM, "k": 3}).encode()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(4)
    lines = ["product_id,image,category,title"]
    for p in range(16):
        category = ("red", "blue")[p % 2]
        pixels = np.clip(np.array(COLOURS[category]) + rng.normal(0, 10 + p, size=(30 + p, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"h{p:02d}.png")
        lines.append(f"sku-{p:02d},h{p:02d}.png,{category},Thing {p}")
    (root / "catalog.csv").write_text("\n".join(lines) + "\n")
    store_path, index_root = root / "store", root / "index"
    with CatalogStore.create_or_open(store_path, dim=DIM, vector_dtype="float32") as store:
        ingest_catalog(root / "catalog.csv", store, colour_embed, progress=False)
        build_version(store_source(store), str(index_root), factory="auto", version="v1")
    return root, store_path, index_root


@pytest.fixture(scope="module")
def store(env):
    """The one read-only handle this process holds on the store (LMDB: one per process)."""
    handle = CatalogStore.open_readonly(env[1])
    yield handle
    handle.close()


def _start(env, name: str, *extra: str) -> ServerProcess:
    root, store_path, index_root = env
    return ServerProcess(["--index-root", str(index_root), "--store", str(store_path), "--threads", "4", *extra],
                         root / f"{name}.log", env={"IMGSEARCH_ADMIN_TOKEN": TOKEN}).wait_ready()


@pytest.fixture(scope="module")
def server(env):
    proc = _start(env, "server")
    try:
        yield proc
    finally:
        proc.kill()


# ---------------------------------------------------------------- a raw HTTP/1.1 client

def _head(method: str, path: str, headers: dict) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """(status, lower-cased headers, body) of one response; the body by Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            raise AssertionError(f"connection closed before a response head: {data[:200]!r}")
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        more = sock.recv(65536)
        if not more:
            break
        body += more
    return int(status_line.split()[1]), headers, body[:length]


def exchange(server, request: bytes, timeout: float = 30) -> tuple[int, dict, bytes]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(request)  # no error allowed: the client must get to read the answer
        return read_response(sock)


def assert_json_error(status, headers, body, want_status: int, code: str, fragment: str = ""):
    assert status == want_status, (status, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), (headers, body[:300])
    got = json.loads(body)
    assert set(got) == {"error"} and set(got["error"]) == {"code", "message"}, got
    assert got["error"]["code"] == code and fragment in got["error"]["message"], got


def post_json(server, path: str, body: bytes, headers=None, timeout: float = 30):
    return exchange(server, _head("POST", path, {"Content-Type": "application/json", "Content-Length": len(body),
                                                 **(headers or {})}) + body, timeout)


def normal_query(server, timeout: float = 10) -> float:
    start = time.perf_counter()
    status, _, body = post_json(server, "/v1/search", VECTOR, timeout=timeout)
    assert status == 200, body[:300]
    return time.perf_counter() - start


# ---------------------------------------------------------------- bodies the JSON parser chokes on

def test_deeply_nested_json_is_400_not_500(server):
    nested = b"[" * 100_000 + b"]" * 100_000
    assert_json_error(*post_json(server, "/v1/search", nested), 400, "bad_json", "nested")
    wrapped = b'{"product_id": "x", "image_base64": "", "metadata": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001
    assert_json_error(*post_json(server, "/v1/products", wrapped, AUTH), 400, "bad_json", "nested")
    normal_query(server)


@pytest.mark.parametrize("number", [b"1" + b"0" * 400, b"1e400", b"-1e400", b"1e39", b"3.5e38"])
def test_numbers_beyond_float32_in_a_vector_are_400(server, number):
    body = b'{"vector": [' + b", ".join([number] + [b"0.1"] * (DIM - 1)) + b"]}"
    assert_json_error(*post_json(server, "/v1/search", body), 400, "bad_vector_value", "vector[0]")


# ---------------------------------------------------------------- bodies over the limit

def _chunked(body: bytes, piece: int = 1 << 16) -> bytes:
    return b"".join(b"%x\r\n" % len(body[i:i + piece]) + body[i:i + piece] + b"\r\n"
                    for i in range(0, len(body), piece)) + b"0\r\n\r\n"


def test_a_chunked_body_over_the_limit_is_413_and_one_under_it_is_answered(server):
    head = _head("POST", "/v1/search", {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    over = VECTOR + b" " * (DEFAULT_MAX_BODY_BYTES + 10 - len(VECTOR))  # valid JSON in its first 10 MiB
    assert_json_error(*exchange(server, head + _chunked(over)), 413, "body_too_large", str(DEFAULT_MAX_BODY_BYTES))
    status, _, body = exchange(server, head + _chunked(VECTOR + b" " * 1000))
    assert status == 200 and len(json.loads(body)["results"]) == 3


def test_a_client_still_sending_a_body_over_the_limit_reads_the_413(server):
    body = b"x" * (20 << 20)
    request = _head("POST", "/v1/search", {"Content-Type": "application/json", "Content-Length": len(body)}) + body
    for _ in range(3):
        assert_json_error(*exchange(server, request), 413, "body_too_large", "20971520")
    normal_query(server)


# ---------------------------------------------------------------- gunicorn's own refusals

GUNICORN_REFUSALS = [
    ("long URL", b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
    ("one big header", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n", 431,
     "header_fields_too_large"),
    ("too many headers", b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(200)) + b"\r\n",
     431, "header_fields_too_large"),
    ("Content-Length: -1", b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400, "bad_http_request"),
    ("garbage request line", b"GARBAGE\r\n\r\n", 400, "bad_http_request"),
    ("Transfer-Encoding: gzip", b"POST /v1/search HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400,
     "bad_http_request"),
]


@pytest.mark.parametrize("name, request_bytes, status, code", GUNICORN_REFUSALS, ids=[r[0] for r in GUNICORN_REFUSALS])
def test_requests_gunicorn_refuses_get_the_json_error_shape(server, name, request_bytes, status, code):
    got_status, headers, body = exchange(server, request_bytes)
    assert_json_error(got_status, headers, body, status, code)
    normal_query(server)


def test_the_head_limits_in_the_openapi_document_are_the_ones_enforced(server):
    """x-limits' request-line and header-field sizes are gunicorn's own: just under passes, just over is refused."""
    status, _headers, body = exchange(server, b"GET /openapi.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200
    lim = json.loads(body)["info"]["x-limits"]
    line, field = lim["max_request_line_bytes"], lim["max_header_field_bytes"]
    for size, want in ((line - 32, 404), (line + 32, 414)):
        path = b"/" + b"a" * (size - len(b"GET / HTTP/1.1"))
        got, headers, body = exchange(server, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert got == want, (size, got, body[:200])
    for size, want in ((field - 32, 200), (field + 32, 431)):
        header = b"X-Pad: " + b"a" * (size - len(b"X-Pad: "))
        got, headers, body = exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + header + b"\r\nConnection: close\r\n\r\n")
        assert got == want, (size, got, body[:200])


# ---------------------------------------------------------------- slow clients

def _slow_client(port: int, kind: str, stop: float, log: list) -> None:
    """Sends one byte every 1.5 s: of its header (``head``) or of a declared 1000-byte body (``body``)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            if kind == "head":
                data = b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Pad: " + b"a" * 200
            else:
                sock.sendall(_head("POST", "/v1/search", {"Content-Type": "application/json", "Content-Length": 1000}))
                data = b" " * 1000
            for byte in data:
                if time.monotonic() > stop:
                    break
                sock.send(bytes([byte]))
                time.sleep(1.5)
            log.append("held")
    except OSError as exc:
        log.append(type(exc).__name__)


def test_slow_clients_do_not_starve_normal_queries(server):
    stop = time.monotonic() + 6.0
    log: list = []
    slow = [threading.Thread(target=_slow_client, args=(server.port, kind, stop, log), daemon=True)
            for kind in ("head", "body") * 10]  # 20 slow sockets against 4 request threads
    for thread in slow:
        thread.start()
    time.sleep(0.5)
    latencies = []
    while time.monotonic() < stop - 0.3 and len(latencies) < 200:
        latencies.append(normal_query(server, timeout=5))
        time.sleep(0.02)
    for thread in slow:
        thread.join(timeout=10)
    latencies.sort()
    assert len(latencies) >= 20
    assert latencies[int(0.99 * (len(latencies) - 1))] < 1.0, latencies[-5:]


@pytest.fixture(scope="module")
def strict_server(env):
    proc = _start(env, "strict", "--header-timeout", "1", "--body-timeout", "1.5")
    try:
        yield proc
    finally:
        proc.kill()


@pytest.mark.parametrize("kind", ["head", "body"])
def test_a_slow_client_is_answered_408_and_dropped_at_its_deadline(strict_server, kind):
    with socket.create_connection(("127.0.0.1", strict_server.port), timeout=10) as sock:
        if kind == "body":
            sock.sendall(_head("POST", "/v1/search", {"Content-Type": "application/json", "Content-Length": 100}))
        start = time.monotonic()
        for _ in range(10):  # one byte each 0.5 s: every read is quick, the whole is too slow
            try:
                sock.send(b"X")
            except OSError:
                break
            if select.select([sock], [], [], 0.5)[0]:
                break
        status, headers, body = read_response(sock)
        assert 0.9 < time.monotonic() - start < 3.5
        assert_json_error(status, headers, body, 408, "request_timeout")
        assert sock.recv(100) == b""  # and the connection is closed
    normal_query(strict_server)


# ---------------------------------------------------------------- no server paths to callers

def test_not_ready_and_reload_messages_name_no_server_path(tmp_path, env, store, caplog):
    _, store_path, _ = env
    index_root = tmp_path / "secret-place" / "index"
    index_root.mkdir(parents=True)
    (index_root / "CURRENT").write_text("v9\n")  # names a version that is not there
    service = SearchService(index_root, store_path, store=store)
    with caplog.at_level("WARNING"):
        assert service.load_current() is None
    assert "secret-place" in caplog.text  # the log keeps the detail
    client = create_app(service, admin_token=TOKEN).test_client()
    for response in (client.get("/readyz"), client.post("/v1/search", json={"vector": [0.1] * DIM}),
                     client.post("/v1/admin/reload", headers=AUTH)):
        assert response.status_code in (500, 503)
        message = response.get_json()["error"]["message"]
        assert "secret-place" not in message and str(tmp_path) not in message and "/tmp" not in message, message
        assert "no index loaded" in message or "could not load" in message


# ---------------------------------------------------------------- the decode budget

def _webp(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 30)).save(buffer, "WEBP", quality=10)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = _webp(3000, 3000)  # 9 Mpx from a few KB
    assert len(data) < 100_000
    return data


def _budget_service(env, store, budget: DecodeBudget) -> tuple[SearchService, object]:
    _, store_path, index_root = env
    service = SearchService(index_root, store_path, embedder=ColourPipeline(), decode_budget=budget, store=store)
    assert service.load_current() is not None
    return service, create_app(service, admin_token=TOKEN).test_client()


def test_a_full_decode_budget_answers_503_with_retry_after_and_frees_again(env, store, bomb):
    budget = DecodeBudget(pixels=10_000_000, wait_s=0.3)
    service, client = _budget_service(env, store, budget)
    image = base64.b64encode(bomb).decode()
    with budget.hold(_webp(2000, 2000)):  # another request's 4 Mpx in flight: 9 more do not fit
        start = time.monotonic()
        response = client.post("/v1/search", json={"image_base64": image, "k": 2})
        assert time.monotonic() - start >= 0.3  # waited for room before refusing
        assert_error(response, 503, "busy", "decod")
        assert int(response.headers["Retry-After"]) >= 1
        assert_error(client.post("/v1/products", json={"product_id": "bomb", "image_base64": image}, headers=AUTH),
                     503, "busy")
    assert budget.in_flight == 0
    assert client.post("/v1/search", json={"image_base64": image, "k": 2}).status_code == 200
    assert_error(client.post("/v1/search", json={"image_base64": base64.b64encode(bomb[:200]).decode()}),
                 422, "undecodable_image")
    assert budget.in_flight == 0  # a failed decode gives its share back


def test_concurrent_decode_bombs_never_hold_more_pixels_than_the_budget(env, store, bomb):
    budget = DecodeBudget(pixels=20_000_000, wait_s=0.05)
    service, _ = _budget_service(env, store, budget)
    app = create_app(service, admin_token=TOKEN)
    image = base64.b64encode(bomb).decode()
    statuses: list = []
    gate = threading.Barrier(8)

    def one():
        client = app.test_client()
        gate.wait()
        response = client.post("/v1/search", json={"image_base64": image, "k": 2})
        statuses.append((response.status_code, response.headers.get("Retry-After")))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(statuses) == 8 and {s for s, _ in statuses} <= {200, 503}
    assert any(s == 200 for s, _ in statuses)
    assert all(retry for s, retry in statuses if s == 503)
    assert budget.peak <= 20_000_000 and budget.in_flight == 0


def test_an_image_over_the_budget_alone_is_still_decoded_when_nothing_else_is(env, store):
    budget = DecodeBudget(pixels=1_000_000, wait_s=0.1)
    _, client = _budget_service(env, store, budget)
    response = client.post("/v1/search", json={"image_base64": base64.b64encode(_webp(1500, 1500)).decode(), "k": 2})
    assert response.status_code == 200, response.get_data(as_text=True)


def test_serve_takes_the_decode_budget_and_deadline_options():
    from imgsearch.cli import build_parser

    args = build_parser().parse_args(["serve", "--index-root", "i", "--store", "s", "--decode-pixel-budget", "5000000",
                                      "--header-timeout", "2.5", "--body-timeout", "7"])
    assert (args.decode_pixel_budget, args.header_timeout, args.body_timeout) == (5_000_000, 2.5, 7.0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--index-root", "i", "--store", "s", "--header-timeout", "0"])
