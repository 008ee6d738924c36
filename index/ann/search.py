"""Read side: open an index version and search it (sharded, re-ranked, filtered).

A version is a list of parts (:mod:`index.ann.parts`): one per shard on disk, plus (after ``add``)
one in-RAM delta part built from the same trained quantizer and codebooks.

Search, for a batch of queries:
1. every part returns its ``fetch`` best candidates by PQ distance (per-request
   ``SearchParametersIVF``; the shared index is never mutated, so threads may search at once);
2. candidates of all parts are merged into one exact global top-``fetch`` (ties broken by id,
   so a sharded version returns the same ids as an unsharded one);
3. deleted / superseded / filtered-out candidates are dropped; the best ``k * rerank_factor``
   survivors are re-scored with their float16 vectors; the best k are returned;
4. queries left with fewer than k results are searched again with a doubled ``fetch`` (and
   doubled nprobe once the probed lists are exhausted) until k survive or nothing is left.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from dataclasses import dataclass, replace

import faiss
import numpy as np

from imgsearch.errors import BadInput
from index.ann import gpu as gpu_support
from index.ann import integrity, versions
from index.ann.limits import MAX_K, check_k, defaults_for_k, widen
from index.ann.merge import allowed_ids_of, along, candidates, cut, keep_filter, pad_to_k, select, top_k
from index.ann.parts import Part, open_part, search_part, shard_files_of, want_mmap
from index.ann.rerank import rerank_rows

log = logging.getLogger(__name__)

__all__ = ["MAX_K", "IndexVersion", "open_index"]

SELECTOR_MAX_FRACTION = 0.2  # above this, a selector saves little over post-filtering


@dataclass(frozen=True)
class _State:
    """What a search reads; replaced whole (copy-on-write) by add/delete."""
    parts: tuple
    tombstones: np.ndarray  # sorted unique user ids


class IndexVersion:
    """An opened index version. ``search`` is thread-safe; ``add``/``delete`` may run alongside."""

    def __init__(self, path: str, manifest: dict, parts: list[Part], tombstones: np.ndarray,
                 trained_path: str | None, category_of=None, ids_of_category=None, mmap: bool = False):
        self.path = path
        self.manifest = manifest
        self.version = manifest["version"]
        self.dim = int(manifest["dim"])
        self.metric = manifest["metric"]
        self.mmap = mmap
        self.category_of = category_of
        self.ids_of_category = ids_of_category
        self._trained_path = trained_path
        self._write_lock = threading.Lock()
        self._state = _State(tuple(parts), np.unique(np.asarray(tombstones, np.int64)))
        self.nlist = int(manifest.get("nlist") or 0)

    # -- facts -----------------------------------------------------------------------------
    def indexed_ids(self, *, searchable: bool = False) -> np.ndarray:
        """int64 ids of the stored rows: part by part (the shard files in manifest order, then
        the in-RAM additions), each in row order, so one shard file's ids line up with its faiss
        rows. ``searchable=True``: only rows a search can return (deleted and superseded rows
        left out)."""
        st = self._state
        out = []
        for p in st.parts:
            ids = np.asarray(p.ids, np.int64)
            if searchable and p.dead_rows.size:
                keep = np.ones(ids.shape[0], bool)
                keep[p.dead_rows] = False
                ids = ids[keep]
            out.append(ids)
        ids = np.concatenate(out) if out else np.empty(0, np.int64)
        if searchable and st.tombstones.size:
            ids = ids[~np.isin(ids, st.tombstones)]
        return ids

    @property
    def ntotal(self) -> int:
        """Stored vectors that can be returned (deleted and superseded ones excluded)."""
        st = self._state
        rows = sum(p.ntotal - p.dead_rows.size for p in st.parts)
        return int(rows - self._deleted_present(st))

    def _deleted_present(self, st: _State) -> int:
        if not st.tombstones.size:
            return 0
        live = lambda p, rows: rows[~np.isin(rows, p.dead_rows)].size  # noqa: E731
        return sum(live(p, p.rows_of(st.tombstones)[1]) for p in st.parts)

    def bytes_per_vector(self) -> dict:
        """RAM and disk bytes per stored vector, as measured at build time."""
        out = dict(self.manifest.get("bytes_per_vector") or {})
        out["mmap"] = self.mmap
        return out

    def __repr__(self) -> str:
        return f"IndexVersion({self.version!r}, ntotal={self.ntotal}, factory={self.manifest.get('factory')!r})"

    # -- search ----------------------------------------------------------------------------
    def search(self, queries, k: int = 10, *, nprobe: int | None = None, rerank_factor: int | None = None,
               category=None, allowed_ids=None, exclude_ids=None):
        """float32 n x d -> (scores n x k float32, ids n x k int64), -1 padded.

        ``l2`` scores are squared distances (ascending); ``ip`` scores are similarities
        (descending). ``category`` needs ``category_of`` (given to ``open_index``);
        ``allowed_ids`` restricts results to those ids (an IDSelector on CPU when selective).
        """
        q = self._check_queries(queries)
        k = check_k(k)
        st = self._state
        default_nprobe, default_rerank = defaults_for_k(self.manifest, k)
        nprobe = int(nprobe or default_nprobe)
        rf = int(rerank_factor or default_rerank)
        if nprobe < 1 or rf < 1:
            raise BadInput(f"nprobe and rerank_factor must be >= 1, got {nprobe}, {rf}")
        allowed = allowed_ids_of(category, allowed_ids, self.category_of, self.ids_of_category)
        keep = keep_filter(st.parts, st.tombstones, category, allowed, exclude_ids, self.category_of)
        n = q.shape[0]
        total = sum(p.ntotal for p in st.parts)
        if not total or not n:
            out_s = np.full((n, k), np.nan, np.float32)
            out_i = np.full((n, k), -1, np.int64)
            return self._finish(out_s, out_i)
        todo = np.arange(n)
        fetch = min(k * (rf if self._reranked(st) else 1), total)
        max_probe = max(self.nlist, 1)
        use_sel = allowed is not None and allowed.size <= SELECTOR_MAX_FRACTION * total
        fast = (keep is None and len(st.parts) == 1 and st.parts[0].lock is None
                and st.parts[0].gpu_index is None and not st.parts[0].dead_rows.size)
        while todo.size:
            qt = q if todo.size == n else q[todo]
            if fast:
                s, i, found, n_valid = self._search_one_part(st.parts[0], qt, fetch, nprobe, k, rf)
            else:
                sel_ids = allowed if use_sel else None
                keys, uids, part_no, rows, n_valid = candidates(st.parts, qt, fetch, nprobe, sel_ids, self.metric == "ip")
                s, i, found = select(st.parts, qt, keys, uids, part_no, rows, keep, k, rf, self.metric == "ip")
            if todo.size == n:
                out_s, out_i = s, i
            else:
                out_s[todo], out_i[todo] = s, i
            unfinished = found < k
            if not unfinished.any() or (nprobe >= max_probe and fetch >= total):
                break
            # Lists probed so far ran dry for some query: widen the probe, not just the fetch.
            if (n_valid < fetch)[unfinished].any() and nprobe < max_probe:
                nprobe = widen(nprobe, max_probe)
            fetch = widen(fetch, total)
            todo = todo[unfinished]
        return self._finish(out_s, out_i)

    def _finish(self, scores, ids):
        # Reported scores: similarity for ip (higher better), squared distance for l2.
        scores = np.asarray(scores, dtype=np.float32)  # every path builds a fresh array: no copy
        if self.metric == "ip":
            np.negative(scores, out=scores)
        pad = ids < 0
        if pad.any():
            scores[pad] = -np.inf if self.metric == "ip" else np.inf
        return scores, ids

    def _check_queries(self, queries) -> np.ndarray:
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise BadInput(f"queries must be n x {self.dim}, got shape {q.shape}")
        q = np.ascontiguousarray(q, dtype=np.float32)
        if not np.isfinite(q).all():
            raise BadInput("queries contain NaN or infinite values")
        return q

    @staticmethod
    def _reranked(st: _State) -> bool:
        return any(p.rerank is not None for p in st.parts)

    def _search_one_part(self, part: Part, q: np.ndarray, fetch: int, nprobe: int, k: int, rf: int):
        """``merge.candidates`` + ``merge.select`` for one part with nothing to filter, without the merge.

        Same results: faiss returns each list sorted by key, so the global top-``fetch`` by
        (key, id) is its first ``fetch`` columns unless keys tie across the cut (common with
        fast-scan's quantized distances); ``merge.cut`` resolves such ties by id. The margin fetched
        past ``fetch`` is what lets one shard cut exactly where a multi-shard merge would, so a
        sharded version returns the same ids as an unsharded one.
        """
        want = fetch + max(8, fetch // 4)
        d, r = search_part(part, q, want, nprobe, None)
        key = np.negative(d, out=d) if self.metric == "ip" else d  # faiss' fresh arrays: ours
        dry = r.size and r.min() < 0  # some query ran out of candidates: -1 rows
        if dry:
            valid = r >= 0
            key[~valid] = np.inf
            n_valid = np.minimum(np.count_nonzero(valid, axis=1), fetch)
        else:
            n_valid = np.full(r.shape[0], min(r.shape[1], fetch))
        if r.shape[1] > fetch:
            key, r = cut(part, key, r, fetch)
            if dry:
                valid = r >= 0
        uids = np.take(part.ids_arr, r)  # -1 rows read the last id: overwritten below
        if dry:
            uids[~valid] = -1
        if part.rerank_arr is not None:
            key = rerank_rows(part, q, r, self.metric == "ip")
            if dry:
                key[~valid] = np.inf
        final = top_k(key, uids, k)
        s, i = pad_to_k(along(key, final), along(uids, final), k)
        return s, i, np.minimum(n_valid, k), n_valid

    # -- updates ---------------------------------------------------------------------------
    def delete(self, ids, persist: bool = False) -> None:
        """Tombstone ids: they are never returned from now on. ``persist`` writes tombstones.npy."""
        ids = np.asarray(ids, np.int64).ravel()
        with self._write_lock:
            st = self._state
            tomb = np.union1d(st.tombstones, ids)
            self._state = replace(st, tombstones=tomb)
            if persist:
                self._save_tombstones(tomb)

    def _save_tombstones(self, tomb: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, tomb)
        versions.write_bytes_atomic(os.path.join(self.path, "tombstones.npy"), buf.getvalue())

    def add(self, ids, vectors) -> None:
        """Add or replace vectors; searchable as soon as this returns.

        New rows go to an in-RAM delta part cloned from the version's trained (empty) index,
        so they share the quantizer and codebooks of the shards (base shards may be
        memory-mapped read-only, and faiss aborts when adding to those). Older copies of the
        same ids become dead rows; re-added ids leave the tombstone set.
        """
        ids = np.asarray(ids, np.int64).ravel()
        x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32).reshape(len(ids), -1))
        if x.shape[1] != self.dim or not np.isfinite(x).all() or np.unique(ids).size != ids.size:
            raise BadInput(f"add needs unique ids and finite n x {self.dim} vectors, got {x.shape}")
        if ids.size and ids.min() < 0:
            raise BadInput("ids must be >= 0")
        with self._write_lock:
            st = self._state
            parts = [self._supersede(p, ids) for p in st.parts]
            if not parts or parts[-1].lock is None:
                parts.append(self._new_delta(x.shape[1]))
            delta = parts[-1]
            with delta.lock:
                start = delta.ntotal
                delta.index.add_with_ids(x, np.arange(start, start + len(ids), dtype=np.int64))
                all_ids = np.concatenate([delta.ids, ids])
                order = np.argsort(all_ids, kind="stable")
                rerank = None if delta.rerank is None else np.concatenate([delta.rerank, x.astype(np.float16)])
                parts[-1] = replace(delta, ids=all_ids, sorted_ids=all_ids[order], order=order, rerank=rerank)
            self._state = _State(tuple(parts), np.setdiff1d(st.tombstones, ids))

    @staticmethod
    def _supersede(part: Part, ids: np.ndarray) -> Part:
        _, rows = part.rows_of(ids)
        if not rows.size:
            return part
        return replace(part, dead_rows=np.union1d(part.dead_rows, rows))

    def _new_delta(self, dim: int) -> Part:
        if self._trained_path is None:
            raise BadInput("this index version has no trained.faiss; it cannot take additions")
        index = faiss.read_index(self._trained_path)
        rerank = None if not self._reranked(self._state) else np.empty((0, dim), np.float16)
        empty = np.empty(0, np.int64)
        return Part(index, empty, empty, empty, rerank, lock=threading.Lock(), name="delta")


def open_index(index_root: str, version: str | None = None, *, mmap="auto", gpu: str = "off",
               category_of=None, ids_of_category=None, deleted_ids=None,
               shards: tuple[int, int] | None = None) -> IndexVersion:
    """Open the live version (or ``version``) of INDEX_ROOT, read-only.

    ``mmap``: True/False/"auto" (auto maps shards larger than the RAM budget; plain-PQ
    inverted lists then stay on disk). ``gpu``: "off", "auto" or "on" (search on GPUs).
    ``category_of(ids) -> categories`` enables ``search(category=...)``;
    ``ids_of_category(cat) -> ids`` lets selective categories use an IDSelector.
    ``deleted_ids``: ids to tombstone (e.g. the store's deleted items).
    ``shards=(i, n)``: open only shard files ``j`` with ``j % n == i`` (one shard server's
    share, see :func:`shard_files_of`); its ``manifest`` then has ``shard_of: [i, n]`` and that
    share's ``ntotal``. Searching every share and merging by (score, id) gives the full
    version's results.
    A version whose files fail the cheap integrity checks (:mod:`index.ann.integrity`) raises
    :class:`~index.ann.versions.BadIndex` and is not opened.
    """
    vdir = versions.version_dir(index_root, version)
    manifest = versions.read_manifest(vdir)
    mine = shard_files_of(manifest, shards)
    integrity.check_at_open(vdir, manifest, mine, whole=shards is None)
    use_mmap = want_mmap(vdir, manifest, mmap)
    parts = [open_part(vdir, s, int(manifest["dim"]), use_mmap) for s in mine]
    if shards is not None:
        manifest = dict(manifest, shard_of=[int(shards[0]), int(shards[1])], ntotal=sum(int(s["ntotal"]) for s in mine))
    tomb = [np.asarray(deleted_ids if deleted_ids is not None else [], np.int64).ravel()]
    tomb_path = os.path.join(vdir, "tombstones.npy")
    if os.path.exists(tomb_path):
        tomb.append(np.load(tomb_path).astype(np.int64))
    trained = os.path.join(vdir, manifest.get("trained_index") or "trained.faiss")
    idx = IndexVersion(vdir, manifest, parts, np.concatenate(tomb),
                       trained if os.path.exists(trained) else None,
                       category_of=category_of, ids_of_category=ids_of_category, mmap=use_mmap)
    if gpu != "off":
        gpu_support.attach(idx, required=(gpu == "on"))
    return idx
