"""PK sampler: P distinct products x K views per batch, seeded, validated."""

import numpy as np
import pytest

from imgsearch.errors import BadInput
from train.sampler import PKSampler

LABELS = np.repeat(np.arange(10), 5)  # 10 products x 5 views


def test_batches_hold_p_distinct_products_with_k_views_each():
    sampler = PKSampler(LABELS, p=4, k=3, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        assert batch.shape == (12,)
        labels = LABELS[batch]
        assert len(set(labels)) == 4
        assert all(np.sum(labels == label) == 3 for label in set(labels))
        assert len(set(batch)) == 12  # no view twice in a batch


def test_same_seed_and_epoch_same_batches_other_epoch_other_batches():
    first = [b.tolist() for b in PKSampler(LABELS, 4, 3, seed=7)]
    again = [b.tolist() for b in PKSampler(LABELS, 4, 3, seed=7)]
    assert first == again
    later = PKSampler(LABELS, 4, 3, seed=7)
    later.set_epoch(1)
    assert [b.tolist() for b in later] != first


def test_every_product_appears_in_an_epoch():
    seen = set()
    for batch in PKSampler(LABELS, 4, 2, seed=1):
        seen |= set(LABELS[batch].tolist())
    assert seen == set(range(10))


@pytest.mark.parametrize(("p", "k", "quoted"), [(1, 3, "got 1"), (4, 1, "got 1"), (11, 2, "P=11"), (4, "3", "'3'")])
def test_bad_p_or_k_is_quoted(p, k, quoted):
    with pytest.raises(BadInput, match=quoted):
        PKSampler(LABELS, p, k)


def test_product_with_too_few_views_is_an_error_naming_it():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    with pytest.raises(BadInput, match=r"K=3 views \(label 1 has 2\)"):
        PKSampler(labels, p=2, k=3)
