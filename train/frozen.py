"""Frozen-trunk feature caches: the CPU budget trick.

Full fine-tuning of MobileNetV2 does not fit a 2-core, 20-minute budget: the
trunk's forward alone is ~50 ms per 224 px image there, and backward triples
it. The early blocks transfer from ImageNet as they are, so they are run
ONCE per augmented view (in inference mode: ONNX Runtime, else traced and
oneDNN-optimised TorchScript) and their output maps are kept in float16;
every epoch then trains only the upper blocks and the heads on those maps,
which is 20-50x cheaper. Measured in ``bench/bench_recall.py`` (see
BENCHMARKS.md). ONNX Runtime runs the embedder's frozen blocks [:14] at
315 images/s against TorchScript's 131 (224 px, batch 32, 2 threads), the
same gap as for the whole embedder (embed/runtime.py).
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import nn

from embed.runtime import OnnxModel, onnxruntime_available

log = logging.getLogger(__name__)

T = TypeVar("T")
A = TypeVar("A")
_END = object()


class FrozenPrefix:
    """An inference-only copy of a module, run by ONNX Runtime or traced and optimised when
    possible; output in float16. ``kind`` names its ONNX export in the cache (embed/runtime.py)."""

    def __init__(self, module: nn.Module, example: torch.Tensor, optimise: bool = True, kind: str = "frozen-prefix"):
        self.module = copy.deepcopy(module).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.runner = self.module
        self.onnx = self._onnx(kind, example) if optimise else None
        if optimise and self.onnx is None:
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch.jit's deprecation notice
                    traced = torch.jit.optimize_for_inference(torch.jit.trace(self.module, example))
                    traced(example)  # the profiling pass, now rather than on the first real batch
                self.runner = traced
            except Exception as exc:  # an odd build without oneDNN: eager is correct, only slower
                log.warning("frozen trunk runs eager (trace failed: %s)", exc)

    def _onnx(self, kind: str, example: torch.Tensor):
        if not onnxruntime_available():
            return None
        with torch.inference_mode():
            out = self.module(example)
        names = [f"map{i}" for i in range(len(out))] if isinstance(out, (tuple, list)) else ["map0"]
        try:
            return OnnxModel(kind, self.module, example.contiguous(), names, {"frozen_prefix": kind}, torch.get_num_threads())
        except Exception as exc:  # an export or session failure: TorchScript computes the same maps
            log.warning("frozen trunk: ONNX Runtime unavailable (%s: %s); tracing instead", type(exc).__name__, exc)
            return None

    def __call__(self, x: torch.Tensor):
        if self.onnx is not None:
            out = [torch.from_numpy(m).to(torch.float16) for m in self.onnx(x.contiguous().numpy())]
            return tuple(out) if len(out) > 1 else out[0]
        with torch.inference_mode():
            out = self.runner(x.contiguous(memory_format=torch.channels_last))
        if isinstance(out, (tuple, list)):
            return tuple(o.to(torch.float16).contiguous() for o in out)
        return out.to(torch.float16).contiguous()


def freeze(module: nn.Module) -> None:
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)


def prefetched(items: Iterable[T], depth: int = 64) -> Iterator[T]:
    """``items`` in order, produced by a background thread up to ``depth`` ahead of the consumer.

    Making views and scenes is PIL/numpy work on one core, much of it outside
    the GIL, while the frozen trunk's forward is torch work; overlapping the
    two shortens building a cache. An exception in the producer is raised in
    the consumer; a consumer that stops early stops the producer.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    failure: list[BaseException] = []

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            failure.append(exc)
        put(_END)

    producer = threading.Thread(target=produce, name="prefetch", daemon=True)
    producer.start()
    try:
        while (item := buffer.get()) is not _END:
            yield item
        if failure:
            raise failure[0]
    finally:
        stop.set()
        producer.join(timeout=5.0)


def mapped_in_order(fn: Callable[[A], T], tasks: Iterable[A], workers: int = 2, ahead: int = 8) -> Iterator[T]:
    """``fn(task)`` for each task, in order, computed by ``workers`` threads at most ``ahead`` tasks early.

    Rendering a view or a scene is PIL and numpy work that releases the GIL: two threads render
    1.8x as fast as one on 2 cores (16 products x 24 views, 14.1 -> 7.8 s). Each task must own its
    random stream, so the result does not depend on which thread ran it.
    """
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="render") as pool:
        pending: deque[Future] = deque()
        try:
            for task in tasks:
                pending.append(pool.submit(fn, task))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # a consumer that stops early (or a failed task) leaves no queued work behind
            for future in pending:
                future.cancel()
