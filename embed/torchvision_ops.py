"""CPU kernels for torchvision's ``nms`` and ``qnms`` ops.

Importing this module has no side effects; :mod:`embed.torchvision_compat`
calls :func:`install_fallback_ops` before it imports torchvision.
"""

from __future__ import annotations

import importlib.util
import os

import torch

# torchvision's meta registrations (imported by ``import torchvision``) need both ops to exist.
NMS_OPS = ("nms", "qnms")
NMS_SCHEMA = "{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"

_fallback_library = None  # keeps the torch.library.Library (and so the ops) alive for the process


def nms_reference_kernel(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS with torchvision's exact semantics.

    Boxes are (x1, y1, x2, y2); a box is suppressed when its IoU with a kept,
    higher-scoring box is strictly greater than ``iou_threshold``; areas carry
    no +1 (as in torchvision's CPU kernel). Returns kept indices (int64),
    sorted by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if boxes.dim() != 2 or boxes.size(1) != 4:
        raise ValueError(f"boxes should be a N x 4 tensor, got shape {tuple(boxes.shape)}")
    if scores.dim() != 1 or scores.size(0) != boxes.size(0):
        raise ValueError(f"scores should have shape ({boxes.size(0)},), got {tuple(scores.shape)}")
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
        suppressed[rest[iou > iou_threshold]] = True
    return torch.stack(keep).to(torch.int64)


def _qnms_kernel(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS on quantized boxes and scores: same decisions as on their dequantized values."""
    if boxes.is_quantized:
        boxes = boxes.dequantize()
    if scores.is_quantized:
        scores = scores.dequantize()
    return nms_reference_kernel(boxes, scores, iou_threshold)


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
        for name, kernel in zip(NMS_OPS, (nms_reference_kernel, _qnms_kernel)):
            lib.define(NMS_SCHEMA.format(name=name))
            lib.impl(name, kernel, "CPU")
        _fallback_library = lib
    return True
