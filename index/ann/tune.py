"""Auto-tuning: measure recall@10 against exact search, pick the cheapest defaults.

Queries: held-out vectors when the caller has them (``build --tune-queries``); otherwise a seeded
sample of stored rows, each searched with its own id removed from its results and from its
exact neighbours ("leave one out"): a real point of the catalog's own distribution, whose
neighbours are the other rows, as a new photo's are. (Stored rows plus Gaussian noise, used
before, are harder than real queries: at 5M they reported recall 0.856 where fresh queries
measured 0.96, so the defaults cost more than they needed.) Ground truth: exact search streamed
over the same blocks the build read (faiss.knn per block, merged), so it never loads the catalog.

Recall counts distance ties: a returned id whose exact distance equals the k-th true distance
is a hit even when the exact search kept an equally close twin instead (duplicate vectors in a
catalog are common, and which twin a search keeps is arbitrary: an exact ``IDMap,Flat`` index
scored 0.93 on 3x duplicated data before). :func:`ground_truth` finds those ties in one more
pass over the source.

Cost model for "cheapest": scanning one code in a probed list costs 1 unit, re-ranking one
candidate costs RERANK_UNITS (a 2*d-byte gather, often a page fault, plus d FMAs, against
one SIMD table lookup per fast-scan code).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import faiss
import numpy as np

from index.ann.limits import MAX_K, TUNED_K
from index.ann.parts import open_part
from index.ann.search import IndexVersion
from index.ann.sources import DEFAULT_BLOCK, VectorSource, sample_rows

log = logging.getLogger(__name__)

K = TUNED_K
N_QUERIES = 500
NOISE = 0.2  # query = x + noise with |noise| ~ 0.2 |x| (cosine ~0.98 to its source)
# Up to 64: at 1M-5M vectors 4-bit codes need 16-32x (bench_scale), and a grid that stops
# short reports "not reached" for a target a larger factor meets.
RERANK_FACTORS = (1, 2, 4, 8, 16, 32, 64)
RERANK_UNITS = 20.0
TIE_RTOL = 1e-5  # float32 GEMM rounding is ~1e-6 of the terms a key is made of; see boundary_ties
TIE_EXACT_RTOL = 1e-9  # float64 rounding is ~1e-15: equal vectors pass, distinct ones do not
MAX_TIES = 1024
TIE_QUERY_CHUNK = 128  # 128 queries x a 65536-row block of float32 keys: 32 MB
# Big k (10,000 candidates per query, the duplicate scans' and re-rankers' case) gets its own
# operating point: the k=10 point probes far too few lists to hold 10,000 true neighbours.
BIG_K = 10_000
# Exact top-10,000 per query is dear (100 x 10,000 = 1M judged ids), but the cheapest point that
# reaches the target on few queries is an optimistic pick: on 50, SIFT 1M's measured 0.954 was
# 0.947 on 20 fresh queries.
BIG_K_QUERIES = 100
BIG_K_MIN_NTOTAL = 20 * BIG_K  # below this, a big-k search is most of the catalog: not tuned
BIG_K_RERANK_FACTORS = (1, 2, 4)  # re-ranking k * rf float16 rows dominates at big k
# At big k both nprobe and the re-rank are dear, and a doubling of nprobe overshoots: on SIFT 1M
# 512 x 2 gave 0.947 at 3.1 ms, 768 x 2 0.966 at 3.5, 1024 x 2 0.972 at 4.2 (exact: 11).
BIG_K_NPROBE_MIDPOINTS = True


def noisy_queries(source: VectorSource, n: int, seed: int, metric: str) -> np.ndarray:
    _, x = sample_rows(source, n, seed + 1)
    rng = np.random.default_rng(seed + 2)
    scale = NOISE * np.linalg.norm(x, axis=1, keepdims=True) / np.sqrt(x.shape[1])
    q = x + scale * rng.standard_normal(x.shape).astype(np.float32)
    if metric == "ip":  # queries from the embedder are L2-normalised like the catalog
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(q, dtype=np.float32)


def exact_knn(source: VectorSource, queries: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact (keys, ids) streamed over the source; keys ascending (ip keys are -similarity)."""
    mt = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    n = queries.shape[0]
    best_k = np.full((n, 0), np.inf, np.float32)
    best_i = np.full((n, 0), -1, np.int64)
    for ids, x in source.blocks(DEFAULT_BLOCK):
        kk = min(k, len(ids))
        d, i = faiss.knn(queries, x, kk, metric=mt)
        key = -d if metric == "ip" else d
        best_k = np.hstack([best_k, key])
        best_i = np.hstack([best_i, np.where(i >= 0, ids[np.maximum(i, 0)], -1)])
        order = np.argsort(best_k, axis=1, kind="stable")[:, :k]
        best_k = np.take_along_axis(best_k, order, 1)
        best_i = np.take_along_axis(best_i, order, 1)
    return best_k, best_i


def own_last(ids: np.ndarray, own: np.ndarray) -> np.ndarray:
    """Column order per row that moves each row's own id to the end and keeps the rest in order."""
    return np.argsort(ids == np.asarray(own, np.int64)[:, None], axis=1, kind="stable")


def without_own(ids: np.ndarray, own: np.ndarray | None, k: int) -> np.ndarray:
    """The first ``k`` columns of ``ids`` (n x >= k+1) once each row's own id is taken out (the
    last column goes when a row's own id is not among them). ``own`` None: the first k columns."""
    if own is None:
        return ids[:, :k]
    return np.take_along_axis(ids, own_last(ids, own), 1)[:, :k]


def leave_one_out_queries(source: VectorSource, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of ``n`` stored rows (seeded) to search as queries with their own ids removed."""
    return sample_rows(source, min(n, source.n), seed + 1)


@dataclass(frozen=True)
class Truth:
    """Exact neighbours of some queries: ``ids`` n x k (ascending key, -1 padded) and, per query,
    ``ties``: the other ids whose exact key equals the k-th one (as good an answer as ``ids[:, -1]``)."""

    keys: np.ndarray
    ids: np.ndarray
    ties: list[np.ndarray]


def ground_truth(source: VectorSource, queries: np.ndarray, k: int, metric: str, own: np.ndarray | None = None) -> Truth:
    """Exact k neighbours of ``queries`` with ties; ``own``: each query's own stored id, left out."""
    if own is None:
        keys, ids = exact_knn(source, queries, k, metric)
    else:
        keys, ids = exact_knn(source, queries, k + 1, metric)
        order = own_last(ids, own)
        keys, ids = np.take_along_axis(keys, order, 1)[:, :k], np.take_along_axis(ids, order, 1)[:, :k]
    ties = boundary_ties(source, queries, keys, ids, metric)
    if own is not None:
        ties = [t[t != o] for t, o in zip(ties, np.asarray(own, np.int64).tolist())]
    return Truth(keys, ids, ties)


def boundary_ties(source: VectorSource, queries: np.ndarray, keys: np.ndarray, ids: np.ndarray, metric: str,
                  cap: int = MAX_TIES) -> list[np.ndarray]:
    """Per query, the ids not in ``ids`` whose exact key equals that of its k-th id ``ids[:, -1]``.

    Float32 keys (faiss's or these) of two equal vectors can differ in the last bits, so candidates
    within float32 rounding of the k-th key (TIE_RTOL of the terms a key is made of) are found with
    one float32 GEMM per block, then their float64 keys are compared with the k-th id's (TIE_EXACT_RTOL). At
    most ``cap`` ties are kept per query (a catalog of one repeated vector would otherwise keep them
    all); one left out can only lower the reported recall."""
    n = len(queries)
    if n == 0 or keys.shape[1] == 0:
        return [np.empty(0, np.int64) for _ in range(n)]
    kth_id = ids[:, -1]
    live = np.isfinite(keys[:, -1]) & (kth_id >= 0)  # fewer than k vectors: every one is in ``ids``
    kth = keys[:, -1].astype(np.float64)
    kth_exact = np.full(n, np.nan)
    q32 = np.ascontiguousarray(queries, dtype=np.float32)
    q = q32.astype(np.float64)
    qn = np.einsum("nd,nd->n", q, q)
    qn32 = qn.astype(np.float32)
    cand: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in range(n)]
    kept = np.zeros(n, np.int64)
    for block_ids, x in source.blocks(DEFAULT_BLOCK):
        x32 = np.ascontiguousarray(x, dtype=np.float32)
        x = x32.astype(np.float64)
        xn = np.einsum("nd,nd->n", x, x)
        xn32 = xn.astype(np.float32)
        order = np.argsort(block_ids)
        loc = np.minimum(np.searchsorted(block_ids[order], kth_id), len(order) - 1)
        here = np.flatnonzero(live & (block_ids[order[loc]] == kth_id))
        at = order[loc[here]]
        kth_exact[here] = _keys(q[here], qn[here], x[at], xn[at], metric, pairwise=False)
        loose = TIE_RTOL * (qn + xn.max() if metric == "l2" else np.sqrt(qn * xn.max()) + 1e-30)
        for s in range(0, n, TIE_QUERY_CHUNK):
            e = min(n, s + TIE_QUERY_CHUNK)
            key = _keys(q32[s:e], qn32[s:e], x32, xn32, metric)
            rows, cols = np.nonzero((np.abs(key - kth[s:e, None]) <= loose[s:e, None]) & live[s:e, None])
            bounds = np.searchsorted(rows, np.arange(e - s + 1))  # np.nonzero lists rows in order
            for r in np.flatnonzero(np.diff(bounds)):
                row, c = s + int(r), cols[bounds[r]:bounds[r + 1]]
                c = c[~np.isin(block_ids[c], ids[row])][: max(0, cap - int(kept[row]))]
                if c.size:
                    scale = qn[row] + xn[c] if metric == "l2" else np.sqrt(qn[row] * xn[c])
                    exact = _keys(np.broadcast_to(q[row], (c.size, q.shape[1])), np.full(c.size, qn[row]),
                                  x[c], xn[c], metric, pairwise=False)
                    cand[row].append((block_ids[c], exact, scale))
                    kept[row] += c.size
    ties = []
    for row, found in enumerate(cand):
        if not found:
            ties.append(np.empty(0, np.int64))
            continue
        cid, ckey, cscale = (np.concatenate(a) for a in zip(*found))
        ties.append(cid[np.abs(ckey - kth_exact[row]) <= TIE_EXACT_RTOL * cscale + 1e-300])
    return ties


def _keys(q: np.ndarray, qn: np.ndarray, x: np.ndarray, xn: np.ndarray, metric: str, pairwise: bool = True):
    """Keys (ascending is better; squared norms given): every q against every x, or row i against row i."""
    dot = q @ x.T if pairwise else np.einsum("nd,nd->n", q, x)
    if metric == "ip":
        return -dot
    return (qn[:, None] + xn[None, :] if pairwise else qn + xn) - 2 * dot


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = K, ties: list[np.ndarray] | None = None) -> float:
    """Mean |found[:k] & (truth[:k] | ties)| / k: the usual "k-recall@k", with ``ties`` (from
    :func:`boundary_ties`) counted as hits. A query has at most k distinct found ids, so at most k hits."""
    hits = 0
    for i, (f, t) in enumerate(zip(found, truth)):
        good = set(t[:k].tolist())
        if ties is not None:
            good.update(ties[i].tolist())
        hits += len(set(f[:k].tolist()) & good - {-1})
    return hits / (k * len(truth))


def nprobe_grid(nlist: int, midpoints: bool = False) -> list[int]:
    """Powers of two below ``nlist``, then ``nlist``; ``midpoints`` adds 1.5x each (3, 6, 12, ...)."""
    grid, p = [], 1
    while p < nlist:
        grid.append(p)
        if midpoints and p >= 2 and p * 3 // 2 < nlist:
            grid.append(p * 3 // 2)
        p *= 2
    return grid + [nlist] if nlist else [1]


def cost(nprobe: int, rf: int, nlist: int, ntotal: int, reranked: bool, k: int = K) -> float:
    scanned = ntotal * (nprobe / nlist if nlist else 1.0)
    return scanned + (RERANK_UNITS * k * rf if reranked else 0.0)


def tune(idx, truth: np.ndarray, queries: np.ndarray, target: float, ties: list[np.ndarray] | None = None,
         own: np.ndarray | None = None, k: int = K, factors=RERANK_FACTORS, min_nprobe: int = 1,
         midpoints: bool = False) -> dict:
    """Cheapest (nprobe, rerank_factor) reaching ``target`` recall@k on ``queries`` (``ties``: see
    recall_at; ``own``: each query's own stored id, taken out of what the index returns); nprobe
    from ``min_nprobe`` up over :func:`nprobe_grid` (``midpoints``), rerank factors from ``factors``."""
    # One more than k leaves k once each query's own row is out; at k = MAX_K the own row, when
    # found, costs a hit (1/k of recall: conservative).
    fetch = k if own is None else min(k + 1, MAX_K)
    reranked = idx.manifest.get("rerank") is not None
    factors = factors if reranked else (1,)
    nlist = int(idx.manifest.get("nlist") or 0)
    trials, cheapest_reached = [], np.inf  # cost of the cheapest point reaching the target so far
    grid = nprobe_grid(nlist, midpoints)
    for rf in factors:
        seen: dict[int, float] = {}  # nprobe -> recall at this factor
        # Fewer lists than hold k * rf candidates leave the search's own widening to decide, so
        # recall would not change with nprobe there and the plateau rule would stop too early.
        holds = int(np.ceil(nlist * min(k * rf, idx.ntotal) / max(idx.ntotal, 1))) if nlist else 1
        for nprobe in [p for p in grid if p >= max(min_nprobe, holds)] or grid[-1:]:
            c = cost(nprobe, rf, nlist, idx.ntotal, reranked, k)
            if c >= cheapest_reached:
                break  # dearer than a point that already reaches the target
            t0 = time.perf_counter()
            _, ids = idx.search(queries, fetch, nprobe=nprobe, rerank_factor=rf)
            ms = 1000 * (time.perf_counter() - t0) / len(queries)
            ids = without_own(ids, own, k)
            r = recall_at(ids, truth, k=k, ties=ties)
            trials.append({"nprobe": nprobe, "rerank_factor": rf, "recall": round(r, 4),
                           "ms_per_query": round(ms, 4), "cost": c})
            if r >= target:
                cheapest_reached = min(cheapest_reached, c)
                break  # larger nprobe only costs more at this factor
            # Plateau: a doubling of nprobe gained <= 0.002, so the codes, not the probed lists,
            # limit recall at this factor (measured per doubling, also on the midpoint grid).
            half = max((p for p in seen if p <= nprobe // 2), default=None)
            if nprobe >= 4 and half is not None and r <= seen[half] + 0.002:
                break
            seen[nprobe] = r
    reached = [t for t in trials if t["recall"] >= target]
    if reached:
        best = min(reached, key=lambda t: (t["cost"], -t["recall"]))
    else:
        best = max(trials, key=lambda t: (t["recall"], -t["cost"]))
        log.warning("target recall@%d %.3f not reached; best %.3f at nprobe=%d rerank=%d",
                    k, target, best["recall"], best["nprobe"], best["rerank_factor"])
    return {"search_defaults": {"nprobe": best["nprobe"], "rerank_factor": best["rerank_factor"]},
            "measured_recall": best["recall"], "target_reached": bool(reached), "tuning": trials}


def tune_version(vdir: str, manifest: dict, source: VectorSource, target: float, *, seed: int = 0,
                 queries: np.ndarray | None = None, n_queries: int = N_QUERIES) -> dict:
    """Tune a staged version directory (manifest not yet written) and return manifest fields."""
    metric = manifest["metric"]
    own = None
    if queries is None:
        own, queries = leave_one_out_queries(source, n_queries, seed)
        query_kind = f"{len(queries)} stored vectors, each searched with its own id left out"
    else:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        query_kind = f"{len(queries)} held-out vectors given by the caller"
    t0 = time.monotonic()
    truth = ground_truth(source, queries, K, metric, own=own)
    draft = dict(manifest, version=manifest.get("version", "staging"),
                 search_defaults={"nprobe": 1, "rerank_factor": 1})
    parts = [open_part(vdir, s, manifest["dim"], False) for s in manifest["shard_files"]]
    idx = IndexVersion(vdir, draft, parts, np.empty(0, np.int64), None)
    out = tune(idx, truth.ids, queries, target, ties=truth.ties, own=own)
    big = tune_big_k(idx, source, queries, own, metric, target, min_nprobe=out["search_defaults"]["nprobe"])
    if big is not None:
        out["search_defaults_big_k"] = big
    out["tuning_queries"] = query_kind
    out["recall_ties"] = "counted: a returned id at the 10th true distance is a hit"
    out["tuning_seconds"] = round(time.monotonic() - t0, 3)
    return out


def tune_big_k(idx, source: VectorSource, queries: np.ndarray, own: np.ndarray | None, metric: str, target: float,
               *, k: int = BIG_K, n_queries: int = BIG_K_QUERIES, min_ntotal: int = BIG_K_MIN_NTOTAL,
               min_nprobe: int = 1) -> dict | None:
    """The cheapest measured (nprobe, rerank_factor) reaching ``target`` recall@``k`` on the first
    ``n_queries`` of ``queries``, as the manifest's ``search_defaults_big_k`` (``k`` and the recall
    beside the point; the trials under ``tuning``); None for an index under ``min_ntotal`` vectors."""
    if idx.ntotal < min_ntotal or k >= idx.ntotal:
        return None
    queries = queries[:n_queries]
    own = None if own is None else own[:n_queries]
    t0 = time.monotonic()
    truth = ground_truth(source, queries, k, metric, own=own)
    out = tune(idx, truth.ids, queries, target, ties=truth.ties, own=own, k=k, factors=BIG_K_RERANK_FACTORS,
               min_nprobe=min_nprobe, midpoints=BIG_K_NPROBE_MIDPOINTS)
    best = next(t for t in out["tuning"] if (t["nprobe"], t["rerank_factor"]) == tuple(out["search_defaults"].values()))
    return {"k": k, **out["search_defaults"], "measured_recall": out["measured_recall"],
            "target_reached": out["target_reached"], "ms_per_query": best["ms_per_query"], "queries": len(queries),
            "tuning_seconds": round(time.monotonic() - t0, 3), "tuning": out["tuning"]}
