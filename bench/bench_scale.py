"""Scale curve: build time, peak RSS, RAM and QPS at recall@10 >= 0.95 for each size; then
k=10,000 at 1M (recall@10000 against exact search, per-query time); then the 1B extrapolation.
``--dataset synth`` (default): bench/datasets.py ``synth-<N>`` (seeded Gaussian mixture, l2);
``--dataset sift``: the real-SIFT ladder ``sift-<N>`` (uint8 base streamed from its memmap, l2),
plus page-cache cold and warm QPS of the version opened memory-mapped.

For each size: ``build_version(npy_source(...), factory=--factory)`` (auto by default), then the
cheapest measured (nprobe, rerank_factor) reaching the target on the synthetic queries.
RAM = the version's ``bytes_per_vector['ram']`` (codes + ids + amortised quantizer, as opened)
and the process RSS growth after ``open_index``.

    .venv/bin/python bench/bench_scale.py                        # 100k and 1M
    .venv/bin/python bench/bench_scale.py --sizes 100k,1m,5m     # + 5M (long: run in background)
    .venv/bin/python bench/bench_scale.py --factory-at '1m=IVF4096_HNSW32,PQ64x4fs'  # one size's factory
    .venv/bin/python bench/datasets.py sift-1m && .venv/bin/python bench/bench_scale.py --dataset sift --sizes 1m
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets  # noqa: E402
from bench_index import recall, rss_bytes, run_info, timed, write_results  # noqa: E402

K = 10


def _status_kb(*keys: str) -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0]) * 1024
    return out


class PeakRSS:
    """Peak RSS over a block: VmHWM after resetting it (clear_refs 5), and a 0.1 s sampler of
    RssAnon, since file-backed pages of the memory-mapped base (clean, reclaimable) count in RSS."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.anon, self._stop = 0, threading.Event()
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.1):
            self.anon = max(self.anon, _status_kb("RssAnon")["RssAnon"])

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.hwm = _status_kb("VmHWM")["VmHWM"]
        return False


def drop_cache(folder: str) -> int:
    """Evict ``folder``'s files from the page cache (POSIX_FADV_DONTNEED: these files only, not
    the machine's whole cache); returns the bytes advised. Mapped pages stay: close the index first."""
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total


def fresh_open_rss(root: str, mmap) -> int:
    """RSS growth of ``open_index`` in a new process: after a build, this process' freed heap is
    reused by the open and its growth reads near zero."""
    import subprocess

    code = ("import sys; sys.path.insert(0, sys.argv[1]); from bench_index import rss_bytes; "
            "from index.ann.search import open_index; r = rss_bytes(); idx = open_index(sys.argv[2], mmap="
            f"{mmap!r}); print(rss_bytes() - r)")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent), root],
                         capture_output=True, text=True, check=True, cwd=str(Path(__file__).resolve().parents[1]))
    return int(out.stdout.strip().splitlines()[-1])


def cold_warm(root: str, op: dict, q: np.ndarray, gt: np.ndarray, args) -> dict:
    """QPS of the operating point with the version opened mmap=True: first pass right after the
    version's files left the page cache, then warm passes."""
    import gc

    from index.ann.search import open_index

    dropped = drop_cache(root)
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    idx = open_index(root, mmap=True)
    open_s = time.perf_counter() - t0
    rss_open = rss_bytes() - rss0
    search = lambda x, idx=idx: idx.search(x, K, nprobe=op["nprobe"], rerank_factor=op["rerank_factor"])[1]  # noqa: E731
    cold, ids = timed(search, q, args.batch)
    warm = min(timed(search, q, args.batch)[0] for _ in range(args.rounds))
    out = {"mmap": True, "dropped_bytes": dropped, "open_s": round(open_s, 3),
           "rss_after_open_mb": round(rss_open / 2**20, 1),
           "fresh_process_open_rss_mb": round(fresh_open_rss(root, True) / 2**20, 1), "recall": round(recall(ids, gt), 4),
           "cold_qps": round(len(q) / cold), "warm_qps": round(len(q) / warm)}
    del idx, search
    gc.collect()
    print(f"  mmap serving: open {open_s:.2f}s RSS +{rss_open / 2**20:.0f} MB; cold {out['cold_qps']} QPS, "
          f"warm {out['warm_qps']} QPS", flush=True)
    return out


def bench_size(size: str, args) -> dict:
    import faiss

    from index.ann.build import build_version
    from index.ann.search import open_index
    from index.ann.sources import npy_source

    faiss.omp_set_num_threads(args.threads)
    ds = datasets.load(f"{args.dataset}-{size}")
    # Queries are stored grouped by the scene they came from: a seeded permutation makes the
    # measured and the tuning sets random, disjoint samples of the same held-out scenes.
    order = np.random.default_rng(0).permutation(len(ds.queries))
    q, gt = ds.queries[order[: args.nq]], ds.gt[order[: args.nq], :K]
    root = tempfile.mkdtemp(prefix=f"scale-{size}-", dir=args.workdir)
    t0 = time.perf_counter()
    factory = args.factory_at.get(size, args.factory)
    # npy_source maps the file (uint8 or float32) and hands faiss one float32 block at a time.
    with PeakRSS() as peak:
        if args.tune_queries + args.nq > len(ds.queries):
            raise SystemExit(f"--tune-queries {args.tune_queries} + --nq {args.nq} exceed the {len(ds.queries)} queries")
        tune = ds.queries[order[len(order) - args.tune_queries:]] if args.tune_queries else None
        r = build_version(npy_source(str(ds.folder / "base.npy"), metric="l2"), root, factory=factory, gpu="off",
                          tune_queries=tune)
    build_s = time.perf_counter() - t0
    m = r.manifest
    rss0 = rss_bytes()
    idx = open_index(root)
    rss_open = rss_bytes() - rss0
    nlist = int(m.get("nlist") or 1)
    grid = []
    for rf in args.rerank_grid:
        for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
            if p > nlist:
                break
            dt, ids = timed(lambda x, p=p, rf=rf: idx.search(x, K, nprobe=p, rerank_factor=rf)[1], q, args.batch)
            rec = recall(ids, gt)
            grid.append({"nprobe": p, "rerank_factor": rf, "recall": round(rec, 4), "qps": round(len(q) / dt)})
            if rec >= args.target:
                break
    ok = [g for g in grid if g["recall"] >= args.target] or [max(grid, key=lambda g: g["recall"])]
    op = max(ok, key=lambda g: g["qps"])
    best = min(timed(lambda x: idx.search(x, K, nprobe=op["nprobe"], rerank_factor=op["rerank_factor"])[1],
                     q, args.batch)[0] for _ in range(args.rounds))
    from index.ann.factory import choose_factory

    out = {"size": size, "n": int(m["ntotal"]), "factory": m["factory"],
           "auto_factory": choose_factory(int(m["ntotal"]), int(m["dim"]), metric=m["metric"]).factory, "build_s": round(build_s, 1),
           "train_s": m["train_seconds"], "codes_trial": m.get("codes_trial"),
           "factory_reasons": m["factory_choice"]["reasons"], "bytes_per_vector": m["bytes_per_vector"],
           "build_peak_rss_mb": round(peak.hwm / 2**20, 1), "build_peak_rss_anon_mb": round(peak.anon / 2**20, 1),
           "rss_after_open_mb": round(rss_open / 2**20, 1),
           "fresh_process_open_rss_bytes_per_vector": round(fresh_open_rss(root, "auto") / max(int(m["ntotal"]), 1), 2),
           "operating_point": op,
           "qps": round(len(q) / best), "ms_per_query": round(1000 * best / len(q), 4), "grid": grid}
    print(f"{size}: {m['factory']} build {build_s:.0f}s (train {m['train_seconds']:.0f}s, peak RSS "
          f"{peak.hwm / 2**20:.0f} MB, anon {peak.anon / 2**20:.0f} MB) "
          f"RAM {m['bytes_per_vector']['ram']:.1f} B/vec, RSS +{rss_open / 2**20:.0f} MB; "
          f"nprobe={op['nprobe']} rf={op['rerank_factor']} R@10={op['recall']:.3f} QPS={out['qps']}", flush=True)
    _, at_defaults = idx.search(q, K)  # the manifest's own search_defaults, as a user searches
    out["tuner"] = {"measured_recall": m["measured_recall"], "search_defaults": m["search_defaults"],
                    "held_out_recall": round(recall(at_defaults, gt), 4),
                    "tuning_queries": m.get("tuning_queries"), "coarse_training": m["build_config"].get("coarse_training")}
    print(f"  tuner: measured_recall {m['measured_recall']:.3f} at {m['search_defaults']}, held-out queries "
          f"{out['tuner']['held_out_recall']:.3f}", flush=True)
    if args.peers:
        flat = exact_index(ds)
        out["peers"] = peers(idx, r.path, m, flat, ds, op, q, gt, args)
    if size in args.bigk_at.split(","):
        out["k10000"] = big_k(ds, idx, op, args, q[: args.bigk_queries], flat if args.peers else None)
    flat = None
    if size in args.hnswlib_at.split(","):
        out["hnswlib"] = hnswlib_peer(ds, idx, op, q, gt, args)
    if args.cold_warm:
        del idx
        out["mmap_serving"] = cold_warm(root, op, q, gt, args)
    shutil.rmtree(root, ignore_errors=True)
    return out


def exact_index(ds):
    """The exact peer: an in-RAM IndexFlatL2 over the whole base, filled block by block."""
    import faiss

    base = np.load(ds.folder / "base.npy", mmap_mode="r")
    flat = faiss.IndexFlatL2(base.shape[1])
    for a in range(0, len(base), 1_000_000):
        flat.add(np.ascontiguousarray(base[a:a + 1_000_000], np.float32))
    return flat


def peers(idx, path: str, m: dict, flat, ds, op: dict, q: np.ndarray, gt: np.ndarray, args) -> dict:
    """imgsearch, raw faiss over the same shard file (IndexRefine with an fp16 copy, the same
    nprobe and k_factor) and exact search on a query sample, timed in interleaved rounds."""
    import faiss

    shard = m["shard_files"][0]
    raw = faiss.read_index(os.path.join(path, shard["index"]))
    rows_to_ids = np.fromfile(os.path.join(path, shard["ids"]), dtype=np.int64)
    base = np.load(ds.folder / "base.npy", mmap_mode="r")
    sq = faiss.IndexScalarQuantizer(base.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
    for a in range(0, len(rows_to_ids), 1_000_000):
        sq.add(np.ascontiguousarray(base[rows_to_ids[a:a + 1_000_000]], np.float32))
    ivf = faiss.extract_index_ivf(raw)
    ivf.nprobe = op["nprobe"]
    coarse_q = faiss.downcast_index(ivf.quantizer)
    if isinstance(coarse_q, faiss.IndexHNSW):
        coarse_q.hnsw.efSearch = max(2 * op["nprobe"], 16)  # as imgsearch's search_params
    refine = faiss.IndexRefine(raw, sq)
    refine.k_factor = op["rerank_factor"]
    qe, gte = q[: args.exact_queries], gt[: args.exact_queries]
    methods = {
        "imgsearch": (lambda x: idx.search(x, K, nprobe=op["nprobe"], rerank_factor=op["rerank_factor"])[1], q, gt),
        "faiss raw": (lambda x: rows_to_ids[refine.search(x, K)[1]], q, gt),
        "exact": (lambda x: flat.search(x, K)[1], qe, gte),
    }
    best, recs = {k: float("inf") for k in methods}, {}
    for _ in range(args.rounds):
        for name, (fn, qq, gg) in methods.items():
            dt, ids = timed(fn, qq, args.batch)
            best[name], recs[name] = min(best[name], dt / len(qq)), recall(ids, gg)
    out = {name: {"recall": round(recs[name], 4), "ms_per_query": round(1000 * best[name], 4),
                  "qps": round(1 / best[name]), "queries": len(methods[name][1])} for name in methods}
    out["imgsearch_vs_raw_qps"] = round(best["faiss raw"] / best["imgsearch"], 3)
    out["imgsearch_vs_exact_qps"] = round(best["exact"] / best["imgsearch"], 1)
    print("  peers: " + ", ".join(f"{k} R@10 {v['recall']:.3f} {v['qps']} QPS" for k, v in out.items()
                                  if isinstance(v, dict)), flush=True)
    return out


def hnswlib_peer(ds, idx, op: dict, q: np.ndarray, gt: np.ndarray, args) -> dict:
    """hnswlib (M=16, efC 100, built from the base in blocks), the smallest ef reaching the target,
    timed interleaved with imgsearch at its operating point; RAM = its saved index size."""
    import hnswlib

    base = np.load(ds.folder / "base.npy", mmap_mode="r")
    n, d = base.shape
    t0 = time.perf_counter()
    h = hnswlib.Index(space="l2", dim=d)
    h.init_index(max_elements=n, M=16, ef_construction=100, random_seed=0)
    h.set_num_threads(args.threads)
    for a in range(0, n, 500_000):
        h.add_items(np.ascontiguousarray(base[a:a + 500_000], np.float32), np.arange(a, min(a + 500_000, n)))
        print(f"  hnswlib: {min(a + 500_000, n):,} / {n:,} added, {time.perf_counter() - t0:.0f}s", flush=True)
    build_s = time.perf_counter() - t0
    ef, rec = None, 0.0
    for ef in (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512):
        h.set_ef(max(ef, K))
        _, ids = timed(lambda x: h.knn_query(x, K)[0].astype(np.int64), q, args.batch)
        if (rec := recall(ids, gt)) >= args.target:
            break
    fns = {"imgsearch": lambda x: idx.search(x, K, nprobe=op["nprobe"], rerank_factor=op["rerank_factor"])[1],
           "hnswlib": lambda x: h.knn_query(x, K)[0].astype(np.int64)}
    best = {k: float("inf") for k in fns}
    for _ in range(args.rounds):
        for k, fn in fns.items():
            best[k] = min(best[k], timed(fn, q, args.batch)[0])
    path = os.path.join(tempfile.mkdtemp(dir=args.workdir), "hnsw.bin")
    h.save_index(path)
    ram = os.path.getsize(path) / n
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    out = {"M": 16, "ef_construction": 100, "ef": ef, "recall": round(rec, 4), "build_s": round(build_s, 1),
           "ram_bytes_per_vector": round(ram, 1), "qps": round(len(q) / best["hnswlib"]),
           "imgsearch_qps": round(len(q) / best["imgsearch"]),
           "imgsearch_vs_hnswlib_qps": round(best["hnswlib"] / best["imgsearch"], 3)}
    print(f"  hnswlib: build {build_s:.0f}s, ef={ef} R@10 {rec:.3f}, {out['qps']} QPS, {ram:.0f} B/vec; "
          f"imgsearch {out['imgsearch_qps']} QPS ({out['imgsearch_vs_hnswlib_qps']}x)", flush=True)
    return out


def big_k(ds, idx, op, args, q: np.ndarray, flat=None) -> dict:
    """k=10,000: recall@10000 against exact top-10000, per-query time. With ``flat`` (the in-RAM
    exact peer) that is both the truth and the exact time; else faiss knn per base block."""
    kk = 10_000
    from sift_blocks import blocked_knn

    t0 = time.perf_counter()
    if flat is not None:
        _, truth = flat.search(q, kk)
    else:
        _, truth = blocked_knn(q, np.load(ds.folder / "base.npy", mmap_mode="r"), kk)
    exact_s = (time.perf_counter() - t0) / len(q)
    rows = []
    own = idx.manifest.get("search_defaults_big_k")
    points = ([(own["nprobe"], own["rerank_factor"])] if own else []) + list(args.bigk_points)
    for nprobe, rf in points:
        t0 = time.perf_counter()
        _, ids = idx.search(q, kk, nprobe=nprobe, rerank_factor=rf)
        dt = (time.perf_counter() - t0) / len(q)
        rec = float(np.mean([len(np.intersect1d(a, b)) / kk for a, b in zip(ids, truth)]))
        rows.append({"nprobe": nprobe, "rerank_factor": rf, "recall@10000": round(rec, 4),
                     "ms_per_query": round(1000 * dt, 1)})
        print(f"k=10000: nprobe={nprobe} rf={rf}: recall@10000={rec:.4f}, {1000 * dt:.1f} ms/query "
              f"(exact flat: {1000 * exact_s:.0f} ms/query)", flush=True)
    return {"queries": len(q), "exact_ms_per_query": round(1000 * exact_s, 1), "exact": "in-RAM IndexFlatL2" if flat
            is not None else "faiss knn per base block", "build_point": own and {k: own[k] for k in ("nprobe", "rerank_factor",
            "measured_recall")}, "points": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=("synth", "sift"), default="synth",
                    help="synth: synth-<N> Gaussian mixture; sift: the real-SIFT ladder sift-<N>")
    ap.add_argument("--sizes", default="100k,1m")
    ap.add_argument("--cold-warm", action=argparse.BooleanOptionalAction, default=None,
                    help="also measure page-cache cold/warm QPS opened mmap=True (default: on for sift)")
    ap.add_argument("--factory", default="auto")
    ap.add_argument("--factory-at", action="append", default=[], metavar="SIZE=FACTORY",
                    help="factory for one size only, e.g. '1m=IVF4096_HNSW32,PQ64x4fs' (repeatable)")
    ap.add_argument("--nq", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--rerank-grid", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4, 8, 16, 32, 64],
                    help="rerank factors tried (with nprobe 1..1024 each, up to nlist) for the operating point")
    ap.add_argument("--bigk-at", default="1m", help="sizes (comma list) that also measure k=10,000")
    ap.add_argument("--hnswlib-at", default="", help="sizes (comma list) that also build and time hnswlib")
    ap.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                    help="time raw faiss (same factory and files) and exact search beside imgsearch")
    ap.add_argument("--tune-queries", type=int, default=0,
                    help="tune the build on N dataset queries (as build --tune-queries), disjoint from the --nq"
                         " measured ones; 0: the build's own leave-one-out rows")
    ap.add_argument("--exact-queries", type=int, default=256, help="query sample for the exact peer")
    ap.add_argument("--bigk-queries", type=int, default=20)
    ap.add_argument("--bigk-points", type=lambda s: [tuple(int(v) for v in p.split("x")) for p in s.split(",")],
                    default=[(256, 2), (512, 2), (1024, 1), (1024, 2)], help="nprobe x rerank_factor list, e.g. 64x1,256x2")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--output", default=None, help="default bench/results/bench_scale[_sift].json")
    args = ap.parse_args(argv)
    if args.output is None:
        suffix = "" if args.dataset == "synth" else f"_{args.dataset}"
        args.output = str(Path(__file__).resolve().parent / "results" / f"bench_scale{suffix}.json")
    if args.cold_warm is None:
        args.cold_warm = args.dataset == "sift"
    args.factory_at = dict(v.split("=", 1) for v in args.factory_at)
    os.environ.setdefault("IMGSEARCH_THREADS", str(args.threads))
    res = {**run_info(), "args": {k: str(v) for k, v in vars(args).items()}, "sizes": []}
    for size in args.sizes.split(","):
        res["sizes"].append(bench_size(size.strip(), args))
    print("\n| N | factory | build s | train s | peak RSS MB | RAM B/vec | disk B/vec | nprobe | rerank | R@10 | QPS"
          " | ms/query | raw faiss QPS | exact QPS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in res["sizes"]:
        b, op, pe = s["bytes_per_vector"], s["operating_point"], s.get("peers", {})
        print(f"| {s['n']:,} | {s['factory']} | {s['build_s']:.0f} | {s['train_s']:.0f} | {s['build_peak_rss_mb']:.0f} | "
              f"{b['ram']:.1f} | {b['disk']:.0f} | {op['nprobe']} | {op['rerank_factor']} | {op['recall']:.3f} | "
              f"{s['qps']} | {s['ms_per_query']} | {pe.get('faiss raw', {}).get('qps', '-')} | "
              f"{pe.get('exact', {}).get('qps', '-')} |")
    for a, b in zip(res["sizes"], res["sizes"][1:]):
        growth = b["ms_per_query"] / a["ms_per_query"]
        res.setdefault("cost_growth", []).append({"from": a["size"], "to": b["size"], "ratio": round(growth, 2),
                                                  "sqrt_n_ratio": round((b["n"] / a["n"]) ** 0.5, 2)})
        print(f"per-query cost {a['size']} -> {b['size']}: {growth:.2f}x (sqrt of the size ratio: "
              f"{(b['n'] / a['n']) ** 0.5:.2f}x)")
    write_results(args.output, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
