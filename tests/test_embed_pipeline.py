"""Query pipeline: detect -> crop -> embed, whole-image fallback, boxes in original pixels."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from embed.detector import Detections, ProductDetector
from embed.pipeline import (
    DETECTOR,
    MERGED,
    WHOLE_IMAGE,
    QueryEmbedding,
    QueryPipeline,
    Region,
    best_cosines,
    crop_with_margin,
    load_embedder,
    load_pipeline,
)
from imgsearch.errors import BadInput

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def embedder():
    return load_embedder(None, device="cpu")


@pytest.fixture(scope="module")
def detector():
    return ProductDetector.pretrained()


@pytest.fixture(scope="module")
def photos():
    return [Image.fromarray(data.astronaut()), Image.fromarray(data.rocket())]


def test_without_a_detector_the_whole_image_is_the_region(embedder, photos):
    results = QueryPipeline(embedder).embed_queries(photos)
    whole = embedder.embed(photos)
    for image, result, vector in zip(photos, results, whole):
        assert result.fallback and len(result.regions) == 1
        assert result.regions[0].box == (0.0, 0.0, float(image.width), float(image.height))
        assert result.image_size == image.size
        np.testing.assert_allclose(result.best, vector, atol=1e-5)


def test_an_untrained_detector_falls_back_to_the_whole_image(embedder, detector, photos):
    results = QueryPipeline(embedder, detector).embed_queries(photos)
    assert all(r.fallback for r in results)
    assert results[0].regions[0].box == (0.0, 0.0, 512.0, 512.0)
    # Its low boxes are still candidates, listed as detections; the whole image is not a detection.
    for result in results:
        assert all(0.05 <= d["score"] < 0.3 for d in result.detections())
        assert len(result.detections()) == len(result.regions) - 1 == len(result.vectors) - 1


def test_several_detections_give_several_vectors_best_first(embedder, detector, photos):
    pipeline = QueryPipeline(embedder, detector, score_threshold=0.0, max_regions=3)
    for image, result in zip(photos, pipeline.embed_queries(photos)):
        # Three boxes, the two best merged (unless the best holds the second), then the whole image.
        sources = [r.source for r in result.regions]
        assert not result.fallback and sources in ([DETECTOR] * 3 + [MERGED, WHOLE_IMAGE], [DETECTOR] * 3 + [WHOLE_IMAGE])
        assert result.vectors.shape == (len(sources), 128)
        np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(result.vectors[-1], embedder.embed([image])[0], atol=1e-5)
        scores = [r.score for r in result.regions[:3]]
        assert scores == sorted(scores, reverse=True)
        assert len(result.detections()) == 3
        for region in result.regions:
            x1, y1, x2, y2 = region.box
            assert 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height


def test_catalog_images_take_the_same_path_one_vector_each(embedder, photos):
    pipeline = load_pipeline(None, device="cpu")
    vectors = pipeline.embed_catalog(photos + [photos[0]])
    assert vectors.shape == (3, 128)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-5)
    np.testing.assert_allclose(vectors[:2], embedder.embed(photos), atol=1e-5)
    assert pipeline.model_hash == embedder.model_hash


def test_crop_with_margin_grows_the_box_and_clips_to_the_image():
    image = Image.new("RGB", (100, 80))
    assert crop_with_margin(image, (10, 10, 50, 50), 0.1).size == (48, 48)
    assert crop_with_margin(image, (0, 0, 100, 80), 0.1).size == (100, 80)
    with pytest.raises(BadInput, match="empty"):
        crop_with_margin(image, (120, 10, 130, 20), 0.1)


def _detections(*scores: float) -> Detections:
    boxes = np.array([[10.0 * i, 10.0, 10.0 * i + 40.0, 60.0] for i in range(len(scores))], dtype=np.float32).reshape(-1, 4)
    return Detections(boxes, np.array(scores, dtype=np.float32), np.ones(len(scores), dtype=np.int64))


@pytest.mark.parametrize(("scores", "query_scores", "catalog_scores"), [
    # A confident box leads; the two best boxes merged (scored their mean) come next, the whole image last.
    ((0.8, 0.2, 0.04), [0.8, 0.2, 0.5, 0.0], [0.8]),
    ((0.2, 0.1), [0.0, 0.2, 0.1, 0.15], [0.0]),  # nothing at 0.3: the whole image leads, the boxes stay candidates
    ((0.9, 0.7, 0.6, 0.5), [0.9, 0.7, 0.6, 0.8, 0.0], [0.9]),  # max_regions boxes at most
    ((0.9,), [0.9, 0.0], [0.9]),  # one box: nothing to merge
    ((), [0.0], [0.0]),
])
def test_regions_put_the_detectors_choice_first_then_the_candidates(embedder, detector, scores, query_scores, catalog_scores):
    pipeline = QueryPipeline(embedder, detector, max_regions=3)
    image = Image.new("RGB", (200, 100))
    dets = _detections(*scores)
    assert [r.score for r in pipeline.regions_of(image, dets)] == pytest.approx(query_scores)
    assert [r.score for r in pipeline.regions_of(image, dets, candidates=False)] == pytest.approx(catalog_scores)
    whole = [r for r in pipeline.regions_of(image, dets) if r.whole_image]
    assert [r.box for r in whole] == [(0.0, 0.0, 200.0, 100.0)]


def test_the_two_best_boxes_merge_into_one_more_candidate(embedder, detector):
    image = Image.new("RGB", (200, 100))
    # A parachute and its jumper, boxed apart (boxes x1, y1, x2, y2), and a stray box.
    dets = Detections(np.array([[50, 0, 150, 40], [80, 50, 120, 95], [0, 0, 20, 20]], np.float32),
                      np.array([0.8, 0.4, 0.1], np.float32), np.ones(3, np.int64))
    regions = QueryPipeline(embedder, detector).regions_of(image, dets)
    assert [r.source for r in regions] == [DETECTOR, DETECTOR, DETECTOR, MERGED, WHOLE_IMAGE]
    assert regions[3].box == (50.0, 0.0, 150.0, 95.0) and regions[3].score == pytest.approx(0.6)
    query = QueryEmbedding(image.size, regions, np.zeros((5, 4), np.float32))
    assert query.region(3) == {"box": [50.0, 0.0, 150.0, 95.0], "score": 0.6, "source": "merged"}
    assert [d["score"] for d in query.detections()] == pytest.approx([0.8, 0.4, 0.1])  # merged is no detection
    # The second box inside the best: their union is the best box again, at a lower score, never chosen.
    inner = Detections(np.array([[50, 0, 150, 90], [80, 20, 120, 60]], np.float32), np.array([0.8, 0.4], np.float32),
                       np.ones(2, np.int64))
    assert [r.source for r in QueryPipeline(embedder, detector).regions_of(image, inner)] == [DETECTOR, DETECTOR, WHOLE_IMAGE]
    assert MERGED not in [r.source for r in QueryPipeline(embedder, detector, merge_boxes=False).regions_of(image, dets)]
    # The merged region is cropped with the margin like any box.
    crops = QueryPipeline(embedder, detector, margin=0.1).crops(image, regions)
    assert crops[3].size == (120, 100) and crops[4].size == image.size


def test_choose_weighs_the_search_score_with_the_detector_score():
    regions = [Region((0, 0, 9, 9), 0.6), Region((1, 1, 5, 5), 0.1), Region((0, 0, 20, 20), 0.0, WHOLE_IMAGE)]
    query = QueryEmbedding((20, 20), regions, np.zeros((3, 4), dtype=np.float32))
    assert query.choose([0.50, 0.70, 0.75]) == 0  # 0.80 > 0.75 = 0.75
    assert query.choose([0.50, 0.90, 0.75]) == 1  # 0.95 beats 0.80
    assert query.choose([0.50, 0.70, 0.95]) == 2
    assert query.choose([float("nan"), -np.inf, 0.1]) == 2  # a region whose search found nothing never wins
    assert query.choose([-np.inf] * 3) == 0
    with pytest.raises(BadInput, match="2 search scores for 3 regions"):
        query.choose([0.1, 0.2])
    assert query.region(1) == {"box": [1.0, 1.0, 5.0, 5.0], "score": 0.1, "source": "detector"}
    assert query.region(2)["source"] == "whole_image"
    with pytest.raises(BadInput, match="region source must be .* got 'box'"):
        Region((0, 0, 1, 1), 0.5, "box")
    assert [d["score"] for d in query.detections()] == [0.6, 0.1]


def test_best_cosines_maps_squared_l2_distances_of_unit_vectors_to_cosines():
    rng = np.random.default_rng(0)
    a, b = (v / np.linalg.norm(v) for v in rng.normal(size=(2, 16)))
    squared = float(np.sum((a - b) ** 2))
    assert best_cosines(np.array([[squared, 3.0]]), np.array([[4, 5]]), higher_is_better=False)[0] == pytest.approx(float(a @ b), abs=1e-6)
    assert best_cosines(np.array([[0.25, 0.1]]), np.array([[4, 5]]), higher_is_better=True)[0] == 0.25
    # A row whose search found nothing never wins the choice.
    assert best_cosines(np.array([[0.9], [0.0]]), np.array([[7], [-1]]), higher_is_better=True).tolist() == [0.9, -np.inf]
