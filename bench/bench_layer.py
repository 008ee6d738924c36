"""imgsearch's layer cost against raw faiss, and the searcher before/after a change, in ONE process.

Three searchers over the same index version, at the same (nprobe, rerank_factor):

- ``before``: ``index/searcher.py`` as of git revision --before-rev (loaded from ``git show``);
- ``after``: the working tree's ``index.searcher``;
- ``raw``: plain faiss, ``IndexRefine(shard index, IndexScalarQuantizer(QT_fp16))``, k_factor =
  rerank_factor (the same pipeline as bench_index.py's "faiss raw", float16 vectors in RAM).

It first checks that before and after return identical ids and scores (batches of 256, 7, 1).
Timing interleaves the three call by call (order alternating) and keeps, for every batch, its
fastest of --rounds calls: on a shared machine that removes most of the other jobs' noise.

    .venv/bin/python bench/bench_layer.py --dataset sift --nprobe 64 --rerank 8           # builds
    .venv/bin/python bench/bench_layer.py --dataset sift --root /tmp/idx/sift --nprobe 64 --rerank 8
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
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


def load_before(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:index/searcher.py"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="searcher-before-")) / "searcher_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("searcher_before", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["searcher_before"] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="sift")
    ap.add_argument("--root", default=None, help="an index root built from the dataset (default: build one)")
    ap.add_argument("--nprobe", type=int, required=True)
    ap.add_argument("--rerank", type=int, required=True)
    ap.add_argument("--before-rev", default="HEAD")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nq", type=int, default=2048)
    ap.add_argument("--batches", default="256,1")
    ap.add_argument("--b1-queries", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    import faiss

    from index import searcher as after_mod

    faiss.omp_set_num_threads(args.threads)
    before_mod = load_before(args.before_rev)
    ds = datasets.load(args.dataset)
    root, built = args.root, args.root is None
    if built:
        from index.build import build_version
        from index.sources import npy_source

        root = tempfile.mkdtemp(prefix=f"layer-{args.dataset}-")
        build_version(npy_source(str(ds.folder / "base.npy"), metric=ds.metric), root, gpu="off")
    q = np.ascontiguousarray(ds.queries[: args.nq], dtype=np.float32)
    gt = ds.gt[: args.nq, :10]
    old, new = before_mod.open_index(root), after_mod.open_index(root)
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
    fs = {"before": lambda x: old.search(x, 10, nprobe=args.nprobe, rerank_factor=args.rerank),
          "after": lambda x: new.search(x, 10, nprobe=args.nprobe, rerank_factor=args.rerank),
          "raw": lambda x: ref.search(x, 10)}
    res = {**run_info(), "dataset": args.dataset, "factory": new.manifest["factory"],
           "nprobe": args.nprobe, "rerank_factor": args.rerank, "threads": args.threads,
           "before_rev": args.before_rev, "identical": {}, "batches": {}}
    for bs in (256, 7, 1):
        qq = q if bs != 1 else q[:200]
        o = [old.search(qq[a:a + bs], 10, nprobe=args.nprobe, rerank_factor=args.rerank) for a in range(0, len(qq), bs)]
        n = [new.search(qq[a:a + bs], 10, nprobe=args.nprobe, rerank_factor=args.rerank) for a in range(0, len(qq), bs)]
        same = bool(np.array_equal(np.vstack([x[1] for x in o]), np.vstack([x[1] for x in n]))
                    and np.array_equal(np.vstack([x[0] for x in o]), np.vstack([x[0] for x in n])))
        res["identical"][str(bs)] = same
        print(f"before == after (ids and scores), batch {bs}: {same}", flush=True)
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
