"""Frozen-trunk feature caches: the CPU budget trick.

Full fine-tuning of MobileNetV2 does not fit a 2-core, 20-minute budget: the
trunk's forward alone is ~50 ms per 224 px image there, and backward triples
it. The early blocks transfer from ImageNet as they are, so they are run
ONCE per augmented view (traced and oneDNN-optimised, in inference mode) and
their output maps are kept in float16; every epoch then trains only the
upper blocks and the heads on those maps, which is 20-50x cheaper.
Measured in ``bench/bench_recall.py`` (see BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
from torch import nn

log = logging.getLogger(__name__)

T = TypeVar("T")
_END = object()


class FrozenPrefix:
    """An inference-only copy of a module, traced and optimised when possible; output in float16."""

    def __init__(self, module: nn.Module, example: torch.Tensor, optimise: bool = True):
        self.module = copy.deepcopy(module).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.runner = self.module
        if optimise:
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch.jit's deprecation notice
                    traced = torch.jit.optimize_for_inference(torch.jit.trace(self.module, example))
                    traced(example)  # the profiling pass, now rather than on the first real batch
                self.runner = traced
            except Exception as exc:  # an odd build without oneDNN: eager is correct, only slower
                log.warning("frozen trunk runs eager (trace failed: %s)", exc)

    def __call__(self, x: torch.Tensor):
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
