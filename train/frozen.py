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
import warnings

import torch
from torch import nn

log = logging.getLogger(__name__)


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
