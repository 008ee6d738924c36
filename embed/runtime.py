"""Ways to run an :class:`~embed.model.EmbeddingNet` forward pass fast, chosen by measurement.

Every runner maps ImageNet-normalised (n, 3, S, S) float32 -> (n, dim) float32
unit vectors on the CPU, and has a ``name`` for logs and benchmarks.

Measured by ``bench/bench_embed.py`` (2 shared cores, AVX2, batch 32, 224 px,
forward only, best round; plain fp32 eager torchvision MobileNetV2 = 31 img/s):

    runtime       img/s   x plain   max |dv| vs fp32   Recall@1 (sample set)
    eager          47.8     1.53        0                  0.727
    torchscript    92.9     2.98        2.7e-6             0.727
    int8 (FX)     156.9     5.03        0.26               0.513   <- loses 0.21 R@1: opt-in only
    onnxruntime   208.8     6.69        2.4e-6             0.727

So ``auto`` on a CPU is ONNX Runtime when ``onnxruntime`` and ``onnx`` are
installed (optional extra), else the oneDNN TorchScript runner, else eager.
ONNX Runtime also keeps its speed at batch 1..7, where torch's oneDNN path
pays for every new input shape (queries come 1-3 crops at a time).
Post-training int8 of MobileNetV2's depthwise layers costs too much
accuracy; it needs quantization-aware training (part 2) before it is usable.
Every optimised runner falls back with a logged reason when it cannot be built.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import logging
import warnings

import numpy as np
import torch
from torch import nn

from embed.model import EmbeddingNet
from imgsearch.errors import BadInput

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "eager", "torchscript", "int8", "onnxruntime")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise BadInput(f"unknown device {device!r}; expected auto, cpu or cuda[:N]") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"device {device!r} asked for, but torch sees no CUDA GPU")
    return resolved


class EagerRunner:
    """The module itself: channels_last, inference_mode; fp16 on a GPU (bandwidth-bound convs, ~2x)."""

    name = "eager"

    def __init__(self, net: nn.Module, device: torch.device):
        self.device = device
        self.half = device.type == "cuda"
        self.net = copy.deepcopy(net).eval().to(device, memory_format=torch.channels_last)
        if self.half:
            self.net = self.net.half()
            self.name = "eager-fp16"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True, memory_format=torch.channels_last)
            y = self.net(x.half() if self.half else x)
            # Renormalise in fp32: fp16 rounding leaves norms ~1e-3 off.
            return torch.nn.functional.normalize(y.float(), dim=1).cpu()


class TorchScriptRunner:
    """Trunk traced, frozen and optimised for inference (conv+BN folded, oneDNN blocked layout); head eager.

    Only the trunk is traced: freezing folds GeM's learnable ``p`` into a
    constant that ``optimize_for_inference`` then trips over, and the head is
    a few microseconds anyway.
    """

    name = "torchscript"

    def __init__(self, net: EmbeddingNet, image_size: int):
        example = torch.zeros(2, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
        trunk = copy.deepcopy(net.trunk).eval()
        with torch.no_grad(), warnings.catch_warnings():
            # torch 2.13 marks torch.jit deprecated; it still measures fastest here, and make_runner
            # falls back to eager the day it is gone.
            warnings.simplefilter("ignore", DeprecationWarning)
            self.trunk = torch.jit.optimize_for_inference(torch.jit.trace(trunk, example))
            self.trunk(example)  # first call runs the profiling pass; do it now, not on a user's query
        self.head = copy.deepcopy(net.head).eval()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.head(self.trunk(x.contiguous(memory_format=torch.channels_last)))


class Int8Runner:
    """Trunk statically quantized to int8 with FX (x86 qengine), calibrated on real images; head fp32.

    Calibration sets each activation's range, so it must see images like the
    ones that will be embedded (a few dozen product photos are enough).
    """

    name = "int8"

    def __init__(self, net: EmbeddingNet, calibration: torch.Tensor):
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        if calibration is None or len(calibration) == 0:
            raise BadInput("the int8 runtime needs calibration images (a batch of preprocessed product photos)")
        engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
        torch.backends.quantized.engine = engine
        trunk = copy.deepcopy(net.trunk).eval()
        prepared = prepare_fx(trunk, get_default_qconfig_mapping(engine), (calibration[:1],))
        with torch.inference_mode():
            for start in range(0, len(calibration), 16):
                prepared(calibration[start : start + 16])
        self.trunk = convert_fx(prepared)
        self.head = copy.deepcopy(net.head).eval()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.head(self.trunk(x.contiguous(memory_format=torch.channels_last)))


class OnnxRuntimeRunner:
    """The whole net exported to ONNX (in memory) and run by ONNX Runtime's CPU provider."""

    name = "onnxruntime"

    def __init__(self, net: EmbeddingNet, image_size: int, threads: int | None = None):
        import onnxruntime as ort  # optional dependency

        example = torch.zeros(2, 3, image_size, image_size)
        buffer = io.BytesIO()
        torch.onnx.export(
            copy.deepcopy(net).eval(), (example,), buffer, dynamo=False, opset_version=17,
            input_names=["images"], output_names=["vectors"],
            dynamic_axes={"images": {0: "n"}, "vectors": {0: "n"}},
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(["vectors"], {"images": array})[0])


def onnxruntime_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def make_runner(net: EmbeddingNet, runtime: str = "auto", device: str | torch.device = "auto", calibration: torch.Tensor | None = None):
    """Build the runner asked for. ``auto``: eager fp16 on a GPU; ONNX Runtime, else TorchScript/oneDNN, on a CPU.

    An optimised runner that cannot be built (an optional package missing, a
    tracing failure on an unusual build) falls back to eager with a warning,
    except ``int8`` without calibration, which is the caller's mistake.
    """
    if runtime not in RUNTIMES:
        raise BadInput(f"unknown runtime {runtime!r}; expected one of {list(RUNTIMES)}")
    device = resolve_device(device)
    if device.type != "cpu" or runtime == "eager":
        return EagerRunner(net, device)
    size = net.config.image_size
    if runtime == "auto":
        runtime = "onnxruntime" if onnxruntime_available() else "torchscript"
    builders = {
        "torchscript": lambda: TorchScriptRunner(net, size),
        "int8": lambda: Int8Runner(net, calibration),
        "onnxruntime": lambda: OnnxRuntimeRunner(net, size),
    }
    try:
        return builders[runtime]()
    except BadInput:
        raise
    except Exception as exc:  # ImportError for onnxruntime; RuntimeError from jit/FX/export on odd builds
        log.warning("runtime %s unavailable (%s: %s); falling back", runtime, type(exc).__name__, exc)
    if runtime == "onnxruntime":
        return make_runner(net, "torchscript", device)
    return EagerRunner(net, device)
