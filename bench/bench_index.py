"""imgsearch vs its peers on real data, at recall@10 >= 0.95 against exact search, in ONE run.

For each dataset (see bench/datasets.py: sift, glove, embed, embed-fmnist) it measures, side by side:

- ``exact``: faiss IndexFlatL2 / IndexFlatIP (the ground truth's own index);
- ``hnswlib``: M and ef tuned: for each M in --hnsw-m, the smallest ef (grid) reaching the
  target; the M with the best QPS is reported;
- ``faiss raw``: the very index files imgsearch built (same trained factory string, same codes),
  searched with plain faiss: ``IndexRefine(shard index, IndexScalarQuantizer(QT_fp16))``, i.e.
  the same PQ candidates (nprobe) and the same float16 re-rank of k * rerank_factor of them, all
  in faiss' C++ (float16 vectors in RAM), with no imgsearch layer;
- ``faiss raw PQ only``: the same index and nprobe without re-rank (for the recall it gives);
- ``imgsearch``: ``open_index(root).search(q, 10, nprobe=, rerank_factor=)``.

The operating point (nprobe, rerank_factor) is the one with the best measured imgsearch QPS
among the grid points reaching the target recall on the benchmark queries (rerank_factor over
the tuner's grid, ``index.ann.tune.RERANK_FACTORS``); raw faiss uses the same point. Throughput is
measured with batches of --batch queries (a server batching requests) and per-query latency
with batch 1 on --latency-queries queries. Timing rounds interleave the methods and keep each
one's best round (the CPU is shared). Threads: faiss/hnswlib use --threads.

    .venv/bin/python bench/bench_index.py                       # sift, glove, embed (~10 min)
    .venv/bin/python bench/bench_index.py --datasets glove --nq 2000 --hnsw-m 8,16,32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets  # noqa: E402

K = 10
EF_GRID = (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536)
# The re-rank factors the build's auto-tuner tries (index.ann.tune, up to 64): a shorter grid here
# reports "target not reached" where the library itself reaches it (embed-fmnist needs 32).
from index.ann.tune import RERANK_FACTORS as RF_GRID  # noqa: E402


def recall(found: np.ndarray, gt: np.ndarray, k: int = K) -> float:
    hits = 0
    for f, t in zip(found, gt):
        hits += len(set(f[:k].tolist()) & set(t[:k].tolist()))
    return hits / (k * len(gt))


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_info() -> dict:
    """Where and how a bench ran: recorded at the top of every results file."""
    return {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "cores": os.cpu_count(), "command": " ".join(sys.argv)}


def write_results(path: str | Path, results: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {path}")


def timed(fn, q: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    out = []
    t0 = time.perf_counter()
    for a in range(0, len(q), batch):
        out.append(fn(q[a:a + batch]))
    return time.perf_counter() - t0, np.vstack(out)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_dataset(name: str, args) -> dict:
    import faiss
    import hnswlib

    from index.ann.build import build_version
    from index.ann.search import open_index
    from index.ann.sources import npy_source

    faiss.omp_set_num_threads(args.threads)
    ds = datasets.load(name)
    base = np.ascontiguousarray(ds.base, dtype=np.float32)
    n, d = base.shape
    q = ds.queries[: args.nq]
    gt = ds.gt[: args.nq, :K]
    ip = ds.metric == "ip"
    mt = faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2
    print(f"\n## {name}: {n} x {d}, {len(q)} queries, metric {ds.metric}", flush=True)
    res = {"dataset": name, "n": n, "d": d, "nq": len(q), "metric": ds.metric, "meta": ds.meta, "methods": {}}

    # exact
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(d) if ip else faiss.IndexFlatL2(d)
    flat.add(base)
    exact_build = time.perf_counter() - t0

    # imgsearch build (auto factory) into a temp root
    root = tempfile.mkdtemp(prefix=f"bench-{name}-", dir=args.workdir)
    t0 = time.perf_counter()
    r = build_version(npy_source(str(ds.folder / "base.npy"), metric=ds.metric), root, factory=args.factory,
                      gpu="off", target_recall=args.target)
    img_build = time.perf_counter() - t0
    m = r.manifest
    idx = open_index(root)
    print(f"imgsearch build {img_build:.1f}s factory {m['factory']} auto-tuned {m['search_defaults']} "
          f"(recall {m['measured_recall']}); bytes/vector {m['bytes_per_vector']}", flush=True)
    nlist = int(m.get("nlist") or 0)
    reranked = m.get("rerank") is not None

    # raw faiss over the same shard files
    shard = m["shard_files"][0]
    raw = faiss.read_index(os.path.join(r.path, shard["index"]))
    rows_to_ids = np.fromfile(os.path.join(r.path, shard["ids"]), dtype=np.int64)
    refine = None
    if reranked:
        sq = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, mt)
        sq.add(base[rows_to_ids])
        refine = faiss.IndexRefine(raw, sq)
    ivf = faiss.extract_index_ivf(raw) if nlist else None

    # operating point: grid over (rf, nprobe) for imgsearch, best QPS at >= target
    grid = []
    probes = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256) if not nlist or p <= nlist] if nlist else [1]
    for rf in (RF_GRID if reranked else (1,)):
        for p in probes:
            dt, ids = timed(lambda x, p=p, rf=rf: idx.search(x, K, nprobe=p, rerank_factor=rf)[1], q, args.batch)
            rec = recall(ids, gt)
            grid.append({"nprobe": p, "rerank_factor": rf, "recall": round(rec, 4), "qps": round(len(q) / dt)})
            if rec >= args.target:
                break
    ok = [g for g in grid if g["recall"] >= args.target] or [max(grid, key=lambda g: g["recall"])]
    op = max(ok, key=lambda g: g["qps"])
    nprobe, rf = op["nprobe"], op["rerank_factor"]
    print(f"operating point nprobe={nprobe} rerank_factor={rf} (grid recall {op['recall']})", flush=True)
    res["grid"] = grid

    if ivf is not None:
        ivf.nprobe = nprobe
        hnsw_q = faiss.downcast_index(ivf.quantizer)
        if isinstance(hnsw_q, faiss.IndexHNSW):
            hnsw_q.hnsw.efSearch = max(2 * nprobe, 16)  # as imgsearch's search_params
    if refine is not None:
        refine.k_factor = rf

    # hnswlib: tune M and ef
    hn_best = None
    for M in args.hnsw_m:
        t0 = time.perf_counter()
        h = hnswlib.Index(space="ip" if ip else "l2", dim=d)
        h.init_index(max_elements=n, M=M, ef_construction=args.ef_construction, random_seed=0)
        h.set_num_threads(args.threads)
        h.add_items(base, np.arange(n))
        hb = time.perf_counter() - t0
        path = os.path.join(root, f"hnsw{M}.bin")
        h.save_index(path)
        hbytes = os.path.getsize(path) / n
        os.remove(path)
        chosen = None
        for ef in EF_GRID:
            h.set_ef(max(ef, K))
            dt, ids = timed(lambda x, h=h: h.knn_query(x, K)[0].astype(np.int64), q, args.batch)
            rec = recall(ids, gt)
            if rec >= args.target:
                chosen = (ef, rec, len(q) / dt)
                break
        if chosen is None:
            chosen = (ef, rec, len(q) / dt)
        print(f"hnswlib M={M} efC={args.ef_construction}: build {hb:.1f}s, {hbytes:.1f} B/vec, ef={chosen[0]} "
              f"R@10={chosen[1]:.4f} QPS~{chosen[2]:.0f}", flush=True)
        cand = {"M": M, "ef": chosen[0], "build_s": hb, "bytes": hbytes, "index": h, "qps0": chosen[2],
                "reached": chosen[1] >= args.target}
        if hn_best is None or (cand["reached"], cand["qps0"]) > (hn_best["reached"], hn_best["qps0"]):
            hn_best = cand
        else:
            del h
    h = hn_best["index"]
    h.set_ef(max(hn_best["ef"], K))

    methods = {
        "exact": (lambda x: flat.search(x, K)[1], exact_build, 4.0 * d,
                  f"IndexFlat{'IP' if ip else 'L2'}"),
        "hnswlib": (lambda x: h.knn_query(x, K)[0].astype(np.int64), hn_best["build_s"], hn_best["bytes"],
                     f"M={hn_best['M']} efC={args.ef_construction} ef={hn_best['ef']}"),
    }
    raw_desc = f"{m['factory']} nprobe={nprobe}"
    if refine is not None:
        methods["faiss raw"] = (lambda x: rows_to_ids[refine.search(x, K)[1]], None, None,
                                f"IndexRefine({raw_desc}, SQfp16) k_factor={rf}")
        methods["faiss raw PQ only"] = (lambda x: rows_to_ids[raw.search(x, K)[1]], None, None, raw_desc)
    else:
        methods["faiss raw"] = (lambda x: raw.search(x, K)[1] if nlist else
                                rows_to_ids[np.maximum(raw.search(x, K)[1], 0)], None, None, raw_desc)
    methods["imgsearch"] = (lambda x: idx.search(x, K, nprobe=nprobe, rerank_factor=rf)[1], img_build,
                            m["bytes_per_vector"]["ram"], f"{m['factory']} nprobe={nprobe} rerank={rf}")

    best = {k: float("inf") for k in methods}
    lat = {k: float("inf") for k in methods}
    recs = {}
    ql = q[: args.latency_queries]
    for _ in range(args.rounds):
        for k, (fn, *_rest) in methods.items():
            dt, ids = timed(fn, q, args.batch)
            best[k] = min(best[k], dt)
            recs[k] = recall(ids, gt)
            dt1, _ = timed(fn, ql, 1)
            lat[k] = min(lat[k], dt1 / len(ql))
    out = {}
    for k, (_fn, build_s, bpv, desc) in methods.items():
        out[k] = {"desc": desc, "recall@10": round(recs[k], 4), "qps": round(len(q) / best[k], 1),
                  "latency_ms_b1": round(1000 * lat[k], 4),
                  "build_s": None if build_s is None else round(build_s, 1),
                  "ram_bytes_per_vector": None if bpv is None else round(bpv, 2)}
    res["methods"] = out
    res["operating_point"] = {"nprobe": nprobe, "rerank_factor": rf}
    res["imgsearch_manifest"] = {k: m.get(k) for k in ("factory", "nlist", "search_defaults", "measured_recall",
                                                        "bytes_per_vector", "train_seconds", "build_seconds",
                                                        "factory_choice")}
    ex, hn, rw, im = out["exact"], out["hnswlib"], out["faiss raw"], out["imgsearch"]
    res["ratios"] = {
        "imgsearch_qps_vs_exact": round(im["qps"] / ex["qps"], 2),
        "imgsearch_qps_vs_hnswlib": round(im["qps"] / hn["qps"], 2),
        "imgsearch_layer_cost_vs_raw_batched": round(rw["qps"] / im["qps"] - 1, 3),
        "imgsearch_layer_cost_vs_raw_b1": round(im["latency_ms_b1"] / rw["latency_ms_b1"] - 1, 3),
        "imgsearch_layer_us_per_query_b1": round(1000 * (im["latency_ms_b1"] - rw["latency_ms_b1"]), 1),
        "ram_per_vector_vs_hnswlib": round(im["ram_bytes_per_vector"] / hn["ram_bytes_per_vector"], 4),
    }
    print_table(res, args)
    shutil.rmtree(root, ignore_errors=True)
    return res


def print_table(res: dict, args) -> None:
    print(f"\n{res['dataset']}: N={res['n']} d={res['d']} metric={res['metric']} queries={res['nq']} "
          f"batch={args.batch} threads={args.threads}")
    ex = res["methods"]["exact"]
    print(f"| method | config | R@10 | QPS (batch {args.batch}) | x exact | ms/query (batch 1) | build s | RAM B/vec |")
    print("|---|---|---|---|---|---|---|---|")
    for k, v in res["methods"].items():
        bpv = "" if v["ram_bytes_per_vector"] is None else f"{v['ram_bytes_per_vector']:.1f}"
        bs = "" if v["build_s"] is None else f"{v['build_s']:.1f}"
        print(f"| {k} | {v['desc']} | {v['recall@10']:.4f} | {v['qps']:.0f} | {v['qps'] / ex['qps']:.1f} | "
              f"{v['latency_ms_b1']:.3f} | {bs} | {bpv} |")
    print("ratios:", json.dumps(res["ratios"]), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="sift,glove,embed")
    ap.add_argument("--nq", type=int, default=2000, help="queries per dataset (from the held-out set)")
    ap.add_argument("--batch", type=int, default=256, help="queries per search call for throughput")
    ap.add_argument("--latency-queries", type=int, default=200, help="queries timed one at a time")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--factory", default="auto")
    ap.add_argument("--hnsw-m", type=lambda s: [int(v) for v in s.split(",")], default=[16])
    ap.add_argument("--ef-construction", type=int, default=100)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--output", default=str(Path(__file__).resolve().parent / "results" / "bench_index.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("IMGSEARCH_THREADS", str(args.threads))
    results = {**run_info(), "args": vars(args), "datasets": []}
    for name in args.datasets.split(","):
        results["datasets"].append(bench_dataset(name.strip(), args))
    print()
    write_results(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
