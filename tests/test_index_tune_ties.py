"""Reported recall counts distance ties: an exact index scores 1.0 on data with duplicate vectors."""

from __future__ import annotations

import numpy as np
import pytest

from index.ann import tune
from index.ann.build import build_version
from index.ann.sources import array_source


def duplicated(n_distinct: int = 400, copies: int = 3, dim: int = 16, metric: str = "l2") -> np.ndarray:
    x = np.repeat(np.random.default_rng(0).standard_normal((n_distinct, dim)).astype(np.float32), copies, axis=0)
    return x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "ip" else x


@pytest.mark.parametrize(("metric", "shards", "shuffled_ids"), [("l2", 1, True), ("ip", 1, False), ("ip", 2, True)])
def test_exact_index_on_duplicate_vectors_reports_recall_1(tmp_path, metric, shards, shuffled_ids):
    x = duplicated(metric=metric)
    ids = np.random.default_rng(1).permutation(10**6)[: len(x)] if shuffled_ids else None
    res = build_version(array_source(x, ids, metric=metric), str(tmp_path), factory="IDMap,Flat", shards=shards, gpu="off")
    # Which of 3 equal twins an exact search keeps at rank 10 is arbitrary: ~0.93 before ties counted.
    assert res.manifest["measured_recall"] == 1.0
    assert all(t["recall"] == 1.0 for t in res.manifest["tuning"])


def test_a_twin_of_the_kth_neighbour_is_a_hit_and_nothing_else_is():
    x = duplicated(n_distinct=300, copies=3)  # rows 3g, 3g+1, 3g+2 are equal vectors
    source = array_source(x)
    q = tune.noisy_queries(source, 50, 3, "l2")
    truth = tune.ground_truth(source, q, tune.K, "l2")
    # Each query's ties are exactly the k-th neighbour's twins that the exact top k left out.
    for i in range(len(q)):
        group = set(range(3 * (truth.ids[i, -1] // 3), 3 * (truth.ids[i, -1] // 3) + 3))
        assert sorted(truth.ties[i].tolist()) == sorted(group - set(truth.ids[i].tolist()))
    has = np.array([len(t) > 0 for t in truth.ties])
    assert has.sum() >= 10  # 10 = 3 + 3 + 3 + 1: most queries cut a group
    swapped = truth.ids.copy()
    swapped[has, -1] = [t[0] for t in truth.ties if len(t)]
    assert tune.recall_at(swapped, truth.ids, ties=truth.ties) == 1.0
    assert tune.recall_at(swapped, truth.ids) < 1.0  # the count without ties
    # A row that is not at the k-th distance is no hit.
    far = truth.ids.copy()
    far[:, -1] = [next(j for j in range(len(x)) if j // 3 not in set(truth.ids[i] // 3)) for i in range(len(q))]
    assert tune.recall_at(far, truth.ids, ties=truth.ties) == pytest.approx(0.9)


def test_distinct_vectors_have_no_ties_and_a_repeated_vector_is_capped():
    x = np.random.default_rng(2).standard_normal((5000, 24)).astype(np.float32)
    source = array_source(x)
    q = tune.noisy_queries(source, 200, 4, "l2")
    assert sum(len(t) for t in tune.ground_truth(source, q, tune.K, "l2").ties) == 0
    same = array_source(np.ones((3000, 8), np.float32), metric="ip")
    keys, ids = tune.exact_knn(same, np.ones((2, 8), np.float32), tune.K, "ip")
    ties = tune.boundary_ties(same, np.ones((2, 8), np.float32), keys, ids, "ip", cap=100)
    assert [len(t) for t in ties] == [100, 100] and not set(ties[0]) & set(ids[0])
