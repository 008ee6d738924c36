"""How much batching can buy on this CPU host: per-item cost at batch 1 vs batch 4, 8, 32, in process.

The HTTP server's micro-batching (``serve/batcher.py``, off by default: ``serve/service.py``
``DEFAULT_BATCH_WINDOW_MS``) groups concurrent queries so the detector, the embedder and the
faiss search each run once per batch. Whatever it saves over HTTP, it cannot save more than
the stages themselves gain from a larger batch. This script measures that ceiling, with no
HTTP, no threads and no queueing, for three stages:

1. the detector network on ONNX Runtime: ``ProductDetector.detect(photos, threshold)`` (the
   numpy resize + normalise per photo, one network run per call, the postprocess per photo),
   the pretrained detector (ImageNet trunk, untrained heads: the weights do not change the
   cost) or, with ``--model CKPT``, the checkpoint's via ``load_pipeline``;
2. the embedder on ONNX Runtime: ``Embedder.embed(photos)`` (letterbox + normalise per photo,
   one network run per call);
3. faiss search through the project's own searcher (``index.ann.build.build_version`` with
   ``index.ann.factory.choose_factory``'s pick, ``index.open_index(...).search(q, k, nprobe=...)``)
   on ``--n`` synthetic 128-d vectors (``bench/datasets.py``'s Gaussian mixture, L2-normalised,
   inner product like the served embeddings), single-threaded like a server worker
   (``serve.commands.FAISS_THREADS``).

Inputs: the held-out query photos of the full sample set (``bench/datasets.py``: built on first
use, then reused), decoded once up front; the network stages see ``--photos`` of them, the
search ``--queries`` fresh vectors from the same mixture.
At batch B each pass runs all inputs in calls of B, and the per-item cost is the pass time
over the input count. Every round runs every (stage, batch) pass once, in an order that
rotates from round to round, so load drift from the other jobs on the 2 shared cores hits all
alike; each pass keeps its best round. Compare ratios within one run only. The built index is
cached under ``$IMGSEARCH_CACHE/bench/batching-<n>-<factory>/``.

    .venv/bin/python bench/bench_batching.py [--rounds 5] [--photos 32] [--n 200000] [--nprobe 32] [--k 10]
                                             [--model CKPT] [--output results.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before faiss / torch load their OpenMP runtime

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from imgsearch import assets  # noqa: E402
from imgsearch.argtypes import positive_int  # noqa: E402

THREADS = 2  # ONNX Runtime intra-op threads (torch.get_num_threads), as a server worker on this host
FAISS_THREADS = 1  # serve.commands.FAISS_THREADS: each worker searches single-threaded
BATCHES = (1, 4, 8, 32)
STAGES = ("detector", "embedder", "faiss")
DIM = 128
TUNE_QUERIES = 200


def load_avg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def machine() -> dict:
    return {"nproc": os.cpu_count(), "load_avg": [round(v, 2) for v in os.getloadavg()],
            "cpu": _cpu_model(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": _version("onnxruntime"), "faiss": _version("faiss")}


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - informational only
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def query_photos(n: int) -> list:
    """The full sample set's held-out query photos (the set is built on first use), decoded (``load_rgb``) once."""
    import datasets  # bench/datasets.py

    from embed.image_io import load_rgb
    from train.evaluate import RetrievalSet

    paths = RetrievalSet.from_sample_set(datasets.full_sample_set()).query_images[:n]
    return [load_rgb(p) for p in paths]


def load_models(model: Path | None):
    """(detector, embedder), both on ONNX Runtime, as the server loads them."""
    from embed.detector import ProductDetector
    from embed.pipeline import load_embedder, load_pipeline

    if model is None:
        embedder, detector = load_embedder(None, device="cpu", runtime="onnxruntime"), None
    else:
        pipeline = load_pipeline(str(model), device="cpu", runtime="onnxruntime")
        embedder, detector = pipeline.embedder, pipeline.detector
        if detector is None:
            print(f"  {model} carries no detector: timing the pretrained one")
    if detector is None:
        detector = ProductDetector.pretrained()
        detector.use_runtime("onnxruntime", threads=THREADS)
    if detector.runtime != "onnxruntime" or embedder.runtime != "onnxruntime":
        raise SystemExit(f"ONNX Runtime unavailable (detector {detector.runtime}, embedder {embedder.runtime}): "
                         "install the onnx extra")
    return detector, embedder


def synth_vectors(n: int, stream: int) -> np.ndarray:
    """bench/datasets.py's 128-d Gaussian mixture, L2-normalised (the served embeddings are unit vectors)."""
    import datasets

    x = datasets.synth_draw(n, stream, DIM)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(x, dtype=np.float32)


def open_search_index(n: int, factory: str):
    """An index version of ``n`` synthetic vectors built by the project's builder (cached), opened."""
    from index import open_index, versions
    from index.ann.build import build_version, resolve_factory
    from index.ann.sources import array_source

    choice = resolve_factory(factory, n, DIM, "ip", None)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", choice.factory).strip("_")
    root = assets.cache_dir() / "bench" / f"batching-{n}-{slug}"
    if "v1" not in versions.list_versions(str(root)):
        import faiss

        root.mkdir(parents=True, exist_ok=True)
        print(f"  building {choice.factory} on {n} vectors into {root} (once) ...", flush=True)
        t0 = time.monotonic()
        faiss.omp_set_num_threads(THREADS)  # k-means on both cores; searching is single-threaded again below
        build_version(array_source(synth_vectors(n, 0), metric="ip", description=f"batching-{n}"), str(root),
                      factory=choice.factory, target_recall=0.95, gpu="off", version="v1",
                      tune_queries=synth_vectors(TUNE_QUERIES, 1_000_001))
        print(f"  built in {time.monotonic() - t0:.0f} s", flush=True)
        faiss.omp_set_num_threads(FAISS_THREADS)
    return open_index(str(root), "v1")


def chunks(items, size: int):
    return [items[i:i + size] for i in range(0, len(items), size)]


def make_passes(detector, embedder, index, photos: list, queries: np.ndarray, threshold: float,
                k: int, nprobe: int) -> dict:
    """(stage, batch) -> (a function running every input once in calls of that batch, items per pass).

    Batches larger than the inputs are left out (they would time a smaller batch).
    """
    passes = {}
    for stage in STAGES:
        items = queries if stage == "faiss" else photos
        for b in BATCHES:
            if b > len(items):
                print(f"  {stage}: batch {b} left out (only {len(items)} inputs)")
                continue
            calls = chunks(items, b)
            if stage == "detector":
                fn = lambda calls=calls: [detector.detect(c, threshold) for c in calls]  # noqa: E731
            elif stage == "embedder":
                fn = lambda calls=calls: [embedder.embed(c, batch_size=len(c)) for c in calls]  # noqa: E731
            else:
                fn = lambda calls=calls: [index.search(c, k, nprobe=nprobe) for c in calls]  # noqa: E731
            passes[(stage, b)] = (fn, len(items))
    return passes


def measure(passes: dict, rounds: int) -> dict:
    """(stage, batch) -> seconds per item of each round; every round runs every pass once, order rotating."""
    keys = list(passes)
    for key in keys:  # warm-up: ONNX Runtime's first run at a new batch shape, faiss' first touch of the lists
        passes[key][0]()
    times = {key: [] for key in keys}
    for r in range(rounds):
        shift = (r * len(keys)) // rounds
        order = keys[shift:] + keys[:shift]
        if r % 2:
            order.reverse()
        for key in order:
            fn, items = passes[key]
            start = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - start) / items)
    return times


def table(times: dict) -> list[dict]:
    rows = []
    for (stage, batch), values in times.items():
        best = min(values)
        base = min(times[(stage, 1)])
        rows.append({"stage": stage, "batch": batch, "ms_per_item": 1e3 * best,
                     "ms_per_item_median": 1e3 * float(np.median(values)), "x_batch1": base / best,
                     "rounds_ms": [round(1e3 * v, 4) for v in values]})
    return rows


def print_table(rows: list[dict], labels: dict) -> None:
    print("\n| stage | batch | ms per item | x batch 1 |")
    print("|---|---:|---:|---:|")
    for row in rows:
        digits = 3 if row["ms_per_item"] < 1 else 2
        print(f"| {labels[row['stage']]} | {row['batch']} | {row['ms_per_item']:.{digits}f} | {row['x_batch1']:.2f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=5, help="timed rounds; each pass keeps its best (default 5)")
    parser.add_argument("--photos", type=positive_int, default=32, help="query photos per network pass (default 32)")
    parser.add_argument("--queries", type=positive_int, default=256, help="query vectors per faiss pass (default 256)")
    parser.add_argument("--n", type=positive_int, default=200_000, help="synthetic vectors in the index (default 200000)")
    parser.add_argument("--factory", default="auto", help="faiss factory string (default: index.ann.factory.choose_factory's)")
    parser.add_argument("--nprobe", type=positive_int, default=32)
    parser.add_argument("--k", type=positive_int, default=10)
    parser.add_argument("--threshold", type=float, default=None,
                        help="detector score threshold (default: the detector's own)")
    parser.add_argument("--model", type=Path, default=None, metavar="CKPT",
                        help="a checkpoint (load_pipeline); default: the pretrained detector and embedder")
    parser.add_argument("--output", type=Path, default=None, metavar="JSON", help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.model is not None and not args.model.is_file():
        parser.error(f"no checkpoint at {args.model}")
    logging.basicConfig(level=logging.WARNING)
    import faiss

    torch.set_num_threads(THREADS)
    faiss.omp_set_num_threads(FAISS_THREADS)
    load_before = load_avg()
    print(f"load {load_before}; {os.cpu_count()} cores (shared); ONNX Runtime {THREADS} threads, "
          f"faiss {FAISS_THREADS} thread; best of {args.rounds} rounds, interleaved")

    photos = query_photos(args.photos)
    detector, embedder = load_models(args.model)
    threshold = detector.config.score_threshold if args.threshold is None else args.threshold
    index = open_search_index(args.n, args.factory)
    queries = synth_vectors(args.queries, 1_000_000)
    factory = index.manifest["factory"]
    rerank = index.manifest.get("search_defaults", {}).get("rerank_factor")
    sizes = np.array([im.size for im in photos])
    print(f"{len(photos)} query photos ({sizes.min(0)}..{sizes.max(0)} px); detector {detector.config.arch}-"
          f"{detector.config.image_size} threshold {threshold}; embedder {embedder.config.image_size} px, dim {embedder.dim}; "
          f"index {factory} ({index.ntotal} vectors, ip), nprobe {args.nprobe}, k {args.k}, rerank x{rerank}, "
          f"{len(queries)} queries")

    passes = make_passes(detector, embedder, index, photos, queries, threshold, args.k, args.nprobe)
    t0 = time.monotonic()
    times = measure(passes, args.rounds)
    rows = table(times)
    labels = {"detector": f"detector ({detector.config.arch}-{detector.config.image_size}, ORT)",
              "embedder": f"embedder ({embedder.config.image_size} px, ORT)",
              "faiss": f"faiss {factory}, nprobe {args.nprobe}, k {args.k}"}
    print_table(rows, labels)
    load_after = load_avg()
    print(f"\n{time.monotonic() - t0:.0f} s of timing; load {load_before} before, {load_after} after")

    if args.output is not None:
        result = {
            "date": datetime.date.today().isoformat(),
            "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
            "machine": machine() | {"load_avg_before": load_before, "load_avg_after": load_after},
            "settings": {"rounds": args.rounds, "photos": len(photos), "queries": len(queries), "n": index.ntotal,
                         "factory": factory, "nprobe": args.nprobe, "k": args.k, "rerank_factor": rerank,
                         "threshold": threshold, "model": str(args.model) if args.model else None,
                         "ort_threads": THREADS, "faiss_threads": FAISS_THREADS, "batches": list(BATCHES)},
            "stage_labels": labels,
            "rows": rows,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
