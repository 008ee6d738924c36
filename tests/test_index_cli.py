"""`imgsearch build` / `imgsearch search` through imgsearch.cli.main."""

import json
import os

import faiss
import numpy as np
import pytest

from imgsearch.cli import main
from index.ann import versions

faiss.omp_set_num_threads(1)


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12_000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(12_000, dtype=np.int64) * 3 + 11
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "q.npy", x[:7] + 0.01)
    return tmp_path, x, ids


def test_build_search_round_trip_writes_npz(files, capsys):
    tmp, x, ids = files
    root = str(tmp / "root")
    rc = main(["build", "--vectors", str(tmp / "x.npy"), "--ids", str(tmp / "ids.npy"), "--metric", "ip",
               "--index-root", root, "--shards", "2", "--target-recall", "0.9"])
    assert rc == 0
    assert "built" in capsys.readouterr().out
    manifest = versions.read_manifest(versions.version_dir(root))
    assert manifest["shards"] == 2 and manifest["ntotal"] == 12_000 and manifest["measured_recall"] >= 0.9
    out = str(tmp / "r.npz")
    assert main(["search", "--index-root", root, "--vectors", str(tmp / "q.npy"), "-k", "10", "--output", out]) == 0
    with np.load(out) as r:
        r_ids = r["ids"]
        assert r["ids"].dtype == np.int64 and r["ids"].shape == (7, 10)
        assert r["scores"].dtype == np.float32 and r["scores"].shape == (7, 10)
        assert np.isin(r["ids"], ids).all()
        np.testing.assert_array_equal(r["ids"][:, 0], ids[:7])  # each query's source vector first
        assert (np.diff(r["scores"], axis=1) <= 1e-6).all()  # ip: higher is better, best first
    assert "wrote 7 x 10" in capsys.readouterr().out
    assert main(["search", "--index-root", root, "--vectors", str(tmp / "q.npy"), "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    first = json.loads(lines[0])["results"]  # built from --vectors: no store, so ids stand for products
    assert len(lines) == 7 and [r["product_id"] for r in first] == [str(i) for i in r_ids[0, :3]]


def test_uint8_vectors_default_l2_and_padding(tmp_path):
    x = np.random.default_rng(1).integers(0, 255, (300, 8), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "q.npy", x[:2])
    root, out = str(tmp_path / "root"), str(tmp_path / "r.npz")
    assert main(["build", "--vectors", str(tmp_path / "x.npy"), "--index-root", root]) == 0
    assert versions.read_manifest(versions.version_dir(root))["metric"] == "l2"
    assert main(["search", "--index-root", root, "--vectors", str(tmp_path / "q.npy"), "-k", "400", "--output", out]) == 0
    with np.load(out) as r:
        assert (r["ids"][:, 300:] == -1).all() and (r["ids"][:, 0] == [0, 1]).all()
        assert (r["scores"][:, 0] == 0).all()  # squared distance to itself


def test_bad_factory_exits_2_with_one_line(files, capsys):
    tmp, _, _ = files
    rc = main(["build", "--vectors", str(tmp / "x.npy"), "--index-root", str(tmp / "root"), "--factory", "IVF12,PQ7x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "'IVF12,PQ7x'" in err[0]
    assert not os.path.exists(tmp / "root" / "CURRENT")


def test_search_errors(files, capsys, tmp_path):
    tmp, _, _ = files
    assert main(["search", "--index-root", str(tmp_path / "nothing"), "--vectors", str(tmp / "q.npy")]) == 2
    assert "CURRENT" in capsys.readouterr().err
    assert main(["search", "--index-root", str(tmp_path)]) == 2  # neither images nor vectors
