"""Read side: open an index version and search it (sharded, re-ranked, filtered).

A version is a list of *parts*: one per shard on disk, plus (after ``add``) one in-RAM delta
part built from the same trained quantizer and codebooks. Inside a part, faiss labels are
row numbers; ``part.ids[row]`` is the user's int64 id and ``part.rerank[row]`` its float16
vector (memory-mapped), so RAM per vector stays at the PQ code + the 8-byte label.

Search, for a batch of queries:
1. every part returns its ``fetch`` best candidates by PQ distance (per-request
   ``SearchParametersIVF``; the shared index is never mutated, so threads may search at once);
2. candidates of all parts are merged into one exact global top-``fetch`` (ties broken by id,
   so a sharded version returns the same ids as an unsharded one);
3. deleted / superseded / filtered-out candidates are dropped; the best ``k * rerank_factor``
   survivors are re-scored with their float16 vectors; the best k are returned;
4. queries left with fewer than k results are searched again with a doubled ``fetch`` (and
   doubled nprobe once the probed lists are exhausted) until k survive or nothing is left.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from imgsearch.errors import BadInput
from index import versions

log = logging.getLogger(__name__)

MAX_K = 10_000
SELECTOR_MAX_FRACTION = 0.2  # above this, a selector saves little over post-filtering
RERANK_CHUNK = 1 << 20  # candidate vectors gathered at once during re-ranking
SMALL_BATCH = 16  # below this many queries, re-rank in numpy (no OpenMP wake-up)
F16_DECODE_MIN = 1 << 14  # float16 values above which faiss' decoder beats numpy's astype
_SQ_FP16: dict = {}  # dim -> faiss.ScalarQuantizer(QT_fp16), the float16 -> float32 decoder
_I64_MIN, _I64_MAX = np.iinfo(np.int64).min, np.iinfo(np.int64).max

try:  # the fused float16 re-rank kernel (setup.py builds it when a C compiler is there)
    from index import _f16rerank
except ImportError:
    _f16rerank = None
FUSED = _f16rerank is not None  # False: gather + decode + faiss' kernels (tests flip it)
# Candidates per thread below which a batch's re-rank is not split. Right after a search, faiss'
# OpenMP workers spin-wait on every core for milliseconds, so a second thread mostly shares a busy
# core (SIFT, 2 cores, in-search re-rank us/query, split vs not: 256 x 80: 7.2 vs 6.6 idle, 5.9-7.1
# vs 5.1-5.3 loaded; 1024 x 80: 3.8 vs 3.6 idle, 6.0 vs 7.5 loaded). With OMP_WAIT_POLICY=passive
# the split pays (256 x 80: 3.6 vs 6.0).
FUSED_SPLIT_MIN = 1 << 15
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def shard_prefix(shard_no: int, n_shards: int) -> str:
    return f"shard-{shard_no:05d}-of-{n_shards:05d}"


@dataclass
class Part:
    """One searchable piece: a faiss index whose labels are rows of the arrays below."""

    index: object
    ids: np.ndarray  # row -> user id (int64)
    sorted_ids: np.ndarray  # ids sorted, for id -> row lookups
    order: np.ndarray  # rows in sorted_ids order
    rerank: np.ndarray | None  # row -> float16 vector, or None for exact codes
    dead_rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # superseded
    lock: threading.Lock | None = None  # only the mutable delta part has one
    gpu_index: object = None
    name: str = ""
    direct: object = None  # the IDMap's inner index when its id map is the identity (see _open_part)
    params_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        # Plain ndarray views: fancy indexing a np.memmap subclass costs a wrapper per call.
        self.ids_arr = np.asarray(self.ids)
        self.rerank_arr = None if self.rerank is None else np.asarray(self.rerank)
        # Re-rank vectors larger than the RAM budget are mostly on disk: read them in row order.
        self.cold = False
        if self.rerank_arr is not None and self.rerank_arr.nbytes > (1 << 30):
            from index.factory import default_memory_budget

            self.cold = self.rerank_arr.nbytes > default_memory_budget()

    def params(self, nprobe: int):
        """Cached per-nprobe search parameters (faiss only reads them, so threads may share)."""
        got = self.params_cache.get(nprobe)
        if got is None:
            got = search_params(self.index, nprobe)
            if len(self.params_cache) < 64:
                self.params_cache[nprobe] = got
        return got[0]

    @property
    def ntotal(self) -> int:
        return int(self.ids.shape[0])

    def rows_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in ``ids`` found here, their rows)."""
        if not self.ntotal or not ids.size:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        pos = np.searchsorted(self.sorted_ids, ids)
        pos = np.minimum(pos, self.ntotal - 1)
        found = np.asarray(self.sorted_ids[pos]) == ids
        return np.flatnonzero(found), np.asarray(self.order[pos[found]], dtype=np.int64)


def _ivf(index):
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError):
        return None


def search_params(index, nprobe: int | None, sel=None):
    """Per-request parameters for ``index`` (never mutate the shared index)."""
    import faiss

    ivf = _ivf(index)
    keep = [sel]  # SWIG does not own these; keep them alive for the duration of the call
    if ivf is None:
        params = faiss.SearchParameters()
    else:
        params = faiss.SearchParametersIVF()
        params.nprobe = int(min(max(nprobe or 1, 1), ivf.nlist))
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            qp = faiss.SearchParametersHNSW()
            qp.efSearch = max(2 * params.nprobe, 16)  # HNSW must return >= nprobe lists
            params.quantizer_params = qp
            keep.append(qp)
    if sel is not None:
        params.sel = sel
    if isinstance(index, faiss.IndexPreTransform):
        outer = faiss.SearchParametersPreTransform()
        outer.index_params = params
        keep.append(params)
        params = outer
    return params, keep


def _search_part(part: Part, q: np.ndarray, fetch: int, nprobe: int, allowed: np.ndarray | None):
    """(distances, rows) of one part; -1 rows where it ran out."""
    import faiss

    fetch = max(1, min(fetch, part.ntotal))
    if not part.ntotal:
        return (np.full((q.shape[0], 1), np.nan, np.float32), np.full((q.shape[0], 1), -1, np.int64))
    sel = None
    if allowed is not None:
        _, rows = part.rows_of(allowed)
        if not rows.size:
            return (np.full((q.shape[0], 1), np.nan, np.float32), np.full((q.shape[0], 1), -1, np.int64))
        sel = faiss.IDSelectorBatch(np.ascontiguousarray(rows, dtype=np.int64))
    if part.gpu_index is not None and sel is None:
        from index import gpu

        return gpu.search(part.gpu_index, part.index, q, fetch, nprobe)
    if sel is None and part.lock is None:
        index = part.index if part.direct is None else part.direct
        return index.search(q, fetch, params=part.params(nprobe))
    params, _keep = search_params(part.index, nprobe, sel)
    if part.lock is not None:
        with part.lock:
            return part.index.search(q, fetch, params=params)
    return part.index.search(q, fetch, params=params)


def _along(a: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``np.take_along_axis(a, cols, 1)`` for 2-d arrays, without its per-call index building."""
    n, c = a.shape
    if n == 1:
        return a[:, cols[0]]
    return np.take(a, cols + np.arange(0, n * c, c)[:, None])


def _cut(part: Part, key: np.ndarray, rows: np.ndarray, fetch: int):
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
    u = np.take(part.ids_arr, rs)
    u[rs < 0] = -1
    prio = np.where(ks < v, _I64_MIN, np.where(ks == v, u, _I64_MAX))
    o = np.argsort(prio, axis=1)[:, :fetch]
    if sub.size == key.shape[0]:
        return _along(ks, o), _along(rs, o)
    key, rows = key[:, :fetch].copy(), rows[:, :fetch].copy()
    key[sub], rows[sub] = _along(ks, o), _along(rs, o)
    return key, rows


def _top_k(key: np.ndarray, uids: np.ndarray, k: int) -> np.ndarray:
    """Columns of the best ``k`` per row by (key, id): ``np.lexsort((uids, key))[:, :k]``.

    For batches, a plain argsort of the keys (SIMD) is several times faster than lexsort; only
    the rows whose first k + 1 sorted keys are not strictly increasing (a tie, or NaN) are
    lexsorted.
    """
    n, c = key.shape
    if n < SMALL_BATCH or c <= k:
        return np.lexsort((uids, key), axis=-1)[:, :k]
    o = np.argsort(key, axis=1)[:, :k + 1]
    ks = _along(key, o)
    bad = ~np.all(ks[:, 1:] > ks[:, :-1], axis=1)
    o = o[:, :k]
    if bad.any():
        sub = np.flatnonzero(bad)
        o[sub] = np.lexsort((uids[sub], key[sub]), axis=-1)[:, :k]
    return o


def _f16_to_f32(h: np.ndarray) -> np.ndarray:
    """float16 rows (n x d) -> float32, bit-exact, with faiss' F16C decoder.

    numpy's ``astype`` has no SIMD path for half floats; faiss' ``ScalarQuantizer`` (QT_fp16)
    decodes with F16C, in one pass, OpenMP-parallel over rows. Small inputs use ``astype``.
    """
    n, d = h.shape
    if h.size < F16_DECODE_MIN:
        return h.astype(np.float32)
    import faiss

    sq = _SQ_FP16.get(d)
    if sq is None:  # const after construction: threads may share it
        sq = _SQ_FP16.setdefault(d, faiss.ScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16))
    h = np.ascontiguousarray(h)
    out = np.empty((n, d), np.float32)
    sq.decode_c(faiss.swig_ptr(h.view(np.uint8)), faiss.swig_ptr(out), n)
    return out


def _fused_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            import faiss

            workers = max(1, faiss.omp_get_max_threads() - 1)  # the caller scores a slice too
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="f16rerank")
        return _pool


def _fused_keys(base: np.ndarray, q: np.ndarray, rows: np.ndarray, ip: bool) -> np.ndarray:
    """Ascending keys (squared L2, or -ip) of float16 ``base[rows]`` for float32 queries ``q``;
    +inf where ``rows < 0``.

    One C pass reads each candidate's float16 row and scores it (no gathered float32 copy). The
    kernel releases the GIL, so large batches are split by query over a few threads; no OpenMP,
    whose second runtime would fight faiss' for the cores.
    """
    n, c = rows.shape
    out = np.empty((n, c), np.float32)
    slices = min(n, n * c // FUSED_SPLIT_MIN)
    if slices > 1:
        import faiss

        slices = min(slices, faiss.omp_get_max_threads())
    if slices <= 1:
        _f16rerank.distances(q, base, rows, out, ip)
        return out
    cut = np.linspace(0, n, slices + 1).astype(int)
    pool = _fused_pool()
    futures = [pool.submit(_f16rerank.distances, q[a:b], base, rows[a:b], out[a:b], ip)
               for a, b in zip(cut[1:-1], cut[2:])]
    _f16rerank.distances(q[:cut[1]], base, rows[:cut[1]], out[:cut[1]], ip)
    for f in futures:
        f.result()
    return out


@dataclass(frozen=True)
class _State:
    """What a search reads; replaced whole (copy-on-write) by add/delete."""

    parts: tuple
    tombstones: np.ndarray  # sorted unique user ids


class IndexVersion:
    """An opened index version. ``search`` is thread-safe; ``add``/``delete`` may run alongside."""

    def __init__(self, path: str, manifest: dict, parts: list[Part], tombstones: np.ndarray,
                 trained_path: str | None, category_of=None, ids_of_category=None, mmap: bool = False):
        self.path = path
        self.manifest = manifest
        self.version = manifest["version"]
        self.dim = int(manifest["dim"])
        self.metric = manifest["metric"]
        self.mmap = mmap
        self.category_of = category_of
        self.ids_of_category = ids_of_category
        self._trained_path = trained_path
        self._write_lock = threading.Lock()
        self._state = _State(tuple(parts), np.unique(np.asarray(tombstones, np.int64)))
        defaults = manifest.get("search_defaults") or {}
        self.default_nprobe = int(defaults.get("nprobe") or 1)
        self.default_rerank = int(defaults.get("rerank_factor") or 1)
        self.nlist = int(manifest.get("nlist") or 0)

    # -- facts -----------------------------------------------------------------------------
    def indexed_ids(self, *, searchable: bool = False) -> np.ndarray:
        """int64 ids of the stored rows: part by part (the shard files in manifest order, then
        the in-RAM additions), each in row order, so one shard file's ids line up with its faiss
        rows. ``searchable=True``: only rows a search can return (deleted and superseded rows
        left out)."""
        st = self._state
        out = []
        for p in st.parts:
            ids = np.asarray(p.ids, np.int64)
            if searchable and p.dead_rows.size:
                keep = np.ones(ids.shape[0], bool)
                keep[p.dead_rows] = False
                ids = ids[keep]
            out.append(ids)
        ids = np.concatenate(out) if out else np.empty(0, np.int64)
        if searchable and st.tombstones.size:
            ids = ids[~np.isin(ids, st.tombstones)]
        return ids

    @property
    def ntotal(self) -> int:
        """Stored vectors that can be returned (deleted and superseded ones excluded)."""
        st = self._state
        rows = sum(p.ntotal - p.dead_rows.size for p in st.parts)
        return int(rows - self._deleted_present(st))

    def _deleted_present(self, st: _State) -> int:
        if not st.tombstones.size:
            return 0
        live = lambda p, rows: rows[~np.isin(rows, p.dead_rows)].size  # noqa: E731
        return sum(live(p, p.rows_of(st.tombstones)[1]) for p in st.parts)

    def bytes_per_vector(self) -> dict:
        """RAM and disk bytes per stored vector, as measured at build time."""
        out = dict(self.manifest.get("bytes_per_vector") or {})
        out["mmap"] = self.mmap
        return out

    def __repr__(self) -> str:
        return f"IndexVersion({self.version!r}, ntotal={self.ntotal}, factory={self.manifest.get('factory')!r})"

    # -- search ----------------------------------------------------------------------------
    def search(self, queries, k: int = 10, *, nprobe: int | None = None, rerank_factor: int | None = None,
               category=None, allowed_ids=None, exclude_ids=None):
        """float32 n x d -> (scores n x k float32, ids n x k int64), -1 padded.

        ``l2`` scores are squared distances (ascending); ``ip`` scores are similarities
        (descending). ``category`` needs ``category_of`` (given to ``open_index``);
        ``allowed_ids`` restricts results to those ids (an IDSelector on CPU when selective).
        """
        q = self._check_queries(queries)
        k = self._check_k(k)
        st = self._state
        nprobe = int(nprobe or self.default_nprobe)
        rf = int(rerank_factor or self.default_rerank)
        if nprobe < 1 or rf < 1:
            raise BadInput(f"nprobe and rerank_factor must be >= 1, got {nprobe}, {rf}")
        allowed = self._allowed(category, allowed_ids)
        keep = self._keep_fn(st, category, allowed, exclude_ids)
        n = q.shape[0]
        total = sum(p.ntotal for p in st.parts)
        if not total or not n:
            out_s = np.full((n, k), np.nan, np.float32)
            out_i = np.full((n, k), -1, np.int64)
            return self._finish(out_s, out_i)
        todo = np.arange(n)
        fetch = min(k * (rf if self._reranked(st) else 1), total)
        max_probe = max(self.nlist, 1)
        use_sel = allowed is not None and allowed.size <= SELECTOR_MAX_FRACTION * total
        fast = (keep is None and len(st.parts) == 1 and st.parts[0].lock is None
                and st.parts[0].gpu_index is None and not st.parts[0].dead_rows.size)
        while todo.size:
            qt = q if todo.size == n else q[todo]
            if fast:
                s, i, found, n_valid = self._search_one_part(st.parts[0], qt, fetch, nprobe, k, rf)
            else:
                sel_ids = allowed if use_sel else None
                keys, uids, part_no, rows, n_valid = self._candidates(st, qt, fetch, nprobe, sel_ids)
                s, i, found = self._select(st, qt, keys, uids, part_no, rows, keep, k, rf)
            if todo.size == n:
                out_s, out_i = s, i
            else:
                out_s[todo], out_i[todo] = s, i
            unfinished = found < k
            if not unfinished.any() or (nprobe >= max_probe and fetch >= total):
                break
            # Lists probed so far ran dry for some query: widen the probe, not just the fetch.
            if (n_valid < fetch)[unfinished].any() and nprobe < max_probe:
                nprobe = min(2 * nprobe, max_probe)
            fetch = min(2 * fetch, total)
            todo = todo[unfinished]
        return self._finish(out_s, out_i)

    def _finish(self, scores, ids):
        # Reported scores: similarity for ip (higher better), squared distance for l2.
        scores = np.asarray(scores, dtype=np.float32)  # every path builds a fresh array: no copy
        if self.metric == "ip":
            np.negative(scores, out=scores)
        pad = ids < 0
        if pad.any():
            scores[pad] = -np.inf if self.metric == "ip" else np.inf
        return scores, ids

    def _check_queries(self, queries) -> np.ndarray:
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise BadInput(f"queries must be n x {self.dim}, got shape {q.shape}")
        q = np.ascontiguousarray(q, dtype=np.float32)
        if not np.isfinite(q).all():
            raise BadInput("queries contain NaN or infinite values")
        return q

    @staticmethod
    def _check_k(k) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= MAX_K:
            raise BadInput(f"k must be an integer in 1..{MAX_K}, got {k!r}")
        return int(k)

    @staticmethod
    def _reranked(st: _State) -> bool:
        return any(p.rerank is not None for p in st.parts)

    def _allowed(self, category, allowed_ids) -> np.ndarray | None:
        allowed = None if allowed_ids is None else np.unique(np.asarray(allowed_ids, np.int64))
        if category is not None:
            if self.category_of is None:
                raise BadInput("category filter needs category_of (open the index with the store)")
            if self.ids_of_category is not None:
                cat_ids = np.unique(np.asarray(self.ids_of_category(category), np.int64))
                allowed = cat_ids if allowed is None else np.intersect1d(allowed, cat_ids)
        return allowed

    def _keep_fn(self, st: _State, category, allowed, exclude_ids):
        if (category is None and allowed is None and exclude_ids is None and not st.tombstones.size
                and not any(p.dead_rows.size for p in st.parts)):
            return None  # nothing to filter: searches take the single-part fast path when they can
        exclude = np.unique(np.asarray(exclude_ids if exclude_ids is not None else [], np.int64))
        dead = np.union1d(st.tombstones, exclude)
        category_of = self.category_of

        def keep(uids: np.ndarray, part_no: np.ndarray, rows: np.ndarray) -> np.ndarray:
            ok = uids >= 0
            if dead.size:
                ok &= ~np.isin(uids, dead)
            for p_no, part in enumerate(st.parts):
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

    def _search_one_part(self, part: Part, q: np.ndarray, fetch: int, nprobe: int, k: int, rf: int):
        """``_candidates`` + ``_select`` for one part with nothing to filter, without the merge.

        Same results: faiss returns each list sorted by key, so the global top-``fetch`` by
        (key, id) is its first ``fetch`` columns unless keys tie across the cut (common with
        fast-scan's quantized distances); ``_cut`` resolves such ties by id. The margin fetched
        past ``fetch`` is what lets one shard cut exactly where a multi-shard merge would, so a
        sharded version returns the same ids as an unsharded one.
        """
        want = fetch + max(8, fetch // 4)
        d, r = _search_part(part, q, want, nprobe, None)
        key = np.negative(d, out=d) if self.metric == "ip" else d  # faiss' fresh arrays: ours
        dry = r.size and r.min() < 0  # some query ran out of candidates: -1 rows
        if dry:
            valid = r >= 0
            key[~valid] = np.inf
            n_valid = np.minimum(np.count_nonzero(valid, axis=1), fetch)
        else:
            n_valid = np.full(r.shape[0], min(r.shape[1], fetch))
        if r.shape[1] > fetch:
            key, r = _cut(part, key, r, fetch)
            if dry:
                valid = r >= 0
        uids = np.take(part.ids_arr, r)  # -1 rows read the last id: overwritten below
        if dry:
            uids[~valid] = -1
        if part.rerank_arr is not None:
            key = self._rerank_rows(part, q, r)
            if dry:
                key[~valid] = np.inf
        final = _top_k(key, uids, k)
        s, i = _along(key, final), _along(uids, final)
        if s.shape[1] < k:  # fewer candidates than k: pad
            pad = k - s.shape[1]
            s = np.hstack([s, np.full((s.shape[0], pad), np.inf, np.float32)])
            i = np.hstack([i, np.full((i.shape[0], pad), -1, np.int64)])
        return s, i, np.minimum(n_valid, k), n_valid

    def _rerank_rows(self, part: Part, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Keys (ascending) of ``rows`` (-1: none) re-scored with their float16 vectors.

        With the fused kernel (``_f16rerank``) each row is scored straight from its float16 code
        (+inf for -1), which saves the separate gather + decode pass. Without it, and for cold
        vectors (larger than the RAM budget: rows are then read in sorted order, sequential on
        disk), rows are gathered with ``np.take`` (a row memcpy; fancy indexing is several times
        slower), converted to float32 once and scored by faiss' multi-threaded
        ``fvec_*_by_idx`` kernels.
        """
        if FUSED and not part.cold:
            return _fused_keys(part.rerank_arr, q, rows, self.metric == "ip")
        import faiss

        n, c = rows.shape
        if n < SMALL_BATCH:  # faiss' OpenMP kernels cost ~ms to wake threads for a few queries
            v = np.take(part.rerank_arr, rows.ravel(), axis=0).astype(np.float32).reshape(n, c, -1)
            dots = np.matmul(v, q[:, :, None])[:, :, 0]
            if self.metric == "ip":
                return np.negative(dots, out=dots)
            out = np.einsum("ncd,ncd->nc", v, v)
            out -= 2 * dots
            out += np.einsum("nd,nd->n", q, q)[:, None]
            return np.maximum(out, 0.0, out=out)
        out = np.empty((n, c), np.float32)
        step = max(1, RERANK_CHUNK // max(1, c))
        kernel = faiss.fvec_inner_products_by_idx if self.metric == "ip" else faiss.fvec_L2sqr_by_idx
        for a in range(0, n, step):
            rr, qq = rows[a:a + step], q[a:a + step]
            m = rr.shape[0]
            flat = rr.ravel()
            if part.cold:
                order = np.argsort(flat)
                srt = flat[order]
                nbad = int(np.searchsorted(srt, 0))
                y = _f16_to_f32(np.take(part.rerank_arr, srt[nbad:], axis=0))
                pos = np.empty(flat.size, np.int64)
                pos[order] = np.arange(-nbad, flat.size - nbad, dtype=np.int64)
                if nbad:
                    pos[order[:nbad]] = -1
            else:  # fits the page cache: the sort would cost more than the reads it orders
                y = _f16_to_f32(np.take(part.rerank_arr, flat, axis=0))  # -1: a dummy row
                pos = np.arange(flat.size, dtype=np.int64)
                bad = flat < 0
                if bad.any():
                    pos[bad] = -1
            dis = out[a:a + m]
            kernel(faiss.swig_ptr(dis), faiss.swig_ptr(qq), faiss.swig_ptr(y), faiss.swig_ptr(pos),
                   self.dim, m, c)
        if self.metric == "ip":
            np.negative(out, out=out)
        else:
            np.maximum(out, 0.0, out=out)  # rounding must not make a squared distance negative
        return out

    def _candidates(self, st: _State, q: np.ndarray, fetch: int, nprobe: int, allowed):
        """Global top-``fetch`` over all parts by PQ key (lower is better), ties by id."""
        keys, uids, part_no, rows = [], [], [], []
        # Fast-scan distances are quantized, so equal keys are common; each part cuts its list
        # arbitrarily among ties. Fetching a margin and cutting here by (key, id) makes the
        # global top-fetch independent of how the data is split into shards.
        want = fetch + max(8, fetch // 4)
        for p_no, part in enumerate(st.parts):
            d, r = _search_part(part, q, want, nprobe, allowed)
            r = np.asarray(r, np.int64)
            # Rows past this snapshot's arrays were added to the delta part after the search
            # began: they belong to a later snapshot, so they are skipped, never mis-read.
            valid = (r >= 0) & (r < part.ntotal)
            r = np.where(valid, r, -1)
            u = np.full(r.shape, -1, np.int64)
            if valid.any():
                u[valid] = np.asarray(part.ids[r[valid]])
            key = np.where(valid, -d if self.metric == "ip" else d, np.inf).astype(np.float32)
            keys.append(key), uids.append(u), rows.append(r)
            part_no.append(np.full(r.shape, p_no, np.int32))
        keys, uids = np.hstack(keys), np.hstack(uids)
        part_no, rows = np.hstack(part_no), np.hstack(rows)
        n_valid = np.minimum((uids >= 0).sum(axis=1), fetch)
        order = np.lexsort((uids, keys), axis=-1)[:, :fetch]
        take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
        return take(keys), take(uids), take(part_no), take(rows), n_valid

    def _select(self, st, q, keys, uids, part_no, rows, keep, k, rf):
        """Filter, re-rank the best k*rf survivors, return the best k per query."""
        ok = keep(uids, part_no, rows) if keep is not None else uids >= 0
        found = ok.sum(axis=1)
        width = k * rf if self._reranked(st) else k
        # Survivors first, in key order (stable sort keeps the global order).
        order = np.argsort(~ok, axis=1, kind="stable")[:, :width]
        take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
        keys, uids, part_no, rows, ok = take(keys), take(uids), take(part_no), take(rows), take(ok)
        if self._reranked(st):
            keys = self._rerank(st, q, keys, part_no, rows, ok)
        keys = np.where(ok, keys, np.inf)
        uids = np.where(ok, uids, -1)
        final = np.lexsort((uids, keys), axis=-1)[:, :k]
        s = np.take_along_axis(keys, final, axis=1)
        i = np.take_along_axis(uids, final, axis=1)
        if s.shape[1] < k:  # fewer candidates than k: pad
            pad = k - s.shape[1]
            s = np.hstack([s, np.full((s.shape[0], pad), np.inf, np.float32)])
            i = np.hstack([i, np.full((i.shape[0], pad), -1, np.int64)])
        return s, i, np.minimum(found, k)

    def _rerank(self, st, q, keys, part_no, rows, ok):
        """Exact-ish keys from the float16 vectors (memory-mapped) of the candidates."""
        if FUSED and not any(p.cold for p in st.parts):
            return self._rerank_fused(st, q, keys, part_no, rows, ok)
        out = keys.copy()
        step = max(1, RERANK_CHUNK // max(1, rows.shape[1]))  # bounds the gathered n x c x d block
        for a in range(0, q.shape[0], step):
            b = slice(a, a + step)
            out[b] = self._rerank_chunk(st, q[b], keys[b], part_no[b], rows[b], ok[b])
        return out

    def _rerank_fused(self, st, q, keys, part_no, rows, ok):
        # The kernel needs no gathered block, so no chunks: one pass per part, other rows masked.
        out = keys.copy()
        for p_no, part in enumerate(st.parts):
            m = ok & (part_no == p_no)
            if part.rerank_arr is None or not m.any():
                continue
            exact = _fused_keys(part.rerank_arr, q, np.where(m, rows, -1), self.metric == "ip")
            out[m] = exact[m]
        return out

    def _rerank_chunk(self, st, q, keys, part_no, rows, ok):
        vecs = np.zeros(rows.shape + (self.dim,), np.float32)
        for p_no, part in enumerate(st.parts):
            m = ok & (part_no == p_no)
            if not m.any() or part.rerank is None:
                continue
            uniq, inv = np.unique(rows[m], return_inverse=True)  # sorted reads: sequential on disk
            vecs[m] = _f16_to_f32(np.take(part.rerank_arr, uniq, axis=0))[inv.ravel()]
        dots = np.einsum("nd,ncd->nc", q, vecs)
        if self.metric == "ip":
            exact = -dots
        else:
            exact = (q * q).sum(1)[:, None] - 2 * dots + np.einsum("ncd,ncd->nc", vecs, vecs)
            exact = np.maximum(exact, 0.0)  # rounding must not make a squared distance negative
        return np.where(ok, exact, keys).astype(np.float32)

    # -- updates ---------------------------------------------------------------------------
    def delete(self, ids, persist: bool = False) -> None:
        """Tombstone ids: they are never returned from now on. ``persist`` writes tombstones.npy."""
        ids = np.asarray(ids, np.int64).ravel()
        with self._write_lock:
            st = self._state
            tomb = np.union1d(st.tombstones, ids)
            self._state = replace(st, tombstones=tomb)
            if persist:
                self._save_tombstones(tomb)

    def _save_tombstones(self, tomb: np.ndarray) -> None:
        import io

        buf = io.BytesIO()
        np.save(buf, tomb)
        versions.write_bytes_atomic(os.path.join(self.path, "tombstones.npy"), buf.getvalue())

    def add(self, ids, vectors) -> None:
        """Add or replace vectors; searchable as soon as this returns.

        New rows go to an in-RAM delta part cloned from the version's trained (empty) index,
        so they share the quantizer and codebooks of the shards (base shards may be
        memory-mapped read-only, and faiss aborts when adding to those). Older copies of the
        same ids become dead rows; re-added ids leave the tombstone set.
        """
        ids = np.asarray(ids, np.int64).ravel()
        x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32).reshape(len(ids), -1))
        if x.shape[1] != self.dim or not np.isfinite(x).all() or np.unique(ids).size != ids.size:
            raise BadInput(f"add needs unique ids and finite n x {self.dim} vectors, got {x.shape}")
        if ids.size and ids.min() < 0:
            raise BadInput("ids must be >= 0")
        with self._write_lock:
            st = self._state
            parts = [self._supersede(p, ids) for p in st.parts]
            if not parts or parts[-1].lock is None:
                parts.append(self._new_delta(x.shape[1]))
            delta = parts[-1]
            with delta.lock:
                start = delta.ntotal
                delta.index.add_with_ids(x, np.arange(start, start + len(ids), dtype=np.int64))
                all_ids = np.concatenate([delta.ids, ids])
                order = np.argsort(all_ids, kind="stable")
                rerank = None if delta.rerank is None else np.concatenate([delta.rerank, x.astype(np.float16)])
                parts[-1] = replace(delta, ids=all_ids, sorted_ids=all_ids[order], order=order, rerank=rerank)
            self._state = _State(tuple(parts), np.setdiff1d(st.tombstones, ids))

    @staticmethod
    def _supersede(part: Part, ids: np.ndarray) -> Part:
        _, rows = part.rows_of(ids)
        if not rows.size:
            return part
        return replace(part, dead_rows=np.union1d(part.dead_rows, rows))

    def _new_delta(self, dim: int) -> Part:
        import faiss

        if self._trained_path is None:
            raise BadInput("this index version has no trained.faiss; it cannot take additions")
        index = faiss.read_index(self._trained_path)
        rerank = None if not self._reranked(self._state) else np.empty((0, dim), np.float16)
        empty = np.empty(0, np.int64)
        return Part(index, empty, empty, empty, rerank, lock=threading.Lock(), name="delta")


# -- opening -------------------------------------------------------------------------------
def _load_raw(path: str, dtype, shape, mmap: bool):
    if shape[0] == 0:
        return np.empty(shape, dtype)
    if mmap:
        return np.memmap(path, dtype=dtype, mode="r", shape=shape)
    return np.fromfile(path, dtype=dtype).reshape(shape)


def _open_part(vdir: str, shard: dict, dim: int, mmap: bool) -> Part:
    import faiss

    flags = (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY) if mmap else 0
    index = faiss.read_index(os.path.join(vdir, shard["index"]), flags)
    n = int(shard["ntotal"])
    if index.ntotal != n:
        raise versions.NoIndex(f"{vdir!r}: {shard['index']} holds {index.ntotal} vectors, manifest says {n}")
    ids = _load_raw(os.path.join(vdir, shard["ids"]), np.int64, (n,), mmap)
    sorted_ids = _load_raw(os.path.join(vdir, shard["sorted_ids"]), np.int64, (n,), mmap)
    order = _load_raw(os.path.join(vdir, shard["order"]), np.int64, (n,), mmap)
    rerank = None
    if shard.get("rerank"):
        # The float16 vectors are only read for a few candidates per query: always mapped.
        rerank = _load_raw(os.path.join(vdir, shard["rerank"]), np.float16, (n, dim), True)
    return Part(index, ids, sorted_ids, order, rerank, name=shard["index"], direct=_identity_inner(index))


def _identity_inner(index):
    """The inner index of an ``IndexIDMap`` whose labels are its row numbers (as build writes
    them), else None. Searching the inner index skips IDMap's OpenMP label translation, which
    costs more than a whole single-query search of a small Flat index."""
    import faiss

    if not isinstance(index, faiss.IndexIDMap) or isinstance(index, faiss.IndexIDMap2):
        return None
    labels = faiss.vector_to_array(index.id_map)
    if labels.size != index.index.ntotal or not np.array_equal(labels, np.arange(labels.size)):
        return None
    return index.index


def _want_mmap(vdir: str, manifest: dict, mmap) -> bool:
    if mmap in (True, False):
        return mmap
    if manifest.get("mmap_recommended"):
        return True
    size = sum(os.path.getsize(os.path.join(vdir, s["index"])) for s in manifest["shard_files"])
    from index.factory import default_memory_budget

    return size > default_memory_budget()


def shard_files_of(manifest: dict, shards: tuple[int, int] | None) -> list[dict]:
    """The manifest's shard-file entries that shard ``i`` of ``n`` serves: files ``j`` with
    ``j % n == i`` (all of them for None). The version needs at least n shard files."""
    files = list(manifest["shard_files"])
    if shards is None:
        return files
    i, n = (int(v) for v in shards)
    if not (n >= 1 and 0 <= i < n):
        raise BadInput(f"shards must be (i, n) with 0 <= i < n, got {shards!r}")
    if len(files) < n:
        raise BadInput(f"version {manifest['version']!r} has {len(files)} shard file(s); cannot open shard {i} of {n} "
                       f"(build it with --shards {n} or a multiple)")
    return [s for j, s in enumerate(files) if j % n == i]


def open_index(index_root: str, version: str | None = None, *, mmap="auto", gpu: str = "off",
               category_of=None, ids_of_category=None, deleted_ids=None,
               shards: tuple[int, int] | None = None) -> IndexVersion:
    """Open the live version (or ``version``) of INDEX_ROOT, read-only.

    ``mmap``: True/False/"auto" (auto maps shards larger than the RAM budget; plain-PQ
    inverted lists then stay on disk). ``gpu``: "off", "auto" or "on" (search on GPUs).
    ``category_of(ids) -> categories`` enables ``search(category=...)``;
    ``ids_of_category(cat) -> ids`` lets selective categories use an IDSelector.
    ``deleted_ids``: ids to tombstone (e.g. the store's deleted items).
    ``shards=(i, n)``: open only shard files ``j`` with ``j % n == i`` (one shard server's
    share, see :func:`shard_files_of`); its ``manifest`` then has ``shard_of: [i, n]`` and that
    share's ``ntotal``. Searching every share and merging by (score, id) gives the full
    version's results.
    """
    vdir = versions.version_dir(index_root, version)
    manifest = versions.read_manifest(vdir)
    use_mmap = _want_mmap(vdir, manifest, mmap)
    mine = shard_files_of(manifest, shards)
    parts = [_open_part(vdir, s, int(manifest["dim"]), use_mmap) for s in mine]
    if shards is not None:
        manifest = dict(manifest, shard_of=[int(shards[0]), int(shards[1])], ntotal=sum(int(s["ntotal"]) for s in mine))
    tomb = [np.asarray(deleted_ids if deleted_ids is not None else [], np.int64).ravel()]
    tomb_path = os.path.join(vdir, "tombstones.npy")
    if os.path.exists(tomb_path):
        tomb.append(np.load(tomb_path).astype(np.int64))
    trained = os.path.join(vdir, manifest.get("trained_index") or "trained.faiss")
    idx = IndexVersion(vdir, manifest, parts, np.concatenate(tomb),
                       trained if os.path.exists(trained) else None,
                       category_of=category_of, ids_of_category=ids_of_category, mmap=use_mmap)
    if gpu != "off":
        from index import gpu as gpu_mod

        gpu_mod.attach(idx, required=(gpu == "on"))
    return idx
