"""Detector: valid boxes and scores, prior init, training contract; fast paths (eager, ONNX Runtime) vs torchvision's forward."""

import dataclasses
import os

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from embed import detector as detector_module
from embed.detector import DetectorConfig, ProductDetector, detector_input
from embed.runtime import onnxruntime_available
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


# --- the fast detect path: numpy preprocessing, network on a runtime, postprocess over candidates only ---

def _sharpened(seed: int = 0) -> ProductDetector:
    """ImageNet trunk, seeded random heads: top scores spread over ~0.27-0.38, so the default 0.3 threshold bites."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the heads' other layers are randomly initialised too
        det = ProductDetector.pretrained()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for branch in det.model.head.classification_head.module_list:
            last = branch[-1]
            last.weight.copy_(torch.randn(last.weight.shape, generator=generator) * 0.1)
            last.bias.view(-1, 2)[:, 0] = 1.5
            last.bias.view(-1, 2)[:, 1] = 0.0
    return det.eval()


@pytest.fixture(scope="module")
def sharp_detectors(tmp_path_factory):
    """The same weights three ways: torchvision's forward (reference), eager network, ONNX Runtime (own cache)."""
    cache = tmp_path_factory.mktemp("onnx")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMGSEARCH_ONNX_CACHE", str(cache))
        dets = {}
        for runtime in ("torchvision", "eager", "onnxruntime"):
            det = _sharpened()
            assert det.use_runtime(runtime) == (runtime if runtime != "onnxruntime" or onnxruntime_available() else "eager")
            dets[runtime] = det
    return dets, cache


@pytest.fixture(scope="module")
def reference_detections(sharp_detectors, real_photos) -> dict:
    reference = sharp_detectors[0]["torchvision"]
    return {threshold: reference.detect(real_photos, threshold) for threshold in (None, 0.0)}


def assert_same_detections(got, want, box_atol=0.05, score_atol=1e-4) -> None:
    assert len(got) == len(want), (got.scores, want.scores)
    np.testing.assert_allclose(got.boxes, want.boxes, atol=box_atol)
    np.testing.assert_allclose(got.scores, want.scores, atol=score_atol)
    np.testing.assert_array_equal(got.labels, want.labels)


def test_detector_input_matches_torchvisions_transform(real_photos):
    import torch.nn.functional as F

    from embed.preprocess import IMAGENET_MEAN, IMAGENET_STD

    for image in [*real_photos[:2], Image.new("RGB", (37, 91), (200, 10, 30))]:
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
        x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
        want = F.interpolate(x[None], size=(320, 320), mode="bilinear", align_corners=False)[0].numpy()
        got = detector_input(image, 320)
        assert got.shape == (3, 320, 320) and got.dtype == np.float32 and got.flags["C_CONTIGUOUS"]
        np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("runtime", ["eager", pytest.param("onnxruntime", marks=pytest.mark.onnxruntime)])
@pytest.mark.parametrize("threshold", [None, 0.0])  # None: the config's 0.3
def test_fast_paths_match_torchvisions_forward_on_real_photos(sharp_detectors, reference_detections, real_photos, runtime, threshold):
    dets, _ = sharp_detectors
    want = reference_detections[threshold]
    got = dets[runtime].detect(real_photos, threshold)
    counts = [len(d) for d in want]
    if threshold is None:
        assert 0 < sum(counts) < 5 * len(real_photos), f"the test needs a threshold that bites: {counts}"
    for g, w, image in zip(got, want, real_photos):
        assert_valid(g, image)
        assert_same_detections(g, w)


@pytest.mark.onnxruntime
def test_onnxruntime_batch_equals_one_photo_at_a_time(sharp_detectors, real_photos):
    det = sharp_detectors[0]["onnxruntime"]
    together = det.detect(real_photos, 0.0)
    for image, want in zip(real_photos, together):
        assert_same_detections(det.detect([image], 0.0)[0], want, box_atol=1e-3, score_atol=1e-5)


@pytest.mark.onnxruntime
def test_second_load_uses_the_cached_export(sharp_detectors, monkeypatch, forbid_onnx_export):
    import embed.runtime

    _, cache = sharp_detectors
    (path,) = cache.glob("detector-*.onnx")
    mtime = path.stat().st_mtime_ns

    monkeypatch.setenv("IMGSEARCH_ONNX_CACHE", str(cache))
    forbid_onnx_export()
    det = _sharpened()
    assert det.use_runtime("onnxruntime") == "onnxruntime"
    assert det._runner.model.source == "cache" and det._runner.model.path == path
    assert path.stat().st_mtime_ns == mtime
    other = _sharpened(seed=1)  # other weights: another file

    def key(d):
        return embed.runtime.onnx_cache_key("detector", detector_module.SSDNet(d.model), (2, 3, 320, 320), d.config.network_dict())

    assert path.name == f"detector-{key(det)}.onnx" and key(other) != key(det)
    # Thresholds act after the network: changing them reuses the same export.
    retuned = _sharpened()
    retuned.config = dataclasses.replace(retuned.config, score_threshold=0.5, nms_iou=0.4, max_detections=2)
    assert key(retuned) == key(det)
    assert retuned.use_runtime("onnxruntime") == "onnxruntime" and retuned._runner.model.path == path


def test_onnxruntime_failure_falls_back_to_eager_with_a_reason(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise ImportError("No module named 'onnxruntime'")

    monkeypatch.setattr(detector_module, "_OnnxNet", broken)
    det = ProductDetector.pretrained()
    with caplog.at_level("WARNING", logger="embed.detector"):
        assert det.use_runtime("onnxruntime") == "eager"
    assert "onnxruntime" in caplog.text and "falling back to eager" in caplog.text
    with pytest.raises(BadInput, match="'tensorrt'"):
        det.use_runtime("tensorrt")


@pytest.mark.onnxruntime
def test_training_or_new_weights_leave_the_onnx_snapshot(sharp_detectors):
    import copy

    source = sharp_detectors[0]["onnxruntime"]
    det = copy.deepcopy(source)  # an ONNX Runtime session does not deep-copy: the copy starts eager
    assert det.runtime == "eager" and source.runtime == "onnxruntime"
    det._runner = source._runner
    det.train()
    assert det.runtime == "eager"
    det.eval()._runner = source._runner
    det.load_state_dict(source.state_dict())
    assert det.runtime == "eager"
