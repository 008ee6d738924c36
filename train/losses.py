"""Metric-learning losses in pytorch-metric-learning's shape: ``loss(embeddings, labels) -> scalar``.

:class:`MetricLoss` checks the inputs once, so every subclass implements only
``compute_loss`` on an (n, d) float matrix and its (n,) labels. Embeddings are
expected L2-normalised (what :class:`embed.model.EmbeddingHead` outputs): the
triplet loss uses Euclidean distance, multi-similarity the cosine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imgsearch.errors import BadInput


class MetricLoss(nn.Module):
    """Validates (embeddings, labels), then defers to :meth:`compute_loss`."""

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2 or not embeddings.is_floating_point():
            found = f"{embeddings.dtype} {tuple(embeddings.shape)}" if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
            raise BadInput(f"embeddings must be a 2-D float tensor (n, d), got {found}")
        if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.is_floating_point():
            found = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise BadInput(f"labels must be a 1-D integer tensor (n,), got {found}")
        if labels.shape[0] != embeddings.shape[0]:
            raise BadInput(f"labels has {labels.shape[0]} entries but embeddings has {embeddings.shape[0]} rows")
        return self.compute_loss(embeddings, labels.to(embeddings.device))

    def compute_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _pair_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) boolean n x n masks; a sample is not its own positive."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


class BatchHardTripletLoss(MetricLoss):
    """Triplet margin loss with batch-hard mining (Hermans et al. 2017, "In Defense of the Triplet Loss").

    For each anchor: its farthest positive and nearest negative in the batch,
    ``relu(d(a, p) - d(a, n) + margin)``, averaged over the anchors that have
    both. Euclidean distance; on unit vectors it lies in [0, 2].
    """

    def __init__(self, margin: float = 0.2):
        super().__init__()
        if not margin > 0:
            raise BadInput(f"triplet margin must be > 0, got {margin!r}")
        self.margin = margin

    def compute_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Squared distances via the Gram matrix, clamped before sqrt: the diagonal's rounding error
        # can go negative, and sqrt(0) has an infinite gradient, hence the small floor.
        gram = embeddings @ embeddings.T
        sq_norms = gram.diagonal()
        distances = (sq_norms[:, None] + sq_norms[None, :] - 2 * gram).clamp(min=1e-12).sqrt()
        positive, negative = _pair_masks(labels)
        hardest_positive = distances.masked_fill(~positive, float("-inf")).max(dim=1).values
        hardest_negative = distances.masked_fill(~negative, float("inf")).min(dim=1).values
        valid = positive.any(dim=1) & negative.any(dim=1)
        if not valid.any():
            return embeddings.sum() * 0.0  # keeps the graph, so backward() still works
        losses = F.relu(hardest_positive[valid] - hardest_negative[valid] + self.margin)
        return losses.mean()


class MultiSimilarityLoss(MetricLoss):
    """Multi-similarity loss with its pair mining (Wang et al. 2019, CVPR), on cosine similarity.

    Mining keeps a negative pair when its similarity is within ``epsilon`` of
    the anchor's hardest positive, and a positive pair within ``epsilon`` of
    the hardest negative. Per anchor::

        1/alpha * log(1 + sum_pos exp(-alpha (S - base))) + 1/beta * log(1 + sum_neg exp(beta (S - base)))

    averaged over all anchors (an anchor with nothing mined adds 0), as in the
    paper's reference implementation.
    """

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1):
        super().__init__()
        if not (alpha > 0 and beta > 0 and epsilon >= 0):
            raise BadInput(f"multi-similarity needs alpha > 0, beta > 0, epsilon >= 0; got {alpha!r}, {beta!r}, {epsilon!r}")
        self.alpha, self.beta, self.base, self.epsilon = alpha, beta, base, epsilon

    def compute_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        similarity = embeddings @ embeddings.T
        positive, negative = _pair_masks(labels)
        hardest_positive = similarity.masked_fill(~positive, float("inf")).min(dim=1, keepdim=True).values
        hardest_negative = similarity.masked_fill(~negative, float("-inf")).max(dim=1, keepdim=True).values
        # Mining uses the similarities as constants: it selects pairs, it is not part of the loss surface.
        mined_negative = negative & (similarity.detach() + self.epsilon > hardest_positive.detach())
        mined_positive = positive & (similarity.detach() - self.epsilon < hardest_negative.detach())
        pos_term = _log1p_sum_exp(-self.alpha * (similarity - self.base), mined_positive) / self.alpha
        neg_term = _log1p_sum_exp(self.beta * (similarity - self.base), mined_negative) / self.beta
        return (pos_term + neg_term).mean()


def _log1p_sum_exp(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise log(1 + sum over mask of exp(logits)), stably: logsumexp with a zero logit for the 1."""
    masked = logits.masked_fill(~mask, float("-inf"))
    zero = torch.zeros(len(logits), 1, dtype=logits.dtype, device=logits.device)
    return torch.logsumexp(torch.cat([zero, masked], dim=1), dim=1)


LOSSES = {"triplet": BatchHardTripletLoss, "multisimilarity": MultiSimilarityLoss}


def make_loss(name: str) -> MetricLoss:
    if name not in LOSSES:
        raise BadInput(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}")
    return LOSSES[name]()
