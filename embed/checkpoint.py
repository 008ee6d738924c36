"""Model checkpoints: one ``torch.save`` dict carrying weights, resolved config and a weights hash.

Layout (``format_version`` 1)::

    {"format": "imgsearch.checkpoint", "format_version": 1,
     "config": {"embedder": {...EmbedderConfig...}, "detector": {...} | None},
     "state_dict": {"embedder.<name>": tensor, ..., "detector.<name>": tensor, ...},
     "weights_sha256": hex digest of state_dict (see :func:`state_dict_sha256`),
     "extra": {...}}   # training bookkeeping (epoch, metrics); not hashed

The hash is what an index manifest records as ``model``: vectors made with
different weights must never be mixed in one index.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from embed.model import BadCheckpoint
from imgsearch.atomic import atomic_file
from imgsearch.errors import MissingAsset

CHECKPOINT_FORMAT = "imgsearch.checkpoint"
CHECKPOINT_VERSION = 1


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of every tensor, in sorted name order.

    Names and shapes are in the hash so that a renamed or reshaped tensor with
    the same bytes still changes it.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # A uint8 view reads the bytes of any dtype (bf16 and friends have no numpy type).
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def prefixed(prefix: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": tensor for name, tensor in state_dict.items()}


def unprefixed(prefix: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = len(prefix) + 1
    return {name[start:]: tensor for name, tensor in state_dict.items() if name.startswith(prefix + ".")}


@dataclass
class Checkpoint:
    """The parts of a checkpoint file, in memory."""

    config: dict
    state_dict: dict[str, torch.Tensor]
    weights_sha256: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.weights_sha256:
            self.weights_sha256 = state_dict_sha256(self.state_dict)

    def part(self, prefix: str) -> dict[str, torch.Tensor]:
        return unprefixed(prefix, self.state_dict)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (:func:`imgsearch.atomic.atomic_file`): readers see the old file or the new one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "config": self.config,
            "state_dict": {k: v.detach().to("cpu") for k, v in self.state_dict.items()},
            "weights_sha256": self.weights_sha256,
            "extra": self.extra,
        }
        with atomic_file(path) as f:
            torch.save(payload, f)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Checkpoint:
        """Read and verify: format, version, config present, and the weights hash recomputed."""
        path = Path(path)
        if not path.is_file():
            raise MissingAsset(f"checkpoint not found at {path}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated zip, pickle garbage, not a torch file at all
            raise BadCheckpoint(f"{path} cannot be read as a checkpoint (corrupt or not a torch.save file): {exc}") from None
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise BadCheckpoint(f"{path} is not an imgsearch checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})")
        if payload.get("format_version") != CHECKPOINT_VERSION:
            raise BadCheckpoint(f"{path} has checkpoint format_version {payload.get('format_version')!r}; this build reads {CHECKPOINT_VERSION}")
        state, config, recorded = payload.get("state_dict"), payload.get("config"), payload.get("weights_sha256")
        if not isinstance(state, dict) or not isinstance(config, dict) or not isinstance(recorded, str):
            raise BadCheckpoint(f"{path} lacks one of state_dict, config, weights_sha256")
        actual = state_dict_sha256(state)
        if actual != recorded:
            raise BadCheckpoint(f"{path} fails its weights hash check: recorded sha256 {recorded[:16]}..., computed {actual[:16]}...; the file is corrupt or was edited")
        return cls(config=config, state_dict=state, weights_sha256=actual, extra=payload.get("extra") or {})
