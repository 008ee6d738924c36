"""Exact re-ranking of candidates with their float16 vectors (memory-mapped).

With the fused kernel (``_f16rerank``, built by setup.py when a C compiler is there) each candidate
is scored straight from its float16 row in one C pass; without it, rows are gathered, decoded
with faiss' F16C decoder and scored by faiss' multi-threaded kernels.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np

try:  # the fused float16 re-rank kernel (setup.py builds it when a C compiler is there)
    from index.ann import _f16rerank
except ImportError:
    _f16rerank = None

RERANK_CHUNK = 1 << 20  # candidate vectors gathered at once during re-ranking
SMALL_BATCH = 16  # below this many queries, re-rank in numpy (no OpenMP wake-up)
F16_DECODE_MIN = 1 << 14  # float16 values above which faiss' decoder beats numpy's astype
_SQ_FP16: dict = {}  # dim -> faiss.ScalarQuantizer(QT_fp16), the float16 -> float32 decoder
FUSED = _f16rerank is not None  # False: gather + decode + faiss' kernels (tests flip it)
# Candidates per thread below which a batch's re-rank is not split. Right after a search, faiss'
# OpenMP workers spin-wait on every core for milliseconds, so a second thread mostly shares a busy
# core (SIFT, 2 cores, in-search re-rank us/query, split vs not: 256 x 80: 7.2 vs 6.6 idle, 5.9-7.1
# vs 5.1-5.3 loaded; 1024 x 80: 3.8 vs 3.6 idle, 6.0 vs 7.5 loaded). With OMP_WAIT_POLICY=passive
# the split pays (256 x 80: 3.6 vs 6.0).
FUSED_SPLIT_MIN = 1 << 15
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def clip_unit_scores(scores: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Scores of a unit-length query against the unit-length catalog, kept to the range exact
    arithmetic gives them: cosines in [-1, 1] (ip), squared distances in [0, 4] (l2). Float16
    storage and float32 sums put a self-match at 1.000019 or -2e-7, which users read as a bug.
    Only for queries known to be unit length (the embedder's); a raw query vector's scores are
    reported as computed."""
    low, high = (-1.0, 1.0) if higher_is_better else (0.0, 4.0)
    return np.clip(np.asarray(scores, np.float32), low, high)


def f16_to_f32(h: np.ndarray) -> np.ndarray:
    """float16 rows (n x d) -> float32, bit-exact, with faiss' F16C decoder.

    numpy's ``astype`` has no SIMD path for half floats; faiss' ``ScalarQuantizer`` (QT_fp16)
    decodes with F16C, in one pass, OpenMP-parallel over rows. Small inputs use ``astype``.
    """
    n, d = h.shape
    if h.size < F16_DECODE_MIN:
        return h.astype(np.float32)
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
            workers = max(1, faiss.omp_get_max_threads() - 1)  # the caller scores a slice too
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="f16rerank")
        return _pool


def fused_keys(base: np.ndarray, q: np.ndarray, rows: np.ndarray, ip: bool) -> np.ndarray:
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


def rerank_rows(part, q: np.ndarray, rows: np.ndarray, ip: bool) -> np.ndarray:
    """Keys (ascending) of ``rows`` (-1: none) re-scored with their float16 vectors.

    With the fused kernel (``_f16rerank``) each row is scored straight from its float16 code
    (+inf for -1), which saves the separate gather + decode pass. Without it, and for cold
    vectors (larger than the RAM budget: rows are then read in sorted order, sequential on
    disk), rows are gathered with ``np.take`` (a row memcpy; fancy indexing is several times
    slower), converted to float32 once and scored by faiss' multi-threaded
    ``fvec_*_by_idx`` kernels.
    """
    if FUSED and not part.cold:
        return fused_keys(part.rerank_arr, q, rows, ip)
    n, c = rows.shape
    if n < SMALL_BATCH:  # faiss' OpenMP kernels cost ~ms to wake threads for a few queries
        v = np.take(part.rerank_arr, rows.ravel(), axis=0).astype(np.float32).reshape(n, c, -1)
        dots = np.matmul(v, q[:, :, None])[:, :, 0]
        if ip:
            return np.negative(dots, out=dots)
        out = np.einsum("ncd,ncd->nc", v, v)
        out -= 2 * dots
        out += np.einsum("nd,nd->n", q, q)[:, None]
        return np.maximum(out, 0.0, out=out)
    out = np.empty((n, c), np.float32)
    step = max(1, RERANK_CHUNK // max(1, c))
    kernel = faiss.fvec_inner_products_by_idx if ip else faiss.fvec_L2sqr_by_idx
    for a in range(0, n, step):
        rr, qq = rows[a:a + step], q[a:a + step]
        m = rr.shape[0]
        flat = rr.ravel()
        if part.cold:
            order = np.argsort(flat)
            srt = flat[order]
            nbad = int(np.searchsorted(srt, 0))
            y = f16_to_f32(np.take(part.rerank_arr, srt[nbad:], axis=0))
            pos = np.empty(flat.size, np.int64)
            pos[order] = np.arange(-nbad, flat.size - nbad, dtype=np.int64)
            if nbad:
                pos[order[:nbad]] = -1
        else:  # fits the page cache: the sort would cost more than the reads it orders
            y = f16_to_f32(np.take(part.rerank_arr, flat, axis=0))  # -1: a dummy row
            pos = np.arange(flat.size, dtype=np.int64)
            bad = flat < 0
            if bad.any():
                pos[bad] = -1
        dis = out[a:a + m]
        kernel(faiss.swig_ptr(dis), faiss.swig_ptr(qq), faiss.swig_ptr(y), faiss.swig_ptr(pos),
               q.shape[1], m, c)
    if ip:
        np.negative(out, out=out)
    else:
        np.maximum(out, 0.0, out=out)  # rounding must not make a squared distance negative
    return out


def rerank_candidates(parts, q, keys, part_no, rows, ok, ip: bool):
    """Exact-ish keys from the float16 vectors (memory-mapped) of the candidates."""
    if FUSED and not any(p.cold for p in parts):
        return _rerank_fused(parts, q, keys, part_no, rows, ok, ip)
    out = keys.copy()
    step = max(1, RERANK_CHUNK // max(1, rows.shape[1]))  # bounds the gathered n x c x d block
    for a in range(0, q.shape[0], step):
        b = slice(a, a + step)
        out[b] = _rerank_chunk(parts, q[b], keys[b], part_no[b], rows[b], ok[b], ip)
    return out


def _rerank_fused(parts, q, keys, part_no, rows, ok, ip: bool):
    # The kernel needs no gathered block, so no chunks: one pass per part, other rows masked.
    out = keys.copy()
    for p_no, part in enumerate(parts):
        m = ok & (part_no == p_no)
        if part.rerank_arr is None or not m.any():
            continue
        exact = fused_keys(part.rerank_arr, q, np.where(m, rows, -1), ip)
        out[m] = exact[m]
    return out


def _rerank_chunk(parts, q, keys, part_no, rows, ok, ip: bool):
    vecs = np.zeros(rows.shape + (q.shape[1],), np.float32)
    for p_no, part in enumerate(parts):
        m = ok & (part_no == p_no)
        if not m.any() or part.rerank is None:
            continue
        uniq, inv = np.unique(rows[m], return_inverse=True)  # sorted reads: sequential on disk
        vecs[m] = f16_to_f32(np.take(part.rerank_arr, uniq, axis=0))[inv.ravel()]
    dots = np.einsum("nd,ncd->nc", q, vecs)
    if ip:
        exact = -dots
    else:
        exact = (q * q).sum(1)[:, None] - 2 * dots + np.einsum("ncd,ncd->nc", vecs, vecs)
        exact = np.maximum(exact, 0.0)  # rounding must not make a squared distance negative
    return np.where(ok, exact, keys).astype(np.float32)
