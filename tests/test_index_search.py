"""Build + search behaviour on small seeded clustered data (20k x 32-d)."""

import faiss
import numpy as np
import pytest

from imgsearch.errors import BadInput
from index.ann.build import build_version
from index.ann.search import open_index
from index.ann.sources import array_source

faiss.omp_set_num_threads(1)  # shared CI cores: OpenMP spin-waits collapse under contention
D, N, N_CAT = 32, 20_000, 20


def clustered(n, seed, d=D, centers=200):
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(99).standard_normal((centers, d)).astype(np.float32)
    x = c[rng.integers(0, centers, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    x = clustered(N, 0)
    ids = np.arange(N, dtype=np.int64) * 7 + 1000  # explicit, non-contiguous ids
    queries = clustered(200, 1)  # held out: not in the base
    cats = np.array([f"c{i % N_CAT}" for i in range(N)], dtype=object)
    cats[:15] = "rare"  # 15 items only
    return x, ids, queries, dict(zip(ids.tolist(), cats.tolist()))


def exact(x, ids, q, k, metric="ip", mask=None):
    xs, ids = (x, ids) if mask is None else (x[mask], ids[mask])
    s, i = faiss.knn(q, xs, k, metric=faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2)
    return s, np.where(i >= 0, ids[np.maximum(i, 0)], -1)


def recall(found, truth, k=10):
    return np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)])


def category_of(table):
    return lambda ids: [table.get(int(i)) for i in ids]


@pytest.fixture(scope="module")
def root(tmp_path_factory, data):
    x, ids, _, _ = data
    r = tmp_path_factory.mktemp("idx")
    build_version(array_source(x, ids, metric="ip"), str(r), factory="auto", target_recall=0.95, version="auto1")
    return str(r)


@pytest.fixture(scope="module")
def sharded_roots(tmp_path_factory, data):
    x, ids, _, _ = data
    out = {}
    for shards in (1, 3):
        r = str(tmp_path_factory.mktemp(f"s{shards}"))
        build_version(array_source(x, ids, metric="ip"), r, factory="IVF256,PQ16x4fs", shards=shards, version="v")
        out[shards] = r
    return out


def test_auto_build_manifest_and_tuned_recall(root, data):
    x, ids, q, _ = data
    idx = open_index(root)
    m = idx.manifest
    for key in ("version", "dim", "metric", "factory", "ntotal", "shards", "created_at", "model",
                "search_defaults", "measured_recall", "bytes_per_vector", "build_seconds", "build_config"):
        assert key in m, key
    assert m["factory"] == "IVF512,PQ16x4fsr" and m["ntotal"] == N and m["model"] is None
    assert m["measured_recall"] >= 0.95 and m["target_reached"]
    assert m["factory_choice"]["reasons"]
    bpv = idx.bytes_per_vector()
    assert bpv["ram"] < 4 * D and bpv["rerank_disk"] == 2 * D  # RAM near code + id, floats on disk
    _, truth = exact(x, ids, q, 10)
    scores, found = idx.search(q, 10)  # tuned defaults, held-out queries
    assert recall(found, truth) >= 0.9
    assert scores.dtype == np.float32 and found.dtype == np.int64 and found.shape == (200, 10)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # ip: best (highest) first


def test_rerank_improves_recall_over_pq_only(sharded_roots, data):
    x, ids, q, _ = data
    idx = open_index(sharded_roots[1])
    _, truth = exact(x, ids, q, 10)
    # rerank_factor=1 keeps the PQ top-10 set; 8 re-scores 80 candidates with float16 vectors.
    pq_only = recall(idx.search(q, 10, nprobe=32, rerank_factor=1)[1], truth)
    reranked = recall(idx.search(q, 10, nprobe=32, rerank_factor=8)[1], truth)
    assert reranked >= pq_only + 0.3 and reranked >= 0.9


def test_sharded_search_equals_unsharded(sharded_roots, data):
    _, _, q, _ = data
    one, three = open_index(sharded_roots[1]), open_index(sharded_roots[3])
    assert three.manifest["shards"] == 3 and len(three.manifest["shard_files"]) == 3
    sizes = [s["ntotal"] for s in three.manifest["shard_files"]]
    assert sum(sizes) == N and min(sizes) > N / 4  # hashed ids spread evenly
    for params in ({"nprobe": 4, "rerank_factor": 1}, {"nprobe": 16, "rerank_factor": 4}, {}):
        s1, i1 = one.search(q, 20, **params)
        s3, i3 = three.search(q, 20, **params)
        np.testing.assert_array_equal(i1, i3)
        np.testing.assert_allclose(s1, s3, rtol=1e-5, atol=1e-5)


def test_open_index_shards_opens_exactly_that_shards_ids(sharded_roots, data):
    _, ids, _, _ = data
    full = open_index(sharded_roots[3])
    sizes = [int(s["ntotal"]) for s in full.manifest["shard_files"]]
    by_file = np.split(full.indexed_ids(), np.cumsum(sizes)[:-1])  # shard files in manifest order
    np.testing.assert_array_equal(np.sort(full.indexed_ids()), np.sort(ids))
    for i in range(3):
        one = open_index(sharded_roots[3], shards=(i, 3))
        np.testing.assert_array_equal(one.indexed_ids(), by_file[i])
        assert one.manifest["shard_of"] == [i, 3] and one.manifest["ntotal"] == one.ntotal == sizes[i]
    halves = [open_index(sharded_roots[3], shards=(i, 2)).indexed_ids() for i in range(2)]
    np.testing.assert_array_equal(halves[0], np.concatenate([by_file[0], by_file[2]]))
    np.testing.assert_array_equal(halves[1], by_file[1])
    for bad in ((3, 3), (-1, 2), (0, 0), (0, 4)):
        with pytest.raises(BadInput, match="shard"):
            open_index(sharded_roots[3], shards=bad)


def test_shards_opened_apart_merge_to_the_unsharded_results(tmp_path, data):
    """Flat (exact): each shard server's top k, merged by (score, id), is the full top k."""
    x, ids, q, _ = data
    root = str(tmp_path / "flat4")
    build_version(array_source(x[:4000], ids[:4000], metric="ip"), root, factory="Flat", shards=4, version="f")
    full = open_index(root)
    s_full, i_full = full.search(q, 25)
    parts = [open_index(root, shards=(i, 2)).search(q, 25) for i in range(2)]
    s, i = np.hstack([p[0] for p in parts]), np.hstack([p[1] for p in parts])
    order = np.lexsort((i, -s), axis=-1)[:, :25]
    np.testing.assert_array_equal(np.take_along_axis(i, order, 1), i_full)
    np.testing.assert_allclose(np.take_along_axis(s, order, 1), s_full, rtol=1e-5, atol=1e-5)


def test_indexed_ids_searchable_leaves_out_deleted_and_superseded_rows(sharded_roots, data):
    _, ids, q, _ = data
    idx = open_index(sharded_roots[3])
    idx.delete(ids[:4])
    idx.add(ids[4:6], q[:2])  # replaces two stored vectors: old rows superseded, new rows added
    stored = idx.indexed_ids()
    assert stored.size == N + 2 and np.isin(ids[:4], stored).all()
    live = idx.indexed_ids(searchable=True)
    assert live.size == idx.ntotal == N - 4 and np.unique(live).size == live.size
    assert not np.isin(ids[:4], live).any() and np.isin(ids[4:6], live).all()


def test_k_larger_than_ntotal_pads_and_k_10000_works(sharded_roots, tmp_path, data):
    x, ids, q, _ = data
    small = str(tmp_path / "small")
    build_version(array_source(x[:500], ids[:500], metric="l2"), small, version="flat")
    idx = open_index(small)
    assert idx.manifest["factory"] == "IDMap,Flat"
    scores, found = idx.search(q[:3], 600)
    assert (found[:, :500] >= 0).all() and (found[:, 500:] == -1).all()
    assert np.isinf(scores[:, 500:]).all() and (np.diff(scores[:, :500], axis=1) >= 0).all()  # l2 ascending
    big = open_index(sharded_roots[3])
    scores, found = big.search(q[:2], 10_000)
    assert found.shape == (2, 10_000) and (found >= 0).all()
    assert all(len(set(row)) == 10_000 for row in found)
    with pytest.raises(BadInput):
        big.search(q[:1], 10_001)


def test_deletes_never_returned_and_k_still_filled(sharded_roots, data):
    _, _, q, _ = data
    idx = open_index(sharded_roots[3])
    _, before = idx.search(q, 10)
    gone = np.unique(before[:, :5])  # the best half of every query's results
    idx.delete(gone)
    _, after = idx.search(q, 10)
    assert not np.isin(after, gone).any()
    assert (after >= 0).all()
    assert idx.ntotal == N - gone.size


def test_deletes_persist_and_store_tombstones(sharded_roots, data):
    _, ids, q, _ = data
    path = sharded_roots[1]
    idx = open_index(path)
    idx.delete(ids[:3], persist=True)
    again = open_index(path, deleted_ids=ids[3:6])
    _, found = again.search(q, 50)
    assert not np.isin(found, ids[:6]).any()
    assert again.ntotal == N - 6


def test_add_is_searchable_at_once_and_replaces_old_copies(sharded_roots, data):
    x, ids, q, _ = data
    idx = open_index(sharded_roots[3])
    new_ids = np.array([5, 6, 7], dtype=np.int64)
    idx.add(new_ids, q[:3])
    _, found = idx.search(q[:3], 5)
    np.testing.assert_array_equal(found[:, 0], new_ids)
    # Re-adding an existing id replaces its vector: it is found at the new place only, once.
    idx.add(ids[:1], q[3:4])
    _, found = idx.search(q[3:4], 10)
    assert found[0, 0] == ids[0]
    _, found = idx.search(x[:1], 50)
    assert (found == ids[0]).sum() <= 1 and found[0, 0] != ids[0]
    assert idx.ntotal == N + 3


@pytest.mark.parametrize("selector", [False, True])
def test_category_filter_on_ivf(sharded_roots, data, selector):
    _, _, q, table = data
    ids_of = (lambda c: [i for i, v in table.items() if v == c]) if selector else None
    idx = open_index(sharded_roots[3], category_of=category_of(table), ids_of_category=ids_of)
    for cat, k, expect in (("c3", 10, 10), ("rare", 10, 10), ("rare", 20, 15)):
        _, found = idx.search(q[:20], k, category=cat)
        valid = found >= 0
        assert (valid.sum(axis=1) == expect).all(), (cat, k)
        assert all(table[int(i)] == cat for i in found[valid])


def test_category_filter_on_flat_equals_exact_filtered(tmp_path, data):
    x, ids, q, table = data
    n = 8_000  # auto -> exact Flat
    root = str(tmp_path / "flat")
    build_version(array_source(x[:n], ids[:n], metric="ip"), root, version="f")
    idx = open_index(root, category_of=category_of(table))
    for cat in ("c7", "rare"):
        mask = np.array([table[int(i)] == cat for i in ids[:n]])
        want_s, want_i = exact(x[:n], ids[:n], q, 10, mask=mask)
        got_s, got_i = idx.search(q, 10, category=cat)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_allclose(got_s[got_i >= 0], want_s[want_i >= 0], rtol=1e-5, atol=1e-5)


def test_memory_mapped_open_matches_in_ram(tmp_path, data):
    x, ids, q, _ = data
    root = str(tmp_path / "pq")
    build_version(array_source(x, ids, metric="l2"), root, factory="IVF64,PQ8x4", version="p")
    in_ram, mapped = open_index(root, mmap=False), open_index(root, mmap=True)
    ivf = faiss.extract_index_ivf(mapped._state.parts[0].index)
    assert isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)
    s1, i1 = in_ram.search(q, 10)
    s2, i2 = mapped.search(q, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-5)
    assert (np.diff(s1, axis=1) >= 0).all()  # l2: squared distances ascending
    mapped.add(np.array([1], dtype=np.int64), q[:1])  # additions never touch the read-only mapping
    assert mapped.search(q[:1], 1)[1][0, 0] == 1


def test_bad_queries_are_bad_input(sharded_roots):
    idx = open_index(sharded_roots[1])
    for bad in (np.zeros((2, D + 1), np.float32), np.full((1, D), np.nan, np.float32)):
        with pytest.raises(BadInput):
            idx.search(bad, 10)
    with pytest.raises(BadInput):
        idx.search(np.zeros((1, D), np.float32), 0)
    with pytest.raises(BadInput):
        idx.search(np.zeros((1, D), np.float32), 10, category="c1")  # no category_of given


def test_search_threads_alongside_add_and_delete(sharded_roots, data):
    import threading

    _, _, q, _ = data
    idx = open_index(sharded_roots[3])
    errors, stop = [], threading.Event()

    def searcher():
        while not stop.is_set():
            try:
                _, found = idx.search(q[:8], 10, nprobe=8)
                assert (found >= 0).all() and all(len(set(r)) == 10 for r in found)
            except Exception as exc:  # noqa: BLE001 - any failure fails the test
                errors.append(repr(exc))
                return

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    rng = np.random.default_rng(5)
    for step in range(30):
        new = clustered(20, 100 + step)
        idx.add(np.arange(20, dtype=np.int64) + 10**9 + 20 * step, new)
        idx.delete(rng.integers(0, N, 10) * 7 + 1000)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
