"""The (key, id) orders every search relies on: ``top_k`` (packed 64-bit codes, or lexsort when
ids do not fit) and ``cut`` (only the tied run at the cut is ordered by id) give exactly what a
full ``np.lexsort`` gives, on ties, negative keys, -0.0, +inf padding and -1 ids; and a big-k
search over several shards returns the same ids as over one."""

from unittest import mock

import faiss
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from index.ann import merge
from index.ann.merge import cut, key_id_codes, top_k

faiss.omp_set_num_threads(2)


def _lexsorted(key, ids, k):
    return np.lexsort((ids, key), axis=-1)[:, :k]


@st.composite
def _candidates(draw):
    n = draw(st.integers(1, 20))
    c = draw(st.integers(1, 60))
    k = draw(st.integers(1, c + 3))
    seed = draw(st.integers(0, 2**31))
    big_ids = draw(st.booleans())
    rng = np.random.default_rng(seed)
    # Few distinct keys, so ties are everywhere; negative keys (ip), both zeros and +inf padding.
    pool = np.array([-3.5, -1.0, -0.0, 0.0, 0.25, 1.0, 2.0, np.inf], np.float32)
    key = pool[rng.integers(0, len(pool), (n, c))]
    top = (1 << 40) if big_ids else 1000
    ids = np.stack([rng.choice(top, c, replace=False) for _ in range(n)]).astype(np.int64)
    pad = key == np.inf
    ids[pad & (rng.random((n, c)) < 0.7)] = -1
    return key, ids, k


@settings(max_examples=300, deadline=None)
@given(_candidates())
def test_top_k_equals_lexsort(case):
    key, ids, k = case
    want = _lexsorted(key, ids, k)
    for packed_from in (1, 10**9):  # the packed codes and the argsort + tie-check path
        with mock.patch.object(merge, "PACKED_FROM_K", packed_from):
            got = top_k(key, ids, k)
        # Equal (key, id) pairs (several -1 pads at +inf) may come in either order: compare pairs.
        np.testing.assert_array_equal(np.take_along_axis(key, got, 1), np.take_along_axis(key, want, 1))
        np.testing.assert_array_equal(np.take_along_axis(ids, got, 1), np.take_along_axis(ids, want, 1))


def test_codes_refuse_what_they_cannot_order():
    key = np.zeros((1, 3), np.float32)
    assert key_id_codes(key, np.array([[0, 1, (1 << 32) - 1]])) is None  # id + 1 overflows 32 bits
    assert key_id_codes(key, np.array([[0, 1, -2]])) is None
    assert key_id_codes(np.array([[0, np.nan, 1]], np.float32), np.array([[0, 1, 2]])) is None
    assert key_id_codes(np.array([[1.0, 1.0 + 1e-12]]), np.array([[1, 0]])) is None  # float64: order kept by lexsort
    codes = key_id_codes(np.array([[-np.inf, -2.0, -0.0, 0.0, 3.0, np.inf]], np.float32), np.array([[5, 4, 3, 2, 1, -1]]))
    assert codes is not None
    order = np.argsort(codes[0])
    assert order.tolist() == [0, 1, 3, 2, 4, 5]  # -0.0 == 0.0: the lower id (2) first


class _Part:
    def __init__(self, ids):
        self.ids_arr = ids


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 40), st.integers(1, 12))
def test_cut_keeps_the_first_fetch_by_key_then_id(seed, fetch, n):
    rng = np.random.default_rng(seed)
    c = fetch + int(rng.integers(1, 12))
    # faiss' output: each row sorted by key, in arbitrary order among ties, -1 rows at +inf.
    key = np.sort(rng.integers(0, 6, (n, c)).astype(np.float32), axis=1)
    key[:, -int(rng.integers(1, 4)):] = np.inf if rng.random() < 0.5 else key[:, -1:]
    rows = np.stack([rng.permutation(c) for _ in range(n)]).astype(np.int64)
    rows[key == np.inf] = -1
    ids = rng.choice(10 * c, c, replace=False).astype(np.int64)
    part = _Part(ids)
    got_k, got_r = cut(part, key, rows, fetch)
    uid = np.where(rows >= 0, ids[rows], -1)
    want = _lexsorted(key, uid, fetch)
    for r in range(n):
        pairs = sorted(zip(got_k[r].tolist(), np.where(got_r[r] >= 0, ids[got_r[r]], -1).tolist()))
        assert pairs == sorted(zip(key[r, want[r]].tolist(), uid[r, want[r]].tolist()))


def test_big_k_sharded_equals_unsharded(tmp_path):
    from helpers.glove import glove_split

    from index.ann.build import build_version
    from index.ann.search import open_index
    from index.ann.sources import array_source

    base, held = glove_split(40_000, 8, seed=1)
    roots = {}
    for shards in (1, 3):
        roots[shards] = str(tmp_path / f"s{shards}")
        build_version(array_source(base, metric="ip"), roots[shards], factory="IVF256,PQ25x4fsr", shards=shards)
    k = 5000
    a = open_index(roots[1]).search(held, k, nprobe=64, rerank_factor=2)
    b = open_index(roots[3]).search(held, k, nprobe=64, rerank_factor=2)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    assert (a[1] >= 0).all() and all(len(set(r.tolist())) == k for r in a[1])
