"""Building from the LMDB catalog store (index.store.CatalogStore)."""

import faiss
import numpy as np
import pytest

from imgsearch.cli import main
from index.ann import versions
from index.ann.search import open_index
from index.ann.sources import store_category_of, store_source

store_mod = pytest.importorskip("index.store")
faiss.omp_set_num_threads(1)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((11_000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    recs = [store_mod.ItemRecord(product_id=f"p{i}", image=f"{i}.jpg", category=f"c{i % 5}") for i in range(len(x))]
    with store_mod.CatalogStore.create_or_open(path, vector_dtype="float32") as store:
        written = store.put(recs, x)
        store.mark_deleted([written[0].id, written[1].id])
    return str(path), x, np.array([r.id for r in written], dtype=np.int64)


def test_build_from_store_skips_deleted_and_filters_by_category(store_path, tmp_path):
    path, x, ids = store_path
    root = str(tmp_path / "root")
    assert main(["build", "--store", path, "--index-root", root, "--target-recall", "0.9"]) == 0
    manifest = versions.read_manifest(versions.version_dir(root))
    assert manifest["ntotal"] == len(x) - 2 and manifest["metric"] == "ip"
    store = store_mod.CatalogStore.open_readonly(path)
    try:
        idx = open_index(root, category_of=store_category_of(store))
        _, found = idx.search(x[:2], 10)
        assert not np.isin(found, ids[:2]).any()
        _, found = idx.search(x[2:6], 10, category="c3")
        recs = store.get_many(int(i) for i in found.ravel())
        assert (found >= 0).all() and all(r.category == "c3" for r in recs)
        assert store_source(store).n == len(x) - 2
    finally:
        store.close()
