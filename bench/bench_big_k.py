"""10,000 results per query: the build's own big-k operating point against exact search.

For each dataset: ``build_version`` with the auto factory (its tuner also measures the big-k
point, ``search_defaults_big_k``, on 50 tuning queries); then fresh held-out queries searched with
``k = 10,000`` and no parameters (what a user's call gets) against an exact in-RAM ``IndexFlat``
with the same k, interleaved, best of ``--rounds``; recall@10,000 against the exact top 10,000.

    .venv/bin/python bench/bench_big_k.py                      # GloVe 390k (ip)
    .venv/bin/python bench/bench_big_k.py --datasets glove,sift-1m

Datasets come from bench/datasets.py (``glove``: 390k base, held-out words as queries).
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

import datasets  # noqa: E402
from bench_index import run_info, write_results  # noqa: E402

BIG_K = 10_000


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / truth.shape[1] for f, t in zip(found, truth)]))


def exact_index(base: np.ndarray, metric: str):
    import faiss

    flat = faiss.IndexFlatIP(base.shape[1]) if metric == "ip" else faiss.IndexFlatL2(base.shape[1])
    for start in range(0, len(base), 1 << 18):
        flat.add(np.ascontiguousarray(base[start:start + (1 << 18)], dtype=np.float32))
    return flat


def bench_dataset(name: str, n_queries: int, rounds: int) -> dict:
    from index.ann.build import build_version
    from index.ann.search import open_index
    from index.ann.sources import npy_source

    ds = datasets.load(name)
    metric = ds.metric
    queries = np.ascontiguousarray(ds.queries[-n_queries:], dtype=np.float32)  # not the tuner's
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        manifest = build_version(npy_source(str(ds.folder / "base.npy"), metric=metric), root, factory="auto",
                                 target_recall=0.95, gpu="off").manifest
        build_s = time.perf_counter() - t0
        idx = open_index(root)
        base = ds.base
        flat = exact_index(base, metric)
        exact_ms, index_ms = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            _, truth = flat.search(queries, BIG_K)
            exact_ms.append(1000 * (time.perf_counter() - t0) / len(queries))
            t0 = time.perf_counter()
            _, found = idx.search(queries, BIG_K)
            index_ms.append(1000 * (time.perf_counter() - t0) / len(queries))
        del flat
    big = {k: v for k, v in (manifest.get("search_defaults_big_k") or {}).items() if k != "tuning"}
    row = {"dataset": name, "n": int(manifest["ntotal"]), "dim": int(manifest["dim"]), "metric": metric,
           "factory": manifest["factory"], "search_defaults": manifest["search_defaults"], "big_k": big,
           "recall_at_10000": round(recall(found, truth), 4), "index_ms": round(min(index_ms), 2),
           "exact_ms": round(min(exact_ms), 2), "build_s": round(build_s, 1), "queries": len(queries)}
    row["speedup_vs_exact"] = round(row["exact_ms"] / row["index_ms"], 2)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="glove", help="comma-separated bench/datasets.py names")
    parser.add_argument("--queries", type=int, default=50, help="fresh queries (the last ones of the set)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default="bench/results/bench_big_k.json")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'data':<10} {'N':>9} {'factory':<26} {'big-k nprobe x rf':>17} {'R@10000':>8} {'index ms':>9} "
          f"{'exact ms':>9} {'x exact':>8}")
    for name in args.datasets.split(","):
        row = bench_dataset(name, args.queries, args.rounds)
        rows.append(row)
        point = f"{row['big_k'].get('nprobe', '-')} x {row['big_k'].get('rerank_factor', '-')}"
        print(f"{name:<10} {row['n']:>9,} {row['factory']:<26} {point:>17} {row['recall_at_10000']:>8} "
              f"{row['index_ms']:>9} {row['exact_ms']:>9} {row['speedup_vs_exact']:>8}", flush=True)
    write_results(args.output, {**run_info(), "k": BIG_K, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
