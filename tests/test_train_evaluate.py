"""Recall@K, AP@0.5 and kNN P@1 on hand-made inputs."""

import numpy as np
import pytest

from imgsearch.errors import BadInput
from train.evaluate import average_precision, box_iou, cosine_recall, knn_precision_at_1, ranked_products, recall_at_k


def test_ranking_collapses_to_distinct_products_best_first():
    scores = np.array([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.95]])
    assert ranked_products(scores, ["a", "a", "b", "c"]) == [["a", "b", "c"], ["c", "b", "a"]]


def test_recall_at_k_on_a_hand_made_ranking():
    ranked = [["a", "b", "c"], ["b", "a", "c"], ["c", "b", "a"], ["b", "c", "d"]]
    truths = ["a", "a", "a", "a"]
    # found at rank 1, 2, 3, never
    assert recall_at_k(ranked, truths, ks=(1, 2, 3)) == {1: 0.25, 2: 0.5, 3: 0.75}


def test_cosine_recall_counts_a_second_image_of_the_same_product_once():
    catalog = np.eye(3, dtype=np.float32)
    query = np.array([[0.6, 0.8, 0.0]], dtype=np.float32)  # nearest: row 1 (product x), then row 0 (product x), then y
    assert cosine_recall(query, ["y"], catalog, ["x", "x", "y"], ks=(1, 2)) == {1: 0.0, 2: 1.0}


def test_recall_rejects_mismatched_inputs():
    with pytest.raises(BadInput, match="2 rankings but 1"):
        recall_at_k([["a"], ["b"]], ["a"])
    with pytest.raises(BadInput, match=r"\[0\]"):
        recall_at_k([["a"]], ["a"], ks=(0,))


def test_box_iou():
    assert box_iou([[0, 0, 10, 10]], [[5, 0, 15, 10]])[0, 0] == pytest.approx(50 / 150)


def test_average_precision_on_a_hand_case():
    truths = [np.array([[0, 0, 10, 10]]), np.array([[20, 20, 40, 40]])]
    predictions = [
        (np.array([[0, 0, 10, 10], [50, 50, 60, 60]]), np.array([0.9, 0.8])),  # a hit, then a false positive
        (np.array([[21, 21, 40, 40], [20, 20, 40, 40]]), np.array([0.7, 0.6])),  # a hit, then a duplicate (FP)
    ]
    # ranked: TP .9 (P 1, R .5), FP .8, TP .7 (P 2/3, R 1), FP .6 -> AP = .5 * 1 + .5 * 2/3
    assert average_precision(predictions, truths) == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_average_precision_is_zero_without_detections_and_one_when_perfect():
    truths = [np.array([[0, 0, 10, 10]])]
    assert average_precision([(np.zeros((0, 4)), np.zeros(0))], truths) == 0.0
    assert average_precision([(np.array([[0, 0, 10, 10]]), np.array([0.5]))], truths) == 1.0


def test_knn_precision_at_1_leaves_each_item_out():
    vectors = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.8, 0.2]])
    labels = [0, 0, 1, 1, 1]  # the last one's nearest other item is label 0
    assert knn_precision_at_1(vectors, labels) == pytest.approx(4 / 5)


def test_fashion_mnist_p_at_1_scores_an_embedder_against_raw_pixels_on_real_images():
    from imgsearch import assets
    from imgsearch.errors import MissingAsset
    from train.evaluate import fashion_mnist_p_at_1, fashion_mnist_pick

    try:
        assets.fashion_mnist_dir()
    except MissingAsset as exc:
        pytest.skip(f"asset missing, run make data: {exc}")
    seen = []

    def inverted_pixels(pils):  # an "embedder" that undoes the inversion: it must score as the raw pixels do
        seen.extend(pils)
        return np.stack([255.0 - np.asarray(p.convert("L"), np.float32).ravel() for p in pils])

    result = fashion_mnist_p_at_1(inverted_pixels, n=300, seed=1)
    assert result["n"] == 300 and len(seen) == 300 and seen[0].mode == "RGB" and seen[0].size == (28, 28)
    assert result["embedding"] == pytest.approx(result["raw_pixels"]) and 0.5 < result["raw_pixels"] < 1.0  # chance: 0.1
    pick = fashion_mnist_pick(10_000, 300, seed=1)
    assert len(np.unique(pick)) == 300 and (np.diff(pick) > 0).all()
    assert np.array_equal(pick, fashion_mnist_pick(10_000, 300, seed=1))


def test_answering_vectors_take_each_querys_best_matching_region():
    from embed.pipeline import QueryEmbedding, Region
    from train.evaluate import answering_vectors

    catalog = np.eye(4, dtype=np.float32)
    box, whole = Region((0, 0, 5, 5), 0.3, "detector"), Region((0, 0, 9, 9), 0.0, "whole_image")
    off = np.full(4, 0.5, dtype=np.float32)  # 0.5 from every catalog row
    near = np.array([0.0, 0.96, 0.28, 0.0], dtype=np.float32)  # 0.96 from row 1
    queries = [
        QueryEmbedding((9, 9), [box, whole], np.stack([off, near])),  # 0.5 + 0.15 < 0.96: the whole photo answers
        QueryEmbedding((9, 9), [box, whole], np.stack([near, off])),  # the box matches: it answers
        QueryEmbedding((9, 9), [whole], off[None]),
    ]
    np.testing.assert_array_equal(answering_vectors(queries, catalog), np.stack([near, near, off]))
