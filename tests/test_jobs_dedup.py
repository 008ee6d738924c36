"""imgsearch dedup: union-find, planted near-duplicates, calibration, output format."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgsearch.calibration import precision_cut
from index.jobs import dedup
from index.jobs.unionfind import UnionFind

DIM = 32


def test_union_find_components_over_int64():
    uf = UnionFind()
    big = (1 << 62) + 7
    uf.union_pairs([1, 2, big, 10], [2, 3, 1, 11])
    uf.union(20, 20)
    assert uf.groups() == [[1, 2, 3, big], [10, 11]]
    assert uf.find(3) == uf.find(big) != uf.find(10)
    assert 20 in uf and len(uf) == 7


def test_union_find_long_chain_is_shallow():
    uf = UnionFind()
    n = 50_000
    uf.union_pairs(np.arange(n - 1), np.arange(1, n))  # no recursion: no RecursionError
    assert len(uf.groups()) == 1 and uf.size[uf.find(0)] == n


def test_choose_threshold_reaches_target_precision():
    scores = np.array([0.99, 0.97, 0.95, 0.93, 0.91, 0.90, 0.85, 0.80])
    labels = np.array([1, 1, 1, 0, 1, 1, 0, 1], bool)
    got = dedup.choose_threshold(scores, labels, 0.95)
    assert got["threshold"] == pytest.approx(0.94) and got["precision"] == 1.0 and got["recall"] == 0.5
    got = dedup.choose_threshold(scores, labels, 0.8)
    assert got["threshold"] == pytest.approx(0.875) and got["recall"] == pytest.approx(5 / 6, abs=1e-4)
    with pytest.raises(Exception, match="both"):
        dedup.choose_threshold(scores, np.ones(8, bool), 0.9)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.booleans()), max_size=30), st.sampled_from([0.5, 0.8, 0.95, 1.0]))
def test_precision_cut_is_the_longest_prefix_reaching_the_target_between_distinct_values(items, target):
    values = np.array(sorted((v for v, _ in items), reverse=True), dtype=np.float64)  # most alike first
    labels = np.array([y for _, y in sorted(items, key=lambda item: -item[0])], dtype=bool)
    found = precision_cut(values, labels, target)
    if not items:
        assert found is None
        return
    cut, reached = found
    allowed = [i for i in range(len(values)) if i + 1 == len(values) or values[i + 1] != values[i]]  # no tie split
    assert cut in allowed
    precision = lambda i: labels[: i + 1].mean()  # noqa: E731
    valid = [i for i in allowed if labels[i] and precision(i) >= target]
    assert reached == bool(valid)
    assert cut == (max(valid) if valid else max(allowed, key=lambda i: (precision(i), -i)))


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def planted_store(tmp_path, seed=0):
    """300 distinct products (2 images for every 5th), 25 planted duplicate products (5 of them
    duplicated twice, i.e. groups of 3), and 25 look-alikes (similarity ~0.8) as hard negatives."""
    from index.store import CatalogStore, ItemRecord

    rng = np.random.default_rng(seed)
    base = _unit(rng.standard_normal((300, DIM)))
    records, vectors, truth = [], [], set()

    def add(pid, vec, n=0):
        records.append(ItemRecord(product_id=pid, image=f"{pid}-{n}.jpg", content_hash=f"{pid}{n}"))
        vectors.append(vec)

    def near(v, cos):
        noise = _unit(rng.standard_normal(DIM) - (rng.standard_normal(DIM) @ v) * v)
        noise -= (noise @ v) * v
        noise = _unit(noise)
        return _unit(cos * v + np.sqrt(1 - cos**2) * noise)

    for i, v in enumerate(base):
        add(f"p{i:03d}", v)
        if i % 5 == 0:
            add(f"p{i:03d}", near(v, 0.6), 1)  # a second, different view: not a duplicate
    for j in range(25):
        src = f"p{j * 7:03d}"
        add(f"dup{j:02d}", near(base[j * 7], 0.97))
        truth.add(tuple(sorted((src, f"dup{j:02d}"))))
        if j < 5:
            add(f"dupb{j:02d}", near(base[j * 7], 0.96))
            truth |= {tuple(sorted((src, f"dupb{j:02d}"))), tuple(sorted((f"dup{j:02d}", f"dupb{j:02d}")))}
        add(f"look{j:02d}", near(base[j * 7 + 3], 0.80))
    with CatalogStore.create_or_open(tmp_path / "store", dim=DIM, vector_dtype="float32") as store:
        for s in range(0, len(records), 100):
            store.put(records[s:s + 100], np.stack(vectors[s:s + 100]))
    return tmp_path / "store", truth


def build_index(store_path, root):
    from index.ann.build import build_version
    from index.ann.sources import store_source
    from index.store import CatalogStore

    with CatalogStore.open_readonly(store_path) as store:
        return build_version(store_source(store), str(root), gpu="off", factory="IVF8,Flat")


def found_pairs(groups):
    return {(a, b) for g in groups for a, b, _ in g["pairs"]}


def test_dedup_finds_planted_duplicates_only(tmp_path):
    from index.store import CatalogStore

    store_path, truth = planted_store(tmp_path)
    build_index(store_path, tmp_path / "index")
    with CatalogStore.open_readonly(store_path) as store:
        res = dedup.run_dedup(store, str(tmp_path / "index"), dedup.DedupConfig(threshold=0.9, block_size=64, gpu="off"),
                              progress=False)
    assert found_pairs(res.groups) == truth
    sizes = sorted(len(g["products"]) for g in res.groups)
    assert sizes == [2] * 20 + [3] * 5
    # Same result without exact re-scoring, and with tiny blocks (streaming does not change it).
    with CatalogStore.open_readonly(store_path) as store:
        res2 = dedup.run_dedup(store, str(tmp_path / "index"),
                               dedup.DedupConfig(threshold=0.9, block_size=7, rescore=False, gpu="off"), progress=False)
    assert found_pairs(res2.groups) == truth


def test_dedup_skips_same_product_and_deleted(tmp_path):
    from index.store import CatalogStore

    store_path, truth = planted_store(tmp_path)
    build_index(store_path, tmp_path / "index")
    with CatalogStore.create_or_open(store_path) as store:
        store.delete_product("dup00")
    with CatalogStore.open_readonly(store_path) as store:
        res = dedup.run_dedup(store, str(tmp_path / "index"), dedup.DedupConfig(threshold=0.5, gpu="off"), progress=False)
    pairs = found_pairs(res.groups)
    assert all(a != b for a, b in pairs)
    assert not any("dup00" in pair for pair in pairs)


def test_cli_output_format_and_calibrate(tmp_path, capsys):
    from imgsearch.cli import main

    store_path, truth = planted_store(tmp_path)
    build_index(store_path, tmp_path / "index")
    labels = tmp_path / "labels.jsonl"
    rows = [{"a": a, "b": b, "duplicate": True} for a, b in sorted(truth)]
    rows += [{"a": f"p{j * 7 + 3:03d}", "b": f"look{j:02d}", "duplicate": False} for j in range(25)]
    rows += [{"a": f"p{i:03d}", "b": f"p{i + 1:03d}", "duplicate": False} for i in range(0, 100, 2)]
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "groups.jsonl"
    code = main(["dedup", "--store", str(store_path), "--index-root", str(tmp_path / "index"), "--output", str(out),
                 "--calibrate", str(labels), "--target-precision", "0.95", "--gpu", "off"])
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    calib = json.loads(printed[0])["calibration"]
    assert 0.8 < calib["threshold"] < 0.96 and calib["precision"] >= 0.95 and calib["recall"] == 1.0
    assert "group(s)" in printed[-1]
    groups = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["group"] for g in groups] == list(range(len(groups)))
    for g in groups:
        assert set(g) == {"group", "products", "pairs"}
        assert g["products"] == sorted(g["products"]) and len(g["products"]) >= 2
        for a, b, score in g["pairs"]:
            assert a < b and {a, b} <= set(g["products"]) and isinstance(score, float) and score >= calib["threshold"]
    assert found_pairs(groups) == truth
    # --threshold and --calibrate together: bad arguments.
    code = main(["dedup", "--store", str(store_path), "--index-root", str(tmp_path / "index"), "--output", str(out),
                 "--calibrate", str(labels), "--threshold", "0.9"])
    assert code == 2


# ---------------------------------------------------------------- verification on real images


def _real_store(tmp_path):
    """A store of real tuxpaint catalog shots: planted copies (JPEG q25, 45% resize, 80% crop,
    recolour; pizza has two) and distinct look-alike products, with embeddings placed so that every
    planted pair AND every look-alike pair is above 0.9: only the pixels can tell them apart."""
    from test_embed_verify import jpeg, planted_copy

    from imgsearch import assets
    from imgsearch.errors import MissingAsset
    from imgsearch.sample_data import catalog_shot, list_products
    from index.store import CatalogStore, ItemRecord

    try:
        products = {p.product_id: p for p in list_products(assets.tuxpaint_stamps_dir())}
    except MissingAsset as exc:
        pytest.skip(f"asset missing, run make data: {exc}")
    rng = np.random.default_rng(0)
    folder = tmp_path / "img"
    folder.mkdir()
    records, vectors, truth, base = [], [], set(), {}

    def add(pid, image, vec):
        path = folder / f"{pid}.jpg"
        image.save(path, "JPEG", quality=92)
        records.append(ItemRecord(product_id=pid, image=f"img/{pid}.jpg", path=str(path), content_hash=pid))
        vectors.append(vec)

    def near(v, cos):
        noise = rng.standard_normal(DIM)
        noise = _unit(noise - (noise @ v) * v)
        return _unit(cos * v + np.sqrt(1 - cos**2) * noise)

    lookalikes = [("seasonal.hanukkah.dreydl-gimmel", "seasonal.hanukkah.dreydl-nun"),
                  ("clothes.t_poloshirt", "clothes.t_tshirt"), ("clothes.hats.blue_fedora", "clothes.hats.green_fedora"),
                  ("animals.birds.duck", "animals.birds.drake")]
    for a, b in lookalikes:
        base[a] = _unit(rng.standard_normal(DIM))
        base[b] = near(base[a], 0.96)
    for pid in ("food.pizza", "vehicles.auto.sedan", "seasonal.hanukkah.dreydl-hay"):
        base[pid] = _unit(rng.standard_normal(DIM))
    shots = {pid: jpeg(catalog_shot(products[pid]), 92) for pid in base}
    for pid, vec in base.items():
        add(pid, shots[pid], vec)
    copies = [("animals.birds.duck", "jpeg"), ("clothes.t_poloshirt", "recolour"), ("food.pizza", "crop"),
              ("vehicles.auto.sedan", "resize"), ("seasonal.hanukkah.dreydl-hay", "recolour"), ("food.pizza", "jpeg")]
    for src, kind in copies:
        pid = f"{src}.copy-{kind}"
        add(pid, planted_copy(shots[src], kind, rng), near(base[src], 0.97))
        truth.add(tuple(sorted((src, pid))))
    truth.add(tuple(sorted(("food.pizza.copy-crop", "food.pizza.copy-jpeg"))))
    with CatalogStore.create_or_open(tmp_path / "store", dim=DIM, vector_dtype="float32") as store:
        store.put(records, np.stack(vectors))
    from index.ann.build import build_version
    from index.ann.sources import store_source

    with CatalogStore.open_readonly(tmp_path / "store") as store:
        build_version(store_source(store), str(tmp_path / "index"), gpu="off", factory="Flat")
    return tmp_path / "store", truth, {tuple(sorted(p)) for p in lookalikes}


def test_dedup_with_verification_keeps_planted_copies_not_lookalikes(tmp_path):
    from embed.verify import VerifyConfig
    from index.store import CatalogStore

    store_path, truth, lookalikes = _real_store(tmp_path)
    with CatalogStore.open_readonly(store_path) as store:
        plain = dedup.run_dedup(store, str(tmp_path / "index"), dedup.DedupConfig(threshold=0.9, gpu="off"), progress=False)
        verified = dedup.run_dedup(store, str(tmp_path / "index"),
                                   dedup.DedupConfig(threshold=0.9, gpu="off", verify=VerifyConfig()), progress=False)
    # The embedding alone pairs the look-alikes too (so the check below can fail)...
    assert lookalikes <= found_pairs(plain.groups) and truth <= found_pairs(plain.groups)
    # ...verification keeps exactly the planted duplicates.
    assert found_pairs(verified.groups) == truth
    assert sorted(len(g["products"]) for g in verified.groups) == [2, 2, 2, 2, 3]
    v = verified.verify
    assert v["candidate_pairs"] == plain.pairs and v["verified_pairs"] == len(truth) and v["unverifiable_pairs"] == 0
    assert "verified pair(s)" in verified.line()


def test_cli_verify_job_config_and_missing_image(tmp_path, capsys):
    from imgsearch.cli import main

    store_path, truth, lookalikes = _real_store(tmp_path)
    out = tmp_path / "groups.jsonl"
    args = ["dedup", "--store", str(store_path), "--index-root", str(tmp_path / "index"), "--output", str(out),
            "--gpu", "off", "--verify", "--threshold", "0.9"]
    assert main(args) == 0
    assert found_pairs([json.loads(line) for line in out.read_text().splitlines()]) == truth
    job = json.loads((tmp_path / "groups.jsonl.job.json").read_text())
    assert job["config"]["threshold"] == 0.9 and job["config"]["verify"]["max_disagreement"] > 0
    assert job["verify"]["verified_pairs"] == len(truth) and job["counts"]["pairs"] == len(truth)
    capsys.readouterr()
    # A missing image file: its pairs are counted as unverifiable and left out; the scan still writes its output.
    (tmp_path / "img" / "vehicles.auto.sedan.copy-resize.jpg").unlink()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "1 unverifiable" in printed
    got = found_pairs([json.loads(line) for line in out.read_text().splitlines()])
    assert got == truth - {("vehicles.auto.sedan", "vehicles.auto.sedan.copy-resize")}
    job = json.loads((tmp_path / "groups.jsonl.job.json").read_text())
    assert job["verify"]["unverifiable_pairs"] == 1 and "sedan.copy-resize" in job["verify"]["errors"][0]
    # Bad combinations of options.
    assert main([*args[:-3], "--verify-threshold", "0.05"]) == 2  # needs --verify


def test_cli_calibrate_with_verify(tmp_path, capsys):
    from imgsearch.cli import main

    store_path, truth, lookalikes = _real_store(tmp_path)
    labels = tmp_path / "labels.jsonl"
    rows = [{"a": a, "b": b, "duplicate": True} for a, b in sorted(truth)]
    rows += [{"a": a, "b": b, "duplicate": False} for a, b in sorted(lookalikes)]
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "groups.jsonl"
    code = main(["dedup", "--store", str(store_path), "--index-root", str(tmp_path / "index"), "--output", str(out),
                 "--gpu", "off", "--verify", "--calibrate", str(labels)])
    assert code == 0
    calib = json.loads(capsys.readouterr().out.splitlines()[0])["calibration"]
    # Duplicates and look-alikes have the same embedding similarity here: only the image threshold separates them.
    assert calib["precision"] == 1.0 and calib["recall"] == 1.0 and calib["reached"]
    assert 0 < calib["verify_threshold"] < 0.2
    assert found_pairs([json.loads(line) for line in out.read_text().splitlines()]) == truth
    job = json.loads((tmp_path / "groups.jsonl.job.json").read_text())
    assert job["config"]["verify"]["max_disagreement"] == calib["verify_threshold"]
    assert job["config"]["threshold"] == calib["threshold"]
