"""Dedup's default threshold calibrated on planted copies of the catalog's own images; reported
cosines clipped to [-1, 1]; a replaced product image counted as changed by ingest."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from helpers.pixel_embedder import PixelEmbedder
from PIL import Image

from index.jobs import dedup
from index.jobs import dedup_calibration as dc

N_PRODUCTS = 150
N_DUPLICATES = 10


def _fashion_catalog(tmp_path):
    """Real Fashion-MNIST images as products, 10 of them re-uploaded (JPEG q40 or a 90% resize)
    under a new product id: the real duplicates."""
    from imgsearch.errors import MissingAsset
    from imgsearch.sample_data import load_fashion_mnist

    try:
        images, _labels = load_fashion_mnist("test")
    except (MissingAsset, OSError) as exc:
        pytest.skip(f"asset missing, run make data: {exc}")
    folder = tmp_path / "catalog"
    folder.mkdir()
    rows, truth = [], set()
    for i in range(N_PRODUCTS):
        img = Image.fromarray(np.asarray(images[i], np.uint8)).convert("RGB").resize((56, 56), Image.BILINEAR)
        img.save(folder / f"p{i:03d}.png")
        rows.append(f"p{i:03d},p{i:03d}.png,fashion")
        if i < N_DUPLICATES:
            if i % 2:
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=40)
                copy = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
            else:
                copy = img.resize((50, 50), Image.BILINEAR)
            copy.save(folder / f"d{i:03d}.png")
            rows.append(f"d{i:03d},d{i:03d}.png,fashion")
            truth.add((f"d{i:03d}", f"p{i:03d}"))
    (folder / "catalog.csv").write_text("product_id,image,category\n" + "\n".join(rows) + "\n")
    return folder / "catalog.csv", truth


def _ingest(catalog, store_path, embed_fn, model):
    from index.store import CatalogStore
    from index.store.ingest import ingest_catalog

    with CatalogStore.create_or_open(store_path, dim=embed_fn.__self__.dim, vector_dtype="float32") as store:
        return ingest_catalog(catalog, store, embed_fn, progress=False, model=model)


def _build(store_path, root):
    from index.ann.build import build_version
    from index.ann.sources import store_source
    from index.store import CatalogStore

    with CatalogStore.open_readonly(store_path) as store:
        build_version(store_source(store), str(root), gpu="off", factory="IVF4,Flat")


def _default_model_store_and_index(tmp_path):
    """The Fashion-MNIST catalog embedded with the default model into tmp_path/store and indexed
    into tmp_path/index; returns the true duplicate pairs (skips when the model is unavailable)."""
    from embed.pipeline import load_pipeline
    from index.store import CatalogStore
    from index.store.ingest import ingest_catalog

    try:
        pipeline = load_pipeline(None)
    except Exception as exc:  # noqa: BLE001 - the default weights are an offline asset
        pytest.skip(f"default model unavailable: {exc}")
    catalog, truth = _fashion_catalog(tmp_path)
    with CatalogStore.create_or_open(tmp_path / "store", dim=pipeline.dim) as store:
        ingest_catalog(catalog, store, pipeline.embed_catalog, progress=False, model=pipeline.model_hash)
    _build(tmp_path / "store", tmp_path / "index")
    return truth


def _precision(groups, truth):
    found = {(a, b) for g in groups for a, b, _ in g["pairs"]}
    return len(found & truth) / max(len(found), 1), len(found & truth) / len(truth)


def test_calibrated_threshold_is_more_precise_than_the_fixed_default(tmp_path):
    from index.store import CatalogStore

    catalog, truth = _fashion_catalog(tmp_path)
    emb = PixelEmbedder(dim=64)
    _ingest(catalog, tmp_path / "store", emb.embed_catalog, emb.model_hash)
    _build(tmp_path / "store", tmp_path / "index")
    with CatalogStore.open_readonly(tmp_path / "store") as store:
        before = store.stats()
        calib = dc.calibrate_planted(store, emb.embed_catalog, 0.85, sample=100)
        assert store.stats() == before  # planted copies live in memory only
        fixed = dedup.run_dedup(store, str(tmp_path / "index"), dedup.DedupConfig(threshold=0.90, gpu="off"), progress=False)
        tuned = dedup.run_dedup(store, str(tmp_path / "index"), dedup.DedupConfig(threshold=calib["threshold"], gpu="off"),
                                progress=False)
    assert calib["method"] == "planted-copies" and calib["planted_copies"] == 100
    assert calib["reached"] and calib["precision"] >= 0.85 and calib["threshold"] > 0.90
    p_fixed, _ = _precision(fixed.groups, truth)
    p_tuned, r_tuned = _precision(tuned.groups, truth)
    assert p_tuned > p_fixed and r_tuned >= 0.5, (calib, p_fixed, p_tuned, r_tuned)


def test_cli_without_threshold_falls_back_when_no_image_is_reachable(tmp_path, capsys):
    from test_jobs_dedup import build_index, planted_store

    from imgsearch.cli import main

    store_path, truth = planted_store(tmp_path)  # records name images that do not exist
    build_index(store_path, tmp_path / "index")
    out = tmp_path / "groups.jsonl"
    code = main(["dedup", "--store", str(store_path), "--index-root", str(tmp_path / "index"), "--output", str(out),
                 "--gpu", "off"])
    assert code == 0
    captured = capsys.readouterr()
    assert "fixed default (no image file" in captured.err.strip().splitlines()[-1]
    assert "threshold 0.9 is the fixed default" in captured.out.splitlines()[-1]
    job = json.loads((tmp_path / "groups.jsonl.job.json").read_text())
    assert job["calibration"]["method"] == "fixed-default" and job["config"]["threshold"] == 0.9


def test_cli_calibrates_with_the_store_model_and_records_it(tmp_path, capsys):
    from imgsearch.cli import main
    from index.store import CatalogStore

    _default_model_store_and_index(tmp_path)
    out = tmp_path / "groups.jsonl"
    code = main(["dedup", "--store", str(tmp_path / "store"), "--index-root", str(tmp_path / "index"),
                 "--output", str(out), "--gpu", "off"])
    assert code == 0
    line = capsys.readouterr().out.splitlines()[-1]
    job = json.loads((tmp_path / "groups.jsonl.job.json").read_text())
    calib = job["calibration"]
    assert calib["method"] == "planted-copies" and calib["planted_copies"] == N_PRODUCTS + N_DUPLICATES
    assert job["config"]["threshold"] == calib["threshold"] and {"precision", "recall"} <= set(calib)
    assert f"threshold {calib['threshold']:.3f} calibrated on {N_PRODUCTS + N_DUPLICATES} planted copies" in line
    with CatalogStore.open_readonly(tmp_path / "store") as store:
        assert store.stats()["count"] == N_PRODUCTS + N_DUPLICATES


def test_reported_scores_are_cosines_in_minus_one_to_one(tmp_path):
    from index.store import CatalogStore, ItemRecord

    assert dedup.group_pairs([("a", "b", 1.000019)])[0]["pairs"] == [["a", "b", 1.0]]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[1] = x[0] * 1.0001  # a re-upload whose stored vector rounds just past unit length
    records = [ItemRecord(product_id=f"p{i:02d}", image=f"{i}.jpg", content_hash=str(i)) for i in range(20)]
    with CatalogStore.create_or_open(tmp_path / "store", dim=8, vector_dtype="float32") as store:
        store.put(records, x)
    _build(tmp_path / "store", tmp_path / "index")
    for rescore in (True, False):
        with CatalogStore.open_readonly(tmp_path / "store") as store:
            res = dedup.run_dedup(store, str(tmp_path / "index"),
                                  dedup.DedupConfig(threshold=0.99, rescore=rescore, gpu="off"), progress=False)
        assert [g["pairs"] for g in res.groups] == [[["p00", "p01", 1.0]]]


def test_replaced_product_image_counts_as_changed(tmp_path):
    from index.jobs.rebuild import RebuildResult

    rng = np.random.default_rng(0)
    folder = tmp_path / "c"
    folder.mkdir()
    for name in ("p0", "p1", "p2", "p3", "p1-new"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    catalog = folder / "catalog.csv"
    catalog.write_text("product_id,image\n" + "".join(f"p{i},p{i}.png\n" for i in range(4)))
    emb = PixelEmbedder()
    first = _ingest(catalog, tmp_path / "store", emb.embed_catalog, emb.model_hash)
    assert (first.added, first.changed, first.deleted) == (4, 0, 0)
    catalog.write_text("product_id,image\n" + "".join(f"p{i},p{i}{'-new' if i == 1 else ''}.png\n" for i in range(4)))
    from index.store import CatalogStore
    from index.store.ingest import ingest_catalog

    with CatalogStore.create_or_open(tmp_path / "store") as store:
        second = ingest_catalog(catalog, store, emb.embed_catalog, progress=False, model=emb.model_hash,
                                allow_mass_delete=True)
        assert store.stats()["live"] == 4
    assert (second.added, second.changed, second.deleted, second.unchanged) == (0, 1, 0, 3)
    assert second.line().startswith("added 0, changed 1, unchanged 3, updated 0, deleted 0")
    assert "added 0, changed 1, deleted 0" in RebuildResult("unchanged", ingest=second).line()
    # A product that really lost one image and gained none still counts as deleted.
    catalog.write_text("product_id,image\n" + "".join(f"p{i},p{i}{'-new' if i == 1 else ''}.png\n" for i in range(3)))
    with CatalogStore.create_or_open(tmp_path / "store") as store:
        third = ingest_catalog(catalog, store, emb.embed_catalog, progress=False, model=emb.model_hash,
                               allow_mass_delete=True)
    assert (third.added, third.changed, third.deleted) == (0, 0, 1)


def test_verify_candidate_threshold_is_calibrated_and_keeps_the_duplicates(tmp_path, capsys):
    """--verify without a threshold: the candidate cut comes from planted copies (recorded with the
    share of copies it lets through), not the fixed 0.60, and verification still finds the duplicates."""
    from embed.align import DEFAULT_CANDIDATE_THRESHOLD
    from imgsearch.cli import main

    truth = _default_model_store_and_index(tmp_path)
    out = tmp_path / "groups.jsonl"
    code = main(["dedup", "--store", str(tmp_path / "store"), "--index-root", str(tmp_path / "index"),
                 "--output", str(out), "--gpu", "off", "--verify"])
    assert code == 0
    line = capsys.readouterr().out.splitlines()[-1]
    job = json.loads((tmp_path / "groups.jsonl.job.json").read_text())
    calib = job["calibration"]
    assert calib["method"] == "planted-copies" and calib["for"] == "verify"
    assert job["config"]["threshold"] == calib["candidate_threshold"] != DEFAULT_CANDIDATE_THRESHOLD
    assert calib["candidate_recall"] >= 0.99
    assert f"candidate threshold {calib['candidate_threshold']:.3f} calibrated on" in line
    groups = [json.loads(g) for g in out.read_text().splitlines()]
    _precision_found, recall = _precision(groups, truth)
    assert recall >= 0.9
