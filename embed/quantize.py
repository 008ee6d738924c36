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

Calibration runs in chunks of :data:`CALIBRATION_CHUNK` images, one
``collect_data`` call each: ONNX Runtime keeps every intermediate activation
of a call (~60 MB per 224 px image for MobileNetV2) until it has folded them
into its histograms, so one call over 300 images peaked at 17-19 GB. Merged
histograms keep the first chunk's bin width and widen by whole bins, so a
percentile range can move by up to about two one-call bins
(2 * max|x| / 2048; measured <= 1.95 on 64 images, half the tensors equal)
from the one-call result; the chunk size is part of the settings' identity
for that reason.
"""

from __future__ import annotations

import functools
import hashlib
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from imgsearch.errors import BadInput

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
TRUNK_PREFIX = "/trunk/"  # node-name scope the TorchScript exporter gives EmbeddingNet.trunk's ops
CALIBRATION_CHUNK = 16  # images per collect_data call: 300 images peak at 1.8 GB RSS (32: 2.7 GB, and slower)
QUANTIZE_FORMAT = 2  # bump when quantize_graph changes what a quantized graph computes (2: chunked calibration)


@dataclass(frozen=True)
class QuantSettings:
    """The accuracy levers of post-training static quantization (defaults: the measured best, see embed/runtime.py)."""

    activations: str = "uint8"  # u8 activations x s8 weights fuse to QLinearConv on x86; s8 ones leave float Convs (2x slower)
    per_channel: bool = True
    reduce_range: bool | None = None  # None: True on x86 CPUs without VNNI (see cpu_lacks_vnni)
    symmetric_activations: bool = False
    method: str = "percentile"
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
        if self.reduce_range is None:  # resolved here, so the cache key names what was quantized
            object.__setattr__(self, "reduce_range", cpu_lacks_vnni())

    def to_dict(self) -> dict:
        return asdict(self) | {"format": QUANTIZE_FORMAT, "chunk": CALIBRATION_CHUNK}


@functools.lru_cache(maxsize=4)  # every QuantSettings() asks; the CPU does not change
def cpu_lacks_vnni(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True on an x86 CPU without VNNI (AVX2 only). There ONNX Runtime's u8 x s8 kernels sum pairs of
    products in 16 bits, which saturates with 8-bit weights; 7-bit weights (``reduce_range``) do not.
    Measured on such a host: mean int8-vs-fp32 cosine 0.898 with 8-bit weights, against 0.970 on a
    VNNI host. Unknown (no cpuinfo, not x86): False."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return False
    if not flags or "avx2" not in flags:
        return False
    return not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)


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


class _ChunkReader:
    """CalibrationDataReader that hands over one chunk as a single batch.

    One array per ``collect_data`` call: the histogram calibrators stack a
    call's batches with ``np.asarray``, which fails on ragged ones, so a short
    last chunk is used whole instead of being dropped.
    """

    def __init__(self, chunk: np.ndarray, input_name: str):
        self.chunk, self.input_name = chunk, input_name

    def get_next(self):
        chunk, self.chunk = self.chunk, None
        return None if chunk is None else {self.input_name: np.ascontiguousarray(chunk, dtype=np.float32)}


def _prepare(fp32_graph: bytes, calibration: np.ndarray):
    import onnx

    if calibration is None or len(calibration) == 0:
        raise BadInput("int8 quantization needs calibration images (a batch of preprocessed product photos)")
    model = onnx.load_from_string(fp32_graph)
    used = {name for node in model.graph.node for name in node.input}
    # the exporter leaves folded Clip bounds behind; ORT logs a warning per tensor otherwise
    for init in [init for init in model.graph.initializer if init.name not in used]:
        model.graph.initializer.remove(init)
    return model


def _calibration_method(settings: QuantSettings):
    from onnxruntime import quantization as q

    return {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
            "percentile": q.CalibrationMethod.Percentile}[settings.method]


def _ranges(model_path: Path, calibration: np.ndarray, settings: QuantSettings, input_name: str, chunk: int):
    """The calibrator's TensorsData, fed ``chunk`` images per collect_data call (what quantize_static does in one)."""
    from onnxruntime.quantization.calibrate import create_calibrator
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    # quantize_static's defaults when op_types_to_quantize is None and only CalibPercentile is given
    op_types = list(set(QLinearOpsRegistry) | set(QDQRegistry))
    options = {"percentile": settings.percentile} if settings.method == "percentile" else {}
    calibrator = create_calibrator(model_path, op_types,
                                   augmented_model_path=str(model_path.with_name("augmented.onnx")),
                                   calibrate_method=_calibration_method(settings), extra_options=options)
    try:
        for start in range(0, len(calibration), chunk):
            calibrator.collect_data(_ChunkReader(calibration[start : start + chunk], input_name))
        return calibrator.compute_data()
    finally:
        calibrator.infer_session = None  # the augmented session holds the graph with every tensor as an output


def calibration_ranges(fp32_graph: bytes, calibration: np.ndarray, settings: QuantSettings = QuantSettings(),
                       input_name: str = "images", chunk: int = CALIBRATION_CHUNK) -> dict:
    """{tensor name: (low, high)} activation ranges of ``fp32_graph`` on ``calibration``, ``chunk`` images at a time."""
    if not isinstance(chunk, int) or chunk < 1:
        raise BadInput(f"calibration chunk must be a whole number of images >= 1, got {chunk!r}")
    model = _prepare(fp32_graph, calibration)
    with tempfile.TemporaryDirectory(prefix="imgsearch-calib-") as tmp:
        src = Path(tmp) / "fp32.onnx"
        src.write_bytes(model.SerializeToString())
        data = _ranges(src, np.asarray(calibration, dtype=np.float32), settings, input_name, chunk)
    return {name: tuple(float(np.asarray(v).item()) for v in tensor.range_value) for name, tensor in data.data.items()}


def quantize_graph(fp32_graph: bytes, calibration: np.ndarray, settings: QuantSettings = QuantSettings(),
                   input_name: str = "images") -> bytes:
    """The int8 QDQ graph of ``fp32_graph`` (bytes of an ONNX model), its activation ranges from ``calibration``."""
    from onnxruntime import quantization as q
    from onnxruntime.quantization.calibrate import save_tensors_data

    model = _prepare(fp32_graph, calibration)
    extra = {"ActivationSymmetric": settings.symmetric_activations, "WeightSymmetric": True}
    with tempfile.TemporaryDirectory(prefix="imgsearch-quant-") as tmp:
        src, dst, ranges = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx", Path(tmp) / "ranges.json"
        src.write_bytes(model.SerializeToString())
        # Ranges computed here, chunk by chunk, reach the quantizer through its calibration cache file, so
        # quantize_static never runs its own one-call calibration over every image.
        save_tensors_data(_ranges(src, np.asarray(calibration, dtype=np.float32), settings, input_name,
                                  CALIBRATION_CHUNK), ranges)
        q.quantize_static(str(src), str(dst), None, quant_format=q.QuantFormat.QDQ,
                          per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                          activation_type=q.QuantType.QUInt8 if settings.activations == "uint8" else q.QuantType.QInt8,
                          weight_type=q.QuantType.QInt8,
                          nodes_to_exclude=float_nodes(model, settings), calibrate_method=_calibration_method(settings),
                          extra_options=extra, calibration_cache_path=str(ranges))
        return dst.read_bytes()
