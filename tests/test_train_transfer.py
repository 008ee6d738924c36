"""The transfer teacher (train/transfer.py): the similarity-preserving term, the whitened head start, the fallback."""

import logging

import numpy as np
import pytest
import torch

from embed.model import EmbedderConfig, EmbeddingNet
from imgsearch.errors import BadInput
from imgsearch.sample_data import load_fashion_mnist
from train.engine import EmbedderStage, TrainConfig, ViewCache
from train.evaluate import fashion_mnist_pils
from train.transfer import similarity_preserving_loss

torch.set_num_threads(2)
SIZE = 64


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1)


def test_similarity_preserving_loss_is_zero_for_the_teacher_and_blind_to_rotations():
    g = torch.Generator().manual_seed(0)
    teacher = _unit(torch.randn(12, 16, generator=g))
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert similarity_preserving_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    assert similarity_preserving_loss(teacher @ rotation, teacher).item() == pytest.approx(0.0, abs=1e-6)
    other = _unit(torch.randn(12, 16, generator=g)).requires_grad_(True)
    loss = similarity_preserving_loss(other, teacher)
    direct = ((other @ other.T - teacher @ teacher.T) ** 2).sum() / (12 * 11)
    assert loss.item() > 0.01 and loss.item() == pytest.approx(direct.item(), rel=1e-6)
    loss.backward()
    assert other.grad is not None and other.grad.abs().sum() > 0
    assert similarity_preserving_loss(other[:1], teacher[:1]).item() == 0.0


@pytest.fixture(scope="module")
def fashion_views():
    """300 real Fashion-MNIST photos (30 per category; the category stands in for the product)."""
    images, labels = load_fashion_mnist("test")
    pick = np.concatenate([np.flatnonzero(labels == c)[:30] for c in range(10)])
    return list(zip(labels[pick].tolist(), fashion_mnist_pils(images[pick])))


@pytest.fixture(scope="module")
def fashion_cache(fashion_views):
    """Their frozen-prefix maps: the same for every stage that learns from the same block."""
    return _stage().cache(fashion_views, progress=False)


def _stage(**overrides) -> EmbedderStage:
    torch.manual_seed(0)
    config = TrainConfig(image_size=SIZE, products_per_batch=10, views_per_batch=6, embed_trainable_from=16, **overrides)
    return EmbedderStage(EmbeddingNet.pretrained(EmbedderConfig(image_size=SIZE, projection_bn=False)), config)


def test_whitened_head_starts_as_the_teacher(fashion_cache):
    stage = _stage(head_init="whitened", transfer_weight=1.0)
    fixed = stage.net.head.projection.weight.detach().clone()
    cache = fashion_cache
    stage.start(cache)
    assert not torch.allclose(stage.net.head.projection.weight, fixed)
    student = torch.from_numpy(stage.vectors(cache))
    torch.testing.assert_close(student, cache.teacher, atol=3e-3, rtol=0)  # the teacher runs in float16 out
    # Centred and whitened: the views' mean vector is far from unit length (the fixed head's is not).
    assert float(student.mean(0).norm()) < 0.3


def test_transfer_weight_keeps_the_in_batch_geometry_nearer_the_teacher(fashion_cache):
    def drift(weight: float) -> float:
        stage = _stage(head_init="whitened", transfer_weight=weight, embed_lr=1e-2, embed_trunk_lr=2e-3)
        stage.start(fashion_cache)
        stage.train_epoch(fashion_cache, 0)
        return similarity_preserving_loss(torch.from_numpy(stage.vectors(fashion_cache)), fashion_cache.teacher).item()

    free, tied = drift(0.0), drift(50.0)
    assert tied < 0.5 * free, (tied, free)  # 0.83 free against 0.43 at weight 20, lower at 50


def test_too_few_views_fall_back_to_a_centred_teacher_and_keep_the_fixed_head(fashion_views, caplog):
    stage = _stage(head_init="whitened", transfer_weight=1.0)
    fixed = stage.net.head.projection.weight.detach().clone()
    cache = stage.cache(fashion_views[:40], progress=False)
    with caplog.at_level(logging.WARNING, logger="train.transfer"):
        stage.start(cache)
    assert "too few" in caplog.text
    torch.testing.assert_close(stage.net.head.projection.weight, fixed)
    np.testing.assert_allclose(cache.teacher.norm(dim=1).numpy(), 1.0, atol=1e-5)
    assert np.isfinite(stage.train_epoch(cache, 0))


def test_a_stage_without_transfer_builds_no_teacher():
    stage = _stage(head_init="fixed", transfer_weight=0.0)
    assert stage.teacher is None
    stage.start(ViewCache(torch.zeros(2, 1), np.array([0, 1])))  # nothing to do, nothing computed


@pytest.mark.parametrize("field, value", [("head_init", "random"), ("transfer_weight", -1.0),
                                          ("transfer_weight", float("nan")), ("transfer_weight", float("inf"))])
def test_config_names_the_bad_transfer_value(field, value):
    with pytest.raises(BadInput, match=field):
        TrainConfig(**{field: value})


def test_a_config_saved_before_transfer_resumes_without_it():
    old = {k: v for k, v in TrainConfig().to_dict().items() if k not in ("head_init", "transfer_weight")}
    restored = TrainConfig.from_dict(old)
    assert (restored.head_init, restored.transfer_weight) == ("fixed", 0.0)
