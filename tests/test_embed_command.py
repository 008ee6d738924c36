"""``imgsearch embed CATALOG --store STORE`` end to end on a tiny real-photo catalog."""

import pytest
import torch
from PIL import Image
from skimage import data

from imgsearch.cli import main

torch.set_num_threads(2)
pytest.importorskip("index.store.catalog")


def embedded_photo_catalog(tmp_path):
    """Four real photos (products ``p-coffee``, ``p-chelsea``, ...) through ``imgsearch embed`` and
    ``imgsearch build`` with default flags: (STORE, INDEX_ROOT)."""
    names = ("coffee", "chelsea", "astronaut", "rocket")
    for name in names:
        Image.fromarray(getattr(data, name)()).convert("RGB").save(tmp_path / f"{name}.jpg")
    rows = "".join(f"p-{name},{name}.jpg,cat-{i % 2}\n" for i, name in enumerate(names))
    (tmp_path / "catalog.csv").write_text("product_id,image,category\n" + rows)
    store, root = tmp_path / "store", tmp_path / "index"
    assert main(["embed", str(tmp_path / "catalog.csv"), "--store", str(store)]) == 0
    assert main(["build", "--store", str(store), "--index-root", str(root)]) == 0
    return store, root


def test_embed_ingests_good_rows_rejects_bad_ones_and_is_idempotent(tmp_path, capsys):
    for name in ("coffee", "chelsea"):
        Image.fromarray(getattr(data, name)()).save(tmp_path / f"{name}.jpg")
    (tmp_path / "bad.jpg").write_text("not an image")
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("product_id,image,category\nc1,coffee.jpg,food\nc2,chelsea.jpg,animals\nb1,bad.jpg,x\n")
    store = tmp_path / "store"
    assert main(["embed", str(catalog), "--store", str(store), "--batch-size", "2"]) == 0
    assert "added 2" in capsys.readouterr().out and (store / "rejects.jsonl").exists()
    assert main(["embed", str(catalog), "--store", str(store)]) == 0
    assert "unchanged 2" in capsys.readouterr().out


def test_search_image_goes_through_the_query_pipeline(tmp_path, capsys):
    """embed -> build -> ``search IMAGE``: the same detect/crop/embed path as the server, the
    HTTP response's shape, and a shopper-like copy of a catalog photo finds its product first."""
    import json

    store, root = embedded_photo_catalog(tmp_path)
    capsys.readouterr()

    chelsea = Image.open(tmp_path / "chelsea.jpg")
    w, h = chelsea.size
    chelsea.crop((w // 10, h // 10, w - w // 10, h - h // 10)).resize((w // 2, h // 2)).save(tmp_path / "q.jpg", quality=60)
    assert main(["search", "--index-root", str(root), "--store", str(store), "-k", "3", str(tmp_path / "q.jpg")]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    answer = json.loads(line)
    assert set(answer) == {"query", "index_version", "took_ms", "detections", "region", "results"}
    assert answer["results"][0]["product_id"] == "p-chelsea" and answer["results"][0]["category"] == "cat-1"
    assert len(answer["results"]) == 3 and len({r["product_id"] for r in answer["results"]}) == 3
    # No trained detector in the default model: the whole photo is the one region.
    assert answer["detections"] == []
    assert answer["region"] == {"box": [0.0, 0.0, float(w // 2), float(h // 2)], "score": 0.0, "source": "whole_image"}

    assert main(["search", "--index-root", str(root), str(tmp_path / "missing.jpg")]) == 2
    assert "missing.jpg" in capsys.readouterr().err
