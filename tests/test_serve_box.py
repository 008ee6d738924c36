"""``box`` on image queries: search exactly the region the shopper picked, through the real Flask
app over the real sample catalog, with a real pipeline whose detector (prior-initialised heads
on the ImageNet trunk) gives real, low-scored boxes for every photo."""

import base64
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from serve.app import create_app
from serve.requests import BOX_LENGTH
from serve.service import SearchService

torch.set_num_threads(2)


def prepare_detector_demo(workdir: Path):
    """The demo's data (12 real sample products) embedded by a checkpoint holding the pretrained
    embedder and an untrained detector whose heads start at a 0.1 product prior: its boxes score
    about 0.13-0.16, between the candidate floor (0.05) and its own choice's (0.3), so every photo
    has three detections and the catalog is embedded as whole images."""
    from embed.detector import DetectorConfig, ProductDetector
    from embed.model import EmbedderConfig, EmbeddingNet
    from embed.pipeline import make_checkpoint
    from serve.demo import DEMO_CHECKPOINT, prepare_demo

    checkpoint = workdir / DEMO_CHECKPOINT
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)  # the heads' init: the same boxes every run
    make_checkpoint(EmbeddingNet.pretrained(EmbedderConfig()), ProductDetector.pretrained(DetectorConfig(prior=0.1))).save(checkpoint)
    return prepare_demo(workdir, limit_products=12)


def demo_queries(demo) -> list[dict]:
    root = Path(demo.queries_dir).parent
    return [{**q, "path": root / q["image"]} for q in map(json.loads, (root / "queries.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return prepare_detector_demo(tmp_path_factory.mktemp("box") / "demo")


@pytest.fixture(scope="module")
def client(demo):
    from embed.pipeline import load_pipeline

    service = SearchService(demo.index_root, demo.store_path, embedder=load_pipeline(str(demo.checkpoint), device="cpu"),
                            batch_window_ms=2.0)  # the server's batched path, as `serve` runs
    assert service.load_current() is not None, service.not_ready_reason()
    return create_app(service).test_client()


@pytest.fixture(scope="module")
def query(demo):
    return demo_queries(demo)[0]


def search(client, photo: bytes, box=None, k=3):
    data = {"image": (io.BytesIO(photo), "q.jpg"), "k": str(k)}
    if box is not None:
        data["box"] = box if isinstance(box, str) else json.dumps(box)
    return client.post("/v1/search", data=data, content_type="multipart/form-data")


def assert_bad_box(response, *fragments):
    assert response.status_code == 400, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == "bad_box", body
    for fragment in fragments:
        assert fragment in body["error"]["message"], body


def test_a_box_search_answers_for_that_region_and_still_lists_the_detections(client, query):
    photo = query["path"].read_bytes()
    response = search(client, photo, query["box"])
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["region"] == {"box": query["box"], "score": 0.0, "source": "user"}
    assert query["product_id"] in [r["product_id"] for r in body["results"]]
    # The detector still ran: its boxes are listed (the same as without a box), for the page to draw.
    plain = search(client, photo).get_json()
    assert body["detections"] and body["detections"] == plain["detections"]
    assert plain["region"]["source"] != "user"


def test_the_box_is_what_is_searched(client, demo, query):
    """The ground-truth box finds its product first on most photos; and its answer is exactly that
    of the box's crop (with the pipeline's 10% margin, as a detector box) sent as a vector, not
    the answer to the detector's choice."""
    queries = demo_queries(demo)[:6]
    hits = sum(search(client, q["path"].read_bytes(), q["box"], k=1).get_json()["results"][0]["product_id"] == q["product_id"]
               for q in queries)
    assert hits >= 4, hits
    from embed.pipeline import crop_with_margin, load_embedder

    image = Image.open(query["path"]).convert("RGB")
    vector = load_embedder(str(demo.checkpoint), device="cpu").embed([crop_with_margin(image, query["box"], 0.10)])[0]
    by_vector = client.post("/v1/search", json={"vector": vector.tolist(), "k": 5}).get_json()["results"]
    by_box = search(client, query["path"].read_bytes(), query["box"], k=5).get_json()["results"]
    assert [r["product_id"] for r in by_box] == [r["product_id"] for r in by_vector]
    assert [r["score"] for r in by_box] == pytest.approx([r["score"] for r in by_vector], abs=1e-4)
    plain = search(client, query["path"].read_bytes(), k=5).get_json()["results"]
    assert [r["score"] for r in plain] != pytest.approx([r["score"] for r in by_box], abs=1e-4)


def test_picking_a_detected_box_searches_it_and_accepts_both_text_forms(client, query):
    photo = query["path"].read_bytes()
    detections = search(client, photo).get_json()["detections"]
    assert len(detections) >= 2
    picked = detections[1]["box"]
    as_json = search(client, photo, picked).get_json()
    as_text = search(client, photo, " " + ",".join(map(str, picked))).get_json()
    assert as_json["region"]["box"] == as_text["region"]["box"] == picked
    assert as_json["results"] == as_text["results"]


def test_a_json_image_query_takes_a_box_too(client, query):
    photo = base64.b64encode(query["path"].read_bytes()).decode()
    response = client.post("/v1/search", json={"image_base64": photo, "box": query["box"], "k": 3})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["region"]["box"] == query["box"]


BAD_SHAPES = [
    ("[1, 2, 3]", "is not 4 numbers"),
    ("1,2,3,4,5", "is not 4 numbers"),
    ("a,b,c,d", "is not 4 numbers"),
    ("", "is not 4 numbers"),
    ('["1", 2, 30, 40]', "not a number"),
    ("[true, 0, 10, 10]", "not a number"),
    ("nan,0,10,10", "not finite"),
    ("[0, 0, Infinity, 10]", "not finite"),
    ("0,0,1e999,10", "not finite"),
    ("50,10,20,60", "inverted"),
    ("10,60,50,20", "inverted"),
    ("10,10,10,50", "zero area"),
    ("10,10,50,10", "zero area"),
]


@pytest.mark.parametrize("box, fragment", BAD_SHAPES, ids=[b[0] or "empty" for b in BAD_SHAPES])
def test_a_malformed_box_is_a_400_naming_it_before_the_photo_is_decoded(client, box, fragment):
    response = search(client, b"these bytes are no photo", box)  # a 422 had it been decoded
    assert_bad_box(response, fragment, f"box {box!r}")


def test_a_box_outside_the_photo_is_a_400_naming_the_box_and_the_size(client, query):
    photo, w, h = query["path"].read_bytes(), query["width"], query["height"]
    for box in ([-1, 0, 10, 10], [0, 0, w + 1, 10], [0, 0, 10, h + 1], [w + 5, h + 5, w + 50, h + 50]):
        assert_bad_box(search(client, photo, box), f"{w}x{h}", "[" + ", ".join(map(str, box)) + "]")
    # The photo's edges are inside: the whole photo is a box.
    body = search(client, photo, [0, 0, w, h]).get_json()
    assert body["region"]["box"] == [0, 0, w, h]


def test_the_bounds_are_those_of_the_photo_as_its_exif_tag_turns_it(client):
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: stored 300 wide x 100 high, shown (and decoded) 100 x 300
    Image.new("RGB", (300, 100), (180, 60, 40)).save(buffer, "JPEG", exif=exif)
    photo = buffer.getvalue()
    assert search(client, photo, [0, 0, 100, 300]).status_code == 200
    assert_bad_box(search(client, photo, [0, 0, 300, 100]), "100x300")


def test_a_vector_query_with_a_box_is_refused(client, demo):
    body = {"vector": [0.0] * 127 + [1.0], "box": [0, 0, 10, 10]}
    assert_bad_box(client.post("/v1/search", json=body), "[0, 0, 10, 10]", "vector")
    assert client.post("/v1/search", json={"vector": [0.0] * 127 + [1.0]}).status_code == 200


def test_the_openapi_document_describes_the_box_from_the_same_rule(client):
    doc = client.get("/openapi.json").get_json()
    schemas = doc["components"]["schemas"]
    box = schemas["SearchJson"]["properties"]["box"]
    assert box["minItems"] == box["maxItems"] == BOX_LENGTH and box["items"] == {"type": "number"}
    assert "EXIF" in box["description"] and "box" in schemas["SearchMultipart"]["properties"]
    assert "bad_box" in json.dumps(doc["paths"]["/v1/search"]["post"]["responses"]["400"])
