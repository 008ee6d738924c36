"""A projection learned from the catalog itself, without labels: PCA-whitening of the pooled trunk features.

The untrained embedder projects GeM features with a fixed seeded orthogonal map,
which keeps every direction of the ImageNet feature space alike. Instance
retrieval practice (Radenovic et al., "Fine-tuning CNN image retrieval with no
human annotation"; Jegou & Chum, "Negative evidences and co-occurrences") learns
a PCA-whitening from the database's own descriptors instead: centring removes
what every catalog image shares, and dividing each principal direction by a
power of its variance stops a few dominant directions (background, lighting)
from deciding the cosine ranking.

``fit_whitening`` does the linear algebra; ``fit_catalog_net`` embeds a seeded
sample of catalog images with the pretrained trunk and returns an
:class:`embed.model.EmbeddingNet` whose ``head.projection`` is the whitening, so it
saves as an ordinary checkpoint (its weights hash is the model hash).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from embed.image_io import ImageSource, load_rgb
from embed.model import EmbedderConfig, EmbeddingNet
from embed.pipeline import make_checkpoint
from embed.preprocess import Preprocessor
from imgsearch.atomic import write_bytes_atomic
from imgsearch.errors import BadInput

# Eigenvalue power: -0.5 is full whitening; softer powers keep part of the variance ordering.
DEFAULT_POWER = 0.25  # bench_projection.py: best R@1 and Fashion-MNIST P@1 together
# Added to every eigenvalue, as a share of their mean: shrinks the covariance towards isotropy so the
# weakest kept directions (noise in a small catalog) are not blown up.
DEFAULT_SHRINKAGE = 0.0
MAX_FIT_IMAGES = 2000
FIT_SEED = 0


def min_fit_images(dim: int) -> int:
    """Fewest images a whitening to ``dim`` dimensions is fitted from: twice the dimension,
    so every kept direction's variance is estimated from more images than directions."""
    return 2 * dim


def fit_whitening(features: np.ndarray, dim: int, power: float = DEFAULT_POWER,
                  shrinkage: float = DEFAULT_SHRINKAGE) -> tuple[np.ndarray, np.ndarray]:
    """(weight (dim, C), bias (dim,)) with ``weight @ x + bias`` the whitened top-``dim`` PCA coordinates of x.

    ``power`` 0 is plain PCA (rotation only), 0.5 full whitening. Computed in float64.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or not 1 <= dim <= x.shape[1]:
        raise BadInput(f"whitening needs (n, C) features with 1 <= dim <= C, got {x.shape} and dim {dim}")
    if x.shape[0] <= dim:
        raise BadInput(f"whitening to {dim} dimensions needs more than {dim} images, got {x.shape[0]}")
    if not (0.0 <= power <= 1.0 and shrinkage >= 0.0):
        raise BadInput(f"power must be in [0, 1] and shrinkage >= 0, got {power!r}, {shrinkage!r}")
    mean = x.mean(axis=0)
    centred = x - mean
    covariance = centred.T @ centred / (len(x) - 1)
    values, vectors = np.linalg.eigh(covariance)  # ascending
    order = np.argsort(-values, kind="stable")[:dim]
    values, vectors = np.clip(values[order], 0.0, None), vectors[:, order]
    # eigh's sign per vector is arbitrary: fix it (largest-magnitude entry positive) so refits agree.
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(dim)])
    vectors = vectors * np.where(signs == 0, 1.0, signs)
    scale = (values + shrinkage * values.mean() + 1e-12) ** -power
    weight = scale[:, None] * vectors.T
    return weight.astype(np.float32), (-weight @ mean).astype(np.float32)


def pooled_features(net: EmbeddingNet, batch: torch.Tensor) -> torch.Tensor:
    """GeM-pooled trunk features (n, C) of an already-preprocessed batch: what the projection sees."""
    with torch.no_grad():
        return net.head.pool(net.trunk(batch))


def catalog_sample(images: Sequence[ImageSource], limit: int = MAX_FIT_IMAGES, seed: int = FIT_SEED) -> list[ImageSource]:
    """At most ``limit`` of ``images``, a seeded pick in catalog order (the same catalog gives the same sample)."""
    images = list(images)
    if len(images) <= limit:
        return images
    pick = np.sort(np.random.default_rng(seed).choice(len(images), size=limit, replace=False))
    return [images[i] for i in pick]


class TooFewImages(BadInput):
    """The catalog has fewer decodable images than a whitening of that dimension is fitted from."""


def fit_catalog_net(images: Sequence[ImageSource], config: EmbedderConfig | None = None,
                    weights: str | os.PathLike | None = None, batch_size: int = 32,
                    power: float = DEFAULT_POWER, shrinkage: float = DEFAULT_SHRINKAGE) -> EmbeddingNet:
    """The pretrained trunk with a projection whitened on a seeded sample (<= 2000) of catalog ``images``.

    Unsupervised: only the images, no labels. An image that cannot be read or decoded is left out
    (ingest rejects its row anyway). Raises :class:`TooFewImages` when fewer than
    :func:`min_fit_images` are left; ``net.fit_images`` is how many were used.
    """
    config = config or EmbedderConfig()
    if config.projection_bn:
        raise BadInput("a whitened projection replaces the BatchNorm head; use projection_bn=False")
    sample = catalog_sample(images)
    needed = min_fit_images(config.dim)
    if len(sample) < needed:
        raise TooFewImages(f"fitting the catalog projection needs at least {needed} images, the catalog has {len(sample)}")
    net = EmbeddingNet.pretrained(config, weights)
    preprocess = Preprocessor(config.image_size)
    chunks, used = [], 0
    for start in range(0, len(sample), batch_size):
        decoded = []
        for image in sample[start : start + batch_size]:
            try:
                decoded.append(load_rgb(image))
            except (BadInput, OSError):
                continue
        if decoded:
            chunks.append(pooled_features(net, preprocess(decoded)).numpy())
            used += len(decoded)
    if used < needed:
        raise TooFewImages(f"fitting the catalog projection needs at least {needed} images, "
                           f"only {used} of the catalog's {len(sample)} sampled images could be decoded")
    weight, bias = fit_whitening(np.concatenate(chunks), config.dim, power, shrinkage)
    with torch.no_grad():
        net.head.projection.weight.copy_(torch.from_numpy(weight))
        net.head.projection.bias.copy_(torch.from_numpy(bias))
    net.fit_images = used
    return net.eval()


def save_projection(net: EmbeddingNet, path: str | os.PathLike, fit_info: dict) -> None:
    """Write ``net`` as a checkpoint at ``path`` (atomically) and its resolved config as ``<path>.json`` beside it."""
    path = Path(path)
    checkpoint = make_checkpoint(net, extra={"projection": fit_info})
    checkpoint.save(path)  # atomic
    config = {"embedder": net.config.to_dict(), "projection": fit_info, "weights_sha256": checkpoint.weights_sha256}
    write_bytes_atomic(path.with_name(path.name + ".json"), (json.dumps(config, indent=1, sort_keys=True) + "\n").encode())
