"""``imgsearch search``: one results shape for IMAGE and --vectors queries, product ids whenever
a store is known (--store, else the one the version's manifest records), and --output for both."""

import json

import faiss
import numpy as np
import pytest

from imgsearch.cli import main

faiss.omp_set_num_threads(1)
DIM, PRODUCTS = 16, 150
RESULT_KEYS = {"product_id", "score", "category", "image", "metadata"}


@pytest.fixture()
def store_index(tmp_path):
    """A store of 150 products x 2 images (near-identical vectors) and an index built from it."""
    from index.store import CatalogStore, ItemRecord

    rng = np.random.default_rng(0)
    base = rng.standard_normal((PRODUCTS, DIM)).astype(np.float32)
    records, vectors = [], []
    for p in range(PRODUCTS):
        for n in range(2):
            v = base[p] + 0.01 * rng.standard_normal(DIM).astype(np.float32)
            records.append(ItemRecord(product_id=f"p{p:03d}", image=f"p{p:03d}-{n}.jpg", content_hash=f"{p}-{n}",
                                      category=f"c{p % 3}"))
            vectors.append(v / np.linalg.norm(v))
    store = tmp_path / "store"
    with CatalogStore.create_or_open(store, dim=DIM, vector_dtype="float32") as s:
        s.put(records, np.stack(vectors))
    root = tmp_path / "index"
    assert main(["build", "--store", str(store), "--index-root", str(root), "--target-recall", "0.9"]) == 0
    np.save(tmp_path / "q.npy", (base[:4] / np.linalg.norm(base[:4], axis=1, keepdims=True)).astype(np.float32))
    return tmp_path, store, root


def _check_answers(answers, k):
    assert [a["query"] for a in answers] == [0, 1, 2, 3]
    for n, answer in enumerate(answers):
        results = answer["results"]
        assert len(results) == k and all(set(r) == RESULT_KEYS for r in results)
        assert results[0]["product_id"] == f"p{n:03d}" and results[0]["category"] == f"c{n % 3}"
        assert len({r["product_id"] for r in results}) == k  # distinct products, as the HTTP API


def test_vectors_with_store_print_product_results(store_index, capsys):
    tmp, store, root = store_index
    capsys.readouterr()
    assert main(["search", "--index-root", str(root), "--store", str(store), "--vectors", str(tmp / "q.npy"), "-k", "5"]) == 0
    out, err = capsys.readouterr()
    _check_answers([json.loads(line) for line in out.strip().splitlines()], 5)
    assert err == ""


def test_vectors_without_store_use_the_store_the_manifest_records(store_index, capsys):
    tmp, _, root = store_index
    capsys.readouterr()
    assert main(["search", "--index-root", str(root), "--vectors", str(tmp / "q.npy"), "-k", "5"]) == 0
    out, err = capsys.readouterr()
    _check_answers([json.loads(line) for line in out.strip().splitlines()], 5)
    assert err == ""


def test_vectors_output_is_written_as_json_lines(store_index, capsys):
    tmp, _, root = store_index
    out_file = tmp / "r.jsonl"
    capsys.readouterr()
    assert main(["search", "--index-root", str(root), "--vectors", str(tmp / "q.npy"), "-k", "3",
                 "--output", str(out_file)]) == 0
    assert "wrote results of 4 queries" in capsys.readouterr().out
    _check_answers([json.loads(line) for line in out_file.read_text().splitlines()], 3)


def test_no_known_store_gives_ids_and_says_so_once(tmp_path, capsys):
    x = np.random.default_rng(1).standard_normal((400, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "q.npy", x[:2])
    root = str(tmp_path / "root")
    assert main(["build", "--vectors", str(tmp_path / "x.npy"), "--index-root", root]) == 0
    capsys.readouterr()
    assert main(["search", "--index-root", root, "--vectors", str(tmp_path / "q.npy"), "-k", "4"]) == 0
    out, err = capsys.readouterr()
    answers = [json.loads(line) for line in out.strip().splitlines()]
    assert [a["results"][0]["product_id"] for a in answers] == ["0", "1"]
    assert all(set(r) == RESULT_KEYS and r["category"] is None for a in answers for r in a["results"])
    (line,) = err.strip().splitlines()
    assert "no --store" in line and "index ids" in line


def test_image_query_output_is_written_with_the_manifest_store(tmp_path, capsys):
    from tests.test_embed_command import embedded_photo_catalog  # torch: only for this test

    _, root = embedded_photo_catalog(tmp_path)
    capsys.readouterr()
    out_file = tmp_path / "r.jsonl"
    assert main(["search", "--index-root", str(root), "-k", "2", "--output", str(out_file), str(tmp_path / "chelsea.jpg")]) == 0
    out, err = capsys.readouterr()
    assert "wrote results of 1 queries" in out and "note" not in err
    (answer,) = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert answer["query"] == str(tmp_path / "chelsea.jpg")
    assert [r["product_id"] for r in answer["results"]][0] == "p-chelsea"
    assert answer["results"][0]["category"] == "cat-1" and set(answer["results"][0]) == RESULT_KEYS
    assert main(["search", "--index-root", str(root), "--output", str(tmp_path / "r.npz"), str(tmp_path / "chelsea.jpg")]) == 2


def test_image_query_scores_stay_cosines(tmp_path, capsys):
    """A catalog photo searched as itself: float16 storage puts the raw self-match just past 1
    (the witness below); the CLI and the HTTP answer report a cosine in [-1, 1], still first."""
    import io

    from embed.pipeline import load_pipeline
    from index.ann.search import open_index
    from serve.app import create_app
    from serve.service import SearchService
    from tests.test_embed_command import embedded_photo_catalog  # torch: only for this test

    store, root = embedded_photo_catalog(tmp_path)
    names = ("coffee", "chelsea", "astronaut", "rocket")
    pipeline, idx = load_pipeline(None), open_index(str(root))
    raw = [float(idx.search(pipeline.embed_queries([str(tmp_path / f"{n}.jpg")])[0].vectors, 1)[0].max()) for n in names]
    assert max(raw) > 1.0, raw  # without clipping some answer would print a cosine above 1
    capsys.readouterr()
    answers = {}
    for name in names:  # the CLI first: one LMDB handle per process, and the service keeps its own
        assert main(["search", "--index-root", str(root), "-k", "2", str(tmp_path / f"{name}.jpg")]) == 0
        (answers[name],) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    service = SearchService(root, store, embedder=pipeline)
    assert service.load_current() is not None, service.not_ready_reason()
    client = create_app(service, max_body_bytes=1 << 24).test_client()
    for name, answer in answers.items():
        photo = (tmp_path / f"{name}.jpg").read_bytes()
        body = client.post("/v1/search", data={"image": (io.BytesIO(photo), "q.jpg"), "k": "2"},
                           content_type="multipart/form-data").get_json()
        assert "results" in body, body
        for results in (answer["results"], body["results"]):
            assert results[0]["product_id"] == f"p-{name}"
            assert all(-1.0 <= r["score"] <= 1.0 for r in results), results
            assert results[0]["score"] >= 0.999
