"""Merging and filtering candidates: the exact global top-``fetch`` over all parts, ties broken
by id (so a sharded version returns the same ids as an unsharded one), then deleted / superseded /
filtered-out candidates dropped and the best ``k * rerank_factor`` re-ranked."""

from __future__ import annotations

import numpy as np

from imgsearch.errors import BadInput
from index.ann.parts import Part, search_part
from index.ann.rerank import SMALL_BATCH, rerank_candidates

_I64_MIN, _I64_MAX = np.iinfo(np.int64).min, np.iinfo(np.int64).max
_ID_CODE_MAX = (1 << 32) - 1  # id + 1 must fit the low half of a packed (key, id) code
# k from which top_k sorts packed (key, id) codes. Measured per batch, packed vs argsort + tie
# check: 256 x 80 -> 10: 0.34 vs 0.21 ms; 256 x 400 -> 100: 1.9 vs 4.1; 20 x 20,000 -> 10,000: 25 vs 76.
PACKED_FROM_K = 64


def along(a: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``np.take_along_axis(a, cols, 1)`` for 2-d arrays, without its per-call index building."""
    n, c = a.shape
    if n == 1:
        return a[:, cols[0]]
    return np.take(a, cols + np.arange(0, n * c, c)[:, None])


def cut(part: Part, key: np.ndarray, rows: np.ndarray, fetch: int):
    """The first ``fetch`` columns by (key, id) of faiss' key-sorted (key, rows), as a set.

    Only queries whose key ties across the cut change: among the tied candidates they keep the
    lowest ids (all candidates with a smaller key stay). The order inside the kept set is not
    (key, id) order; the caller sorts the re-scored candidates anyway.
    """
    tie = key[:, fetch - 1] == key[:, fetch]
    if not tie.any():
        return key[:, :fetch], rows[:, :fetch]
    sub = np.flatnonzero(tie)
    ks, rs = key[sub], rows[sub]
    v = ks[:, fetch - 1:fetch]
    # Each row is sorted by key, so its tied keys are one run of columns around the cut: only the
    # columns [lo, hi) spanning every tied row's run are ordered by id (at k = 10,000 the run is
    # tens of columns of 25,000; ordering whole rows cost 3.7 ms a query).
    lo, hi = int((ks < v).sum(axis=1).min()), int((ks <= v).sum(axis=1).max())
    wk, wr = ks[:, lo:hi], rs[:, lo:hi]
    u = np.take(part.ids_arr, wr)
    u[wr < 0] = -1
    prio = np.where(wk < v, _I64_MIN, np.where(wk == v, u, _I64_MAX))
    o = np.argsort(prio, axis=1)[:, :fetch - lo]
    ks = np.concatenate([ks[:, :lo], along(wk, o)], axis=1)
    rs = np.concatenate([rs[:, :lo], along(wr, o)], axis=1)
    if sub.size == key.shape[0]:
        return ks, rs
    key, rows = key[:, :fetch].copy(), rows[:, :fetch].copy()
    key[sub], rows[sub] = ks, rs
    return key, rows


def key_id_codes(key: np.ndarray, ids: np.ndarray) -> np.ndarray | None:
    """uint64 codes whose order is (key, id) order, or None when that cannot be packed (keys
    not float32, whose order a float32 copy could lose; an id outside [-1, 2**32 - 2]; a NaN key).

    High 32 bits: the float32 key's bits made monotonic (sign bit flipped for positives, all bits
    for negatives; -0.0 first becomes +0.0, as the comparison treats them). Low 32 bits: id + 1
    (padding's -1 -> 0). One integer sort then orders by key and breaks ties by id: a plain
    ``np.lexsort`` of 20 x 20,000 candidates cost 2.8 ms a query, the packed sort 0.4.
    """
    if key.dtype != np.float32 or (ids.size and (ids.min() < -1 or ids.max() > _ID_CODE_MAX - 1)):
        return None
    k32 = key + np.float32(0.0)
    if np.isnan(k32).any():
        return None
    bits = k32.view(np.uint32)
    bits ^= (np.uint32(0) - (bits >> np.uint32(31))) | np.uint32(0x80000000)
    codes = bits.astype(np.uint64) << np.uint64(32)
    codes |= (ids + 1).astype(np.uint64)
    return codes


def top_k(key: np.ndarray, uids: np.ndarray, k: int) -> np.ndarray:
    """Columns of the best ``k`` per row by (key, id), in that order: ``np.lexsort((uids, key))[:, :k]``.

    From ``PACKED_FROM_K``, with ids that fit in 32 bits (:func:`key_id_codes`): a partition of
    the packed codes, then a sort of the best k only. Otherwise, for batches, a plain argsort of
    the keys (SIMD) is several times faster than lexsort; only the rows whose first k + 1 sorted
    keys are not strictly increasing (a tie, or NaN) are lexsorted.
    """
    n, c = key.shape
    codes = key_id_codes(key, uids) if k >= PACKED_FROM_K else None
    if codes is not None:
        if c <= k:
            return np.argsort(codes, axis=1)
        best = np.argpartition(codes, k - 1, axis=1)[:, :k]
        return along(best, np.argsort(along(codes, best), axis=1))
    if n < SMALL_BATCH or c <= k:
        return np.lexsort((uids, key), axis=-1)[:, :k]
    o = np.argsort(key, axis=1)[:, :k + 1]
    ks = along(key, o)
    bad = ~np.all(ks[:, 1:] > ks[:, :-1], axis=1)
    o = o[:, :k]
    if bad.any():
        sub = np.flatnonzero(bad)
        o[sub] = np.lexsort((uids[sub], key[sub]), axis=-1)[:, :k]
    return o


def pad_to_k(s: np.ndarray, i: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores (+inf) and ids (-1) padded to ``k`` columns when fewer candidates were found."""
    if s.shape[1] >= k:
        return s, i
    pad = k - s.shape[1]
    return (np.hstack([s, np.full((s.shape[0], pad), np.inf, np.float32)]),
            np.hstack([i, np.full((i.shape[0], pad), -1, np.int64)]))


def candidates(parts, q: np.ndarray, fetch: int, nprobe: int, allowed, ip: bool):
    """Global top-``fetch`` over all parts by PQ key (lower is better), ties by id."""
    keys, uids, part_no, rows = [], [], [], []
    # Fast-scan distances are quantized, so equal keys are common; each part cuts its list
    # arbitrarily among ties. Fetching a margin and cutting here by (key, id) makes the
    # global top-fetch independent of how the data is split into shards.
    want = fetch + max(8, fetch // 4)
    for p_no, part in enumerate(parts):
        d, r = search_part(part, q, want, nprobe, allowed)
        r = np.asarray(r, np.int64)
        # Rows past this snapshot's arrays were added to the delta part after the search
        # began: they belong to a later snapshot, so they are skipped, never mis-read.
        valid = (r >= 0) & (r < part.ntotal)
        r = np.where(valid, r, -1)
        u = np.full(r.shape, -1, np.int64)
        if valid.any():
            u[valid] = np.asarray(part.ids[r[valid]])
        key = np.where(valid, -d if ip else d, np.inf).astype(np.float32)
        keys.append(key), uids.append(u), rows.append(r)
        part_no.append(np.full(r.shape, p_no, np.int32))
    keys, uids = np.hstack(keys), np.hstack(uids)
    part_no, rows = np.hstack(part_no), np.hstack(rows)
    n_valid = np.minimum((uids >= 0).sum(axis=1), fetch)
    order = top_k(keys, uids, fetch)
    take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    return take(keys), take(uids), take(part_no), take(rows), n_valid


def select(parts, q, keys, uids, part_no, rows, keep, k: int, rf: int, ip: bool):
    """Filter, re-rank the best k*rf survivors, return the best k per query."""
    reranked = any(p.rerank is not None for p in parts)
    ok = keep(uids, part_no, rows) if keep is not None else uids >= 0
    found = ok.sum(axis=1)
    width = k * rf if reranked else k
    # Survivors first, in key order (stable sort keeps the global order).
    order = np.argsort(~ok, axis=1, kind="stable")[:, :width]
    take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    keys, uids, part_no, rows, ok = take(keys), take(uids), take(part_no), take(rows), take(ok)
    if reranked:
        keys = rerank_candidates(parts, q, keys, part_no, rows, ok, ip)
    keys = np.where(ok, keys, np.inf)
    uids = np.where(ok, uids, -1)
    final = top_k(keys, uids, k)
    s = np.take_along_axis(keys, final, axis=1)
    i = np.take_along_axis(uids, final, axis=1)
    s, i = pad_to_k(s, i, k)
    return s, i, np.minimum(found, k)


def allowed_ids_of(category, allowed_ids, category_of, ids_of_category) -> np.ndarray | None:
    """The ids a search may return (None: any), from ``allowed_ids`` and a category."""
    allowed = None if allowed_ids is None else np.unique(np.asarray(allowed_ids, np.int64))
    if category is not None:
        if category_of is None:
            raise BadInput("category filter needs category_of (open the index with the store)")
        if ids_of_category is not None:
            cat_ids = np.unique(np.asarray(ids_of_category(category), np.int64))
            allowed = cat_ids if allowed is None else np.intersect1d(allowed, cat_ids)
    return allowed


def keep_filter(parts, tombstones: np.ndarray, category, allowed, exclude_ids, category_of):
    """``keep(uids, part_no, rows) -> bool mask`` of candidates a search may return, or None
    when nothing is filtered."""
    if (category is None and allowed is None and exclude_ids is None and not tombstones.size
            and not any(p.dead_rows.size for p in parts)):
        return None  # nothing to filter: searches take the single-part fast path when they can
    exclude = np.unique(np.asarray(exclude_ids if exclude_ids is not None else [], np.int64))
    dead = np.union1d(tombstones, exclude)

    def keep(uids: np.ndarray, part_no: np.ndarray, rows: np.ndarray) -> np.ndarray:
        ok = uids >= 0
        if dead.size:
            ok &= ~np.isin(uids, dead)
        for p_no, part in enumerate(parts):
            if part.dead_rows.size:
                ok &= ~((part_no == p_no) & np.isin(rows, part.dead_rows))
        if allowed is not None:
            ok &= np.isin(uids, allowed)
        if category is not None and ok.any():
            cand = np.unique(uids[ok])
            cats = np.asarray(category_of(cand), dtype=object)
            good = cand[np.array([c == category for c in cats], dtype=bool)]
            ok &= np.isin(uids, good)
        return ok

    return keep
