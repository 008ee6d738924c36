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
from index.ann.build import build_version, resolve_factory
from index.ann.factory import parse_bytes
from index.ann.limits import DISTINCT_WIDEN_FACTOR, distinct_fetch, widen
from index.ann.rerank import clip_unit_scores
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
        tune_queries = _tune_queries(getattr(args, "tune_queries", None), source.dim)
        budget = parse_bytes(getattr(args, "memory_budget", None))
        # Bad factory or budget: refused before INDEX_ROOT (and its lock file) exists.
        resolve_factory(args.factory, source.n, source.dim, args.metric or source.default_metric, budget)
        # The one writer lock of INDEX_ROOT: a build never publishes while a rebuild (or build) runs.
        with versions.index_root_lock(args.index_root):
            result = build_version(
                source, args.index_root, factory=args.factory, shards=args.shards, metric=args.metric,
                target_recall=args.target_recall, gpu=args.gpu,
                memory_budget=budget, seed=getattr(args, "seed", 0) or 0, build_notes={"job": "build"},
                tune_queries=tune_queries)
    finally:
        if store is not None and hasattr(store, "close"):
            store.close()
    m = result.manifest
    print(f"built {result.version}: {m['ntotal']} vectors, {m['factory']}, {m['shards']} shard(s), "
          f"recall@10 {m['measured_recall']:.3f} at nprobe={m['search_defaults']['nprobe']} "
          f"rerank={m['search_defaults']['rerank_factor']}, {m['build_seconds']:.1f}s")
    return 0


def _tune_queries(path: str | None, dim: int) -> np.ndarray | None:
    """``--tune-queries``: checked before INDEX_ROOT is touched."""
    if path is None:
        return None
    q = _load_queries(path)
    if q.shape[1] != dim or len(q) == 0:
        raise BadInput(f"--tune-queries {path!r} holds {len(q)} x {q.shape[1]} vectors; the index is {dim}-d "
                       f"and needs at least one")
    if not np.isfinite(q).all():
        raise BadInput(f"--tune-queries {path!r} holds NaN or infinite values")
    return q


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
    write_bytes_atomic(path, buf.getvalue())


def search_command(args) -> int:
    """``imgsearch search``: one JSON object per query (IMAGE or a row of --vectors), its
    ``results`` the HTTP API's distinct products, on stdout or, with ``--output``, in that file
    (``--output R.npz`` with --vectors: the raw ids/scores arrays instead)."""
    if args.images and args.vectors:
        raise BadInput("give IMAGE arguments or --vectors Q.npy, not both")
    if not args.images and not args.vectors:
        raise BadInput("give IMAGE arguments or --vectors Q.npy")
    npz = bool(args.output) and args.output.endswith(".npz")
    if npz and args.images:
        raise BadInput(f"--output {args.output!r}: an .npz holds --vectors results; give IMAGE queries a .jsonl name")
    if args.output:
        folder = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(folder):
            raise BadInput(f"--output {args.output!r}: folder {folder!r} does not exist")
    queries = _load_queries(args.vectors) if args.vectors else None
    idx = open_index(args.index_root)
    store = _known_store(args, idx, announce=not npz)
    try:
        if store is not None:
            idx.delete(np.fromiter(store.deleted_ids(), dtype=np.int64))  # in memory only: the version is read-only
        if npz:
            scores, ids = idx.search(queries, args.k)
            _save_npz_atomic(args.output, ids=ids.astype(np.int64), scores=scores.astype(np.float32))
            print(f"wrote {ids.shape[0]} x {ids.shape[1]} results from version {idx.version} to {args.output}")
            return 0
        answers = _vector_answers(idx, store, queries, args.k) if queries is not None else _image_answers(args, idx, store)
        if args.output:
            lines = [json.dumps(answer) + "\n" for answer in answers]
            write_bytes_atomic(args.output, "".join(lines).encode("utf-8"))
            print(f"wrote results of {len(lines)} queries from version {idx.version} to {args.output}")
        else:
            for answer in answers:
                print(json.dumps(answer), flush=True)
    finally:
        if store is not None:
            store.close()
    return 0


def _known_store(args, idx, *, announce: bool):
    """The store that names the products: ``--store``, else the one the version was built from
    (its manifest's ``store.path``). None, said in one stderr line, when neither is there."""
    if args.store:
        return _open_store(args.store)
    recorded = (idx.manifest.get("store") or {}).get("path")
    if recorded and os.path.isdir(recorded):
        return CatalogStore.open_readonly(recorded)
    if announce:
        why = (f"the store version {idx.version} was built from, {recorded!r}, is gone" if recorded
               else f"version {idx.version} was built from {idx.manifest.get('build_config', {}).get('source')!r}, not a store")
        print(f"imgsearch search: note: no --store and {why}: results name index ids, not products", file=sys.stderr)
    return None


def _vector_answers(idx, store, queries: np.ndarray, k: int) -> list[dict]:
    if store is None or idx.ntotal == 0:
        scores, ids = idx.search(queries, k)
        return [{"query": n, "index_version": idx.version, "results": _join(store, scores[n], ids[n], k)}
                for n in range(len(queries))]
    fetch, limit = distinct_fetch(k, idx.ntotal)
    scores, ids = idx.search(queries, fetch)
    return [{"query": n, "index_version": idx.version,
             "results": _distinct_products(idx, store, queries[n], scores[n], ids[n], fetch, limit, k)}
            for n in range(len(queries))]


def _distinct_products(idx, store, vector, scores, ids, fetch: int, limit: int, k: int,
                       unit_query: bool = False) -> list[dict]:
    """Top k distinct products of one query, as the server's: several images of one product
    collapse to one result, so a short answer searches that query again, deeper. ``unit_query``:
    the query is the embedder's (unit length), so scores are clipped to their exact range."""
    while True:
        if unit_query:
            scores = clip_unit_scores(scores, idx.manifest.get("metric") == "ip")
        results = product_results(store, scores, ids, k)
        if len(results) >= k or fetch >= limit:
            return results
        fetch = widen(fetch, limit, DISTINCT_WIDEN_FACTOR)
        s, i = idx.search(vector.reshape(1, -1), fetch)
        scores, ids = s[0], i[0]


def _image_answers(args, idx, store):
    """One answer per query image, shaped like the HTTP response: the same detect -> crop ->
    embed path as the server, results of the region that matches best, every detection listed."""
    import time

    from embed.pipeline import best_cosines, load_pipeline

    # No --model: the live version's own model (its manifest's checkpoint), as `serve` does.
    spec = getattr(args, "model", None) or idx.manifest.get("model_checkpoint")
    if spec and not os.path.isfile(spec):
        raise JobFailed(f"version {idx.version} was embedded with {spec!r}, which is missing; give --model CKPT")
    pipeline = load_pipeline(spec)
    indexed_model = idx.manifest.get("model")
    if indexed_model and indexed_model != pipeline.model_hash:
        log.warning("version %s was embedded by model %s but queries use %s: scores are not comparable",
                    idx.version, str(indexed_model)[:12], pipeline.model_hash[:12])
    fetch, limit = distinct_fetch(args.k, idx.ntotal) if store is not None else (args.k, args.k)
    for image in args.images:
        t0 = time.perf_counter()
        (query,) = pipeline.embed_queries([image])
        if query.vectors.shape[-1] != idx.dim:
            raise BadInput(f"the model makes {query.vectors.shape[-1]}-d vectors, version {idx.version} holds {idx.dim}-d")
        vectors = query.vectors.astype(np.float32)
        if limit == 0:
            chosen, results = 0, []
        else:
            scores, ids = idx.search(vectors, fetch)
            higher_is_better = idx.manifest.get("metric") == "ip"
            chosen = query.choose(best_cosines(scores, ids, higher_is_better=higher_is_better))
            results = (_distinct_products(idx, store, vectors[chosen], scores[chosen], ids[chosen], fetch, limit, args.k,
                                          unit_query=True)
                       if store is not None else
                       _join(None, clip_unit_scores(scores[chosen], higher_is_better), ids[chosen], args.k))
        yield {"query": image, "index_version": idx.version, "took_ms": round(1000 * (time.perf_counter() - t0), 3),
               "detections": query.detections(), "region": query.region(chosen), "results": results}


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
