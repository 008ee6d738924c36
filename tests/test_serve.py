"""The HTTP layer against a real store and a real index version (vector queries need no model)."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from index.ann.build import build_version
from index.ann.sources import store_source
from index.store import CatalogStore
from index.store.ingest import ingest_catalog
from serve.app import create_app
from serve.service import SearchService

DIM = 8
COLOURS = {"red": (200, 30, 30), "blue": (30, 30, 200)}


def colour_embed(images) -> np.ndarray:
    """Deterministic unit vectors from image statistics: distinct images map apart."""
    rows = []
    for image in images:
        px = np.asarray(image, dtype=np.float32) / 255.0
        rows.append([*px.mean(axis=(0, 1)), *px.std(axis=(0, 1)), image.width / 100.0, image.height / 100.0])
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def catalog_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    rng = np.random.default_rng(0)
    lines = ["product_id,image,category,title"]
    for p in range(30):
        category = "red" if p % 3 else "blue"
        for view in range(2):  # two images per product: results must collapse them
            base = np.array(COLOURS[category]) + rng.integers(-25, 25, size=3)
            pixels = np.clip(base + rng.normal(0, 20 + p, size=(40 + p, 50 + view * 7, 3)), 0, 255).astype(np.uint8)
            name = f"p{p:02d}_{view}.png"
            Image.fromarray(pixels).save(root / name)
            lines.append(f"prod-{p:02d},{name},{category},Product {p}")
    (root / "catalog.csv").write_text("\n".join(lines) + "\n")
    store_path, index_root = root / "store", root / "index"
    with CatalogStore.create_or_open(store_path, dim=DIM, vector_dtype="float32") as store:
        ingest_catalog(root / "catalog.csv", store, colour_embed, progress=False)
        build_version(store_source(store), str(index_root), factory="auto")
    return root, store_path, index_root


@pytest.fixture(scope="module")
def service(catalog_env):
    _, store_path, index_root = catalog_env
    service = SearchService(index_root, store_path)
    assert service.load_current() is not None, service.not_ready_reason()
    return service


@pytest.fixture(scope="module")
def client(service):
    return create_app(service, max_body_bytes=1 << 20).test_client()


@pytest.fixture(scope="module")
def stored_vector(service):
    def vector_of(product_id: str) -> list[float]:
        store = service.store()  # one LMDB handle per process: read through the server's
        record = store.items_of_product(product_id)[0]
        return store.vectors_for([record.id])[0].tolist()

    return vector_of


def assert_error(response, status: int, code: str, *fragments: str):
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    for fragment in fragments:
        assert fragment in body["error"]["message"]


def test_health_and_readiness(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["ntotal"] == 60


def test_not_ready_without_an_index(tmp_path, catalog_env):
    _, store_path, _ = catalog_env
    service = SearchService(tmp_path / "no-index", store_path)
    assert service.load_current() is None
    client = create_app(service).test_client()
    assert_error(client.get("/readyz"), 503, "not_ready", "no index loaded")
    assert_error(client.post("/v1/search", json={"vector": [0.0] * DIM}), 503, "not_ready")
    assert client.get("/healthz").status_code == 200


def test_vector_search_returns_distinct_products_with_metadata(client, stored_vector):
    response = client.post("/v1/search", json={"vector": stored_vector("prod-07"), "k": 5})
    assert response.status_code == 200
    body = response.get_json()
    assert list(body) == ["index_version", "took_ms", "detections", "results"]
    assert body["detections"] == []
    products = [r["product_id"] for r in body["results"]]
    assert products[0] == "prod-07" and len(products) == 5 == len(set(products))
    top = body["results"][0]
    assert top["category"] == "red" and top["metadata"] == {"title": "Product 7"}
    assert top["image"] in ("p07_0.png", "p07_1.png")
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_category_filter_returns_k_of_that_category(client, stored_vector):
    body = client.post("/v1/search", json={"vector": stored_vector("prod-07"), "k": 8, "category": "blue"}).get_json()
    assert len(body["results"]) == 8
    assert {r["category"] for r in body["results"]} == {"blue"}


def test_k_above_the_number_of_products_returns_all_of_them(client, stored_vector):
    body = client.post("/v1/search", json={"vector": stored_vector("prod-01"), "k": 10000}).get_json()
    assert len(body["results"]) == 30


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for a huge image, with a few bytes of pixel data: never allocate the image."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b"")


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 10)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "kwargs, status, code, fragment",
    [
        ({"data": "hello", "content_type": "text/plain"}, 415, "unsupported_media_type", "'text/plain'"),
        ({"json": {"vector": [0.1] * DIM, "k": 0}}, 400, "k_out_of_range", "got 0"),
        ({"json": {"vector": [0.1] * DIM, "k": 10001}}, 400, "k_out_of_range", "got 10001"),
        ({"json": {"vector": [0.1] * DIM, "k": "ten"}}, 400, "bad_k", "'ten'"),
        ({"json": {"vector": [0.1] * 3}}, 400, "bad_vector_length", "got 3"),
        ({"data": '{"vector": [NaN, 0, 0, 0, 0, 0, 0, 1]}', "content_type": "application/json"}, 400, "bad_vector_value", "vector[0]"),
        ({"json": {"vector": [0.1] * DIM, "colour": "red"}}, 400, "unknown_field", "'colour'"),
        ({"json": {"vector": [0.1] * DIM, "image_base64": "aGk="}}, 400, "bad_query", "exactly one"),
        ({"json": {"image_base64": "***"}}, 400, "bad_base64", "not valid base64"),
        ({"json": {"vector": [0.1] * DIM, "category": "x" * 201}}, 400, "bad_category", "got 201"),
        ({"data": b"x" * (2 << 20), "content_type": "application/octet-stream"}, 413, "body_too_large", "limit"),
    ],
)
def test_bad_requests_get_their_documented_status_and_the_server_keeps_answering(client, stored_vector, kwargs, status, code, fragment):
    assert_error(client.post("/v1/search", **kwargs), status, code, fragment)
    good = client.post("/v1/search", json={"vector": stored_vector("prod-03"), "k": 1})
    assert good.status_code == 200 and good.get_json()["results"][0]["product_id"] == "prod-03"


@pytest.mark.parametrize(
    "payload, status, code",
    [
        (b"", 422, "undecodable_image"),
        (_jpeg_bytes()[:150], 422, "undecodable_image"),
        (b"just text", 422, "undecodable_image"),
        (_png_header_claiming(50_000, 50_000), 413, "image_too_large"),
    ],
)
def test_bad_images_are_rejected_before_any_model_runs(client, payload, status, code):
    response = client.post("/v1/search", data={"image": (io.BytesIO(payload), "q.jpg")}, content_type="multipart/form-data")
    assert_error(response, status, code)


def test_products_and_their_images(client):
    product = client.get("/v1/products/prod-04").get_json()
    assert product["category"] == "red" and len(product["images"]) == 2
    image = client.get("/v1/products/prod-04/image?image=p04_1.png")
    assert image.status_code == 200 and image.mimetype == "image/png"
    assert_error(client.get("/v1/products/prod-04/image?image=../catalog.csv"), 404, "unknown_image")
    assert_error(client.get("/v1/products/../../etc/passwd"), 404, "unknown_product", "'../../etc/passwd'")
    assert_error(client.get("/v1/products/no-such"), 404, "unknown_product")


def test_metrics_count_requests_and_stage_latencies(client, stored_vector):
    client.post("/v1/search", json={"vector": stored_vector("prod-02")})
    text = client.get("/metrics").get_data(as_text=True)
    assert 'imgsearch_requests_total{code="200",endpoint="/v1/search",method="POST"}' in text
    assert 'imgsearch_stage_seconds_count{stage="search"}' in text
    assert "imgsearch_index_ntotal 60.0" in text


def test_page_is_served(client):
    page = client.get("/")
    assert page.status_code == 200 and b"Drop a product photo" in page.data


def test_errors_are_json_for_unknown_routes(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/v1/search"), 405, "method_not_allowed")


def test_json_body_is_not_parsed_by_force(client):
    response = client.post("/v1/search", data=json.dumps({"vector": [0.1] * DIM}), content_type="text/plain")
    assert_error(response, 415, "unsupported_media_type")


def test_image_query_runs_the_real_pipeline_and_times_each_stage(catalog_env, tmp_path):
    """A photo upload goes decode -> detect -> embed -> search through the pretrained model."""
    from embed.pipeline import load_pipeline
    from index.store.ingest import ingest_catalog as ingest

    root, _, _ = catalog_env
    pipeline = load_pipeline(None)
    store_path, index_root = tmp_path / "store", tmp_path / "index"
    with CatalogStore.create_or_open(store_path, dim=pipeline.dim) as store:
        ingest(root / "catalog.csv", store, pipeline.embed_catalog, progress=False)
        build_version(store_source(store), str(index_root), factory="auto")
    service = SearchService(index_root, store_path, embedder=pipeline)
    assert service.load_current() is not None
    client = create_app(service).test_client()
    photo = (root / "p11_0.png").read_bytes()
    response = client.post("/v1/search", data={"image": (io.BytesIO(photo), "q.png"), "k": "3"}, content_type="multipart/form-data")
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["results"][0]["product_id"] == "prod-11"
    # No trained detector in the default model: no detections, the whole photo answers.
    w, h = Image.open(io.BytesIO(photo)).size
    assert body["detections"] == []
    assert body["region"] == {"box": [0.0, 0.0, float(w), float(h)], "score": 0.0, "source": "whole_image"}
    text = client.get("/metrics").get_data(as_text=True)
    for stage in ("decode", "detect", "embed", "search", "join"):
        assert f'imgsearch_stage_seconds_count{{stage="{stage}"}} 1.0' in text


class TwoRegionPipeline:
    """A photo's regions as the query pipeline gives them: the detector's choice (0.35) first, a
    lower box (0.1) next. The first embeds opposite to a stored product's vector (every stored
    colour vector is positive, so it matches nothing well), the second as that vector."""

    dim = DIM

    def __init__(self, product_vector: list[float]):
        self.product_vector = np.asarray(product_vector, np.float32)

    def embed_queries(self, images, stage=None):
        from embed.pipeline import QueryEmbedding, Region

        regions = [Region((1.0, 2.0, 30.0, 40.0), 0.35), Region((5.0, 5.0, 20.0, 25.0), 0.1)]
        return [QueryEmbedding(im.size, regions, np.stack([-self.product_vector, self.product_vector])) for im in images]

    def embed_catalog(self, images):
        return colour_embed(images)


@pytest.mark.parametrize(("batch_window_ms", "metric"), [(0.0, "ip"), (2.0, "ip"), (0.0, "l2")])
def test_a_photo_is_answered_by_its_best_matching_region(catalog_env, tmp_path, batch_window_ms, metric):
    root, _, _ = catalog_env
    store_path, index_root = tmp_path / "store", tmp_path / "index"  # the module's store is open in this process
    with CatalogStore.create_or_open(store_path, dim=DIM, vector_dtype="float32") as store:
        ingest_catalog(root / "catalog.csv", store, colour_embed, progress=False)
        build_version(store_source(store, metric=metric), str(index_root), factory="auto")
    product_vector = colour_embed([Image.open(root / "p13_0.png").convert("RGB")])[0]
    service = SearchService(index_root, store_path, embedder=TwoRegionPipeline(product_vector), batch_window_ms=batch_window_ms)
    assert service.load_current() is not None
    photo = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 90, 90)).save(photo, format="PNG")
    body = create_app(service).test_client().post(
        "/v1/search", data={"image": (io.BytesIO(photo.getvalue()), "q.png"), "k": "3"}, content_type="multipart/form-data").get_json()
    # The lower box matches exactly (1.0 + 0.5 x 0.1); the detector's choice matches nothing (< 0 + 0.5 x 0.35).
    assert body["region"] == {"box": [5.0, 5.0, 20.0, 25.0], "score": 0.1, "source": "detector"}
    # An l2 index answers in squared distances (lower is better): the choice must not pick the worst region.
    exact = 1.0 if metric == "ip" else 0.0
    assert body["results"][0]["product_id"] == "prod-13" and body["results"][0]["score"] == pytest.approx(exact, abs=1e-4)
    assert [d["score"] for d in body["detections"]] == [0.35, 0.1]
