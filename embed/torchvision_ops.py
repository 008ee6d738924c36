"""CPU kernels for torchvision's ``nms`` and ``qnms`` ops.

Importing this module has no side effects; :mod:`embed.torchvision_compat`
calls :func:`install_fallback_ops` before it imports torchvision.

Two kernels with torchvision's exact semantics: :func:`nms_reference_kernel`
(torch ops, a loop per kept box; the readable reference) and :func:`nms_kernel`
(numpy, registered as the op): it sorts once and works on contiguous sorted
columns, with one boolean IoU matrix for up to ``NMS_MATRIX_MAX`` boxes (a
greedy pass over its rows) and a numpy loop per kept box above that.
``bench/bench_query.py`` (random boxes, IoU 0.5, 2 shared cores): 100 boxes
14.0 -> 0.5 ms, 300: 24.4 -> 0.9 ms, 1000: 58.9 -> 8.3 ms, 3000: 133 -> 20 ms.
The tests check both against an independent textbook NMS and against each
other, ties, empty boxes and IoUs exactly at the threshold included.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

# torchvision's meta registrations (imported by ``import torchvision``) need both ops to exist.
NMS_OPS = ("nms", "qnms")
NMS_SCHEMA = "{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"

_fallback_library = None  # keeps the torch.library.Library (and so the ops) alive for the process
NMS_MATRIX_MAX = 512  # up to this many boxes, one n x n IoU matrix (faster below ~500 boxes); above, a loop per kept box


def _check_nms_args(boxes: torch.Tensor, scores: torch.Tensor) -> None:
    if boxes.dim() != 2 or boxes.size(1) != 4:
        raise ValueError(f"boxes should be a N x 4 tensor, got shape {tuple(boxes.shape)}")
    if scores.dim() != 1 or scores.size(0) != boxes.size(0):
        raise ValueError(f"scores should have shape ({boxes.size(0)},), got {tuple(scores.shape)}")


def nms_reference_kernel(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS with torchvision's exact semantics.

    Boxes are (x1, y1, x2, y2); a box is suppressed when its IoU with a kept,
    higher-scoring box is strictly greater than ``iou_threshold``; areas carry
    no +1 (as in torchvision's CPU kernel). IoUs are computed in the boxes'
    dtype and compared with the threshold in double precision, as the C++
    kernel's ``ovr > iou_threshold`` does. Returns kept indices (int64),
    sorted by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    _check_nms_args(boxes, scores)
    boxes = boxes.detach()
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    order = torch.sort(scores.detach(), descending=True, stable=True).indices
    suppressed = torch.zeros(boxes.size(0), dtype=torch.bool)
    keep = []
    # Vectorised over the remaining boxes; the Python loop runs once per kept box.
    for pos in range(order.numel()):
        i = order[pos]
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[pos + 1 :]
        rest = rest[~suppressed[rest]]
        if rest.numel() == 0:
            break
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest])).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest])).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[iou.double() > iou_threshold]] = True
    return torch.stack(keep).to(torch.int64)


def threshold_in_dtype(iou_threshold: float, dtype: np.dtype) -> np.floating:
    """The largest ``t`` of ``dtype`` with ``x > t`` exactly when ``float(x) > iou_threshold``, for every ``x`` of ``dtype``.

    torchvision compares a float32 IoU with a double threshold; comparing in
    float32 with this ``t`` gives the same answers (0.7 is not a float32: an
    IoU of float32(0.7) is above the double 0.7's float32 rounding, not above 0.7).
    """
    t = dtype.type(iou_threshold)
    if float(t) > iou_threshold:
        t = np.nextafter(t, dtype.type(-np.inf))
    return t


def nms_kernel(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """:func:`nms_reference_kernel`'s results, computed in numpy (float32/float64 CPU tensors; others go to the reference)."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    _check_nms_args(boxes, scores)
    if boxes.device.type != "cpu" or boxes.dtype not in (torch.float32, torch.float64) or scores.dtype != boxes.dtype:
        return nms_reference_kernel(boxes, scores, iou_threshold)
    order = torch.sort(scores.detach(), descending=True, stable=True).indices.numpy()
    sorted_boxes = boxes.detach().numpy()[order]
    x1, y1, x2, y2 = (np.ascontiguousarray(sorted_boxes[:, k]) for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    threshold = threshold_in_dtype(float(iou_threshold), sorted_boxes.dtype)
    n = len(order)
    suppressed = np.zeros(n, dtype=bool)
    keep = []
    if n <= NMS_MATRIX_MAX:
        # Row i holds box i against every box; rows of kept boxes are applied in score order.
        w = np.maximum(np.minimum(x2[:, None], x2[None, :]) - np.maximum(x1[:, None], x1[None, :]), 0)
        h = np.maximum(np.minimum(y2[:, None], y2[None, :]) - np.maximum(y1[:, None], y1[None, :]), 0)
        inter = w * h
        with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 for empty boxes: NaN, never above
            over = inter / (areas[:, None] + areas[None, :] - inter) > threshold
        for i in range(n):
            if not suppressed[i]:
                keep.append(i)
                suppressed |= over[i]
    else:
        for i in range(n):
            if suppressed[i]:
                continue
            keep.append(i)
            rest = slice(i + 1, n)
            w = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0)
            h = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0)
            inter = w * h
            with np.errstate(divide="ignore", invalid="ignore"):
                suppressed[rest] |= inter / (areas[i] + areas[rest] - inter) > threshold
    return torch.from_numpy(order[np.asarray(keep, dtype=np.int64)])


def _qnms_kernel(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS on quantized boxes and scores: same decisions as on their dequantized values."""
    if boxes.is_quantized:
        boxes = boxes.dequantize()
    if scores.is_quantized:
        scores = scores.dequantize()
    return nms_kernel(boxes, scores, iou_threshold)


def compiled_ops_load() -> bool:
    """Try to load torchvision's compiled library the way torchvision itself would."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.submodule_search_locations is None:
        return False
    for folder in spec.submodule_search_locations:
        for name in os.listdir(folder):
            if name.startswith("_C") and name.endswith((".so", ".pyd")):
                try:
                    torch.ops.load_library(os.path.join(folder, name))
                    return True
                except (OSError, RuntimeError):
                    return False
    return False


def op_exists(namespace: str, name: str) -> bool:
    try:
        getattr(getattr(torch.ops, namespace), name)
        return True
    except (AttributeError, RuntimeError):
        return False


def install_fallback_ops(compiled_ops_loaded: bool) -> bool:
    """Register CPU ``torchvision::nms``/``qnms`` unless torchvision's own library loaded.

    Returns True when this call or an earlier one installed the fallback.
    """
    global _fallback_library
    if compiled_ops_loaded:
        return False
    if _fallback_library is None:
        if op_exists("torchvision", "nms"):
            return False
        lib = torch.library.Library("torchvision", "DEF")
        for name, kernel in zip(NMS_OPS, (nms_kernel, _qnms_kernel)):
            lib.define(NMS_SCHEMA.format(name=name))
            lib.impl(name, kernel, "CPU")
        _fallback_library = lib
    return True
