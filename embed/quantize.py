"""Static int8 quantization of an exported embedder graph with ONNX Runtime (QDQ format).

Only the convolutional trunk is quantized; GeM pooling (``x ** p`` amplifies
any rounding of the last feature map) and the projection head stay in float.
Activation ranges come from calibration images, which must be preprocessed
exactly as the embedder preprocesses what it embeds: a range learned on
differently normalised pixels clips real ones.

The quantized graph is a function of the fp32 graph, the calibration images
and :class:`QuantSettings`; :func:`calibration_digest` and
:meth:`QuantSettings.to_dict` give the identity of the last two, for the
on-disk cache key (:mod:`embed.runtime`).
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from imgsearch.errors import BadInput

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
TRUNK_PREFIX = "/trunk/"  # node-name scope the TorchScript exporter gives EmbeddingNet.trunk's ops
CALIBRATION_BATCH = 16
QUANTIZE_FORMAT = 1  # bump when quantize_graph changes what a quantized graph computes


@dataclass(frozen=True)
class QuantSettings:
    """The accuracy levers of post-training static quantization (defaults: the measured best, see embed/runtime.py)."""

    activations: str = "uint8"  # u8 activations x s8 weights fuse to QLinearConv on x86; s8 ones leave float Convs (2x slower)
    per_channel: bool = True
    reduce_range: bool = False
    symmetric_activations: bool = False
    method: str = "percentile"  # histogram methods hold every calibration activation: ~17 GB peak for 300 images
    percentile: float = 99.99
    float_first_conv: bool = False
    float_depthwise: bool = False
    float_last_blocks: int = 0  # how many of the trunk's last top-level blocks stay in float

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise BadInput(f"unknown calibration method {self.method!r}; expected one of {list(CALIBRATION_METHODS)}")
        if self.activations not in ("uint8", "int8"):
            raise BadInput(f"activations must be 'uint8' or 'int8', got {self.activations!r}")
        if self.float_last_blocks < 0:
            raise BadInput(f"float_last_blocks must be >= 0, got {self.float_last_blocks!r}")

    def to_dict(self) -> dict:
        return asdict(self) | {"format": QUANTIZE_FORMAT}


def calibration_digest(calibration: np.ndarray) -> str:
    """sha256 of the preprocessed calibration batch: its shape, dtype and every value."""
    array = np.ascontiguousarray(calibration, dtype=np.float32)
    digest = hashlib.sha256(repr(array.shape).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def _block_of(node_name: str) -> int | None:
    """Index of the trunk's top-level block a node belongs to ("/trunk/trunk.17/..." -> 17)."""
    if not node_name.startswith(TRUNK_PREFIX):
        return None
    head = node_name[len(TRUNK_PREFIX):].split("/", 1)[0]
    try:
        return int(head.rsplit(".", 1)[1])
    except (IndexError, ValueError):
        return None


def float_nodes(model, settings: QuantSettings) -> list[str]:
    """Names of the nodes left in float: everything outside the trunk, plus what ``settings`` keeps out."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    blocks = [b for b in (_block_of(n.name) for n in model.graph.node) if b is not None]
    last_float = (max(blocks) - settings.float_last_blocks + 1) if blocks and settings.float_last_blocks else None
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    keep = []
    for node in model.graph.node:
        block = _block_of(node.name)
        if block is None or (last_float is not None and block >= last_float):
            keep.append(node.name)
        elif node.op_type == "Conv":
            if settings.float_first_conv and convs and node.name == convs[0].name:
                keep.append(node.name)
            elif settings.float_depthwise:
                group = next((a.i for a in node.attribute if a.name == "group"), 1)
                weight = initializers.get(node.input[1])
                if group > 1 and weight is not None and group == numpy_helper.to_array(weight).shape[0]:
                    keep.append(node.name)
    return keep


class _BatchReader:
    """CalibrationDataReader over an in-memory preprocessed batch, in equal slices of up to CALIBRATION_BATCH.

    With ``equal_slices`` the last, shorter slice is dropped: ONNX Runtime's
    histogram calibrators (entropy, percentile) stack every slice's
    activations into one array and fail on a ragged one.
    """

    def __init__(self, calibration: np.ndarray, input_name: str, equal_slices: bool = False):
        size = min(CALIBRATION_BATCH, len(calibration))
        self.end = len(calibration) - (len(calibration) % size if equal_slices else 0)
        self.calibration, self.input_name, self.start, self.size = calibration, input_name, 0, size

    def get_next(self):
        if self.start >= self.end:
            return None
        chunk = self.calibration[self.start : self.start + self.size]
        self.start += self.size
        return {self.input_name: np.ascontiguousarray(chunk, dtype=np.float32)}

    def rewind(self) -> None:
        self.start = 0


def quantize_graph(fp32_graph: bytes, calibration: np.ndarray, settings: QuantSettings = QuantSettings(),
                   input_name: str = "images") -> bytes:
    """The int8 QDQ graph of ``fp32_graph`` (bytes of an ONNX model), its activation ranges from ``calibration``."""
    import onnx
    from onnxruntime import quantization as q

    if calibration is None or len(calibration) == 0:
        raise BadInput("int8 quantization needs calibration images (a batch of preprocessed product photos)")
    model = onnx.load_from_string(fp32_graph)
    method = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
              "percentile": q.CalibrationMethod.Percentile}[settings.method]
    extra = {"ActivationSymmetric": settings.symmetric_activations, "WeightSymmetric": True}
    if settings.method == "percentile":
        extra["CalibPercentile"] = settings.percentile
    reader = _BatchReader(np.asarray(calibration, dtype=np.float32), input_name, equal_slices=settings.method != "minmax")
    used = {name for node in model.graph.node for name in node.input}
    unused = [init for init in model.graph.initializer if init.name not in used]
    for init in unused:  # the exporter leaves folded Clip bounds behind; ORT logs a warning per tensor otherwise
        model.graph.initializer.remove(init)
    with tempfile.TemporaryDirectory(prefix="imgsearch-quant-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model.SerializeToString())
        q.quantize_static(str(src), str(dst), reader, quant_format=q.QuantFormat.QDQ,
                          per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                          activation_type=q.QuantType.QUInt8 if settings.activations == "uint8" else q.QuantType.QInt8,
                          weight_type=q.QuantType.QInt8,
                          nodes_to_exclude=float_nodes(model, settings), calibrate_method=method,
                          extra_options=extra)
        return dst.read_bytes()
