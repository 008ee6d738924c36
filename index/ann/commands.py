"""CLI handlers for ``imgsearch build``, ``imgsearch search`` and ``imgsearch verify`` (wired in imgsearch/cli.py)."""

from __future__ import annotations

import io
import json
import logging
import os
import sys

import numpy as np

from imgsearch.atomic import write_bytes_atomic
from imgsearch.errors import BadInput, JobFailed
from index.ann import integrity, versions
from index.ann.build import build_version
from index.ann.factory import parse_bytes
from index.ann.search import open_index
from index.ann.sources import npy_source, store_source
from index.store import CatalogStore, product_results

log = logging.getLogger(__name__)


def _open_store(path: str):
    if not os.path.isdir(path):
        raise BadInput(f"store {path!r} does not exist")
    return CatalogStore.open_readonly(path)


def build_command(args) -> int:
    store = None
    if getattr(args, "store", None):
        if args.ids:
            raise BadInput("--ids goes with --vectors, not --store")
        store = _open_store(args.store)
        source = store_source(store, metric=args.metric)
    else:
        source = npy_source(args.vectors, args.ids, metric=args.metric)
    try:
        # The one writer lock of INDEX_ROOT: a build never publishes while a rebuild (or build) runs.
        with versions.index_root_lock(args.index_root):
            result = build_version(
                source, args.index_root, factory=args.factory, shards=args.shards, metric=args.metric,
                target_recall=args.target_recall, gpu=args.gpu,
                memory_budget=parse_bytes(getattr(args, "memory_budget", None)),
                seed=getattr(args, "seed", 0) or 0, build_notes={"job": "build"})
    finally:
        if store is not None and hasattr(store, "close"):
            store.close()
    m = result.manifest
    print(f"built {result.version}: {m['ntotal']} vectors, {m['factory']}, {m['shards']} shard(s), "
          f"recall@10 {m['measured_recall']:.3f} at nprobe={m['search_defaults']['nprobe']} "
          f"rerank={m['search_defaults']['rerank_factor']}, {m['build_seconds']:.1f}s")
    return 0


def _load_queries(path: str) -> np.ndarray:
    try:
        q = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise BadInput(f"cannot read query vectors {path!r}: {exc}") from None
    if q.ndim != 2 or q.dtype not in (np.float32, np.uint8, np.float64):
        raise BadInput(f"{path!r}: expected an n x d float32 or uint8 array, got {q.dtype} {q.shape}")
    return np.ascontiguousarray(q, dtype=np.float32)


def _save_npz_atomic(path: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path if path.endswith(".npz") else path, buf.getvalue())


def search_command(args) -> int:
    if args.images and args.vectors:
        raise BadInput("give IMAGE arguments or --vectors Q.npy, not both")
    if args.images:
        return _search_images(args)
    if not args.vectors:
        raise BadInput("give IMAGE arguments or --vectors Q.npy")
    queries = _load_queries(args.vectors)
    deleted = None
    store = None
    if args.store:
        store = _open_store(args.store)
        deleted = np.fromiter(store.deleted_ids(), dtype=np.int64) if hasattr(store, "deleted_ids") else None
    idx = open_index(args.index_root, deleted_ids=deleted)
    scores, ids = idx.search(queries, args.k)
    if store is not None and hasattr(store, "close"):
        store.close()
    if args.output:
        _save_npz_atomic(args.output, ids=ids.astype(np.int64), scores=scores.astype(np.float32))
        print(f"wrote {ids.shape[0]} x {ids.shape[1]} results from version {idx.version} to {args.output}")
    else:
        for row_ids, row_scores in zip(ids, scores):
            keep = row_ids >= 0
            print(json.dumps({"ids": row_ids[keep].tolist(), "scores": row_scores[keep].tolist()}))
        sys.stdout.flush()
    return 0


def _search_images(args) -> int:
    """One JSON object per query image, shaped like the HTTP response: the same detect -> crop ->
    embed path as the server, results of the region that matches best, every detection listed."""
    import time

    from embed.pipeline import best_cosines, load_pipeline

    pipeline = load_pipeline(getattr(args, "model", None))
    store = _open_store(args.store) if args.store else None
    deleted = np.fromiter(store.deleted_ids(), dtype=np.int64) if store is not None else None
    idx = open_index(args.index_root, deleted_ids=deleted)
    indexed_model = idx.manifest.get("model")
    if indexed_model and indexed_model != pipeline.model_hash:
        log.warning("version %s was embedded by model %s but queries use %s: scores are not comparable",
                    idx.version, str(indexed_model)[:12], pipeline.model_hash[:12])
    for image in args.images:
        t0 = time.perf_counter()
        (query,) = pipeline.embed_queries([image])
        if query.vectors.shape[-1] != idx.dim:
            raise BadInput(f"the model makes {query.vectors.shape[-1]}-d vectors, version {idx.version} holds {idx.dim}-d")
        # Several images may share a product: fetch extra, keep each product's best image.
        scores, ids = idx.search(query.vectors.astype(np.float32), min(4 * args.k, 10_000))
        chosen = query.choose(best_cosines(scores, ids, higher_is_better=idx.manifest.get("metric") == "ip"))
        results = _join(store, scores[chosen], ids[chosen], args.k)
        print(json.dumps({"query": image, "index_version": idx.version,
                          "took_ms": round(1000 * (time.perf_counter() - t0), 3),
                          "detections": query.detections(), "region": query.region(chosen), "results": results}))
    if store is not None and hasattr(store, "close"):
        store.close()
    return 0


def _join(store, scores, ids, k: int) -> list[dict]:
    if store is not None:
        return product_results(store, scores, ids, k)
    # No store to name products: each id stands for itself.
    return [{"product_id": str(item), "score": round(float(score), 6), "category": None, "image": None, "metadata": {}}
            for score, item in zip(scores.tolist(), ids.tolist()) if item >= 0][:k]


def verify_command(args) -> int:
    """``imgsearch verify INDEX_ROOT [--version V]``: every check on every byte of one version
    (default: the one CURRENT names). One line per problem on stdout; exit 1 when any."""
    root = args.index_root
    if not os.path.isdir(root):
        raise BadInput(f"INDEX_ROOT {root!r} is not a folder")
    name = versions.check_name(args.version) if args.version else versions.read_current(root)
    vdir = os.path.join(root, name)
    if not os.path.isdir(vdir):
        raise BadInput(f"no index version {name!r} in {root!r} (versions: {', '.join(versions.list_versions(root)) or 'none'})")
    report = integrity.verify_version(vdir)
    for line in report.problems + report.notes:
        print(f"{name}: {line}")
    sys.stdout.flush()
    if report.problems:
        raise JobFailed(f"index version {name!r} failed {len(report.problems)} check(s); first: {report.problems[0]}")
    checked = "sizes and sha256 checked" if not report.notes else "structure checked"
    print(f"{name}: ok ({report.files} files, {checked})")
    return 0
