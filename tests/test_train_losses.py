"""Metric losses against hand-computed values on a 4-point batch in 2-D."""

import math

import pytest
import torch

from imgsearch.errors import BadInput
from train.losses import BatchHardTripletLoss, MultiSimilarityLoss, make_loss

# Unit vectors: e0 = (1, 0), e1 = (0.6, 0.8), e2 = (0, 1), e3 = (-1, 0); products 0, 0, 1, 1.
EMBEDDINGS = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
LABELS = torch.tensor([0, 0, 1, 1])


def test_batch_hard_triplet_matches_hand_computation():
    # Distances: d01 = sqrt(0.8), d02 = sqrt(2), d03 = 2, d12 = sqrt(0.4), d13 = sqrt(3.2), d23 = sqrt(2).
    # Anchor 0: hardest pos d01, hardest neg d02 -> sqrt(.8) - sqrt(2) + .2 < 0 -> 0
    # Anchor 1: d10 - d12 + .2; anchor 2: d23 - d21 + .2; anchor 3: d32 - d31 + .2 < 0 -> 0
    expected = ((math.sqrt(0.8) - math.sqrt(0.4) + 0.2) + (math.sqrt(2) - math.sqrt(0.4) + 0.2)) / 4
    loss = BatchHardTripletLoss(margin=0.2)(EMBEDDINGS, LABELS)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_multi_similarity_matches_hand_computation():
    # Similarities: S01 = .6, S02 = 0, S03 = -1, S12 = .8, S13 = -.6, S23 = 0. alpha 2, beta 50, base .5, eps .1.
    # Anchors 0 and 3 mine nothing. Anchor 1 mines pos {.6} and neg {.8}; anchor 2 pos {0} and negs {0, .8}.
    anchor1 = 0.5 * math.log(1 + math.exp(-2 * (0.6 - 0.5))) + math.log(1 + math.exp(50 * (0.8 - 0.5))) / 50
    anchor2 = 0.5 * math.log(1 + math.exp(-2 * (0.0 - 0.5))) + math.log(1 + math.exp(-25) + math.exp(15)) / 50
    loss = MultiSimilarityLoss(alpha=2, beta=50, base=0.5, epsilon=0.1)(EMBEDDINGS, LABELS)
    assert loss.item() == pytest.approx((anchor1 + anchor2) / 4, abs=1e-5)


@pytest.mark.parametrize("name", ["triplet", "multisimilarity"])
def test_loss_is_differentiable_and_zero_for_separated_products(name):
    embeddings = EMBEDDINGS.clone().requires_grad_(True)
    make_loss(name)(embeddings, LABELS).backward()
    assert embeddings.grad is not None and torch.isfinite(embeddings.grad).all()
    separated = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    assert make_loss(name)(separated, LABELS).item() == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize(
    ("embeddings", "labels", "quoted"),
    [
        (torch.zeros(4), LABELS, "(4,)"),
        (torch.zeros(4, 2, dtype=torch.int64), LABELS, "torch.int64"),
        (EMBEDDINGS, torch.tensor([0, 1]), "2 entries"),
        (EMBEDDINGS, torch.zeros(4, 1, dtype=torch.int64), "(4, 1)"),
        (EMBEDDINGS, torch.zeros(4), "torch.float32"),
    ],
)
def test_base_class_rejects_bad_shapes_quoting_them(embeddings, labels, quoted):
    with pytest.raises(BadInput, match=quoted.replace("(", r"\(").replace(")", r"\)")):
        BatchHardTripletLoss()(embeddings, labels)


def test_unknown_loss_name_is_quoted():
    with pytest.raises(BadInput, match="'arcface'"):
        make_loss("arcface")
