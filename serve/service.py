"""Query execution for the server: the live index snapshot, the store join, distinct products.

The live index is an immutable snapshot object swapped by one attribute
assignment, so a request that started on the old version finishes on it, and
per-request search parameters are passed per call, never written into a
shared index object.

With a batch window (``batch_window_ms`` > 0; off by default, see DEFAULT_BATCH_WINDOW_MS),
concurrent queries are embedded and searched in batches (:mod:`serve.batcher`); with 0 every
request embeds and searches alone, in its own thread.
Live additions and deletions reach the index through the store's updates log
(:mod:`serve.updates`), which every request checks with one ``stat``. After a reload the log
is compacted: lines every version under INDEX_ROOT already holds are dropped, the rest
reduced to the last operation per id.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from embed.image_io import decode_image
from index import open_index
from index.ann import versions
from index.ann.sources import store_category_of
from index.store import CatalogStore, product_results
from serve import embedding
from serve.batcher import DEFAULT_MAX_BATCH, Arrivals, MicroBatcher
from serve.errors import ApiError
from serve.requests import SearchRequest
from serve.updates import LogCursor, UpdateLog, covered_through, version_coverage

log = logging.getLogger(__name__)

# Several images of one product collapse to one result, so fetch more candidates than k.
OVERFETCH = 4
MIN_EXTRA_CANDIDATES = 32
MAX_FETCH = 10_000  # the index's own k limit
# Two network runs side by side: on a CPU, one batched run with intra-op threads leaves cores
# idle between layers; two overlapping runs keep them busy (measured in bench/bench_serve.py).
EMBED_BATCH_THREADS = 2
# Off by default: on a CPU-only host the server is bound by Python work under the GIL (HTTP,
# JSON, join), which batching does not shrink, while faiss and ONNX Runtime already run outside
# the GIL; measured on 2 shared cores, batching cost 10-25% of throughput (bench/bench_serve.py).
# Turn it on (1-5 ms) where the model or the search is the bottleneck, e.g. on a GPU host.
DEFAULT_BATCH_WINDOW_MS = 0.0


@dataclass(frozen=True)
class LiveIndex:
    version: str
    index: Any  # the object index.open_index returns (or a shard fan-out with the same search)
    dim: int
    higher_is_better: bool
    sharded: bool = False  # a front server over shard servers: responses carry "partial"
    cursor: LogCursor = field(default_factory=LogCursor, compare=False)  # updates log applied so far

    @property
    def ntotal(self) -> int:
        """Searchable vectors; counted when loaded and after each applied update, not per query."""
        if self.cursor.ntotal is None:
            self.cursor.ntotal = int(self.index.ntotal)
        return self.cursor.ntotal


@dataclass(frozen=True)
class SearchJob:
    live: LiveIndex
    vectors: np.ndarray  # (m, dim): one query's rows (a photo's candidate regions)
    fetch: int
    category: str | None


def run_search(index, queries: np.ndarray, fetch: int, category: str | None):
    """(scores, ids, partial) of one search call; only a shard fan-out can be partial."""
    if hasattr(index, "search_partial"):
        return index.search_partial(queries, fetch, category=category)
    scores, ids = index.search(queries, fetch, category=category)
    return scores, ids, False


def default_opener(index_root: Path, store):
    """The full live version CURRENT names, with the store's categories and deletions."""
    return open_index(
        str(index_root),
        category_of=store_category_of(store),
        deleted_ids=np.fromiter(store.deleted_ids(), dtype=np.int64),
    )


class SearchService:
    def __init__(self, index_root: str | Path, store_path: str | Path, embedder=None, embedder_loader=None, *,
                 batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS, max_batch: int = DEFAULT_MAX_BATCH,
                 opener=None, live_updates: bool = True, store=None):
        """``store``: an opened CatalogStore to read through (one LMDB handle per process, so
        several services in one process share one); by default opened read-only on first use."""
        self.index_root = Path(index_root)
        self.store_path = Path(store_path)
        self._embedder = embedder
        self._embedder_loader = embedder_loader
        self._embedder_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._apply_lock = threading.Lock()
        self._store_lock = threading.Lock()
        self._live: LiveIndex | None = None
        self._last_error = "no index loaded yet"
        self._store = store
        self._opener = opener or default_opener
        self.updates = UpdateLog(self.store_path) if live_updates else None
        self.metrics = None
        self.arrivals = Arrivals()
        self.batching = batch_window_ms > 0
        self._search_batcher = MicroBatcher(self._search_batch, window_ms=batch_window_ms, max_batch=max_batch,
                                            arrivals=self.arrivals, on_batch=self._observe_batch("search"),
                                            name="search-batcher")
        self._embed_batcher = MicroBatcher(self._embed_batch, window_ms=batch_window_ms, max_batch=max_batch,
                                           arrivals=self.arrivals, on_batch=self._observe_batch("embed"),
                                           name="embed-batcher", threads=EMBED_BATCH_THREADS)
        self._watch: threading.Thread | None = None

    def attach_metrics(self, metrics) -> None:
        self.metrics = metrics
        if self._live is not None:
            metrics.set_index(self._live.version, self._live.ntotal)

    def _observe_batch(self, kind: str):
        def observe(size: int) -> None:
            if self.metrics is not None:
                self.metrics.batch_size.labels(kind).observe(size)

        return observe

    # ------------------------------------------------------------------ lifecycle

    def live(self) -> LiveIndex | None:
        return self._live

    def not_ready_reason(self) -> str:
        return f"no index loaded: {self._last_error}"

    def store(self):
        if self._store is None:
            with self._store_lock:
                if self._store is None:
                    self._store = CatalogStore.open_readonly(self.store_path)
        return self._store

    def reload(self) -> LiveIndex:
        """Load, warm and bring up to date the version CURRENT names, then swap it in.

        Requests keep being answered by the old version meanwhile; on failure it stays live
        and ``ApiError(500, "reload_failed")`` names the reason."""
        with self._reload_lock:
            try:
                opened = self._opener(self.index_root, self.store())
                manifest = opened.manifest
                live = LiveIndex(
                    version=str(manifest["version"]),
                    index=opened,
                    dim=int(manifest["dim"]),
                    higher_is_better=manifest["metric"] == "ip",
                    sharded=bool(getattr(opened, "is_fanout", False)),
                )
                if getattr(opened, "path", None):
                    live.cursor.covered = version_coverage(opened.path, self.store_path)
                self._warm(live)
                self._catch_up(live)  # live additions since the build, before anyone sees it
            except Exception as exc:  # noqa: BLE001 - any failure leaves the old version serving
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.warning("index not loaded from %s: %s", self.index_root, self._last_error)
                raise ApiError(500, "reload_failed", f"could not load the index CURRENT names in {str(self.index_root)!r}: "
                               f"{self._last_error}; still serving {self._live.version if self._live else 'nothing'}") from None
            self._live = live
            self._publish_index_metrics(live)
            log.info("serving index version %s (%d vectors)", live.version, live.ntotal)
            if not live.sharded:
                self.compact_updates()
            return live

    def compact_updates(self) -> dict | None:
        """Compact the updates log (see :mod:`serve.updates`): drop the lines every version
        under INDEX_ROOT holds, reduce the rest to the last operation per id. Never raises."""
        if self.updates is None or not self.updates.size():
            return None
        try:
            return self.updates.compact(covered_through(self.index_root, self.store_path),
                                        store_generation=self.store().generation)
        except Exception as exc:  # noqa: BLE001 - a failed compaction leaves the old log, still valid
            log.warning("updates log %s not compacted: %s: %s", self.updates.path, type(exc).__name__, exc)
            return None

    def load_current(self) -> LiveIndex | None:
        """Open the version CURRENT names and make it live; on failure keep the old one."""
        try:
            return self.reload()
        except ApiError:
            return self._live

    def _publish_index_metrics(self, live: LiveIndex) -> None:
        if self.metrics is not None:
            self.metrics.set_index(live.version, live.ntotal)

    @staticmethod
    def _warm(live: LiveIndex) -> None:
        """One query before going live, so the first real request pays no page-in cost."""
        if live.ntotal:
            run_search(live.index, np.zeros((1, live.dim), dtype=np.float32), 1, None)

    def watch_current(self, interval_s: float) -> None:
        """Poll CURRENT every ``interval_s`` and reload when it names another version."""

        def loop() -> None:
            import time

            while True:
                time.sleep(interval_s)
                try:
                    name = versions.read_current(str(self.index_root))
                    if self._live is None or name != self._live.version:
                        log.info("CURRENT names %s: reloading", name)
                        self.load_current()
                except Exception as exc:  # noqa: BLE001 - the watch must outlive a bad CURRENT
                    log.warning("watching CURRENT in %s: %s", self.index_root, exc)

        if interval_s > 0 and self._watch is None:
            self._watch = threading.Thread(target=loop, name="current-watch", daemon=True)
            self._watch.start()

    def embedder(self):
        with self._embedder_lock:
            if self._embedder is None:
                if self._embedder_loader is None:
                    raise ApiError(503, "no_embedder", "this server has no image embedder; send a 'vector' query")
                self._embedder = self._embedder_loader()
            return self._embedder

    def warm_embedder(self) -> None:
        self.embedder().embed_queries([Image.new("RGB", (224, 224), (128, 128, 128))])

    # ------------------------------------------------------------------ live updates

    def catch_up(self) -> None:
        """Apply updates-log entries written since the live index last looked (one stat if none)."""
        live = self._live
        if live is not None:
            self._catch_up(live)

    def _catch_up(self, live: LiveIndex) -> None:
        if self.updates is None or live.sharded or not self.updates.changed(live.cursor):
            return
        with self._apply_lock:
            cursor = live.cursor
            got = self.updates.read(cursor)
            if got.rewritten:
                log.info("updates log %s was compacted: version %s re-reads it from epoch %s", self.updates.path,
                         live.version, got.epoch)
            if got.must_cover and (cursor.covered is None or cursor.covered < got.must_cover):
                self._fill_from_store(live, got.must_cover)
            for entry in got.entries:
                gen = entry.get("gen")
                if cursor.covered is not None and isinstance(gen, int) and gen <= cursor.covered:
                    continue  # committed before this version's build read the store: built in
                added = np.asarray(entry.get("add", []), np.int64)
                deleted = np.asarray(entry.get("delete", []), np.int64)
                try:
                    if added.size:
                        live.index.add(added, self.store().vectors_for(added.tolist()))
                    if deleted.size:
                        live.index.delete(deleted)
                except Exception as exc:  # noqa: BLE001 - a bad entry must not fail the queries that found it
                    log.error("updates log entry %s not applied to version %s: %s: %s", entry, live.version,
                              type(exc).__name__, exc)
            cursor.offset, cursor.epoch, cursor.stat = got.offset, got.epoch, got.stat
            cursor.ntotal = int(live.index.ntotal)
        if live is self._live:
            self._publish_index_metrics(live)

    def _fill_from_store(self, live: LiveIndex, dropped_through: int) -> None:
        """Bring ``live`` up to the store when the updates log no longer holds lines it needs.

        Compaction dropped lines up to store generation ``dropped_through``, which this version
        cannot show it was built from (it has no ``rebuild.json``, or an older one). The store
        is the truth: every stored, undeleted vector the version does not hold is added, every
        deleted item is tombstoned; the log's remaining lines are then replayed on top. A full
        pass over the store's ids: slow on a large store, but only a version older than the
        compacted log (or built without a recorded generation) ever needs it."""
        log.warning("version %s was not built from store generation %d or later, and the updates log no longer "
                    "holds those lines: adding the store's missing items from the store itself", live.version,
                    dropped_through)
        store = self.store()
        indexed = getattr(live.index, "indexed_ids", None)
        if indexed is None:
            log.error("version %s cannot list its ids: live updates up to store generation %d may be missing",
                      live.version, dropped_through)
            return
        have = np.unique(indexed(searchable=True))
        chunk = 1 << 16
        added = 0
        ids = np.fromiter(store.iter_live_ids(), dtype=np.int64)
        missing = np.setdiff1d(ids, have, assume_unique=False)
        for start in range(0, missing.size, chunk):
            part = missing[start:start + chunk]
            part = part[np.asarray(store.has_vectors(part.tolist()), dtype=bool)]
            if part.size:
                live.index.add(part, store.vectors_for(part.tolist()))
                added += int(part.size)
        deleted = np.fromiter(store.deleted_ids(), dtype=np.int64)
        if deleted.size:
            live.index.delete(deleted)
        log.warning("version %s: %d item(s) added from the store, %d tombstoned", live.version, added, deleted.size)

    # ------------------------------------------------------------------ queries

    def _stage(self, name: str):
        return self.metrics.stage(name) if self.metrics is not None else nullcontext()

    def search(self, live: LiveIndex, query: SearchRequest) -> dict:
        self.catch_up()
        if query.vector is not None:
            embedded = None
            vectors = query.vector.reshape(1, -1)
        else:
            embedded = self._embed_query_image(query.image)
            vectors = embedded.vectors
        if vectors.shape[-1] != live.dim:
            raise ApiError(500, "dimension_mismatch", f"the embedder makes {vectors.shape[-1]}-d vectors, the index holds {live.dim}-d")
        # A photo's regions are searched together; the answer is the region that matches best.
        choose = embedded.choose if embedded is not None else None
        results, partial, chosen = self._distinct_products(live, vectors, query.k, query.category, choose)
        body: dict = {"detections": embedded.detections() if embedded is not None else [], "results": results}
        if embedded is not None:
            body["region"] = embedded.region(chosen)
        if live.sharded:
            body["partial"] = partial
        return body

    def _embed_query_image(self, data: bytes):
        with self._stage("decode"):
            image = decode_image(data)
        pipeline = self.embedder()
        prepared = embedding.prepare(pipeline, image, self._stage)  # in this thread: parallel with others
        if self.batching:
            query = self._embed_batcher.submit(prepared)
        else:
            self.arrivals.leave()
            (query,) = embedding.embed_prepared(pipeline, [prepared], self._stage)
        return query

    def _embed_batch(self, prepared: list) -> list:
        pipeline = self.embedder()
        try:
            return embedding.embed_prepared(pipeline, prepared, self._stage)
        except Exception:
            if len(prepared) == 1:
                raise
        results = []  # one bad query must not fail the others: isolate it
        for one in prepared:
            try:
                results.extend(embedding.embed_prepared(pipeline, [one], self._stage))
            except Exception as exc:  # noqa: BLE001 - handed to that request's thread
                results.append(exc)
        return results

    def _search(self, live: LiveIndex, vectors: np.ndarray, fetch: int, category: str | None):
        """(scores (m, fetch), ids (m, fetch), partial) of one query's m rows: batched with concurrent ones when enabled."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, live.dim)
        if self.batching:
            return self._search_batcher.submit(SearchJob(live, vectors, fetch, category))
        self.arrivals.leave()
        with self._stage("search"):
            return run_search(live.index, vectors, fetch, category)

    def _search_batch(self, jobs: list[SearchJob]) -> list:
        """One index call per (version, category, fetch) group: a query's result never
        depends on which other queries shared its batch."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for n, job in enumerate(jobs):
            groups[(id(job.live), job.category, job.fetch)].append(n)
        out: list = [None] * len(jobs)
        for members in groups.values():
            first = jobs[members[0]]
            queries = np.concatenate([jobs[n].vectors for n in members]).astype(np.float32, copy=False)
            ends = np.cumsum([len(jobs[n].vectors) for n in members])
            try:
                with self._stage("search"):
                    scores, ids, partial = run_search(first.live.index, queries, first.fetch, first.category)
                for n, end in zip(members, ends):
                    start = end - len(jobs[n].vectors)
                    out[n] = (scores[start:end], ids[start:end], partial)
            except Exception as exc:  # noqa: BLE001 - handed to the group's request threads
                for n in members:
                    out[n] = exc
        return out

    def _distinct_products(self, live: LiveIndex, vectors: np.ndarray, k: int, category: str | None,
                           choose=None) -> tuple[list[dict], bool, int]:
        """Top k distinct products (best image each), optionally of one category, of the row of
        ``vectors`` that ``choose(best score per row)`` picks (default row 0); whether some shard
        did not answer; and the row."""
        ntotal = live.ntotal
        if ntotal == 0:
            self.arrivals.leave()
            return [], False, 0
        limit = min(ntotal, MAX_FETCH)
        fetch = min(limit, max(k * OVERFETCH, k + MIN_EXTRA_CANDIDATES))
        all_scores, all_ids, partial = self._search(live, vectors, fetch, category)
        row = 0
        if choose is not None and len(vectors) > 1:
            from embed.pipeline import best_cosines

            row = choose(best_cosines(all_scores, all_ids, live.higher_is_better))
        scores, ids, vector = all_scores[row], all_ids[row], vectors[row]
        while True:
            with self._stage("join"):
                results = self._join(scores, ids, k)
            if len(results) >= k or fetch >= limit:
                return results, partial, row
            fetch = min(limit, fetch * 4)  # many images per product: look deeper, alone
            with self._stage("search"):
                s, i, more_partial = run_search(live.index, vector.reshape(1, -1), fetch, category)
            scores, ids, partial = s[0], i[0], partial or more_partial

    def _join(self, scores: np.ndarray, ids: np.ndarray, k: int) -> list[dict]:
        return product_results(self.store(), scores, ids, k)

    # ------------------------------------------------------------------ products

    def _records_of(self, product_id: str):
        records = self.store().items_of_product(product_id) if len(product_id) <= 1024 else []
        if not records:
            raise ApiError(404, "unknown_product", f"no product with id {product_id!r}")
        return records

    def product(self, product_id: str) -> dict:
        records = self._records_of(product_id)
        first = records[0]
        return {
            "product_id": product_id,
            "category": first.category,
            "metadata": first.metadata,
            "images": [{"image": r.image, "content_hash": r.content_hash, "updated_at": r.updated_at} for r in records],
        }

    def image_file(self, product_id: str, image: str | None) -> Path:
        """A catalog file known to the store for this product; never an arbitrary path."""
        records = self._records_of(product_id)
        chosen = records[0] if image is None else next((r for r in records if r.image == image), None)
        if chosen is None:
            raise ApiError(404, "unknown_image", f"product {product_id!r} has no image {image!r}")
        path = Path(chosen.path)
        if not path.is_file():
            raise ApiError(404, "image_missing", f"the image file of product {product_id!r} is no longer on disk")
        return path
