import subprocess
import sys

import numpy as np
import pytest
import torch

from embed import torchvision_ops
from embed.torchvision_compat import USING_FALLBACK_OPS, nms_reference_kernel, torchvision
from embed.torchvision_ops import nms_kernel


def plain_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Textbook greedy NMS, written independently of the kernel under test."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep: list[int] = []
    for i in order:
        ok = True
        for j in keep:
            xx1, yy1 = max(boxes[i][0], boxes[j][0]), max(boxes[i][1], boxes[j][1])
            xx2, yy2 = min(boxes[i][2], boxes[j][2]), min(boxes[i][3], boxes[j][3])
            inter = max(0.0, xx2 - xx1) * max(0.0, yy2 - yy1)
            area_i = (boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1])
            area_j = (boxes[j][2] - boxes[j][0]) * (boxes[j][3] - boxes[j][1])
            if inter / (area_i + area_j - inter) > threshold:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def random_boxes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    xy = rng.uniform(0, 100, size=(n, 2))
    wh = rng.uniform(1, 40, size=(n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    scores = rng.permutation(n).astype(np.float32) / n  # distinct: the order is unambiguous
    return boxes, scores


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_torchvision_nms_matches_plain_reference(seed, threshold):
    rng = np.random.default_rng(seed)
    boxes, scores = random_boxes(rng, int(rng.integers(1, 80)))
    kept = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold)
    assert kept.dtype == torch.int64
    assert kept.tolist() == plain_nms(boxes, scores, threshold)


def test_batched_nms_keeps_overlapping_boxes_of_different_classes():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    kept = torchvision.ops.batched_nms(boxes, scores, torch.tensor([0, 0, 1]), 0.5)
    assert kept.tolist() == [0, 2]


def test_empty_input_gives_empty_int64():
    kept = nms_reference_kernel(torch.zeros((0, 4)), torch.zeros((0,)), 0.5)
    assert kept.shape == (0,) and kept.dtype == torch.int64


def test_bad_shapes_are_reported():
    with pytest.raises(ValueError, match=r"N x 4.*\(3, 3\)"):
        nms_reference_kernel(torch.zeros((3, 3)), torch.zeros((3,)), 0.5)


def test_detection_models_build_on_this_torch():
    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=2)
    model.eval()
    with torch.inference_mode():
        (out,) = model([torch.rand(3, 160, 200)])
    assert out["boxes"].shape[1] == 4


def test_compiled_ops_present_means_nothing_is_registered():
    # A fresh interpreter where torchvision was never imported: told that its compiled
    # library loaded, the layer registers nothing; told that it did not, it registers nms.
    code = (
        "from embed.torchvision_ops import install_fallback_ops, op_exists\n"
        "assert not op_exists('torchvision', 'nms')\n"
        "assert install_fallback_ops(True) is False\n"
        "assert not op_exists('torchvision', 'nms')\n"
        "assert install_fallback_ops(False) is True\n"
        "assert op_exists('torchvision', 'nms') and op_exists('torchvision', 'qnms')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_fallback_matches_environment():
    # In this CPU-only environment the CUDA-built _C cannot load, so the fallback must be active;
    # with a matching torchvision build it must not be.
    from embed.torchvision_ops import op_exists

    compiled = op_exists("torchvision", "roi_align")  # only the compiled library defines roi_align
    assert USING_FALLBACK_OPS is (not compiled)


@pytest.mark.parametrize("matrix_max", [torchvision_ops.NMS_MATRIX_MAX, 0], ids=["iou-matrix", "loop-per-kept-box"])
@pytest.mark.parametrize("seed", range(12))
def test_numpy_kernel_matches_the_reference_kernel(seed, matrix_max, monkeypatch):
    monkeypatch.setattr(torchvision_ops, "NMS_MATRIX_MAX", matrix_max)
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 400))
    boxes, _ = random_boxes(rng, n)
    boxes = np.round(boxes)  # integer corners: exact ties in IoU and many duplicates
    scores = np.round(rng.uniform(0, 1, n), 1).astype(np.float32)  # few distinct values: tied scores
    threshold = float(rng.choice([0.0, 0.3, 0.5, 0.7, 1.0]))
    for dtype in (torch.float32, torch.float64):
        b, s = torch.from_numpy(boxes).to(dtype), torch.from_numpy(scores).to(dtype)
        want = nms_reference_kernel(b, s, threshold)
        got = nms_kernel(b, s, threshold)
        assert got.dtype == torch.int64 and got.tolist() == want.tolist()


def test_the_registered_op_gives_the_numpy_kernels_results():
    rng = np.random.default_rng(7)
    boxes, scores = (torch.from_numpy(a) for a in random_boxes(rng, 300))
    assert torchvision.ops.nms(boxes, scores, 0.5).tolist() == nms_kernel(boxes, scores, 0.5).tolist()
    if USING_FALLBACK_OPS:
        assert torchvision_ops._fallback_library is not None


@pytest.mark.parametrize("kernel", [nms_reference_kernel, nms_kernel], ids=["reference", "numpy"])
def test_threshold_is_compared_in_double_precision_like_torchvisions_cpp(kernel):
    # IoU 30/100 is float32(0.3) = 0.30000001..., which is above the double 0.3: torchvision suppresses.
    # A float32 comparison (float32(0.3) > float32(0.3)) would keep it; so would an IoU computed in doubles.
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 3.0]])
    scores = torch.tensor([0.9, 0.8])
    assert kernel(boxes, scores, 0.3).tolist() == [0]
    # IoU 70/100 is float32(0.7) = 0.69999998..., not above 0.7: both kept.
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 7.0]])
    assert kernel(boxes, scores, 0.7).tolist() == [0, 1]


def test_threshold_in_dtype_reproduces_the_double_comparison():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(0, 1, 10_000), np.float32([0.3, 0.7, 0.5])]).astype(np.float32)
    values = np.concatenate([values, np.nextafter(values, 2), np.nextafter(values, -1)]).astype(np.float32)
    for threshold in (0.0, 0.3, 0.5, 0.7, 1.0, 1 / 3, 0.1):
        t = torchvision_ops.threshold_in_dtype(threshold, np.dtype(np.float32))
        np.testing.assert_array_equal(values > t, values.astype(np.float64) > threshold)


def test_zero_area_boxes_never_suppress_and_empty_input():
    boxes = torch.tensor([[5, 5, 5, 5], [5, 5, 5, 5], [0, 0, 10, 10.0]])  # IoU 0/0: NaN, never above
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms_kernel(boxes, scores, 0.5).tolist() == nms_reference_kernel(boxes, scores, 0.5).tolist() == [0, 1, 2]
    kept = nms_kernel(torch.zeros((0, 4)), torch.zeros((0,)), 0.5)
    assert kept.shape == (0,) and kept.dtype == torch.int64
    with pytest.raises(ValueError, match=r"N x 4"):
        nms_kernel(torch.zeros((3, 3)), torch.zeros((3,)), 0.5)
