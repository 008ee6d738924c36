"""Query pipeline: detect -> crop -> embed, whole-image fallback, boxes in original pixels."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from embed.detector import ProductDetector
from embed.pipeline import QueryPipeline, crop_with_margin, load_embedder, load_pipeline
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
    assert results[0].detections() == [{"box": [0.0, 0.0, 512.0, 512.0], "score": 0.0}]


def test_several_detections_give_several_vectors_best_first(embedder, detector, photos):
    pipeline = QueryPipeline(embedder, detector, score_threshold=0.0, max_regions=3)
    for image, result in zip(photos, pipeline.embed_queries(photos)):
        assert not result.fallback and len(result.regions) == 3
        assert result.vectors.shape == (3, 128)
        np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
        scores = [r.score for r in result.regions]
        assert scores == sorted(scores, reverse=True)
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
