"""Large builds choose their codes by a measured trial (index/ann/measure.py): the rule's fast-scan
codes against 8-bit PQ of the same bytes on the same lists, timed at the target recall on the
training sample; the manifest names the winner and why. Real data: GloVe words."""


import faiss
import numpy as np
from helpers.glove import glove_split

from index.ann import measure
from index.ann.factory import FactoryChoice

faiss.omp_set_num_threads(2)


def _choice(factory: str) -> FactoryChoice:
    return FactoryChoice(factory, 1024, 40.0, False, ["rule"])


def test_alternatives_are_same_byte_8bit_codes_on_the_same_lists():
    assert measure.alternatives(_choice("IVF4096_HNSW32,PQ64x4fs"), 128) == ["IVF4096_HNSW32,PQ32"]
    assert measure.alternatives(_choice("IVF1024,PQ50x4fsr"), 50) == ["IVF1024,PQ25"]
    assert measure.alternatives(_choice("IVF1024,PQ32"), 128) == []  # already 8-bit (budget-forced)
    assert measure.alternatives(_choice("OPQ16,IVF1024,PQ32x4fs"), 128) == []  # rotated space
    assert measure.alternatives(_choice("IVF1024,PQ25x4fs"), 50) == []  # odd: no same-byte 8-bit split


def _glove(n: int, held: int):
    return glove_split(n, held, seed=2)


def test_rival_reuses_the_coarse_centroids_and_only_trains_codes():
    from index.ann.build import train_index

    base, _ = _glove(15_000, 0)
    trained = train_index("IVF256,PQ50x4fsr", 50, "ip", base)
    rival = measure.train_like("IVF256,PQ25", 50, "ip", base, measure._centroids(trained))
    assert rival.is_trained
    np.testing.assert_array_equal(measure._centroids(rival), measure._centroids(trained))


def test_large_build_records_a_measured_choice_and_reaches_recall(tmp_path, monkeypatch):
    from index.ann.build import build_version
    from index.ann.search import open_index
    from index.ann.sources import array_source

    monkeypatch.setattr(measure, "MEASURE_FROM", 20_000)
    monkeypatch.setattr(measure, "TRIAL_ROWS", 25_000)  # the 30k-row sample is cut to a seeded 25k subset
    base, held = _glove(30_000, 200)
    built = build_version(array_source(base, metric="ip"), str(tmp_path / "v"), target_recall=0.95, gpu="off")
    m = built.manifest
    trial = m["codes_trial"]
    assert trial["sample"] == 25_000
    assert set(trial["candidates"]) == {"IVF512,PQ50x4fsr", "IVF512,PQ25"}, trial
    assert m["factory"] == trial["chosen"] and m["factory_choice"]["factory"] == trial["chosen"]
    assert any(r.startswith("codes measured on the") for r in m["factory_choice"]["reasons"])
    reached = {f: c for f, c in trial["candidates"].items() if c["reached"]}
    assert reached and all(c["recall"] >= 0.95 for c in reached.values())
    cheapest = min(reached, key=lambda f: reached[f]["ms_per_query"])
    rule = "IVF512,PQ50x4fsr"
    assert trial["chosen"] in (cheapest, rule)
    if trial["chosen"] != rule:  # a rival wins only by the margin
        assert reached[trial["chosen"]]["ms_per_query"] <= measure.MARGIN * trial["candidates"][rule]["ms_per_query"]
    _, truth = faiss.knn(held, base, 10, metric=faiss.METRIC_INNER_PRODUCT)
    _, found = open_index(str(tmp_path / "v")).search(held, 10)
    rec = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), truth.tolist())]))
    assert rec >= 0.93, (rec, m["measured_recall"])


def test_given_factory_is_not_measured(tmp_path, monkeypatch):
    from index.ann.build import build_version
    from index.ann.sources import array_source

    monkeypatch.setattr(measure, "MEASURE_FROM", 10_000)
    base, _ = _glove(20_000, 0)
    m = build_version(array_source(base, metric="ip"), str(tmp_path / "v"), factory="IVF128,PQ50x4fsr",
                      gpu="off").manifest
    assert m["codes_trial"] is None and m["factory"] == "IVF128,PQ50x4fsr"
