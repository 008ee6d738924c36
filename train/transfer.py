"""Keeping what ImageNet taught while the metric loss specialises the embedder.

Metric learning on a few hundred catalog products pulls each product's views
together and pushes products apart, and nothing stops it from discarding the
directions that tell *categories* apart (shirt from shoe) but never separate two
products of one batch. The trained model then finds the same product better and
transfers to unseen categories worse (Fashion-MNIST P@1 below the pretrained
trunk's).

The teacher here is the pretrained model as the catalog-learned projection sees
it (:mod:`embed.whitening`): the ImageNet weights of the learning blocks, GeM, and
a PCA-whitening fitted on the training views' own pooled features (no labels).
Two uses, both set in ``TrainConfig``:

- ``head_init="whitened"``: the student's projection starts as that whitening, so
  training starts from the catalog model instead of a random orthogonal map;
- ``transfer_weight``: a similarity-preserving term (Tung & Mori, ICCV 2019) adds
  the mean squared difference between the student's and the teacher's in-batch
  cosine-similarity matrices. It constrains only the geometry among the batch's
  views, not their coordinates, so the metric loss stays free to move the views
  of one product together.

Teacher vectors depend only on a cached view, so they are computed once per view
cache, not per step. A cache with too few views to fit a whitening of the
embedding's dimension (``embed.whitening.min_fit_images``; smoke runs) gets a
teacher of centred pooled features instead, and the head keeps its fixed start.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embed.model import GeM, build_trunk
from embed.whitening import DEFAULT_POWER, fit_whitening, min_fit_images
from train.frozen import FrozenPrefix, freeze

log = logging.getLogger(__name__)

HEAD_INITS = ("fixed", "whitened")


def similarity_preserving_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the off-diagonal in-batch cosine similarities (both inputs unit rows)."""
    n = len(student)
    if n < 2:
        return student.sum() * 0.0
    diff = student @ student.T - teacher @ teacher.T
    return diff.pow(2).sum() / (n * (n - 1))  # the diagonal is 1 - 1 = 0 for unit rows


class TransferTeacher:
    """ImageNet weights of trunk blocks ``[split:]``, GeM, and a whitening fitted on the first maps it sees.

    The blocks and GeM run as a :class:`train.frozen.FrozenPrefix` (ONNX Runtime when present),
    built on the first maps, whose shape it is exported for.
    """

    def __init__(self, backbone: str, split: int, dim: int, gem_p: float, batch: int = 256):
        self.module = nn.Sequential(build_trunk(backbone)[split:], GeM(gem_p))
        freeze(self.module)
        self.dim, self.batch = dim, batch
        self._runner: FrozenPrefix | None = None
        self.weight: np.ndarray | None = None
        self.bias: np.ndarray | None = None
        self.mean: np.ndarray | None = None  # the centring of the fallback teacher

    def pooled(self, maps: torch.Tensor) -> np.ndarray:
        """(n, C) GeM features of cached float16 lower-trunk maps, as the pretrained model pools them."""
        if self._runner is None:
            self._runner = FrozenPrefix(self.module, maps[:2].to(torch.float32), kind="transfer-teacher")
        return np.concatenate([self._runner(maps[a:a + self.batch].to(torch.float32)).numpy().astype(np.float32)
                               for a in range(0, len(maps), self.batch)])

    def vectors(self, maps: torch.Tensor) -> torch.Tensor:
        """Unit teacher vectors (n, dim) of ``maps``; the whitening is fitted on the first call's maps."""
        features = self.pooled(maps)
        if self.weight is None and self.mean is None:
            if len(features) >= min_fit_images(self.dim):
                self.weight, self.bias = fit_whitening(features, self.dim, DEFAULT_POWER)
            else:
                log.warning("%d training views are too few to fit a %d-d whitening (%d needed): the transfer teacher "
                            "is the centred pooled features, the head keeps its fixed start",
                            len(features), self.dim, min_fit_images(self.dim))
                self.mean = features.mean(axis=0)
        projected = features @ self.weight.T + self.bias if self.weight is not None else features - self.mean
        return F.normalize(torch.from_numpy(projected), dim=1)

    def init_projection(self, projection: nn.Linear) -> None:
        """Copy the fitted whitening into a student's ``Linear(C, dim)`` projection (which must have a bias)."""
        if self.weight is None:
            if self.mean is None:
                raise RuntimeError("the teacher's whitening is fitted by vectors() first")
            return  # too few views for a whitening (logged): the head keeps its start
        if projection.bias is None or tuple(projection.weight.shape) != self.weight.shape:
            raise ValueError(f"a whitened head needs a biased Linear of shape {self.weight.shape}, "
                             f"got {tuple(projection.weight.shape)} (bias {projection.bias is not None})")
        with torch.no_grad():
            projection.weight.copy_(torch.from_numpy(self.weight))
            projection.bias.copy_(torch.from_numpy(self.bias))
