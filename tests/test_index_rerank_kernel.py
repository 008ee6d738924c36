"""The fused float16 re-rank kernel (index/ann/_f16rerank.c) and the searcher with and without it."""

import faiss
import numpy as np
import pytest

from index.ann import rerank
from index.ann.build import build_version
from index.ann.search import open_index
from index.ann.sources import array_source

faiss.omp_set_num_threads(1)  # shared CI cores: OpenMP spin-waits collapse under contention


def kernel():
    return pytest.importorskip("index.ann._f16rerank")


def reference(q, base, rows, ip):
    """float64 keys of the float16 rows: squared L2 or -ip, +inf for rows < 0."""
    x = base.astype(np.float64)[np.maximum(rows, 0)]
    q64 = q.astype(np.float64)[:, None, :]
    key = -(x * q64).sum(-1) if ip else ((x - q64) ** 2).sum(-1)
    return np.where(rows < 0, np.inf, key)


def scale(q, base):
    """Tolerance scale: float32 sums of d terms of this size round by ~d * eps of it."""
    return float((np.abs(q).max() + np.abs(base.astype(np.float32)).max()) ** 2 * q.shape[1])


def run(k, q, base, rows, ip, simd=True):
    out = np.empty(rows.shape, np.float32)
    k.distances(q, base, rows, out, ip, simd)
    return out


@pytest.mark.parametrize("d", [50, 128, 7])
@pytest.mark.parametrize("ip", [False, True])
@pytest.mark.parametrize("simd", [True, False])
def test_kernel_matches_float64_reference(d, ip, simd):
    k = kernel()
    rng = np.random.default_rng(d)
    base = (3 * rng.standard_normal((300, d))).astype(np.float16)
    q = (3 * rng.standard_normal((9, d))).astype(np.float32)
    rows = rng.integers(0, 300, (9, 40))
    rows[0, :5] = -1
    rows[3, -1] = -7  # any negative row is "no candidate"
    got = run(k, q, base, rows, ip, simd)
    want = reference(q, base, rows, ip)
    assert np.isposinf(got[rows < 0]).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale(q, base))


def test_simd_and_portable_paths_agree_and_isa_is_reported():
    k = kernel()
    assert k.isa in ("avx2+f16c+fma", "scalar")
    rng = np.random.default_rng(5)
    base = rng.standard_normal((100, 33)).astype(np.float16)
    q = rng.standard_normal((4, 33)).astype(np.float32)
    rows = rng.integers(-1, 100, (4, 64))
    for ip in (False, True):
        np.testing.assert_allclose(run(k, q, base, rows, ip, True), run(k, q, base, rows, ip, False),
                                   rtol=1e-5, atol=1e-5)


def test_memmap_and_strided_inputs(tmp_path):
    k = kernel()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 64)).astype(np.float16)
    path = tmp_path / "rerank.f16"
    x.tofile(path)
    mm = np.memmap(path, dtype=np.float16, mode="r", shape=x.shape)  # read-only: no copy needed
    q = rng.standard_normal((6, 64)).astype(np.float32)
    wide = rng.integers(0, 500, (6, 50))
    rows = wide[:, :30]  # a column slice: row stride 50, rows contiguous
    out = np.full((6, 45), np.nan, np.float32)
    k.distances(q, mm, rows, out[:, :30])
    np.testing.assert_allclose(out[:, :30], reference(q, x, rows, False), rtol=1e-5, atol=1e-4)
    assert np.isnan(out[:, 30:]).all()  # nothing written past the slice
    k.distances(q[:0], np.asarray(mm), rows[:0], out[:0, :30])  # empty batch: nothing to do


def test_every_float16_value_decodes_exactly():
    k = kernel()
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)  # incl. subnormals, inf, nan
    want = h.astype(np.float32)
    base = h[:, None]
    rows = np.arange(h.size, dtype=np.int64)[None]
    for simd in (True, False):
        got = -run(k, np.ones((1, 1), np.float32), base, rows, True, simd)[0]  # -(1 * x) = -x
        same = (got == want) | (np.isnan(got) & np.isnan(want))
        assert same.all(), h[~same][:5]


def test_special_values_in_distances():
    k = kernel()
    base = np.array([[np.inf, 0], [np.nan, 0], [6e-8, 65504], [-0.0, 1]], np.float16)
    q = np.array([[1, 0]], np.float32)
    rows = np.array([[0, 1, 2, 3, -1]])
    l2 = run(k, q, base, rows, False)[0]
    assert np.isposinf(l2[0]) and np.isnan(l2[1]) and np.isposinf(l2[4])
    np.testing.assert_allclose(l2[2:4], reference(q, base, rows, False)[0, 2:4], rtol=1e-6)
    ip = run(k, q, base, rows, True)[0]
    assert np.isneginf(ip[0]) and np.isnan(ip[1]) and np.isposinf(ip[4])  # -ip; +inf: no row


def test_bad_inputs_raise_clear_errors():
    k = kernel()
    base = np.zeros((10, 8), np.float16)
    q = np.zeros((2, 8), np.float32)
    rows = np.zeros((2, 3), np.int64)
    out = np.empty((2, 3), np.float32)
    with pytest.raises(IndexError, match="row 10 out of range"):
        k.distances(q, base, np.array([[0, 1, 2], [3, 10, 4]]), out)
    with pytest.raises(TypeError, match="base must be a 2-d float16"):
        k.distances(q, base.astype(np.float32), rows, out)
    with pytest.raises(TypeError, match="q must be a 2-d float32"):
        k.distances(q.astype(np.float64), base, rows, out)
    with pytest.raises(TypeError, match="rows must be a 2-d int64"):
        k.distances(q, base, rows.astype(np.int32), out)
    with pytest.raises(TypeError, match="rows must be a 2-d int64"):
        k.distances(q, base, rows.astype(np.uint64), out)
    with pytest.raises(TypeError, match="base must be a 2-d float16"):
        k.distances(q, base.astype(">f2"), rows, out)  # byte-swapped
    with pytest.raises(TypeError, match="q must be a 2-d"):
        k.distances(q[0], base, rows, out)
    with pytest.raises(ValueError, match="dimension mismatch"):
        k.distances(np.zeros((2, 7), np.float32), base, rows, out)
    with pytest.raises(ValueError, match="rows has 3 query rows"):
        k.distances(q, base, np.zeros((3, 3), np.int64), out)
    with pytest.raises(ValueError, match="out is"):
        k.distances(q, base, rows, np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="contiguous rows"):
        k.distances(q, np.zeros((10, 16), np.float16)[:, ::2], rows, out)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        k.distances(q, base, rows, out)


def test_split_over_threads_equals_one_pass(monkeypatch):
    k = kernel()
    rng = np.random.default_rng(2)
    base = rng.standard_normal((1000, 24)).astype(np.float16)
    q = rng.standard_normal((37, 24)).astype(np.float32)
    rows = rng.integers(-1, 1000, (37, 20))
    want = run(k, q, base, rows, False)
    monkeypatch.setattr(rerank, "FUSED_SPLIT_MIN", 16)
    monkeypatch.setattr(faiss, "omp_get_max_threads", lambda: 3)  # the split's thread count only
    got = rerank.fused_keys(base, q, rows, False)
    np.testing.assert_array_equal(got, want)  # same kernel on each slice: bit-identical


# -- the searcher with and without the kernel ------------------------------------------------
D, N = 32, 6000


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    centers = np.random.default_rng(99).standard_normal((100, D)).astype(np.float32)
    x = centers[rng.integers(0, 100, N)] + 0.35 * rng.standard_normal((N, D)).astype(np.float32)
    q = centers[rng.integers(0, 100, 100)] + 0.35 * rng.standard_normal((100, D)).astype(np.float32)
    return x.astype(np.float32), np.arange(N, dtype=np.int64) * 3 + 11, q.astype(np.float32)


@pytest.fixture(scope="module")
def roots(tmp_path_factory, corpus):
    x, ids, _ = corpus
    out = {}
    for metric in ("l2", "ip"):
        for shards in (1, 2):
            r = str(tmp_path_factory.mktemp(f"{metric}{shards}"))
            build_version(array_source(x, ids, metric=metric), r, factory="IVF64,PQ16x4fs", shards=shards,
                          gpu="off", version="v")
            out[metric, shards] = r
    return out


def searches(idx, q, extra):
    """(scores, ids) of batches 1, 7 and 100, then with ids deleted and added (the multi-part path)."""
    got = [idx.search(q[a:a + bs], 10, nprobe=nprobe, rerank_factor=4)
           for bs in (1, 7, len(q)) for a in range(0, len(q), bs) for nprobe in (1, 8)]
    idx.delete(extra[1][:3])
    idx.add(extra[1][3:], extra[0])
    return got + [idx.search(q, 10, nprobe=8, rerank_factor=4), idx.search(q[:5], 5000, nprobe=2)]


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("shards", [1, 2])
def test_searcher_ids_identical_with_and_without_kernel(monkeypatch, roots, corpus, metric, shards):
    kernel()
    x, ids, q = corpus
    extra = (x[:20] + 0.01, ids[100:123])
    monkeypatch.setattr(rerank, "FUSED_SPLIT_MIN", 256)  # batch 100 x 40 candidates: split in 2
    monkeypatch.setattr(faiss, "omp_get_max_threads", lambda: 2)
    new = searches(open_index(roots[metric, shards]), q, extra)
    monkeypatch.setattr(rerank, "FUSED", False)
    old = searches(open_index(roots[metric, shards]), q, extra)
    for (s_new, i_new), (s_old, i_old) in zip(new, old, strict=True):
        np.testing.assert_allclose(s_new, s_old, rtol=1e-5, atol=1e-4)  # equal infs pass too
        if i_new.shape[1] == 10:
            np.testing.assert_array_equal(i_new, i_old)
        else:  # k=5000 reaches far neighbours whose float32 keys tie to ~1e-7: rounding may swap them
            np.testing.assert_array_equal(i_new < 0, i_old < 0)
            assert (i_new != i_old).mean() < 0.01
