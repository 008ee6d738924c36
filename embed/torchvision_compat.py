"""Import torchvision through here, never directly.

The pinned torchvision 0.28.0 wheel is a CUDA build. On a CPU-only torch its
compiled ops library (``torchvision/_C.so``) cannot load, and then
``import torchvision`` itself fails: its meta registrations refer to
``torchvision::nms``, which only ``_C`` defines. When that happens we define the
op ourselves, with a CPU kernel written in torch (:mod:`embed.torchvision_ops`),
before torchvision is imported. When ``_C`` loads, this module does nothing but
import torchvision.

Usage::

    from embed.torchvision_compat import torchvision
"""

from __future__ import annotations

from embed import torchvision_ops
from embed.torchvision_ops import nms_reference_kernel


def _import_torchvision():
    fallback = torchvision_ops.install_fallback_ops(torchvision_ops.compiled_ops_load())
    import torchvision  # noqa: E402  (must follow the op registration)
    import torchvision.ops.boxes as tv_boxes

    if fallback:
        # torchvision.ops.nms asserts that *its* library loaded before calling the op.
        # The op is ours now, so the assertion must only check that nms is callable.
        def _assert_nms_available() -> None:
            if not torchvision_ops.op_exists("torchvision", "nms"):
                raise RuntimeError("torchvision::nms is not registered")

        tv_boxes._assert_has_ops = _assert_nms_available
    return torchvision, fallback


torchvision, USING_FALLBACK_OPS = _import_torchvision()

__all__ = ["torchvision", "nms_reference_kernel", "USING_FALLBACK_OPS"]
