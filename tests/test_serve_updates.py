"""Micro-batching, admin auth, live updates, reload and access logs, in-process (real store, real
index, a deterministic stand-in embedder; store writes go through the real writer child)."""

import base64
import io
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embed.pipeline import QueryEmbedding, Region
from index.ann.build import build_version
from index.ann.sources import store_source
from index.store import CatalogStore
from index.store.ingest import ingest_catalog
from serve.app import create_app
from serve.service import SearchService
from tests.test_serve import COLOURS, DIM, assert_error, colour_embed

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HELPERS = Path(__file__).parent / "helpers"


class ColourPipeline:
    """The query/catalog interface of embed.pipeline.QueryPipeline, on colour statistics."""

    dim = DIM

    def embed_queries(self, images, stage=None):
        vectors = colour_embed(images)
        return [QueryEmbedding(im.size, [Region((0.0, 0.0, float(im.width), float(im.height)), 0.0, "whole_image")], v[None, :])
                for im, v in zip(images, vectors)]

    def embed_catalog(self, images):
        return colour_embed(images)


def _make_catalog(root, n_products=12):
    rng = np.random.default_rng(1)
    lines = ["product_id,image,category,title"]
    for p in range(n_products):
        category = "red" if p % 2 else "blue"
        pixels = np.clip(np.array(COLOURS[category]) + rng.normal(0, 25 + 2 * p, size=(30 + p, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"q{p:02d}.png")
        lines.append(f"item-{p:02d},q{p:02d}.png,{category},Item {p}")
    (root / "catalog.csv").write_text("\n".join(lines) + "\n")


def make_env(tmp_path):
    """A store of 12 products and index version v1 built from it."""
    _make_catalog(tmp_path)
    store_path, index_root = tmp_path / "store", tmp_path / "index"
    with CatalogStore.create_or_open(store_path, dim=DIM, vector_dtype="float32") as store:
        ingest_catalog(tmp_path / "catalog.csv", store, colour_embed, progress=False)
        build_version(store_source(store), str(index_root), factory="auto", version="v1")
    return tmp_path, store_path, index_root


@pytest.fixture()
def env(tmp_path):
    return make_env(tmp_path)


_STORES: dict = {}


def _client(env, token=TOKEN, **service_options):
    """A service and its test client; services of one env share one store handle (one LMDB
    handle per process)."""
    _, store_path, index_root = env
    if str(store_path) not in _STORES:
        _STORES.clear()
        _STORES[str(store_path)] = CatalogStore.open_readonly(store_path)
    service = SearchService(index_root, store_path, embedder=ColourPipeline(), store=_STORES[str(store_path)], **service_options)
    assert service.load_current() is not None, service.not_ready_reason()
    return service, create_app(service, admin_token=token).test_client()


def _png_b64(colour, size=(44, 33), seed=5) -> tuple[str, list[float]]:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 9, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    decoded = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return base64.b64encode(buffer.getvalue()).decode(), colour_embed([decoded])[0].tolist()


def _top(client, vector, k=3):
    response = client.post("/v1/search", json={"vector": vector, "k": k})
    assert response.status_code == 200, response.get_data(as_text=True)
    return [r["product_id"] for r in response.get_json()["results"]]


# ---------------------------------------------------------------- micro-batching

def test_concurrent_queries_are_batched_and_answered_as_alone(env):
    service, client = _client(env, batch_window_ms=20)
    _, alone = _client(env, batch_window_ms=0)
    store = service.store()
    vectors = store.vectors_for([r.id for r in store.iter_records()]).tolist()
    expected = [alone.post("/v1/search", json={"vector": v, "k": 4}).get_json()["results"] for v in vectors]
    got: dict[int, list] = {}
    barrier = threading.Barrier(len(vectors))

    def one(n):
        app_client = client.application.test_client()
        barrier.wait()
        got[n] = app_client.post("/v1/search", json={"vector": vectors[n], "k": 4}).get_json()["results"]

    threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in range(len(vectors))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got[n] for n in range(len(vectors))] == expected
    text = client.get("/metrics").get_data(as_text=True)
    count = float(next(line.split()[-1] for line in text.splitlines() if line.startswith('imgsearch_batch_size_count{kind="search"}')))
    assert count < len(vectors), "12 queries released together should share batches"


def test_image_queries_batch_the_embed_step(env):
    service, client = _client(env, batch_window_ms=20)
    photo = (env[0] / "q03.png").read_bytes()
    results = {}

    def one(n):
        response = client.application.test_client().post(
            "/v1/search", data={"image": (io.BytesIO(photo), "q.png"), "k": "1"}, content_type="multipart/form-data")
        results[n] = response.get_json()["results"][0]["product_id"]

    threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(results.values()) == {"item-03"}
    assert 'imgsearch_batch_size_count{kind="embed"}' in client.get("/metrics").get_data(as_text=True)


# ---------------------------------------------------------------- admin auth

@pytest.mark.parametrize(
    "method, path",
    [("post", "/v1/products"), ("delete", "/v1/products/item-01"), ("post", "/v1/admin/reload")],
)
def test_admin_endpoints_need_the_token(env, method, path):
    _, client = _client(env)
    call = getattr(client, method)
    assert_error(call(path), 401, "missing_token", "no Authorization header")
    assert_error(call(path, headers={"Authorization": "Basic abc"}), 401, "missing_token", "'Basic'")
    assert_error(call(path, headers={"Authorization": "Bearer nope"}), 403, "wrong_token")
    _, disabled = _client(env, token=None)
    assert_error(getattr(disabled, method)(path, headers=AUTH), 403, "admin_disabled", "IMGSEARCH_ADMIN_TOKEN")
    assert client.get("/v1/products/item-01").status_code == 200  # nothing changed, still serving


def test_admin_token_comes_from_the_environment(env, monkeypatch):
    _, store_path, index_root = env
    monkeypatch.setenv("MY_TOKEN", "from-env")
    service, _ = _client(env)
    client = create_app(service, admin_token_env="MY_TOKEN").test_client()
    assert client.post("/v1/admin/reload", headers={"Authorization": "Bearer from-env"}).status_code == 200


# ---------------------------------------------------------------- live updates

def test_added_product_is_searchable_at_once_and_durable(env):
    _, store_path, _ = env
    service, client = _client(env)
    image, vector = _png_b64((20, 220, 20))  # green: unlike anything in the catalog
    body = {"product_id": "new-1", "image_base64": image, "category": "green", "metadata": {"title": "New"}}
    response = client.post("/v1/products", json=body, headers=AUTH)
    assert response.status_code == 201, response.get_data(as_text=True)
    assert response.get_json()["product"]["category"] == "green"
    assert _top(client, vector)[0] == "new-1"
    top = client.post("/v1/search", json={"vector": vector, "k": 1}).get_json()["results"][0]
    assert top["metadata"] == {"title": "New"} and top["image"].startswith("uploads/")
    image_response = client.get(f"/v1/products/new-1/image?image={top['image']}")
    assert image_response.status_code == 200 and image_response.mimetype == "image/png"
    # Durable: a fresh process-level service (reads store + updates log) sees it too.
    fresh, fresh_client = _client(env)
    assert _top(fresh_client, vector)[0] == "new-1"
    assert fresh.live().ntotal == service.live().ntotal == 13


def test_update_replaces_the_products_image(env):
    _, client = _client(env)
    red, red_vector = _png_b64((230, 10, 10), seed=1)
    green, green_vector = _png_b64((10, 230, 10), seed=2)
    assert client.post("/v1/products", json={"product_id": "p", "image_base64": red}, headers=AUTH).status_code == 201
    second = client.post("/v1/products", json={"product_id": "p", "image_base64": green, "category": "x"}, headers=AUTH)
    assert second.status_code == 200 and second.get_json()["replaced_images"] == 1
    assert _top(client, green_vector, k=1) == ["p"]
    assert "p" not in _top(client, red_vector, k=1) or _top(client, red_vector, k=1) != ["p"]
    assert len(client.get("/v1/products/p").get_json()["images"]) == 1


def test_delete_removes_the_product_from_results_at_once(env, tmp_path):
    service, client = _client(env)
    store = service.store()
    (record,) = store.items_of_product("item-05")
    vector = store.vectors_for([record.id])[0].tolist()
    assert _top(client, vector)[0] == "item-05"
    response = client.delete("/v1/products/item-05", headers=AUTH)
    assert response.status_code == 200 and response.get_json()["deleted_images"] == 1
    assert "item-05" not in _top(client, vector, k=12)
    assert_error(client.get("/v1/products/item-05"), 404, "unknown_product")
    assert_error(client.delete("/v1/products/item-05", headers=AUTH), 404, "unknown_product", "'item-05'")
    assert_error(client.delete("/v1/products/../../etc/passwd", headers=AUTH), 404, "unknown_product", "'../../etc/passwd'")
    assert service.live().ntotal == 11


@pytest.mark.parametrize(
    "body, status, code, fragment",
    [
        ({"image_base64": "aGk="}, 400, "missing_field", "'product_id'"),
        ({"product_id": "x"}, 400, "missing_field", "'image_base64'"),
        ({"product_id": "", "image_base64": "aGk="}, 400, "bad_product_id", "''"),
        ({"product_id": 7, "image_base64": "aGk="}, 400, "bad_product_id", "7"),
        ({"product_id": "x", "image_base64": "aGk=", "price": 3}, 400, "unknown_field", "'price'"),
        ({"product_id": "x", "image_base64": "***"}, 400, "bad_base64", "not valid base64"),
        ({"product_id": "x", "image_base64": "aGk=", "metadata": [1]}, 400, "bad_metadata", "[1]"),
        ({"product_id": "x", "image_base64": "aGk=", "category": 5}, 400, "bad_category", "5"),
        ({"product_id": "x", "image_base64": base64.b64encode(b"not an image").decode()}, 422, "undecodable_image", ""),
    ],
)
def test_bad_product_bodies_change_nothing(env, body, status, code, fragment):
    service, client = _client(env)
    assert_error(client.post("/v1/products", json=body, headers=AUTH), status, code, fragment)
    assert service.live().ntotal == 12 and not (env[1] / "serve-updates.jsonl").exists()


def test_product_body_must_be_json(env):
    _, client = _client(env)
    assert_error(client.post("/v1/products", data="x", content_type="text/plain", headers=AUTH), 415, "unsupported_media_type")


def test_store_locked_by_another_writer_answers_503_and_changes_nothing(env):
    _, store_path, _ = env
    service, client = _client(env)
    image, _ = _png_b64((1, 2, 3))
    # Another process holds the write lock (e.g. a cron `imgsearch embed`).
    holder = subprocess.Popen([sys.executable, str(HELPERS / "store_writer.py"), "hold-lock", str(store_path)],
                              stdout=subprocess.PIPE, text=True, cwd=HELPERS.parents[1])
    try:
        assert holder.stdout.readline().strip() == "locked"
        response = client.post("/v1/products", json={"product_id": "z", "image_base64": image}, headers=AUTH)
    finally:
        holder.kill()
        holder.wait()
    assert_error(response, 503, "store_locked", "locked for writing")
    assert service.live().ntotal == 12


# ---------------------------------------------------------------- reload

def test_reload_switches_to_the_version_current_names(env):
    _, store_path, index_root = env
    service, client = _client(env)
    assert client.get("/readyz").get_json()["index_version"] == "v1"
    build_version(store_source(service.store()), str(index_root), factory="auto", version="v2")
    response = client.post("/v1/admin/reload", headers=AUTH)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json() == {"index_version": "v2", "previous_version": "v1", "ntotal": 12}
    assert client.post("/v1/search", json={"vector": [0.1] * DIM}).get_json()["index_version"] == "v2"
    assert 'imgsearch_index_info{version="v2"} 1.0' in client.get("/metrics").get_data(as_text=True)


def test_failed_reload_keeps_the_old_version_serving(env):
    _, _, index_root = env
    service, client = _client(env)
    (index_root / "CURRENT").write_text("no-such-version\n")
    assert_error(client.post("/v1/admin/reload", headers=AUTH), 500, "reload_failed", "still serving v1")
    assert client.post("/v1/search", json={"vector": [0.1] * DIM}).get_json()["index_version"] == "v1"


def test_a_new_version_replays_live_updates(env):
    """A version built before some admin writes gets them before it goes live."""
    _, store_path, index_root = env
    service, client = _client(env)
    build_version(store_source(service.store()), str(index_root), factory="auto", version="v2", publish=False)
    image, vector = _png_b64((20, 220, 20))
    client.post("/v1/products", json={"product_id": "late", "image_base64": image}, headers=AUTH)
    client.delete("/v1/products/item-00", headers=AUTH)
    (index_root / "CURRENT").write_text("v2\n")
    assert client.post("/v1/admin/reload", headers=AUTH).get_json()["index_version"] == "v2"
    assert _top(client, vector)[0] == "late"
    assert "item-00" not in _top(client, vector, k=12)
    assert service.live().ntotal == 12


# ---------------------------------------------------------------- observability

def test_access_log_is_one_json_line_per_request(env, caplog):
    _, client = _client(env)
    with caplog.at_level(logging.INFO, logger="imgsearch.access"):
        client.post("/v1/search", json={"vector": [0.1] * DIM, "k": 0})
    line = json.loads(caplog.records[-1].getMessage())
    assert line["status"] == 400 and line["endpoint"] == "/v1/search" and line["error"] == "k_out_of_range"
    assert line["index_version"] == "v1" and line["ms"] > 0


def test_readyz_names_version_size_and_metric(env):
    _, client = _client(env)
    assert client.get("/readyz").get_json() == {"status": "ready", "index_version": "v1", "ntotal": 12, "dim": DIM, "metric": "ip"}
