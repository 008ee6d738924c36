"""Vector sources for the index build: anything that streams ``(ids, vectors)`` blocks.

The build never holds the whole catalog in memory. It only needs a ``VectorSource``: the
row count and dimension up front (to pick a factory and plan the training sample) and a
callable ``blocks(block_size)`` that returns a fresh iterator of ``(int64 ids, float32
vectors)`` blocks each time it is called (the build passes over the data several times:
sample, then one pass per shard, then ground truth for tuning).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from imgsearch.errors import BadInput, JobFailed

Block = tuple[np.ndarray, np.ndarray]
BlockIter = Callable[[int], Iterator[Block]]

DEFAULT_BLOCK = 65536


@dataclass(frozen=True)
class VectorSource:
    blocks: BlockIter
    n: int
    dim: int
    default_metric: str  # "ip" for normalised embeddings (store), "l2" for raw vectors
    model: str | None = None  # checkpoint hash of the embedder, None for raw vectors
    description: str = ""
    # A catalog store's absolute path and its generation (LMDB txn id) read BEFORE any of its
    # vectors: every write committed at or before it is in what ``blocks`` yields.
    store: dict | None = None
    model_checkpoint: str | None = None  # the file of ``model`` (None: the built-in model or raw vectors)


def as_float32(block: np.ndarray) -> np.ndarray:
    """Blockwise conversion: uint8 (or any numeric) rows -> contiguous float32 for faiss."""
    return np.ascontiguousarray(block, dtype=np.float32)


def _check_matrix(x: np.ndarray, what: str) -> None:
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise BadInput(f"{what}: expected a non-empty N x d matrix, got shape {x.shape}")
    if x.dtype not in (np.float32, np.uint8):
        raise BadInput(f"{what}: expected float32 or uint8 vectors, got {x.dtype}")


def _check_ids(ids: np.ndarray, n: int, what: str) -> np.ndarray:
    if ids.ndim != 1 or ids.shape[0] != n:
        raise BadInput(f"{what}: expected {n} ids, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise BadInput(f"{what}: ids must be integers, got {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if n and ids.min() < 0:
        raise BadInput(f"{what}: ids must be >= 0 (-1 marks padding in results)")
    if np.unique(ids).shape[0] != n:
        raise BadInput(f"{what}: ids are not unique")
    return ids


def array_source(vectors: np.ndarray, ids: np.ndarray | None = None, *, metric: str = "l2",
                 model: str | None = None, description: str = "array") -> VectorSource:
    """In-memory (or memory-mapped) matrix; rows are sliced per block, never copied whole."""
    _check_matrix(vectors, description)
    n, d = vectors.shape
    ids = np.arange(n, dtype=np.int64) if ids is None else _check_ids(np.asarray(ids), n, description)

    def blocks(block_size: int = DEFAULT_BLOCK) -> Iterator[Block]:
        for start in range(0, n, block_size):
            stop = min(n, start + block_size)
            yield ids[start:stop], as_float32(vectors[start:stop])

    return VectorSource(blocks, n, d, metric, model, description)


def npy_source(path: str, ids_path: str | None = None, *, metric: str | None = None) -> VectorSource:
    """A float32/uint8 ``.npy`` opened with ``mmap_mode='r'``: only one block is in RAM at a time."""
    try:
        vectors = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise BadInput(f"cannot read vectors {path!r}: {exc}") from None
    ids = None
    if ids_path is not None:
        try:
            ids = np.load(ids_path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise BadInput(f"cannot read ids {ids_path!r}: {exc}") from None
    return array_source(vectors, ids, metric=metric or "l2", description=os.path.basename(path))


def store_source(store, *, metric: str | None = None, deleted: np.ndarray | None = None) -> VectorSource:
    """The LMDB catalog store (``index.store.CatalogStore``): stored, non-deleted vectors."""
    # First, so that the recorded generation never claims a write the blocks might miss.
    generation = getattr(store, "generation", None)
    stats = store.stats() if hasattr(store, "stats") else {}
    stats = stats if isinstance(stats, dict) else getattr(stats, "__dict__", {})
    if deleted is None and hasattr(store, "deleted_ids"):
        deleted = np.fromiter(store.deleted_ids(), dtype=np.int64)
    deleted = np.unique(np.asarray(deleted if deleted is not None else [], dtype=np.int64))

    def blocks(block_size: int = DEFAULT_BLOCK) -> Iterator[Block]:
        for ids, vecs in store.iter_blocks(block_size):
            ids = np.asarray(ids, dtype=np.int64)
            vecs = as_float32(vecs)
            if deleted.size:
                keep = ~np.isin(ids, deleted)
                ids, vecs = ids[keep], vecs[keep]
            if ids.size:
                yield ids, vecs

    n = _count_vectors(stats, blocks, deleted)
    model = stats.get("model") or stats.get("model_hash") or getattr(store, "model", None)
    if not store.dim or not n:
        raise BadInput(f"store {getattr(store, 'path', '')!s} holds no vectors to index")
    origin = None
    if isinstance(generation, int) and getattr(store, "path", None) is not None:
        origin = {"path": os.path.abspath(store.path), "generation": generation}
    return VectorSource(blocks, n, int(store.dim), metric or "ip", model, "store", origin,
                        stats.get("model_checkpoint") or getattr(store, "model_checkpoint", None))


def _count_vectors(stats: dict, blocks: BlockIter, deleted: np.ndarray) -> int:
    for key in ("with_vectors", "vectors", "n_vectors"):
        if key in stats and not deleted.size:
            return int(stats[key])
    # The store's counters may include deleted rows; one cheap ids-only pass is exact.
    return sum(int(ids.shape[0]) for ids, _ in blocks(DEFAULT_BLOCK))


def store_category_of(store) -> Callable[[np.ndarray], list]:
    """``category_of`` for ``open_index``/``search(category=...)`` backed by the store's records."""

    def category_of(ids: np.ndarray) -> list:
        return [None if r is None else r.category for r in store.get_many(int(i) for i in ids)]

    return category_of


def sample_rows(source: VectorSource, size: int, seed: int, block_size: int = DEFAULT_BLOCK):
    """(ids, vectors) of ``size`` rows drawn uniformly (seeded) from one pass over the stream."""
    size = min(size, source.n)
    rng = np.random.default_rng(seed)
    wanted = np.sort(rng.choice(source.n, size=size, replace=False)) if size < source.n else np.arange(source.n)
    xs, ids_out, start = [], [], 0
    for ids, x in source.blocks(block_size):
        stop = start + len(ids)
        lo, hi = np.searchsorted(wanted, [start, stop])
        if hi > lo:
            local = wanted[lo:hi] - start
            xs.append(x[local]), ids_out.append(ids[local])
        start = stop
    if start != source.n:
        raise JobFailed(f"source {source.description!r} streamed {start} vectors, expected {source.n}")
    return np.concatenate(ids_out), np.ascontiguousarray(np.concatenate(xs), dtype=np.float32)
