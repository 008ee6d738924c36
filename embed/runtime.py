"""Ways to run an :class:`~embed.model.EmbeddingNet` forward pass fast, chosen by measurement.

Every runner maps ImageNet-normalised (n, 3, S, S) float32 -> (n, dim) float32
unit vectors on the CPU, and has a ``name`` for logs and benchmarks.

Measured by ``bench/bench_embed.py`` (2 shared cores, AVX2, batch 32, 224 px,
forward only, best round; plain fp32 eager torchvision MobileNetV2 = 31 img/s):

    runtime       img/s   x plain   max |dv| vs fp32   Recall@1 (sample set)
    eager          47.8     1.53        0                  0.727
    torchscript    92.9     2.98        2.7e-6             0.727
    onnxruntime   208.8     6.69        2.4e-6             0.727

int8 is ONNX Runtime static QDQ quantization of the trunk (:mod:`embed.quantize`:
u8 activations, per-channel s8 weights, Percentile 99.99 calibration on 300
train-product images; GeM and head in float). Against fp32 onnxruntime on the
same busy machine (interleaved rounds, batch 32): 193 vs 88 img/s (2.19x),
R@1 0.733 vs 0.727, int8 queries against an fp32 catalog 0.713 (-0.013); mean
cosine to fp32 0.979. MinMax calibration: 2.27x but R@1 0.700 (-0.027); s8
activations leave 15 Convs unfused in float (1.2x). The torch FX int8 runner it
replaces ran 5.03x plain but lost 0.21 R@1 (0.513). Calibration runs 16 images
per pass (one pass over all 300 peaked at ~18 GB): 300 images take ~1 min and
1.8 GB peak RSS (``bench/bench_int8_calibration.py``); the graph is cached
after, like the fp32 export. int8 stays opt-in.

So ``auto`` on a CPU is ONNX Runtime when ``onnxruntime`` and ``onnx`` are
installed (optional extra), else the oneDNN TorchScript runner, else eager.
ONNX Runtime also keeps its speed at batch 1..7, where torch's oneDNN path
pays for every new input shape (queries come 1-3 crops at a time).
Every optimised runner falls back with a logged reason when it cannot be built.

ONNX exports (this embedder's and the detector's, :mod:`embed.detector`) are
cached on disk, ``$IMGSEARCH_CACHE/onnx/<kind>-<key>.onnx`` (default
``~/.cache/imgsearch/onnx``; ``IMGSEARCH_ONNX_CACHE`` names another folder, or
``off``). The key hashes the module's weights and buffers, its config, the
input shape, the opset, the torch version and :data:`ONNX_EXPORT_FORMAT`, so a
server start or a second worker loads the file instead of exporting again
(the detector's export takes ~10 s on a busy 2-core machine). Files are
written atomically (temp file + ``os.replace``); a cached file is only used
after ONNX Runtime loads it *and* it reproduces the eager module's outputs on
a seeded probe input, so a corrupt or stale file is replaced, not trusted.

ONNX Runtime sessions do not spin-wait (``allow_spinning`` 0): on 2 cores
shared with other work, a spinning pool burns the core its partner needs.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import io
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from embed.checkpoint import state_dict_sha256
from embed.model import EmbeddingNet
from embed.quantize import QuantSettings, calibration_digest, quantize_graph
from imgsearch import assets
from imgsearch.atomic import write_bytes_atomic
from imgsearch.errors import BadInput

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "eager", "torchscript", "int8", "onnxruntime")
ONNX_OPSET = 17
ONNX_EXPORT_FORMAT = 1  # bump when an export wrapper changes what a graph computes: old cache files stop matching
ONNX_CACHE_ENV = "IMGSEARCH_ONNX_CACHE"
ORT_ALLOW_SPINNING = False
PROBE_RTOL = PROBE_ATOL = 1e-3  # ONNX Runtime vs eager differ by ~5e-6 here; a damaged file by far more
INT8_PROBE_IMAGES = 8
INT8_PROBE_MIN_COSINE = 0.8  # int8 vs eager on real photos: >= 0.88 measured; another model's vectors: ~0


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


def onnx_cache_dir() -> Path | None:
    """Where ONNX exports are cached; None when ``IMGSEARCH_ONNX_CACHE`` is ``off`` (or 0, none, false, empty)."""
    value = os.environ.get(ONNX_CACHE_ENV)
    if value is None:
        return assets.cache_dir() / "onnx"
    if value.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    return Path(value)


def onnx_cache_key(kind: str, module: nn.Module, input_shape: tuple[int, ...], config: dict) -> str:
    """sha256 of everything that decides the exported graph: weights/buffers, config, input shape, exporter."""
    digest = hashlib.sha256()
    meta = {"kind": kind, "format": ONNX_EXPORT_FORMAT, "opset": ONNX_OPSET, "torch": torch.__version__,
            "input": list(input_shape[1:]), "config": config}
    digest.update(json.dumps(meta, sort_keys=True, default=str).encode())
    digest.update(state_dict_sha256(module.state_dict()).encode())
    return digest.hexdigest()


def _export_onnx(module: nn.Module, example: torch.Tensor, output_names: list[str]) -> bytes:
    """TorchScript-based export (dynamo=False: the dynamo exporter needs onnxscript and compiles for minutes)."""
    buffer = io.BytesIO()
    axes = {"images": {0: "n"}} | {name: {0: "n"} for name in output_names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 deprecates the TorchScript exporter; it is the one that works offline
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["images"], output_names=output_names, dynamic_axes=axes)
    return buffer.getvalue()


def _ort_session(model: bytes, threads: int | None):
    import onnxruntime as ort  # optional dependency

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if ORT_ALLOW_SPINNING else "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _check_probe(session, probe: np.ndarray, expected: list[np.ndarray], output_names: list[str]) -> None:
    got = session.run(output_names, {"images": probe})
    for name, want, have in zip(output_names, expected, got):
        if want.shape != have.shape or not np.allclose(have, want, rtol=PROBE_RTOL, atol=PROBE_ATOL):
            worst = float(np.abs(have - want).max()) if want.shape == have.shape else float("nan")
            raise ValueError(f"output {name!r} differs from the eager module's (shape {have.shape} vs {want.shape}, max |d| {worst:.3g})")


class OnnxModel:
    """An ONNX Runtime session for ``module`` (one ImageNet-normalised ``images`` input), from the disk cache if valid.

    ``source`` says where the graph came from: ``"cache"`` (a verified file, no
    export), ``"export"`` (exported now, and cached when a cache folder is
    writable). ``path`` is the cache file (None with the cache off).
    """

    def __init__(self, kind: str, module: nn.Module, example: torch.Tensor, output_names: list[str],
                 config: dict, threads: int | None = None):
        module = copy.deepcopy(module).eval().cpu()
        self.output_names = list(output_names)
        probe = torch.randn((1, *example.shape[1:]), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            out = module(probe)
        expected = [t.numpy() for t in (out if isinstance(out, (tuple, list)) else (out,))]
        probe = probe.numpy()
        folder = onnx_cache_dir()
        self.path = folder / f"{kind}-{onnx_cache_key(kind, module, tuple(example.shape), config)}.onnx" if folder else None
        self.session = None
        if self.path is not None and self.path.is_file():
            try:
                session = _ort_session(self.path.read_bytes(), threads)
                _check_probe(session, probe, expected, self.output_names)
                self.session, self.source, self.graph = session, "cache", self.path.read_bytes()
                log.info("%s: ONNX graph from the cache, %s", kind, self.path)
            except Exception as exc:  # unreadable, not ONNX, truncated, or computes something else
                log.warning("%s: cached ONNX file %s is unusable (%s: %s); exporting again",
                            kind, self.path, type(exc).__name__, str(exc)[:200])
        if self.session is None:
            data = _export_onnx(module, example, self.output_names)
            self.session = _ort_session(data, threads)
            _check_probe(self.session, probe, expected, self.output_names)  # a bad export is a build failure
            self.source, self.graph = "export", data
            if self.path is not None:
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    write_bytes_atomic(self.path, data)
                    log.info("%s: ONNX graph exported and cached at %s", kind, self.path)
                except OSError as exc:
                    log.warning("%s: cannot cache the ONNX export at %s (%s); the next start exports again", kind, self.path, exc)

    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {"images": np.ascontiguousarray(images, dtype=np.float32)})


class OnnxRuntimeRunner:
    """The whole net exported to ONNX (cached on disk, see the module docstring), run by ONNX Runtime's CPU provider."""

    name = "onnxruntime"

    def __init__(self, net: EmbeddingNet, image_size: int, threads: int | None = None):
        example = torch.zeros(2, 3, image_size, image_size)
        self.model = OnnxModel("embedder", net, example, ["vectors"], net.config.to_dict(), threads)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.model(x.numpy())[0])


class OnnxInt8Runner:
    """The exported net with its trunk statically quantized to int8 (QDQ, :mod:`embed.quantize`), run by ONNX Runtime.

    ``calibration`` is a preprocessed batch of product photos like the ones
    that will be embedded (a few hundred). The quantized graph is cached next
    to the fp32 export, ``embedder-int8-<key>.onnx``; the key adds the
    calibration batch's digest, the settings and the ONNX Runtime version to
    the fp32 graph's key. A cached file is used only if, on the first
    calibration images, its vectors stay within :data:`INT8_PROBE_MIN_COSINE`
    of the eager module's; ``source`` is ``"cache"`` or ``"quantize"``.
    """

    name = "int8"

    def __init__(self, net: EmbeddingNet, image_size: int, calibration: torch.Tensor,
                 settings: QuantSettings | None = None, threads: int | None = None):
        import onnxruntime as ort  # optional dependency

        if calibration is None or len(calibration) == 0:
            raise BadInput("the int8 runtime needs calibration images (a batch of preprocessed product photos)")
        self.settings = settings or QuantSettings()
        fp32 = OnnxModel("embedder", net, torch.zeros(2, 3, image_size, image_size), ["vectors"], net.config.to_dict(), threads)
        images = np.ascontiguousarray(calibration.float().numpy(), dtype=np.float32)
        probe = images[:INT8_PROBE_IMAGES]
        with torch.inference_mode():
            expected = copy.deepcopy(net).eval().cpu()(torch.from_numpy(probe)).numpy()
        key = int8_cache_key(fp32.path.stem if fp32.path else hashlib.sha256(fp32.graph).hexdigest(),
                             calibration_digest(images), self.settings, ort.__version__)
        folder = onnx_cache_dir()
        self.path = folder / f"embedder-int8-{key}.onnx" if folder else None
        self.session = None
        if self.path is not None and self.path.is_file():
            try:
                session = _ort_session(self.path.read_bytes(), threads)
                _check_cosine(session, probe, expected)
                self.session, self.source = session, "cache"
            except Exception as exc:  # unreadable, truncated, or another model's quantization
                log.warning("embedder: cached int8 file %s is unusable (%s: %s); quantizing again",
                            self.path, type(exc).__name__, str(exc)[:200])
        if self.session is None:
            data = quantize_graph(fp32.graph, images, self.settings)
            self.session = _ort_session(data, threads)
            _check_cosine(self.session, probe, expected)
            self.source = "quantize"
            if self.path is not None:
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    write_bytes_atomic(self.path, data)
                except OSError as exc:
                    log.warning("embedder: cannot cache the int8 graph at %s (%s); the next start quantizes again", self.path, exc)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        images = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(["vectors"], {"images": images})[0])


def int8_cache_key(fp32_key: str, calibration_sha256: str, settings: QuantSettings, ort_version: str) -> str:
    """sha256 of what decides a quantized graph: the fp32 graph, the calibration images, the settings, the quantizer."""
    meta = {"fp32": fp32_key, "calibration": calibration_sha256, "settings": settings.to_dict(), "onnxruntime": ort_version}
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _check_cosine(session, probe: np.ndarray, expected: np.ndarray) -> None:
    got = session.run(["vectors"], {"images": probe})[0]
    cosine = (got * expected).sum(axis=1) if got.shape == expected.shape else np.array([float("nan")])
    if not cosine.min() >= INT8_PROBE_MIN_COSINE:
        raise ValueError(f"int8 vectors differ from the eager module's (min cosine {cosine.min():.3f} < {INT8_PROBE_MIN_COSINE})")


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
    if runtime == "int8" and (calibration is None or len(calibration) == 0):
        raise BadInput("the int8 runtime needs calibration images (a batch of preprocessed product photos)")
    size = net.config.image_size
    if runtime == "auto":
        runtime = "onnxruntime" if onnxruntime_available() else "torchscript"
    builders = {
        "torchscript": lambda: TorchScriptRunner(net, size),
        "int8": lambda: OnnxInt8Runner(net, size, calibration),
        "onnxruntime": lambda: OnnxRuntimeRunner(net, size),
    }
    try:
        return builders[runtime]()
    except BadInput:
        raise
    except Exception as exc:  # ImportError for onnxruntime; RuntimeError from jit/export/quantization on odd builds
        log.warning("runtime %s unavailable (%s: %s); falling back", runtime, type(exc).__name__, exc)
    if runtime == "onnxruntime":
        return make_runner(net, "torchscript", device)
    return EagerRunner(net, device)
