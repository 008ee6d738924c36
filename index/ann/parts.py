"""Parts: the searchable pieces of an index version, and opening them from a version's files.

A version is a list of parts: one per shard file on disk, plus (after ``add``) one in-RAM delta
part. Inside a part, faiss labels are row numbers; ``part.ids[row]`` is the user's int64 id and
``part.rerank[row]`` its float16 vector (memory-mapped), so RAM per vector stays at the code plus
the 8-byte label.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import faiss
import numpy as np

from imgsearch.errors import BadInput
from index.ann import gpu, versions
from index.ann.factory import default_memory_budget
from index.ann.params import search_params


def shard_prefix(shard_no: int, n_shards: int) -> str:
    return f"shard-{shard_no:05d}-of-{n_shards:05d}"


@dataclass
class Part:
    """One searchable piece: a faiss index whose labels are rows of the arrays below."""
    index: object
    ids: np.ndarray  # row -> user id (int64)
    sorted_ids: np.ndarray  # ids sorted, for id -> row lookups
    order: np.ndarray  # rows in sorted_ids order
    rerank: np.ndarray | None  # row -> float16 vector, or None for exact codes
    dead_rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # superseded
    lock: threading.Lock | None = None  # only the mutable delta part has one
    gpu_index: object = None
    name: str = ""
    direct: object = None  # the IDMap's inner index when its id map is the identity (see open_part)
    params_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        # Plain ndarray views: fancy indexing a np.memmap subclass costs a wrapper per call.
        self.ids_arr = np.asarray(self.ids)
        self.rerank_arr = None if self.rerank is None else np.asarray(self.rerank)
        # Re-rank vectors larger than the RAM budget are mostly on disk: read them in row order.
        self.cold = False
        if self.rerank_arr is not None and self.rerank_arr.nbytes > (1 << 30):
            self.cold = self.rerank_arr.nbytes > default_memory_budget()

    def params(self, nprobe: int):
        """Cached per-nprobe search parameters (faiss only reads them, so threads may share)."""
        got = self.params_cache.get(nprobe)
        if got is None:
            got = search_params(self.index, nprobe)
            if len(self.params_cache) < 64:
                self.params_cache[nprobe] = got
        return got[0]

    @property
    def ntotal(self) -> int:
        return int(self.ids.shape[0])

    def rows_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in ``ids`` found here, their rows)."""
        if not self.ntotal or not ids.size:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        pos = np.searchsorted(self.sorted_ids, ids)
        pos = np.minimum(pos, self.ntotal - 1)
        found = np.asarray(self.sorted_ids[pos]) == ids
        return np.flatnonzero(found), np.asarray(self.order[pos[found]], dtype=np.int64)


def search_part(part: Part, q: np.ndarray, fetch: int, nprobe: int, allowed: np.ndarray | None):
    """(distances, rows) of one part; -1 rows where it ran out."""
    fetch = max(1, min(fetch, part.ntotal))
    if not part.ntotal:
        return (np.full((q.shape[0], 1), np.nan, np.float32), np.full((q.shape[0], 1), -1, np.int64))
    sel = None
    if allowed is not None:
        _, rows = part.rows_of(allowed)
        if not rows.size:
            return (np.full((q.shape[0], 1), np.nan, np.float32), np.full((q.shape[0], 1), -1, np.int64))
        sel = faiss.IDSelectorBatch(np.ascontiguousarray(rows, dtype=np.int64))
    if part.gpu_index is not None and sel is None:
        return gpu.search(part.gpu_index, part.index, q, fetch, nprobe)
    if sel is None and part.lock is None:
        index = part.index if part.direct is None else part.direct
        return index.search(q, fetch, params=part.params(nprobe))
    params, _keep = search_params(part.index, nprobe, sel)
    if part.lock is not None:
        with part.lock:
            return part.index.search(q, fetch, params=params)
    return part.index.search(q, fetch, params=params)


def load_raw(path: str, dtype, shape, mmap: bool):
    if shape[0] == 0:
        return np.empty(shape, dtype)
    if mmap:
        return np.memmap(path, dtype=dtype, mode="r", shape=shape)
    return np.fromfile(path, dtype=dtype).reshape(shape)


def open_part(vdir: str, shard: dict, dim: int, mmap: bool) -> Part:
    flags = (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY) if mmap else 0
    try:
        index = faiss.read_index(os.path.join(vdir, shard["index"]), flags)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise versions.BadIndex(f"index version {os.path.basename(vdir)!r}: {shard['index']} is not a readable "
                                f"faiss index ({first}); refusing to open it") from None
    n = int(shard["ntotal"])
    if index.ntotal != n or index.d != dim:
        raise versions.BadIndex(f"index version {os.path.basename(vdir)!r}: {shard['index']} holds {index.ntotal} "
                                f"{index.d}-d vectors, the manifest says {n} {dim}-d; refusing to open it")
    ids = load_raw(os.path.join(vdir, shard["ids"]), np.int64, (n,), mmap)
    sorted_ids = load_raw(os.path.join(vdir, shard["sorted_ids"]), np.int64, (n,), mmap)
    order = load_raw(os.path.join(vdir, shard["order"]), np.int64, (n,), mmap)
    rerank = None
    if shard.get("rerank"):
        # The float16 vectors are only read for a few candidates per query: always mapped.
        rerank = load_raw(os.path.join(vdir, shard["rerank"]), np.float16, (n, dim), True)
    return Part(index, ids, sorted_ids, order, rerank, name=shard["index"], direct=_identity_inner(index))


def _identity_inner(index):
    """The inner index of an ``IndexIDMap`` whose labels are its row numbers (as build writes
    them), else None. Searching the inner index skips IDMap's OpenMP label translation, which
    costs more than a whole single-query search of a small Flat index."""
    if not isinstance(index, faiss.IndexIDMap) or isinstance(index, faiss.IndexIDMap2):
        return None
    labels = faiss.vector_to_array(index.id_map)
    if labels.size != index.index.ntotal or not np.array_equal(labels, np.arange(labels.size)):
        return None
    return index.index


def want_mmap(vdir: str, manifest: dict, mmap) -> bool:
    if mmap in (True, False):
        return mmap
    if manifest.get("mmap_recommended"):
        return True
    size = sum(os.path.getsize(os.path.join(vdir, s["index"])) for s in manifest["shard_files"])
    return size > default_memory_budget()


def shard_files_of(manifest: dict, shards: tuple[int, int] | None) -> list[dict]:
    """The manifest's shard-file entries that shard ``i`` of ``n`` serves: files ``j`` with
    ``j % n == i`` (all of them for None). The version needs at least n shard files."""
    files = list(manifest["shard_files"])
    if shards is None:
        return files
    i, n = (int(v) for v in shards)
    if not (n >= 1 and 0 <= i < n):
        raise BadInput(f"shards must be (i, n) with 0 <= i < n, got {shards!r}")
    if len(files) < n:
        raise BadInput(f"version {manifest['version']!r} has {len(files)} shard file(s); cannot open shard {i} of {n} "
                       f"(build it with --shards {n} or a multiple)")
    return [s for j, s in enumerate(files) if j % n == i]
