"""Detector: valid boxes and scores from untrained heads, prior init, torchvision training contract."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from embed.detector import DetectorConfig, ProductDetector
from imgsearch.errors import BadInput

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # torchvision's Python roi_align would compile for 17 s
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def detector() -> ProductDetector:
    return ProductDetector.pretrained()


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee()), Image.new("RGB", (37, 91), (9, 9, 9))]


def assert_valid(dets, image: Image.Image) -> None:
    boxes, scores = dets.boxes, dets.scores
    assert boxes.dtype == np.float32 and boxes.shape == (len(scores), 4)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= image.width).all() and (boxes[:, 3] <= image.height).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert ((scores >= 0) & (scores <= 1)).all()
    assert (np.diff(scores) <= 0).all(), "best first"


def test_boxes_lie_inside_each_image_with_scores_in_0_1_best_first(detector, photos):
    for image, dets in zip(photos, detector.detect(photos, score_threshold=0.0)):
        assert 1 <= len(dets) <= detector.config.max_detections
        assert_valid(dets, image)


def test_untrained_heads_find_nothing_at_the_default_threshold(detector, photos):
    assert all(len(d) == 0 for d in detector.detect(photos))


def test_training_mode_takes_targets_and_returns_losses(detector):
    trainee = ProductDetector.pretrained().train()
    images = [torch.rand(3, 240, 320), torch.rand(3, 200, 200)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 200.0, 230.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[50.0, 50.0, 150.0, 190.0]]), "labels": torch.tensor([1])}]
    losses = trainee(images, targets)
    assert set(losses) == {"bbox_regression", "classification"}
    sum(losses.values()).backward()
    assert trainee.model.head.classification_head.module_list[0][-1].weight.grad is not None
    with pytest.raises(RuntimeError, match="eval mode"):
        trainee.detect([Image.new("RGB", (64, 64))])


def test_bad_threshold_and_config_values_are_quoted(detector):
    with pytest.raises(BadInput, match="1.5"):
        detector.detect([Image.new("RGB", (64, 64))], score_threshold=1.5)
    with pytest.raises(BadInput, match="'yolo'"):
        DetectorConfig(arch="yolo")


@pytest.mark.slow
def test_faster_rcnn_variant_gives_valid_boxes_and_losses(photos):
    frcnn = ProductDetector.pretrained(DetectorConfig(arch="fasterrcnn"))
    # TORCHDYNAMO_DISABLE is read when torch is imported, too late here; roi_align's fallback would compile.
    with torch._dynamo.config.patch(disable=True):
        (dets,) = frcnn.detect(photos[1:2], score_threshold=0.0)
        assert_valid(dets, photos[1])
        frcnn.train()
        target = {"boxes": torch.tensor([[10.0, 20.0, 100.0, 110.0]]), "labels": torch.tensor([1])}
        losses = frcnn([torch.rand(3, 128, 128)], [target])
    assert "loss_classifier" in losses
