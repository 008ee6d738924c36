"""Choosing a large index's codes by measured cost, not by rule alone.

From ``MEASURE_FROM`` vectors the auto factory's codes are a measured choice between the rule's
fast-scan codes (index/ann/factory.py) and plain 8-bit PQ of the same bytes on the same lists:
which one re-ranks fewer candidates, and at what price per code scanned, depends on the data
(real SIFT 1M: fast-scan needs rerank 32 and still gives 2.1x the QPS of 8-bit PQ at rerank 8).

The trial runs on the build's training sample, which is already in memory: the rule's index is
trained as the build would train it; the other candidate reuses its coarse centroids and only
trains its codes. Each candidate indexes the sample, and a seeded set of sample rows is searched
with its own row left out (as the tuner does, index/ann/tune.py) through an fp16 re-rank, over
nprobe x rerank_factor until the target recall@10; the cheapest point's time per query (best of
``TIMING_ROUNDS``) is the candidate's cost. The trial's lists hold sample/N of the full lists'
vectors, so its rerank factors are lower than the full index will need: the trial ranks the
codes, the tuner sets the defaults. An alternative wins only when ``MARGIN`` cheaper.
"""

from __future__ import annotations

import logging
import time

import faiss
import numpy as np

from index.ann import factory as factory_mod
from index.ann.params import search_params
from index.ann.tune import recall_at, without_own

log = logging.getLogger(__name__)

MEASURE_FROM = factory_mod.HNSW_COARSE_FROM  # below, the build itself is cheaper than the trial
TRIAL_QUERIES = 256
TRIAL_ROWS = 1 << 20  # at most this much of the sample is indexed per candidate (1M rows: +87 s at 10M)
K = 10
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RERANK_FACTORS = (1, 2, 4, 8, 16, 32, 64)
TIMING_ROUNDS = 3
MARGIN = 0.9  # the alternative must cost <= 0.9x the rule's choice: timing noise must not flip it


def alternatives(choice: factory_mod.FactoryChoice, dim: int) -> list[str]:
    """Factories measured against the rule's ``choice``: 8-bit PQ of the same bytes on the same
    lists, when the rule chose fast-scan codes (a budget-forced 8-bit choice has no rival)."""
    parts = choice.factory.split(",")
    codes = parts[-1]
    if "x4fs" not in codes or not codes.startswith("PQ") or any(p.startswith("OPQ") for p in parts):
        return []  # (a rotation would put the shared centroids in another space)
    m_fast = int(codes[2:codes.index("x4fs")])
    m = m_fast // 2  # same bytes: m_fast 4-bit codes = m_fast / 2 bytes
    if m_fast % 2 or dim % m:
        return []
    return [",".join(parts[:-1] + [f"PQ{m}"])]


def _centroids(index) -> np.ndarray:
    ivf = faiss.extract_index_ivf(index)
    return ivf.quantizer.reconstruct_n(0, ivf.nlist)


def train_like(factory: str, dim: int, metric: str, sample: np.ndarray, centroids: np.ndarray):
    """``factory`` trained on ``sample`` with the given coarse centroids (only its codes learn)."""
    index = factory_mod.validate_factory(factory, dim, metric)
    if isinstance(faiss.downcast_index(index), faiss.IndexPreTransform):
        raise ValueError(f"{factory!r}: a pre-transform changes the space the centroids live in")
    ivf = faiss.extract_index_ivf(index)
    ivf.quantizer.add(np.ascontiguousarray(centroids, np.float32))
    index.train(sample)  # faiss skips k-means: the quantizer already holds nlist centroids
    return index


def _leave_one_out(sample: np.ndarray, metric: str, seed: int):
    rng = np.random.default_rng(seed + 7)
    rows = np.sort(rng.choice(len(sample), min(TRIAL_QUERIES, len(sample) - K - 1), replace=False))
    _, truth = faiss.knn(sample[rows], sample, K + 1, metric=factory_mod.metric_type(metric))
    return rows, without_own(truth, rows, K)


def trial_cost(trained, sample: np.ndarray, metric: str, target: float, seed: int = 0) -> dict:
    """Cheapest measured (nprobe, rerank_factor) of ``trained`` over the sample, and its time."""
    index = faiss.clone_index(trained)
    index.add(sample)
    fp16 = faiss.IndexScalarQuantizer(sample.shape[1], faiss.ScalarQuantizer.QT_fp16, index.metric_type)
    fp16.add(sample)
    refine = faiss.IndexRefine(index, fp16)
    nlist = faiss.extract_index_ivf(index).nlist
    rows, truth = _leave_one_out(sample, metric, seed)
    q = np.ascontiguousarray(sample[rows])

    def run(nprobe: int, rf: int) -> tuple[float, float]:
        params = faiss.IndexRefineSearchParameters()
        params.k_factor = rf
        # nprobe and the HNSW coarse quantizer's efSearch as every imgsearch search sets them
        params.base_index_params, keep = search_params(index, nprobe)
        t0 = time.perf_counter()
        _, found = refine.search(q, K + 1, params=params)
        dt = (time.perf_counter() - t0) / len(q)
        del keep
        return recall_at(without_own(found, rows, K), truth, K), dt

    points = []
    for rf in RERANK_FACTORS:
        for nprobe in (p for p in NPROBES if p <= nlist):
            rec, dt = run(nprobe, rf)
            points.append({"nprobe": nprobe, "rerank_factor": rf, "recall": round(rec, 4), "ms": dt * 1e3})
            if rec >= target:
                break
    ok = [p for p in points if p["recall"] >= target]
    if not ok:
        best = max(points, key=lambda p: p["recall"])
        return {"reached": False, "recall": best["recall"], "ms_per_query": float("inf"), "points": len(points)}
    best = min(ok, key=lambda p: p["ms"])
    ms = min(run(best["nprobe"], best["rerank_factor"])[1] for _ in range(TIMING_ROUNDS)) * 1e3
    return {"reached": True, "nprobe": best["nprobe"], "rerank_factor": best["rerank_factor"],
            "recall": best["recall"], "ms_per_query": round(ms, 4), "points": len(points)}


def choose_codes(choice: factory_mod.FactoryChoice, trained, n: int, dim: int, metric: str, sample: np.ndarray,
                 target: float, seed: int = 0):
    """The measured winner between the rule's ``choice`` (``trained``: its trained index) and
    :func:`alternatives`. Returns (choice, trained index, report for the manifest)."""
    rivals = alternatives(choice, dim)
    if not rivals:
        return choice, trained, None
    t0 = time.monotonic()
    if len(sample) > TRIAL_ROWS:  # the sample is in stream order: a seeded subset, not its head
        sample = sample[np.sort(np.random.default_rng(seed + 5).choice(len(sample), TRIAL_ROWS, replace=False))]
    sample = np.ascontiguousarray(sample, np.float32)
    centroids = _centroids(trained)
    cost = {choice.factory: trial_cost(trained, sample, metric, target, seed)}
    built = {choice.factory: trained}
    for factory in rivals:
        built[factory] = train_like(factory, dim, metric, sample, centroids)
        cost[factory] = trial_cost(built[factory], sample, metric, target, seed)
    ms = {f: c["ms_per_query"] for f, c in cost.items()}
    rival = min(rivals, key=ms.get)
    winner = rival if ms[rival] <= MARGIN * ms[choice.factory] else choice.factory
    desc = "; ".join(f"{f}: " + (f"nprobe {c['nprobe']} x rerank {c['rerank_factor']}, {c['ms_per_query']:.3f} ms"
                                  if c["reached"] else f"best recall {c['recall']:.3f}, target not reached")
                     for f, c in cost.items())
    reason = (f"codes measured on the {len(sample):,}-row training sample at recall@{K} >= {target} "
              f"(leave-one-out queries, fp16 re-rank): {desc}; chose {winner}")
    report = {"sample": len(sample), "target": target, "candidates": cost, "chosen": winner,
              "seconds": round(time.monotonic() - t0, 1)}
    log.info(reason)
    if winner == choice.factory:
        return factory_mod.FactoryChoice(choice.factory, choice.nlist, choice.bytes_per_vector_ram, choice.mmap,
                                         choice.reasons + [reason]), trained, report
    code = faiss.extract_index_ivf(built[winner]).code_size
    ram = code + factory_mod.ID_BYTES + choice.nlist * (4 * dim + 256) / n
    return factory_mod.FactoryChoice(winner, choice.nlist, round(ram, 3), False, choice.reasons + [reason]), \
        built[winner], report
