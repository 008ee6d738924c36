"""Factory choice and validation (no index is built here)."""

import numpy as np
import pytest

from imgsearch.errors import BadInput
from index.ann.factory import choose_factory, is_exact, nlist_for, parse_bytes, validate_factory


@pytest.mark.parametrize(
    ("n", "budget", "factory", "mmap"),
    [
        (5_000, None, "IDMap,Flat", False),  # too small to train
        (20_000, None, "IVF512,PQ64x4fs", False),
        (100_000, None, "IVF1024,PQ64x4fs", False),
        (2_000_000, None, "IVF4096_HNSW32,PQ64x4fs", False),  # HNSW coarse quantizer from 1M
        (10_000_000, None, "IVF16384_HNSW32,PQ64x4fs", False),
        (100_000_000, None, "IVF131072_HNSW32,PQ64x4fs", False),  # 16*sqrt(N) lists from 100M
        (1_000_000_000, 64 << 30, "IVF524288_HNSW32,PQ64x4fs", False),
        (1_000_000_000, 30 << 30, "IVF524288_HNSW32,PQ32x4fs", False),  # smaller fast-scan codes
        (1_000_000_000, 16 << 30, "IVF524288_HNSW32,PQ32", True),  # codes on disk, memory-mapped
    ],
)
def test_auto_factory_choices(n, budget, factory, mmap):
    choice = choose_factory(n, 128, budget or 256 << 30)
    assert (choice.factory, choice.mmap) == (factory, mmap)
    assert choice.reasons and all(isinstance(r, str) for r in choice.reasons)
    validate_factory(choice.factory, 128, "ip")  # every automatic choice is a valid factory


def test_nlist_is_power_of_two_with_enough_training_points():
    for n in (10_000, 20_000, 123_457, 5_000_000):
        nlist = nlist_for(n, 4)
        assert nlist & (nlist - 1) == 0
        assert n / nlist >= 39


def test_opq_only_for_long_subvectors():
    assert not choose_factory(100_000, 128).factory.startswith("OPQ")


@pytest.mark.parametrize("dim, expected", [(128, "PQ64x4fs"), (50, "PQ50x4fs"), (30, "PQ30x4fs"), (51, "PQ51x4fs")])
def test_odd_half_dims_get_one_dim_fast_scan_subquantizers(dim, expected):
    import faiss

    choice = choose_factory(50_000, dim)
    assert choice.factory.endswith(expected) and not choice.mmap, choice.factory
    validate_factory(choice.factory, dim, "ip")
    # It trains and searches too (fast-scan pads an odd sub-quantizer count).
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2_000, dim)).astype(np.float32)
    index = faiss.index_factory(dim, choice.factory.replace(f"IVF{choice.nlist}", "IVF16"))
    index.train(x)
    index.add(x)
    faiss.extract_index_ivf(index).nprobe = 16
    _, found = index.search(x[:50], 1)
    assert (found[:, 0] == np.arange(50)).mean() > 0.9


@pytest.mark.parametrize("bad", ["IVF12,PQ7x", "NotAnIndex", "IVF100,PQ33", ""])
def test_bad_factory_is_bad_input_quoting_it(bad):
    with pytest.raises(BadInput) as err:
        validate_factory(bad, 32, "l2")
    assert repr(bad) in str(err.value) or bad == ""
    assert "\n" not in str(err.value)


def test_exact_codes_and_budget_parsing():
    assert is_exact("IDMap,Flat") and is_exact("IVF64,Flat") and is_exact("HNSW32")
    assert is_exact("IVF64,PQ8,RFlat") and not is_exact("IVF64,PQ8x4fs")
    assert parse_bytes("2GB") == 2 << 30 and parse_bytes("512m") == 512 << 20 and parse_bytes(None) is None
    with pytest.raises(BadInput):
        parse_bytes("lots")


def test_inner_product_gets_residual_fast_scan_codes_and_l2_raw_ones():
    ip, l2 = choose_factory(100_000, 128, metric="ip"), choose_factory(100_000, 128, metric="l2")
    assert ip.factory == "IVF1024,PQ64x4fsr" and l2.factory == "IVF1024,PQ64x4fs"
    assert any("residual" in r for r in ip.reasons) and not any("residual" in r for r in l2.reasons)
    validate_factory(ip.factory, 128, "ip")
    assert choose_factory(5_000, 128, metric="ip").factory == "IDMap,Flat"  # exact below 10k either way
    with pytest.raises(BadInput, match="'cos'"):
        choose_factory(100_000, 128, metric="cos")
