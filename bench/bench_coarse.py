"""Coarse quantizer training: faiss' flat k-means against two-level k-means (index/ann/coarse.py)
at equal lists, on the same training sample of a real dataset, in one run.

Per method and list count: training seconds; coarse recall@10 at nprobe p (the share of each
query's true 10 nearest neighbours whose list is among the p lists probed, the ceiling any IVF
index with these lists can reach); the mean squared distance of the base to its centroid; and
the imbalance factor of the list sizes (1.0 = equal lists; the scan cost grows with it).

    .venv/bin/python bench/bench_coarse.py                          # sift-1m, 4096 and 8192 lists
    .venv/bin/python bench/bench_coarse.py --nlists 16384 --methods two-level
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets  # noqa: E402
import faiss  # noqa: E402
from bench_index import run_info, write_results  # noqa: E402

from index.ann import coarse  # noqa: E402
from index.ann.build import training_size  # noqa: E402

BLOCK = 200_000


def flat_centroids(x: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    km = faiss.Kmeans(x.shape[1], nlist, niter=coarse.NITER, seed=seed, max_points_per_centroid=256)
    km.train(x)
    return km.centroids


def assign_base(base, centroids: np.ndarray) -> tuple[np.ndarray, float]:
    """List of every base row (exact, in blocks) and the mean squared distance to it."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    lists, err = np.empty(len(base), np.int64), 0.0
    for s in range(0, len(base), BLOCK):
        d, i = index.search(np.ascontiguousarray(base[s:s + BLOCK], np.float32), 1)
        lists[s:s + BLOCK], err = i.ravel(), err + float(d.sum())
    return lists, err / len(base)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="sift-1m")
    ap.add_argument("--nlists", type=lambda s: [int(v) for v in s.split(",")], default=[4096, 8192])
    ap.add_argument("--methods", type=lambda s: s.split(","), default=["flat", "two-level"])
    ap.add_argument("--nprobes", type=lambda s: [int(v) for v in s.split(",")], default=[16, 64, 256])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=str(Path(__file__).resolve().parent / "results" / "bench_coarse.json"))
    args = ap.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    ds = datasets.load(args.dataset)
    base = np.load(ds.folder / "base.npy", mmap_mode="r")
    q, gt = ds.queries.astype(np.float32), ds.gt[:, :10]
    rows = []
    for nlist in args.nlists:
        size = training_size(len(base), nlist)
        pick = np.sort(np.random.default_rng(args.seed).choice(len(base), size, replace=False))
        x = np.ascontiguousarray(base[pick], np.float32)
        for method in args.methods:
            t0 = time.perf_counter()
            if method == "flat":
                c = flat_centroids(x, nlist, args.seed)
            else:
                c = coarse.two_level_centroids(x, nlist, seed=args.seed)
            train_s = time.perf_counter() - t0
            lists, mse = assign_base(base, c)
            sizes = np.bincount(lists, minlength=nlist)
            imbalance = float(nlist * np.sum(sizes.astype(np.float64) ** 2) / np.sum(sizes) ** 2)
            _, probed = faiss.knn(q, c, max(args.nprobes))
            row = {"nlist": nlist, "method": method, "train_size": size, "train_s": round(train_s, 1),
                   "mse": round(mse, 1), "imbalance": round(imbalance, 3)}
            for p in args.nprobes:
                hit = [np.isin(lists[g], pr[:p]).mean() for g, pr in zip(gt, probed)]
                row[f"coarse_recall@{p}"] = round(float(np.mean(hit)), 4)
            rows.append(row)
            print(row, flush=True)
    cols = ["nlist", "method", "train_size", "train_s", "mse", "imbalance"] + [f"coarse_recall@{p}" for p in args.nprobes]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    write_results(args.output, {**run_info(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
