"""Training the IVF coarse quantizer of a large index with two-level k-means.

Flat k-means costs n_train * nlist * d per iteration, and the training sample grows with the
lists (64 points per list), so its cost grows as nlist^2: 4096 lists on 262k points train in
~55 s on 2 cores, 16384 lists on 1M points ~16x that. Two-level k-means clusters the sample
into sqrt(nlist) groups, then splits each group into a share of the lists proportional to its
size, and ends with Lloyd iterations over the whole sample assigned through an HNSW graph of
the centroids, so every point pays ~sqrt(nlist) distance computations instead of nlist.
bench/bench_coarse.py compares both at equal lists: see BENCHMARKS.md.

The rest of the training (OPQ rotation, PQ codebooks on residuals) is faiss' own
``IndexIVF.train``, which skips k-means once the quantizer holds nlist centroids.
"""

from __future__ import annotations

import logging
import time

import faiss
import numpy as np

from index.ann.params import ivf_of

log = logging.getLogger(__name__)

# From 4096 lists (1M vectors) two-level measured the same coarse recall at 1/12 of the time (bench_coarse).
TWO_LEVEL_FROM = 4096
NITER = 20  # Lloyd iterations per k-means, as in faiss' IVF training
REFINE_ITERS = 2  # full-sample passes after the split, assigned through HNSW


def wants_two_level(index, gpu: str) -> bool:
    """Whether ``index`` (an untrained faiss index) should get a two-level coarse quantizer."""
    ivf = ivf_of(index)
    return gpu == "off" and ivf is not None and ivf.nlist >= TWO_LEVEL_FROM and ivf.quantizer.ntotal == 0


def split_counts(sizes: np.ndarray, total: int) -> np.ndarray:
    """Centroids per group: proportional to the group sizes, summing to ``total``, each group
    at least one centroid and at most one per point (largest remainders get the leftovers)."""
    sizes = np.asarray(sizes, np.int64)
    if total < np.count_nonzero(sizes) or total > sizes.sum():
        raise ValueError(f"cannot split {total} centroids over groups of sizes summing to {int(sizes.sum())}")
    share = sizes * (total / sizes.sum())
    counts = np.minimum(np.maximum(np.floor(share).astype(np.int64), (sizes > 0).astype(np.int64)), sizes)
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    while counts.sum() != total:
        step = 1 if counts.sum() < total else -1
        for g in order if step > 0 else order[::-1]:
            if counts.sum() == total:
                break
            if (step > 0 and counts[g] < sizes[g]) or (step < 0 and counts[g] > 1):
                counts[g] += step
    return counts


def _kmeans(x: np.ndarray, k: int, spherical: bool, seed: int) -> np.ndarray:
    if k >= len(x):
        return np.ascontiguousarray(x[:k], np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=NITER, seed=seed, spherical=spherical,
                      max_points_per_centroid=256, verbose=False)
    km.train(np.ascontiguousarray(x, np.float32))
    return km.centroids


def _hnsw_assign(x: np.ndarray, centroids: np.ndarray, spherical: bool) -> np.ndarray:
    graph = faiss.IndexHNSWFlat(centroids.shape[1], 32, faiss.METRIC_INNER_PRODUCT if spherical else faiss.METRIC_L2)
    graph.hnsw.efSearch = 64
    graph.add(centroids)
    return graph.search(x, 1)[1].ravel()


def two_level_centroids(x: np.ndarray, nlist: int, *, spherical: bool = False, seed: int = 0) -> np.ndarray:
    """``nlist`` k-means centroids of ``x`` (float32, n x d) by two-level k-means."""
    n = len(x)
    if n < nlist:
        raise ValueError(f"{n} training vectors for {nlist} lists")
    t0 = time.monotonic()
    n1 = max(1, int(round(np.sqrt(nlist))))
    top = _kmeans(x, n1, spherical, seed)
    _, group = faiss.knn(x, top, 1, metric=faiss.METRIC_INNER_PRODUCT if spherical else faiss.METRIC_L2)
    group = group.ravel()
    sizes = np.bincount(group, minlength=n1)
    counts = split_counts(sizes, nlist)
    parts = []
    for g in np.flatnonzero(sizes):
        parts.append(_kmeans(x[group == g], int(counts[g]), spherical, seed + 1 + int(g)))
    centroids = np.ascontiguousarray(np.vstack(parts), np.float32)
    log.info("two-level k-means: %d groups then %d lists in %.1fs", n1, nlist, time.monotonic() - t0)
    for _ in range(REFINE_ITERS):
        assign = _hnsw_assign(x, centroids, spherical)
        order = np.argsort(assign, kind="stable")
        hits = np.bincount(assign, minlength=nlist)
        live = np.flatnonzero(hits)  # an emptied centroid keeps its place rather than collapsing to zero
        starts = np.concatenate([[0], np.cumsum(hits)[:-1]])[live]
        sums = np.add.reduceat(x[order], starts, axis=0, dtype=np.float64)
        centroids[live] = (sums / hits[live, None]).astype(np.float32)
        if spherical:
            faiss.normalize_L2(centroids)
    log.info("two-level k-means with %d refinement passes: %.1fs", REFINE_ITERS, time.monotonic() - t0)
    return centroids


def train_two_level(index, sample: np.ndarray, metric_ip: bool, seed: int = 0) -> None:
    """Train ``index`` (IVF, optionally under pre-transforms such as OPQ) in place: the chain's
    transforms on the sample, the coarse quantizer by two-level k-means, then faiss' own
    training of the codes (which skips k-means on a filled quantizer)."""
    index = faiss.downcast_index(index)
    x = np.ascontiguousarray(sample, np.float32)
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = index.chain.at(i)
            vt.train(x)
            x = vt.apply(x)
        train_two_level(index.index, x, metric_ip, seed)
        index.is_trained = True
        return
    ivf = faiss.extract_index_ivf(index)
    centroids = two_level_centroids(x, int(ivf.nlist), spherical=metric_ip, seed=seed)
    ivf.quantizer.train(centroids)
    ivf.quantizer.add(centroids)
    index.train(x)
