"""Auto-tuning: measure recall@10 against exact search, pick the cheapest defaults.

Queries: held-out vectors when the caller has them; otherwise stored vectors plus small
Gaussian noise (a self-search catalog has no other queries; the noise keeps the task from
being "find yourself"). Ground truth: exact search streamed over the same blocks the build
read (faiss.knn per block, merged), so it never loads the catalog either.

Cost model for "cheapest": scanning one code in a probed list costs 1 unit, re-ranking one
candidate costs RERANK_UNITS (a 2*d-byte gather, often a page fault, plus d FMAs, against
one SIMD table lookup per fast-scan code).
"""

from __future__ import annotations

import logging
import time

import faiss
import numpy as np

from index.ann.parts import open_part
from index.ann.search import IndexVersion
from index.ann.sources import DEFAULT_BLOCK, VectorSource, sample_rows

log = logging.getLogger(__name__)

K = 10
N_QUERIES = 500
NOISE = 0.2  # query = x + noise with |noise| ~ 0.2 |x| (cosine ~0.98 to its source)
# Up to 64: at 1M-5M vectors 4-bit codes need 16-32x (bench_scale), and a grid that stops
# short reports "not reached" for a target a larger factor meets.
RERANK_FACTORS = (1, 2, 4, 8, 16, 32, 64)
RERANK_UNITS = 20.0


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


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = K) -> float:
    """Mean |found[:k] & truth[:k]| / k (the usual "k-recall@k")."""
    hits = sum(len(set(f[:k]) & set(t[:k]) - {-1}) for f, t in zip(found, truth))
    return hits / (k * len(truth))


def nprobe_grid(nlist: int) -> list[int]:
    grid, p = [], 1
    while p < nlist:
        grid.append(p)
        p *= 2
    return grid + [nlist] if nlist else [1]


def cost(nprobe: int, rf: int, nlist: int, ntotal: int, reranked: bool) -> float:
    scanned = ntotal * (nprobe / nlist if nlist else 1.0)
    return scanned + (RERANK_UNITS * K * rf if reranked else 0.0)


def tune(idx, truth: np.ndarray, queries: np.ndarray, target: float) -> dict:
    """Cheapest (nprobe, rerank_factor) reaching ``target`` recall@10 on ``queries``."""
    reranked = idx.manifest.get("rerank") is not None
    factors = RERANK_FACTORS if reranked else (1,)
    nlist = int(idx.manifest.get("nlist") or 0)
    trials, cheapest_reached = [], np.inf  # cost of the cheapest point reaching the target so far
    for rf in factors:
        last = -1.0
        for nprobe in nprobe_grid(nlist):
            c = cost(nprobe, rf, nlist, idx.ntotal, reranked)
            if c >= cheapest_reached:
                break  # dearer than a point that already reaches the target
            t0 = time.perf_counter()
            _, ids = idx.search(queries, K, nprobe=nprobe, rerank_factor=rf)
            ms = 1000 * (time.perf_counter() - t0) / len(queries)
            r = recall_at(ids, truth)
            trials.append({"nprobe": nprobe, "rerank_factor": rf, "recall": round(r, 4),
                           "ms_per_query": round(ms, 4), "cost": c})
            if r >= target:
                cheapest_reached = min(cheapest_reached, c)
                break  # larger nprobe only costs more at this factor
            if nprobe >= 4 and r <= last + 0.002:
                break  # plateau: the codes, not the probed lists, limit recall at this factor
            last = r
    reached = [t for t in trials if t["recall"] >= target]
    if reached:
        best = min(reached, key=lambda t: (t["cost"], -t["recall"]))
    else:
        best = max(trials, key=lambda t: (t["recall"], -t["cost"]))
        log.warning("target recall@10 %.3f not reached; best %.3f at nprobe=%d rerank=%d",
                    target, best["recall"], best["nprobe"], best["rerank_factor"])
    return {"search_defaults": {"nprobe": best["nprobe"], "rerank_factor": best["rerank_factor"]},
            "measured_recall": best["recall"], "target_reached": bool(reached), "tuning": trials}


def tune_version(vdir: str, manifest: dict, source: VectorSource, target: float, *, seed: int = 0,
                 queries: np.ndarray | None = None, n_queries: int = N_QUERIES) -> dict:
    """Tune a staged version directory (manifest not yet written) and return manifest fields."""
    metric = manifest["metric"]
    if queries is None:
        queries = noisy_queries(source, min(n_queries, source.n), seed, metric)
        query_kind = f"{len(queries)} stored vectors + {NOISE:g} relative Gaussian noise"
    else:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        query_kind = f"{len(queries)} held-out vectors given by the caller"
    t0 = time.monotonic()
    _, truth = exact_knn(source, queries, K, metric)
    draft = dict(manifest, version=manifest.get("version", "staging"),
                 search_defaults={"nprobe": 1, "rerank_factor": 1})
    parts = [open_part(vdir, s, manifest["dim"], False) for s in manifest["shard_files"]]
    idx = IndexVersion(vdir, draft, parts, np.empty(0, np.int64), None)
    out = tune(idx, truth, queries, target)
    out["tuning_queries"] = query_kind
    out["tuning_seconds"] = round(time.monotonic() - t0, 3)
    return out
