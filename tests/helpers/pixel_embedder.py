"""A tiny deterministic stand-in embedder (no torch): for tests, benchmarks and Ray smoke runs.

Each image is resized to 8x8 RGB and projected by a fixed seeded Gaussian matrix to ``dim``
dimensions, then L2-normalised: near-identical images get near-identical vectors, and a
different ``seed`` is a different "model" (its own ``model_hash``). Picklable, so Ray workers
can build it themselves.
"""

from __future__ import annotations

import numpy as np


class PixelEmbedder:
    def __init__(self, dim: int = 16, seed: int = 0):
        self.dim = int(dim)
        self.seed = int(seed)
        self.model_hash = f"pixel-embedder-d{self.dim}-s{self.seed}"
        self._proj = np.random.default_rng(seed).standard_normal((192, self.dim)).astype(np.float32)

    def embed_catalog(self, images) -> np.ndarray:
        rows = [np.asarray(im.convert("RGB").resize((8, 8)), dtype=np.float32).ravel() / 255.0 - 0.5 for im in images]
        x = np.asarray(rows, np.float32).reshape(len(images), 192) @ self._proj
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
