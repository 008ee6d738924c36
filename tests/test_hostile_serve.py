"""Hostile or careless use of a server: shard calls without a token or of any size, workers whose
CURRENT does not load, catalog images swapped on disk under the image endpoint."""

import hashlib
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index.ann import versions
from index.ann.build import build_version
from index.ann.limits import MAX_K
from index.ann.sources import store_source
from index.store import CatalogStore
from index.store.ingest import ingest_catalog
from serve.app import create_app
from serve.service import SearchService
from serve.shards import MAX_SHARD_CANDIDATES, MAX_SHARD_ROWS, ShardFanout, shard_opener
from serve.store_writer import run_writer
from tests.test_serve import COLOURS, DIM, assert_error, colour_embed
from tests.test_serve_shards import ServerProcess

SHARD_TOKEN = "shard-s3cret"
SHARD_AUTH = {"Authorization": f"Bearer {SHARD_TOKEN}"}


def _catalog(root: Path, n: int, folder: str = "") -> Path:
    rng = np.random.default_rng(7)
    lines = ["product_id,image,category,title"]
    (root / folder).mkdir(parents=True, exist_ok=True)
    for p in range(n):
        category = ("red", "blue")[p % 2]
        pixels = np.clip(np.array(COLOURS[category]) + rng.normal(0, 8 + p, size=(20 + p, 30, 3)), 0, 255).astype(np.uint8)
        name = f"{folder}/h{p:02d}.png" if folder else f"h{p:02d}.png"
        Image.fromarray(pixels).save(root / name)
        lines.append(f"hp-{p:02d},{name},{category},Thing {p}")
    (root / "catalog.csv").write_text("\n".join(lines) + "\n")
    return root / "catalog.csv"


def _env(root: Path, n: int = 16, shards: int = 1, folder: str = "", version: str = "v1"):
    catalog = _catalog(root, n, folder)
    store_path, index_root = root / "store", root / "index"
    with CatalogStore.create_or_open(store_path, dim=DIM, vector_dtype="float32") as store:
        ingest_catalog(catalog, store, colour_embed, progress=False)
        build_version(store_source(store), str(index_root), factory="Flat", shards=shards, version=version)
    return store_path, index_root


# ------------------------------------------------------------------ shard calls

@pytest.fixture(scope="module")
def shard_env(tmp_path_factory):
    return _env(tmp_path_factory.mktemp("hostile-shards"), n=24, shards=4, version="s4")


@pytest.fixture(scope="module")
def shard_store(shard_env):
    store_path, _ = shard_env
    store = CatalogStore.open_readonly(store_path)  # one LMDB handle per process, shared
    yield store
    store.close()


def _shard_client(shard_env, shard_store, i=0, n=2, token=SHARD_TOKEN):
    store_path, index_root = shard_env
    service = SearchService(index_root, store_path, opener=shard_opener(i, n), store=shard_store)
    assert service.load_current() is not None, service.not_ready_reason()
    app = create_app(service, admin_token=None, shard_token=token, shard_token_env="TEST_SHARD_TOKEN")
    return service, app.test_client()


def _vector(store, product_id: str) -> list[float]:
    return store.vectors_for([store.items_of_product(product_id)[0].id])[0].tolist()


def test_the_shard_route_is_off_on_a_full_server(shard_env, shard_store):
    store_path, index_root = shard_env
    service = SearchService(index_root, store_path, store=shard_store)
    assert service.load_current() is not None
    client = create_app(service, admin_token=None).test_client()
    body = {"vectors": [_vector(shard_store, "hp-01")], "k": 5}
    assert_error(client.post("/v1/shard/search", json=body, headers=SHARD_AUTH), 404, "not_found")


def test_shard_calls_need_the_shard_token(shard_env, shard_store):
    _, client = _shard_client(shard_env, shard_store)
    body = {"vectors": [_vector(shard_store, "hp-01")], "k": 5}
    assert_error(client.post("/v1/shard/search", json=body), 401, "missing_token")
    assert_error(client.post("/v1/shard/search", json=body, headers={"Authorization": "Bearer nope"}), 403, "wrong_token")
    assert client.post("/v1/shard/search", json=body, headers=SHARD_AUTH).status_code == 200
    _, disabled = _shard_client(shard_env, shard_store, token=None)
    assert_error(disabled.post("/v1/shard/search", json=body, headers=SHARD_AUTH), 403, "shard_disabled", "$TEST_SHARD_TOKEN")


def test_shard_calls_are_bounded_in_rows_k_and_rows_times_k(shard_env, shard_store):
    _, client = _shard_client(shard_env, shard_store)
    row = _vector(shard_store, "hp-01")
    too_many = client.post("/v1/shard/search", json={"vectors": [row] * (MAX_SHARD_ROWS + 1), "k": 1}, headers=SHARD_AUTH)
    assert_error(too_many, 413, "too_many_vectors", str(MAX_SHARD_ROWS + 1), str(MAX_SHARD_ROWS))
    big_k = client.post("/v1/shard/search", json={"vectors": [row], "k": MAX_K + 1}, headers=SHARD_AUTH)
    assert_error(big_k, 400, "k_out_of_range", str(MAX_K))
    rows = MAX_SHARD_CANDIDATES // MAX_K + 1
    product = client.post("/v1/shard/search", json={"vectors": [row] * rows, "k": MAX_K}, headers=SHARD_AUTH)
    assert_error(product, 413, "too_many_candidates", str(rows), str(MAX_K), str(rows * MAX_K), str(MAX_SHARD_CANDIDATES))
    at_limit = client.post("/v1/shard/search", json={"vectors": [row] * (rows - 1), "k": MAX_K}, headers=SHARD_AUTH)
    assert at_limit.status_code == 200 and len(at_limit.get_json()["ids"]) == rows - 1


def _shard_ids(client, vector, k=24) -> set[int]:
    response = client.post("/v1/shard/search", json={"vectors": [vector], "k": k}, headers=SHARD_AUTH)
    assert response.status_code == 200, response.get_data(as_text=True)
    return {i for i in response.get_json()["ids"][0] if i >= 0}


def test_shard_servers_apply_pending_live_updates_each_holding_one_copy(tmp_path):
    store_path, index_root = _env(tmp_path, n=12, shards=4, version="s4")
    store = CatalogStore.open_readonly(store_path)
    try:
        clients = [_shard_client((store_path, index_root), store, i=i)[1] for i in range(2)]
        for c in clients:  # each shard has looked at the updates log once before the writes
            _shard_ids(c, _vector(store, "hp-00"))
        old = store.items_of_product("hp-03")[0]
        old_vector = store.vectors_for([old.id])[0].tolist()
        new_vector = (-np.asarray(old_vector)).tolist()  # far from every catalog vector
        record = {"product_id": "hp-03", "image": old.image, "path": old.path, "category": old.category,
                  "metadata": old.metadata, "content_hash": old.content_hash}
        run_writer(store_path, {"op": "put_product", "record": record, "vector": new_vector})
        fresh = dict(record, product_id="hp-new", image="new.png")
        added = run_writer(store_path, {"op": "put_product", "record": fresh, "vector": new_vector})["item_id"]
        deleted = store.items_of_product("hp-05")[0].id
        run_writer(store_path, {"op": "delete_product", "product_id": "hp-05"})
        found = [_shard_ids(c, new_vector) for c in clients]
        # Each live id is held by exactly one shard server: the two answers are disjoint.
        assert not found[0] & found[1]
        union = found[0] | found[1]
        assert {old.id, added} <= union and deleted not in union
        assert len(union) == 12  # 12 catalog items - 1 deleted + 1 added, each once
    finally:
        store.close()


def test_serve_refuses_a_shard_role_without_a_shard_token(monkeypatch, capsys):
    from imgsearch.cli import main

    monkeypatch.delenv("IMGSEARCH_SHARD_TOKEN", raising=False)
    assert main(["serve", "--index-root", "idx", "--store", "st", "--shard-of", "idx:0/2"]) == 2
    assert "$IMGSEARCH_SHARD_TOKEN" in capsys.readouterr().err
    monkeypatch.delenv("OTHER_TOKEN", raising=False)
    assert main(["serve", "--index-root", "idx", "--store", "st", "--shards", "http://127.0.0.1:1",
                 "--shard-token-env", "OTHER_TOKEN"]) == 2
    assert "$OTHER_TOKEN" in capsys.readouterr().err


def test_the_front_splits_big_query_matrices_into_bounded_authorised_calls(shard_env, shard_store):
    from werkzeug.serving import make_server

    servers, urls = [], []
    for i in range(2):
        _, client = _shard_client(shard_env, shard_store, i=i)
        server = make_server("127.0.0.1", 0, client.application, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        urls.append(f"http://127.0.0.1:{server.server_port}")
    try:
        _, index_root = shard_env
        single = SearchService(index_root, shard_env[0], store=shard_store)
        single.load_current()
        rng = np.random.default_rng(2)
        fanout = ShardFanout(urls, timeout_s=30, token=SHARD_TOKEN)
        fanout.refresh()
        # Over the row limit, then over the rows x k limit: both split into calls the shards take.
        for rows, k in ((MAX_SHARD_ROWS + 40, 5), (MAX_SHARD_CANDIDATES // MAX_K * 2 + 3, MAX_K)):
            queries = rng.normal(size=(rows, DIM)).astype(np.float32)
            scores, ids, partial = fanout.search_partial(queries, k)
            assert not partial and ids.shape == (len(queries), k)
            want_scores, want_ids = single.live().index.search(queries, k)
            assert np.array_equal(ids, want_ids)
        unauthorised = ShardFanout(urls, timeout_s=30, token=None)
        unauthorised.refresh()
        with pytest.raises(Exception, match="shards_unavailable|no shard server answered"):
            unauthorised.search_partial(queries[:1], 5)  # the shards refuse a call without the token
    finally:
        for server in servers:
            server.shutdown()


# ------------------------------------------------------------------ workers whose CURRENT does not load

def _break_version(index_root: Path, name: str) -> None:
    manifest = versions.read_manifest(str(index_root / name))
    for shard in manifest["shard_files"]:
        (index_root / name / shard["index"]).write_bytes(b"\0not a faiss index\0" * 8)


def _env_with_broken_current(root: Path, leftover: bool = False):
    """v1 good, CURRENT -> v2 broken; with ``leftover``, between them a version a killed
    ``rebuild`` left unvalidated (manifest, no rebuild.json)."""
    store_path, index_root = _env(root, n=12, version="v1")
    with CatalogStore.create_or_open(store_path) as store:
        if leftover:
            build_version(store_source(store), str(index_root), factory="Flat", version="v1-unvalidated",
                          publish=False, build_notes={"job": "rebuild"})
        build_version(store_source(store), str(index_root), factory="Flat", version="v2")
    _break_version(index_root, "v2")
    assert versions.read_current(str(index_root)) == "v2"
    return store_path, index_root


def test_a_starting_worker_falls_back_to_the_newest_older_version_that_loads(tmp_path):
    store_path, index_root = _env_with_broken_current(tmp_path, leftover=True)
    # A version newer than CURRENT was never published (a rebuild killed before it): not a fallback.
    with CatalogStore.create_or_open(store_path) as store:
        build_version(store_source(store), str(index_root), factory="Flat", version="v3", publish=False)
    service = SearchService(index_root, store_path)
    live = service.load_current()
    assert live is not None and live.version == "v1"
    client = create_app(service, admin_token=None).test_client()
    assert client.get("/readyz").get_json()["index_version"] == "v1"
    # A reload of the broken CURRENT fails and keeps serving v1.
    with pytest.raises(Exception, match="reload_failed|could not load"):
        service.reload()
    assert service.live().version == "v1"


def test_a_worker_with_nothing_that_loads_is_not_ready(tmp_path):
    store_path, index_root = _env_with_broken_current(tmp_path)
    _break_version(index_root, "v1")
    service = SearchService(index_root, store_path)
    assert service.load_current() is None
    client = create_app(service, admin_token=None).test_client()
    assert_error(client.get("/readyz"), 503, "not_ready")


def _workers(master_pid: int) -> list[int]:
    text = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text()
    return [int(p) for p in text.split()]


def _hammer(url: str, body: dict, seconds: float, threads: int = 4, stop=lambda: False) -> tuple[int, list[str]]:
    """Requests, each on a new connection (so the kernel spreads them over the workers), for
    ``seconds`` or until ``stop()``; (how many, the failures)."""
    data = json.dumps(body).encode()
    failures: list[str] = []
    count = [0]
    deadline = time.monotonic() + seconds

    def loop():
        while time.monotonic() < deadline and not stop():
            request = urllib.request.Request(url + "/v1/search", data=data, method="POST",
                                             headers={"Content-Type": "application/json", "Connection": "close"})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    response.read()
            except urllib.error.HTTPError as exc:
                failures.append(f"{exc.code} {exc.read()[:200]!r}")
            except OSError as exc:
                failures.append(repr(exc))
            count[0] += 1

    pool = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(seconds + 60)
    return count[0], failures


def _wait_for_log(log: Path, offset: int, text: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace")[offset:]:
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not logged in {timeout_s}s: {log.read_text(errors='replace')[-3000:]}")


def test_two_workers_with_a_broken_current_fail_no_request(tmp_path):
    store_path, index_root = _env_with_broken_current(tmp_path)
    with CatalogStore.open_readonly(store_path) as store:
        body = {"vector": _vector(store, "hp-02"), "k": 3}
    log = tmp_path / "server.log"
    server = ServerProcess(["--index-root", str(index_root), "--store", str(store_path), "--workers", "2",
                            "--threads", "4"], log)
    try:
        server.wait_ready()
        time.sleep(1.0)  # both workers booted
        count, failures = _hammer(server.url, body, seconds=4)
        assert count > 20 and failures == [], failures[:5]
        # Now nothing under INDEX_ROOT loads: v1 loses its manifest (the workers keep it open).
        manifest = index_root / "v1" / versions.MANIFEST
        manifest.rename(manifest.with_suffix(".off"))
        victim = _workers(server.proc.pid)[0]
        offset = len(log.read_text(errors="replace"))
        os.kill(victim, signal.SIGKILL)
        # The replacement worker boots (loads the model: seconds), cannot load any version, and
        # must take no traffic while its sibling serves: requests until it has been held back
        # for 5 s, or for 90 s (without holding back it would be serving 503s long before).
        held: list[float] = []

        def held_back_for_5_s() -> bool:
            if not held and "taking no requests while another worker serves" in log.read_text(errors="replace")[offset:]:
                held.append(time.monotonic())
            return bool(held) and time.monotonic() - held[0] > 5

        count, failures = _hammer(server.url, body, seconds=90, stop=held_back_for_5_s)
        assert failures == [], f"{len(failures)} of {count} failed: {failures[:5]}"
        assert held and count > 40
        assert len(_workers(server.proc.pid)) == 2
        # Once a version loads again, the held-back worker serves it.
        offset = len(log.read_text(errors="replace"))
        manifest.with_suffix(".off").rename(manifest)
        _wait_for_log(log, offset, "serving index version v1", timeout_s=60)
        count, failures = _hammer(server.url, body, seconds=3)
        assert failures == [], failures[:5]
    finally:
        server.kill()


# ------------------------------------------------------------------ the image endpoint

@pytest.fixture()
def image_env(tmp_path):
    store_path, index_root = _env(tmp_path, n=4, folder="img")
    store = CatalogStore.open_readonly(store_path)
    service = SearchService(index_root, store_path, store=store)
    assert service.load_current() is not None
    yield tmp_path, create_app(service, admin_token=None).test_client()
    store.close()


def test_the_image_endpoint_serves_the_stored_bytes(image_env):
    root, client = image_env
    response = client.get("/v1/products/hp-01/image")
    data = (root / "img" / "h01.png").read_bytes()
    assert response.status_code == 200 and response.mimetype == "image/png" and response.data == data
    assert response.headers["ETag"].strip('"') == hashlib.sha256(data).hexdigest()


def test_a_symlink_swapped_in_for_a_catalog_image_is_not_served(image_env):
    root, client = image_env
    target = root / "img" / "h01.png"
    target.unlink()
    target.symlink_to("/etc/passwd")
    response = client.get("/v1/products/hp-01/image")
    assert_error(response, 404, "image_missing")
    assert b"root:" not in response.data
    # A link to the very same bytes is not followed either.
    target.unlink()
    (root / "copy.png").write_bytes((root / "img" / "h03.png").read_bytes())
    (root / "img" / "h03.png").unlink()
    (root / "img" / "h03.png").symlink_to(root / "copy.png")
    assert_error(client.get("/v1/products/hp-03/image"), 404, "image_missing")


def test_a_link_in_a_parent_folder_is_not_followed(image_env):
    root, client = image_env
    (root / "img").rename(root / "elsewhere")
    (root / "img").symlink_to(root / "elsewhere")
    assert_error(client.get("/v1/products/hp-02/image"), 404, "image_missing")


def test_an_image_whose_bytes_changed_since_ingest_is_refused(image_env):
    root, client = image_env
    (root / "img" / "h02.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not the catalog image")
    response = client.get("/v1/products/hp-02/image")
    assert_error(response, 409, "image_changed", "hp-02")
    assert b"not the catalog image" not in response.data


def test_a_fifo_at_the_image_path_is_refused_without_blocking(image_env):
    root, client = image_env
    target = root / "img" / "h00.png"
    target.unlink()
    os.mkfifo(target)
    got: dict = {}
    thread = threading.Thread(target=lambda: got.update(r=client.get("/v1/products/hp-00/image")), daemon=True)
    thread.start()
    thread.join(10)
    assert "r" in got, "the image endpoint blocked on a FIFO"
    assert_error(got["r"], 404, "image_missing")
