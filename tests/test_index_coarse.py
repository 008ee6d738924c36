"""Two-level k-means for large coarse quantizers (index/ann/coarse.py): the list split is exact,
the centroids are as good as flat k-means on real data, and a build that uses them says so in
its manifest and reaches its recall on held-out queries. Real data: GloVe words."""

from pathlib import Path

import faiss
import numpy as np
import pytest
from helpers.glove import glove_split
from hypothesis import given, settings
from hypothesis import strategies as st

from index.ann import coarse

faiss.omp_set_num_threads(2)


def _glove(n: int, held: int):
    return glove_split(n, held, seed=1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 500), min_size=1, max_size=40), st.data())
def test_split_counts_is_exact_and_bounded(sizes, data):
    sizes = np.array(sizes)
    nonzero = int(np.count_nonzero(sizes))
    if nonzero == 0:
        return
    total = data.draw(st.integers(nonzero, int(sizes.sum())))
    counts = coarse.split_counts(sizes, total)
    assert counts.sum() == total
    assert np.all(counts <= sizes) and np.all(counts[sizes > 0] >= 1) and np.all(counts[sizes == 0] == 0)
    # proportional: no group is more than one centroid past its share, unless the others are capped
    share = sizes * total / sizes.sum()
    assert np.all(counts <= np.ceil(share) + 1) or np.any(counts == sizes)


def test_split_counts_refuses_impossible_splits():
    with pytest.raises(ValueError, match="cannot split 10"):
        coarse.split_counts(np.array([3, 4]), 10)


def _objective(x, centroids):
    d, _ = faiss.knn(x, centroids, 1)
    return float(d.mean())


def _coarse_recall(base, queries, centroids, nprobe):
    _, lists = faiss.knn(base, centroids, 1)
    _, truth = faiss.knn(queries, base, 10)
    _, probed = faiss.knn(queries, centroids, nprobe)
    return float(np.mean([np.isin(lists.ravel()[t], p).mean() for t, p in zip(truth, probed)]))


def test_two_level_centroids_match_flat_kmeans_on_real_vectors():
    base, queries = _glove(40_000, 300)
    nlist = 400
    km = faiss.Kmeans(base.shape[1], nlist, niter=coarse.NITER, seed=0)
    km.train(base)
    two = coarse.two_level_centroids(base, nlist, seed=0)
    assert two.shape == (nlist, base.shape[1]) and np.isfinite(two).all()
    flat_err, two_err = _objective(base, km.centroids), _objective(base, two)
    assert two_err <= 1.05 * flat_err, (two_err, flat_err)
    flat_rec, two_rec = _coarse_recall(base, queries, km.centroids, 8), _coarse_recall(base, queries, two, 8)
    assert two_rec >= flat_rec - 0.03, (two_rec, flat_rec)


def test_wants_two_level_only_for_large_cpu_ivf():
    big = faiss.index_factory(32, f"IVF{coarse.TWO_LEVEL_FROM},PQ16x4fs")
    small = faiss.index_factory(32, "IVF1024,PQ16x4fs")
    assert coarse.wants_two_level(big, "off")
    assert not coarse.wants_two_level(big, "on")  # the GPU trains flat k-means fast
    assert not coarse.wants_two_level(small, "off")
    assert not coarse.wants_two_level(faiss.index_factory(32, "HNSW32"), "off")


def test_pre_transform_is_trained_before_the_two_level_lists():
    from index.ann.build import train_index

    base, held = _glove(20_000, 100)
    notes = {}
    index = train_index("PCA32,IVF256_HNSW32,PQ16x4fs", base.shape[1], "l2", base, "off", 0, notes)
    assert notes == {"coarse_training": "faiss k-means"} and index.is_trained  # 256 lists
    coarse.train_two_level(two := faiss.index_factory(base.shape[1], "PCA32,IVF256_HNSW32,PQ16x4fs"), base, False)
    assert two.is_trained and faiss.extract_index_ivf(two).quantizer.ntotal == 256
    _, truth = faiss.knn(held, base, 10)
    recalls = []
    for idx in (index, two):
        idx.add(base)
        faiss.extract_index_ivf(idx).nprobe = 16
        _, found = idx.search(held, 10)
        recalls.append(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), truth.tolist())]))
    assert recalls[1] >= recalls[0] - 0.05, recalls


def test_build_with_two_level_quantizer_reaches_its_recall(tmp_path, monkeypatch):
    factory = "IVF512,PQ25x4fsr"
    from index.ann.build import build_version
    from index.ann.search import open_index
    from index.ann.sources import array_source

    monkeypatch.setattr(coarse, "TWO_LEVEL_FROM", 512)
    base, held = _glove(40_000, 200)
    built = build_version(array_source(base, metric="ip"), str(tmp_path / "v"), factory=factory,
                          target_recall=0.95, gpu="off")
    manifest = built.manifest
    assert manifest["build_config"]["coarse_training"].startswith("two-level k-means"), manifest["build_config"]
    idx = open_index(str(tmp_path / "v"))
    ivf = faiss.extract_index_ivf(faiss.read_index(str(Path(built.path) / "trained.faiss")))
    assert ivf.quantizer.ntotal == 512
    _, truth = faiss.knn(held, base, 10, metric=faiss.METRIC_INNER_PRODUCT)
    _, found = idx.search(held, 10)
    rec = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), truth.tolist())]))
    assert rec >= 0.93 and abs(rec - manifest["measured_recall"]) <= 0.03, (rec, manifest["measured_recall"])
