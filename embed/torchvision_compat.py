"""Import torchvision through here, never directly.

The pinned torchvision 0.28.0 wheel is a CUDA build. On a CPU-only torch its
compiled ops library (``torchvision/_C.so``) cannot load, and then
``import torchvision`` itself fails: its meta registrations refer to
``torchvision::nms``, which only ``_C`` defines. When that happens we define the
op ourselves, with a CPU kernel written in torch, before torchvision is
imported. When ``_C`` loads, this module does nothing but import torchvision.

Usage::

    from embed.torchvision_compat import torchvision
"""

from __future__ import annotations

import importlib.util
import os

import torch

# torchvision's meta registrations (imported by ``import torchvision``) need both ops to exist.
NMS_OPS = ("nms", "qnms")
NMS_SCHEMA = "{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"

# Set when this module had to provide the ops itself (introspection for tests and /readyz).
USING_FALLBACK_OPS = False
_fallback_library = None  # keeps the torch.library.Library alive for the process


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


def _compiled_ops_load() -> bool:
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


def _op_exists(namespace: str, name: str) -> bool:
    try:
        getattr(getattr(torch.ops, namespace), name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _register_fallback_nms() -> None:
    global _fallback_library, USING_FALLBACK_OPS
    if _op_exists("torchvision", "nms"):
        return
    lib = torch.library.Library("torchvision", "DEF")
    for name, kernel in zip(NMS_OPS, (nms_reference_kernel, _qnms_kernel)):
        lib.define(NMS_SCHEMA.format(name=name))
        lib.impl(name, kernel, "CPU")
    _fallback_library = lib
    USING_FALLBACK_OPS = True


def _import_torchvision():
    if not _compiled_ops_load():
        _register_fallback_nms()
    import torchvision  # noqa: E402  (must follow the op registration)
    import torchvision.ops.boxes as tv_boxes

    if USING_FALLBACK_OPS:
        # torchvision.ops.nms asserts that *its* library loaded before calling the op.
        # The op is ours now, so the assertion must only check that nms is callable.
        def _assert_nms_available() -> None:
            if not _op_exists("torchvision", "nms"):
                raise RuntimeError("torchvision::nms is not registered")

        tv_boxes._assert_has_ops = _assert_nms_available
    return torchvision


torchvision = _import_torchvision()

__all__ = ["torchvision", "nms_reference_kernel", "USING_FALLBACK_OPS"]
