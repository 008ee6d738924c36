"""Big k gets its own operating point: the build's tuner measures the cheapest (nprobe, rerank)
reaching the target recall@k for k in the thousands (``search_defaults_big_k``), and a search for
that many results without explicit parameters uses it. Real data: GloVe words, held-out queries."""


import faiss
import numpy as np
from helpers.glove import glove_split

from index.ann.limits import defaults_for_k
from index.ann.tune import tune_big_k

faiss.omp_set_num_threads(2)
K = 1000


def _glove(n: int, held: int):
    return glove_split(n, held, seed=0)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / truth.shape[1] for f, t in zip(found, truth)]))


def test_defaults_follow_k():
    manifest = {"search_defaults": {"nprobe": 8, "rerank_factor": 4},
                "search_defaults_big_k": {"k": 10_000, "nprobe": 256, "rerank_factor": 1}}
    assert defaults_for_k(manifest, 10) == (8, 4) and defaults_for_k(manifest, 100) == (8, 4)
    assert defaults_for_k(manifest, 1000) == (256, 1) and defaults_for_k(manifest, 10_000) == (256, 1)
    assert defaults_for_k({"search_defaults": {"nprobe": 8, "rerank_factor": 4}}, 10_000) == (8, 4)


def test_big_k_point_reaches_the_target_on_fresh_queries(tmp_path):
    from index.ann.build import build_version
    from index.ann.search import open_index
    from index.ann.sources import array_source

    base, held = _glove(60_000, 100)
    source = array_source(base, metric="ip")
    manifest = build_version(source, str(tmp_path / "v"), factory="IVF1024,PQ25x4fsr", target_recall=0.95,
                             gpu="off").manifest
    assert "search_defaults_big_k" not in manifest  # 60k vectors: under the size where big k is tuned
    idx = open_index(str(tmp_path / "v"))
    tune_queries, fresh = held[:50], held[50:]
    big = tune_big_k(idx, source, tune_queries, None, "ip", 0.95, k=K, min_ntotal=0,
                     min_nprobe=manifest["search_defaults"]["nprobe"])
    assert big["k"] == K and big["target_reached"] and big["measured_recall"] >= 0.95, big
    assert big["nprobe"] > manifest["search_defaults"]["nprobe"]  # the k=10 point probes too few lists

    _, truth = faiss.knn(fresh, base, K, metric=faiss.METRIC_INNER_PRODUCT)
    _, with_small = idx.search(fresh, K)  # the k=10 defaults (the index widens only when short)
    idx.manifest["search_defaults_big_k"] = big
    _, with_big = idx.search(fresh, K)
    small_recall, big_recall = _recall(with_small, truth), _recall(with_big, truth)
    assert big_recall >= 0.94, (big_recall, big)
    assert small_recall < big_recall - 0.05, (small_recall, big_recall)


def test_big_k_at_the_largest_k_tunes_with_leave_one_out_queries(tmp_path):
    """k = MAX_K with stored rows as queries (their own row left out) cannot fetch k + 1."""
    from index.ann.build import build_version
    from index.ann.limits import MAX_K
    from index.ann.search import open_index
    from index.ann.sources import array_source
    from index.ann.tune import leave_one_out_queries

    base, _ = _glove(30_000, 0)
    source = array_source(base, metric="ip")
    build_version(source, str(tmp_path / "v"), factory="IVF256,PQ25x4fsr", target_recall=0.95, gpu="off")
    own, queries = leave_one_out_queries(source, 20, 0)
    big = tune_big_k(open_index(str(tmp_path / "v")), source, queries, own, "ip", 0.95, k=MAX_K, min_ntotal=0)
    assert big["k"] == MAX_K and big["target_reached"], {k: v for k, v in big.items() if k != "tuning"}


def test_big_k_grid_has_midpoints_and_stays_within_the_lists():
    from index.ann.tune import nprobe_grid

    assert nprobe_grid(4096) == [2**i for i in range(13)]
    fine = nprobe_grid(4096, midpoints=True)
    assert fine[:8] == [1, 2, 3, 4, 6, 8, 12, 16] and fine[-3:] == [2048, 3072, 4096]
    assert fine == sorted(set(fine)) and max(nprobe_grid(100, midpoints=True)) == 100
