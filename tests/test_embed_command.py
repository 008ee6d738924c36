"""``imgsearch embed CATALOG --store STORE`` end to end on a tiny real-photo catalog."""

import pytest
import torch
from PIL import Image
from skimage import data

from imgsearch.cli import main

torch.set_num_threads(2)
pytest.importorskip("index.catalog")


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
