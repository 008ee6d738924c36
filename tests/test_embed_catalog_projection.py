"""``imgsearch embed`` without ``--model``: a new store gets the catalog projection (a PCA-whitening fitted
on the catalog's own photos, saved as STORE/projection.ckpt), later runs and ``rebuild`` reuse the store's
model, ``search`` embeds queries with it; ``--projection fixed``, a tiny catalog and bad flags. Real photos:
the shared sample catalog (338 images, over the 256 the whitening needs)."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from imgsearch.cli import main

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from imgsearch.sample_data import build_sample_set

    root = tmp_path_factory.mktemp("projection") / "demo"
    build_sample_set(root / "sample", seed=0, progress=False)
    return root


def _store_model(store: Path) -> tuple[str, str | None]:
    from index.store import CatalogStore

    s = CatalogStore.open_readonly(store)
    try:
        return s.model, s.model_checkpoint
    finally:
        s.close()


def _small_catalog(sample: Path, tmp_path: Path, n: int = 4) -> Path:
    lines = (sample / "sample" / "catalog.csv").read_text().splitlines()
    header, rows = lines[0], lines[1 : n + 1]
    # Image paths are relative to the catalog's folder: write the small one beside it.
    path = sample / "sample" / f"small-{tmp_path.name}.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_default_embed_fits_the_catalog_projection_reuses_it_and_search_and_rebuild_follow_it(sample, tmp_path, capsys):
    from embed.pipeline import load_pipeline

    catalog, store, root = sample / "sample" / "catalog.csv", tmp_path / "store", tmp_path / "index"
    assert main(["embed", str(catalog), "--store", str(store)]) == 0
    out = capsys.readouterr().out
    ckpt = store / "projection.ckpt"
    assert "fitted the catalog projection on 338 images" in out and str(ckpt) in out
    config = json.loads((store / "projection.ckpt.json").read_text())
    model, checkpoint = _store_model(store)
    assert checkpoint == str(ckpt) and model == config["weights_sha256"] == load_pipeline(str(ckpt)).model_hash
    assert model != load_pipeline(None).model_hash
    assert config["projection"]["images"] == 338 and config["embedder"]["dim"] == 128

    mtime = ckpt.stat().st_mtime_ns
    assert main(["embed", str(catalog), "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "fitted" not in out and "unchanged 338" in out and ckpt.stat().st_mtime_ns == mtime
    assert _store_model(store) == (model, checkpoint)

    # The demo's pretrained phase: a projection already fitted on this very catalog is reused, not refitted.
    from serve.demo import catalog_projection

    for name in ("projection.ckpt", "projection.ckpt.json"):
        shutil.copyfile(store / name, sample / name)
    assert catalog_projection(sample) == sample / "projection.ckpt"
    assert "fitted" not in capsys.readouterr().out and load_pipeline(str(sample / "projection.ckpt")).model_hash == model

    # rebuild without --model: the store's model again (nothing re-embedded), and the version records it.
    assert main(["rebuild", str(catalog), "--store", str(store), "--index-root", str(root)]) == 0
    assert "fitted" not in capsys.readouterr().out and _store_model(store) == (model, checkpoint)
    manifest = json.loads((root / (root / "CURRENT").read_text().strip() / "manifest.json").read_text())
    assert manifest["model"] == model and manifest["model_checkpoint"] == checkpoint

    # search IMAGE without --model embeds the query with the version's model: a stored photo finds itself.
    with catalog.open(newline="") as f:
        row = next(csv.DictReader(f))
    first, image = row["product_id"], catalog.parent / row["image"]
    assert main(["search", "--index-root", str(root), "--store", str(store), "-k", "3", str(image)]) == 0
    captured = capsys.readouterr()
    answer = json.loads(captured.out.strip().splitlines()[-1])
    assert answer["results"][0]["product_id"] == first and answer["results"][0]["score"] > 0.999
    assert "not comparable" not in captured.err

    # dedup without --model calibrates its threshold with the store's model, not the built-in one.
    groups = tmp_path / "groups.jsonl"
    assert main(["dedup", "--store", str(store), "--index-root", str(root), "--output", str(groups), "--gpu", "off"]) == 0
    calibration = json.loads(Path(str(groups) + ".job.json").read_text())["calibration"]
    assert calibration["method"] == "planted-copies", calibration


def test_projection_fixed_keeps_the_built_in_model_and_a_tiny_catalog_falls_back(sample, tmp_path, capsys):
    from embed.pipeline import load_pipeline

    builtin = load_pipeline(None).model_hash
    small = _small_catalog(sample, tmp_path)
    fixed = tmp_path / "fixed"
    assert main(["embed", str(small), "--store", str(fixed), "--projection", "fixed"]) == 0
    captured = capsys.readouterr()
    assert "notice" not in captured.err and "fitted" not in captured.out
    assert _store_model(fixed) == (builtin, None) and not (fixed / "projection.ckpt").exists()

    tiny = tmp_path / "tiny"
    assert main(["embed", str(small), "--store", str(tiny)]) == 0
    captured = capsys.readouterr()
    notices = [line for line in captured.err.splitlines() if "notice" in line]
    assert len(notices) == 1 and "at least 256 images" in notices[0] and "fixed projection" in notices[0]
    assert "added 4" in captured.out
    assert _store_model(tiny) == (builtin, None) and not (tiny / "projection.ckpt").exists()


def test_conflicting_flags_and_a_bad_catalog_exit_2_before_the_store_is_touched(sample, tmp_path, capsys):
    small = _small_catalog(sample, tmp_path)
    store = tmp_path / "store"
    assert main(["embed", str(small), "--store", str(store), "--model", str(tmp_path / "m.ckpt"),
                 "--projection", "catalog"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model" in err[0] and "--projection" in err[0]
    assert not store.exists()

    bad = tmp_path / "bad.csv"
    bad.write_text("sku,picture\n1,a.jpg\n")
    assert main(["embed", str(bad), "--store", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.csv" in err[0]
    assert not store.exists()
