"""imgsearch's layer cost against raw faiss, in ONE process.

Two searchers over the same index version, at the same (nprobe, rerank_factor):

- ``imgsearch``: the working tree's ``index.ann.search`` (``open_index``);
- ``raw``: plain faiss, ``IndexRefine(shard index, IndexScalarQuantizer(QT_fp16))``, k_factor =
  rerank_factor (the same pipeline as bench_index.py's "faiss raw", float16 vectors in RAM).

Timing interleaves the two call by call (order alternating) and keeps, for every batch, its
fastest of --rounds calls: on a shared machine that removes most of the other jobs' noise.

    .venv/bin/python bench/bench_layer.py --dataset sift --nprobe 64 --rerank 8           # builds
    .venv/bin/python bench/bench_layer.py --dataset sift --root /tmp/idx/sift --nprobe 64 --rerank 8
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets  # noqa: E402
from bench_index import recall, run_info, write_results  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="sift")
    ap.add_argument("--root", default=None, help="an index root built from the dataset (default: build one)")
    ap.add_argument("--nprobe", type=int, required=True)
    ap.add_argument("--rerank", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nq", type=int, default=2048)
    ap.add_argument("--batches", default="256,1")
    ap.add_argument("--b1-queries", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    import faiss

    from index.ann.build import build_version
    from index.ann.search import open_index
    from index.ann.sources import npy_source

    faiss.omp_set_num_threads(args.threads)
    ds = datasets.load(args.dataset)
    root, built = args.root, args.root is None
    if built:
        root = tempfile.mkdtemp(prefix=f"layer-{args.dataset}-")
        build_version(npy_source(str(ds.folder / "base.npy"), metric=ds.metric), root, gpu="off")
    q = np.ascontiguousarray(ds.queries[: args.nq], dtype=np.float32)
    gt = ds.gt[: args.nq, :10]
    new = open_index(root)
    ids = new.indexed_ids()[: int(new.manifest["shard_files"][0]["ntotal"])]  # shard file 0, row order
    raw = faiss.read_index(os.path.join(new.path, new.manifest["shard_files"][0]["index"]))
    mt = faiss.METRIC_INNER_PRODUCT if ds.metric == "ip" else faiss.METRIC_L2
    sq = faiss.IndexScalarQuantizer(ds.base.shape[1], faiss.ScalarQuantizer.QT_fp16, mt)
    sq.add(np.ascontiguousarray(ds.base[ids], dtype=np.float32))
    ref = faiss.IndexRefine(raw, sq)
    ref.k_factor = args.rerank
    ivf = faiss.extract_index_ivf(raw)
    ivf.nprobe = args.nprobe
    hq = faiss.downcast_index(ivf.quantizer)
    if isinstance(hq, faiss.IndexHNSW):
        hq.hnsw.efSearch = max(2 * args.nprobe, 16)
    fs = {"imgsearch": lambda x: new.search(x, 10, nprobe=args.nprobe, rerank_factor=args.rerank),
          "raw": lambda x: ref.search(x, 10)}
    res = {**run_info(), "dataset": args.dataset, "factory": new.manifest["factory"],
           "nprobe": args.nprobe, "rerank_factor": args.rerank, "threads": args.threads,
           "batches": {}}
    names = list(fs)
    for bs in [int(b) for b in args.batches.split(",")]:
        qq = q if bs > 1 else q[: args.b1_queries]
        nb = (len(qq) + bs - 1) // bs
        dt = {k: np.full((nb, args.rounds), np.inf) for k in fs}
        found = {k: [None] * nb for k in fs}
        for r in range(args.rounds):
            for b in range(nb):
                x = qq[b * bs:(b + 1) * bs]
                for name in (names if (r + b) % 2 == 0 else names[::-1]):
                    t = time.perf_counter()
                    found[name][b] = fs[name](x)[1]
                    dt[name][b, r] = time.perf_counter() - t
        tot = {k: float(v.min(axis=1).sum()) for k, v in dt.items()}
        row = {}
        for name in fs:
            found_ids = np.vstack(found[name])
            row[name] = {"qps": round(len(qq) / tot[name], 1), "us_per_query": round(1e6 * tot[name] / len(qq), 1),
                         "recall@10": round(recall(ids[found_ids] if name == "raw" else found_ids, gt[:len(qq)]), 4),
                         "cost_vs_raw": round(tot[name] / tot["raw"] - 1, 3)}
            print(f"batch {bs:4d} {name:6s} QPS {row[name]['qps']:9.0f}  {row[name]['us_per_query']:8.1f} us/query  "
                  f"R@10 {row[name]['recall@10']:.4f}  vs raw {row[name]['cost_vs_raw']:+.1%}", flush=True)
        res["batches"][str(bs)] = row
    out = args.output or str(Path(__file__).resolve().parent / "results" / f"bench_layer_{args.dataset}.json")
    write_results(out, res)
    if built:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
