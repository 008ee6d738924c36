"""The blocked sift-<N> generator (bench/sift_blocks.py): blocked exact ground truth equals an
in-RAM faiss.knn, the base has no exact duplicate rows, and a resumed pool is byte-identical."""

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

pytest.importorskip("cv2")  # OpenCV SIFT comes with the bench extra (setup.cfg)
faiss = pytest.importorskip("faiss")

import sift_blocks as sb  # noqa: E402

N, SCENES, NQ, K = 20_000, 10, 200, 10


@pytest.fixture(scope="module")
def rung(tmp_path_factory):
    root = tmp_path_factory.mktemp("ladder")
    meta = sb.make_rung(root / "rung", N, root / "pool", nq=NQ, k=K, scenes_per_block=SCENES,
                        workers=2, gt_block=6_000, log=lambda *_: None)
    return root, meta


def test_blocked_ground_truth_matches_in_ram_knn(rung):
    root, meta = rung
    assert meta["base_blocks"] >= 4, meta  # the rung really spans several pool blocks
    base = np.load(root / "rung" / "base.npy", mmap_mode="r")
    assert base.dtype == np.uint8 and base.shape == (N, 128)
    q = np.load(root / "rung" / "queries.npy")
    gt, gt_d = np.load(root / "rung" / "gt.npy"), np.load(root / "rung" / "gt_dist.npy")
    d, i = faiss.knn(q, np.asarray(base, np.float32), K)
    # Integer SIFT values: float32 distances are exact, so they must agree exactly.
    np.testing.assert_array_equal(gt_d, d)
    for row in range(len(q)):  # ids agree except among rows tied at the k-th distance
        inside = gt_d[row] < gt_d[row, -1]
        assert set(gt[row][inside]) == set(i[row][d[row] < d[row, -1]])
        assert (gt[row] >= 0).all() and len(set(gt[row])) == K


def test_no_exact_duplicates_and_queries_not_rows(rung):
    root, meta = rung
    base = np.asarray(np.load(root / "rung" / "base.npy"))
    assert len(np.unique(base, axis=0)) == N
    q8 = np.load(root / "rung" / "queries.npy").astype(np.uint8)
    both = np.unique(np.concatenate([base, q8]), axis=0)
    assert len(both) == N + len(np.unique(q8, axis=0)) - meta["queries_equal_to_a_base_row"]


def test_resume_after_lost_last_block_is_identical(rung):
    root, meta = rung
    pool = root / "pool"
    blocks = sorted(pool.glob("blk-*.npy"))
    before = [p.read_bytes() for p in blocks]
    base_before = (root / "rung" / "base.npy").read_bytes()
    gt_before = np.load(root / "rung" / "gt.npy")
    blocks[-1].unlink()  # as if the run died while writing the last block
    (pool / "blk-00001.tmp.npy").write_bytes(b"torn")
    sb.make_rung(root / "rung", N, pool, nq=NQ, k=K, scenes_per_block=SCENES, workers=1,
                 gt_block=7_000, log=lambda *_: None)
    assert [p.read_bytes() for p in sorted(pool.glob("blk-*.npy"))] == before
    assert (root / "rung" / "base.npy").read_bytes() == base_before
    assert not (pool / "blk-00001.tmp.npy").exists()
    # Another GT block size, same ties broken by row: the same ground truth.
    np.testing.assert_array_equal(np.load(root / "rung" / "gt.npy"), gt_before)


def test_keep_new_drops_repeats_within_and_across_blocks():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (500, 128), dtype=np.uint8)
    kept, seen = sb.keep_new(np.concatenate([a, a[:50]]), np.empty(0, np.uint64))
    np.testing.assert_array_equal(kept, a)
    b = np.concatenate([a[100:120], rng.integers(0, 256, (30, 128), dtype=np.uint8)])
    kept2, seen2 = sb.keep_new(b, seen)
    np.testing.assert_array_equal(kept2, b[20:])
    assert len(seen2) == 530 and (np.diff(seen2.astype(np.float64)) >= 0).all()
