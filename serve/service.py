"""Query execution for the server: embedding, the search, the store join, distinct products.

The live index version and its updates belong to :class:`serve.live.LiveVersions`; a request
takes one snapshot and finishes on it. Per-request search parameters are passed per call, never
written into a shared index object.

With a batch window (``batch_window_ms`` > 0; off by default, see DEFAULT_BATCH_WINDOW_MS),
concurrent queries are embedded and searched in batches (:mod:`serve.batcher`); with 0 every
request embeds and searches alone, in its own thread.
Live additions and deletions reach the index through the store's updates log
(:mod:`serve.updates`), which every request checks with one ``stat`` (``catch_up``).
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from embed.image_io import decode_image
from index.ann.limits import DISTINCT_WIDEN_FACTOR, distinct_fetch, widen
from index.ann.rerank import clip_unit_scores
from index.store import CatalogStore, product_results
from serve import embedding
from serve.batcher import DEFAULT_MAX_BATCH, Arrivals, MicroBatcher
from serve.decode_budget import DecodeBudget
from serve.errors import ApiError
from serve.image_files import read_verified
from serve.live import LiveIndex, LiveVersions, run_search
from serve.models import model_kind
from serve.requests import SearchRequest, check_box_inside
from serve.updates import UpdateLog

log = logging.getLogger(__name__)

# Two network runs side by side: on a CPU, one batched run with intra-op threads leaves cores
# idle between layers; two overlapping runs keep them busy (measured in bench/bench_serve.py).
EMBED_BATCH_THREADS = 2
# Off by default: on a CPU-only host the server is bound by Python work under the GIL (HTTP,
# JSON, join), which batching does not shrink, while faiss and ONNX Runtime already run outside
# the GIL; measured on 2 shared cores, batching cost 10-25% of throughput (bench/bench_serve.py).
# Turn it on (1-5 ms) where the model or the search is the bottleneck, e.g. on a GPU host.
DEFAULT_BATCH_WINDOW_MS = 0.0


@dataclass(frozen=True)
class SearchJob:
    live: LiveIndex
    vectors: np.ndarray  # (m, dim): one query's rows (a photo's candidate regions)
    fetch: int
    category: str | None


class SearchService:
    def __init__(self, index_root: str | Path, store_path: str | Path, embedder=None, embedder_loader=None, *,
                 batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS, max_batch: int = DEFAULT_MAX_BATCH,
                 opener=None, live_updates: bool = True, store=None, decode_budget: DecodeBudget | None = None,
                 models: str | None = None):
        """``store``: an opened CatalogStore to read through (one LMDB handle per process, so
        several services in one process share one); by default opened read-only on first use.
        ``decode_budget``: the decoded pixels this process holds at once (:mod:`serve.decode_budget`).
        ``models``: ``"follow"`` (embed with each live version's own model, :mod:`serve.models`),
        ``"fixed"`` (refuse at reload a version of another model than the embedder's), or None."""
        self.decode_budget = decode_budget or DecodeBudget()
        self.index_root = Path(index_root)
        self._store_path = Path(store_path)
        self._pinned = threading.local()  # the LiveIndex a request thread is answering on
        self._embedder = embedder
        self._embedder_loader = embedder_loader
        self._embedder_lock = threading.Lock()
        self._store_lock = threading.Lock()
        self._store = store
        self._updates = UpdateLog(self._store_path) if live_updates else None
        self.versions = LiveVersions(self.index_root, self._store_path, self._own_store, opener=opener,
                                     updates=self._updates, metrics=lambda: self.metrics,
                                     policy=self._model_policy(models, live_updates))
        self.metrics = None
        self.arrivals = Arrivals()
        self.batching = batch_window_ms > 0
        self._search_batcher = MicroBatcher(self._search_batch, window_ms=batch_window_ms, max_batch=max_batch,
                                            arrivals=self.arrivals, on_batch=self._observe_batch("search"),
                                            name="search-batcher")
        self._embed_batcher = MicroBatcher(self._embed_batch, window_ms=batch_window_ms, max_batch=max_batch,
                                           arrivals=self.arrivals, on_batch=self._observe_batch("embed"),
                                           name="embed-batcher", threads=EMBED_BATCH_THREADS)

    def attach_metrics(self, metrics) -> None:
        self.metrics = metrics
        live = self.versions.live()
        if live is not None:
            metrics.set_index(live.version, live.ntotal)

    def _observe_batch(self, kind: str):
        def observe(size: int) -> None:
            if self.metrics is not None:
                self.metrics.batch_size.labels(kind).observe(size)

        return observe

    # ------------------------------------------------------------------ lifecycle

    def live(self) -> LiveIndex | None:
        return self.versions.live()

    def not_ready_reason(self) -> str:
        return self.versions.not_ready_reason()

    # Loading and live updates are LiveVersions' (serve.live); these name them for the routes.
    def reload(self) -> LiveIndex:
        return self.versions.reload()

    def load_current(self) -> LiveIndex | None:
        return self.versions.load_current()

    def watch_current(self, interval_s: float) -> None:
        self.versions.watch_current(interval_s)

    def catch_up(self) -> None:
        self.versions.catch_up()

    def compact_updates(self) -> dict | None:
        return self.versions.compact_updates()

    def store(self):
        backend = self.backend()
        return backend.store if backend is not None else self._own_store()

    def _own_store(self):
        if self._store is None:
            with self._store_lock:
                if self._store is None:
                    self._store = CatalogStore.open_readonly(self.store_path)
        return self._store

    def embedder(self):
        backend = self.backend()
        if backend is not None:
            return backend.embedder
        with self._embedder_lock:
            if self._embedder is None:
                if self._embedder_loader is None:
                    raise ApiError(503, "no_embedder", "this server has no image embedder; send a 'vector' query")
                self._embedder = self._embedder_loader()
            return self._embedder

    def warm_embedder(self) -> None:
        self.embedder().embed_queries([Image.new("RGB", (224, 224), (128, 128, 128))])

    # ------------------------------------------------------------------ models (serve.models)

    def _model_policy(self, models: str | None, live_updates: bool):
        if models is None:
            return None
        from serve.models import ModelPolicy

        def fixed_model() -> str | None:
            return self._embedder.model_hash if self._embedder is not None else None

        return ModelPolicy(follow=models == "follow", store_path=self._store_path, open_store=self._own_store,
                           live_updates=live_updates, embedder_model=fixed_model)

    def backend(self):
        """The Backend (model + store) of the request's version, else of the live one; None: the server's own."""
        live = getattr(self._pinned, "live", None) or self.versions.live()
        return live.backend if live is not None else None

    @property
    def store_path(self) -> Path:
        backend = self.backend()
        return backend.store_path if backend is not None else self._store_path

    @property
    def updates(self) -> UpdateLog | None:
        backend = self.backend()
        return backend.updates if backend is not None else self._updates

    def model_info(self) -> dict:
        """``GET /v1/model``'s body (without the training status): the live version's model."""
        live = self.live()
        backend = live.backend if live is not None else None
        manifest = getattr(live.index, "manifest", {}) if live is not None else {}
        if backend is not None:
            model, kind = backend.model, backend.kind
        else:
            model = self._embedder.model_hash if self._embedder is not None else None
            checkpoint = manifest.get("model_checkpoint", "")  # "" when not recorded
            kind = "unknown"
            if model is not None and model == manifest.get("model") and checkpoint != "":
                kind = model_kind(checkpoint)
        return {"model": model, "kind": kind, "index_version": live.version if live is not None else None,
                "index_model": manifest.get("model")}

    # ------------------------------------------------------------------ live updates

    # ------------------------------------------------------------------ queries

    def _stage(self, name: str):
        return self.metrics.stage(name) if self.metrics is not None else nullcontext()

    def search(self, live: LiveIndex, query: SearchRequest) -> dict:
        """The answer to ``query`` wholly on ``live``: its index, and its model and store (a model
        switch meanwhile serves the next requests, never half of this one)."""
        self._pinned.live = live
        try:
            return self._search_on(live, query)
        finally:
            self._pinned.live = None

    def _search_on(self, live: LiveIndex, query: SearchRequest) -> dict:
        self.catch_up()
        if query.vector is not None:
            embedded = None
            vectors = query.vector.reshape(1, -1)
        else:
            embedded, detections = self._embed_query_image(query.image, query.box)
            vectors = embedded.vectors
        if vectors.shape[-1] != live.dim:
            raise ApiError(500, "dimension_mismatch", f"the embedder makes {vectors.shape[-1]}-d vectors, the index holds {live.dim}-d")
        # A photo's regions are searched together; the answer is the region that matches best.
        choose = embedded.choose if embedded is not None and query.box is None else None  # a user's box: no choice
        results, partial, chosen = self._distinct_products(live, vectors, query.k, query.category, choose,
                                                           unit_query=embedded is not None)
        body: dict = {"detections": embedded.detections() if embedded is not None else [], "results": results}
        if query.box is not None:
            body["detections"] = detections
            body["region"] = {"box": [int(v) if v.is_integer() else v for v in query.box], "score": 0.0, "source": "user"}
        elif embedded is not None:
            body["region"] = embedded.region(chosen)
        if live.sharded:
            body["partial"] = partial
        return body

    def _embed_query_image(self, data: bytes, box=None):
        """(QueryEmbedding, the detector's boxes when ``box`` is given: only that region is embedded)."""
        with self.decode_budget.hold(data):  # the decoded photo counts until it is embedded
            with self._stage("decode"):
                image = decode_image(data)
            if box is not None:
                check_box_inside(box, image.width, image.height)
            pipeline = self.embedder()
            prepared = embedding.prepare(pipeline, image, self._stage, box)  # in this thread: parallel with others
            detections = prepared.detections
            if self.batching:
                query = self._embed_batcher.submit(prepared)
            else:
                self.arrivals.leave()
                (query,) = embedding.embed_prepared(pipeline, [prepared], self._stage)
            del image, prepared
        return query, detections

    def _embed_batch(self, prepared: list) -> list:
        """Each query embedded by the pipeline that prepared it (one network call per pipeline):
        across a model switch a batch mixes queries of the old and the new version."""
        groups: dict[int, list[int]] = {}
        for n, one in enumerate(prepared):
            groups.setdefault(id(one.pipeline), []).append(n)
        if len(groups) == 1:
            return self._embed_group(prepared[0].pipeline or self.embedder(), prepared)
        results: list = [None] * len(prepared)
        for rows in groups.values():
            try:
                group = self._embed_group(prepared[rows[0]].pipeline or self.embedder(), [prepared[n] for n in rows])
            except Exception as exc:  # noqa: BLE001 - a lone query's failure is its own, not the batch's
                group = [exc]
            for n, result in zip(rows, group):
                results[n] = result
        return results

    def _embed_group(self, pipeline, prepared: list) -> list:
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
                           choose=None, unit_query: bool = False) -> tuple[list[dict], bool, int]:
        """Top k distinct products (best image each), optionally of one category, of the row of
        ``vectors`` that ``choose(best score per row)`` picks (default row 0); whether some shard
        did not answer; and the row. ``unit_query``: the vectors are the embedder's (unit length),
        so scores are clipped to their exact range."""
        ntotal = live.ntotal
        if ntotal == 0:
            self.arrivals.leave()
            return [], False, 0
        fetch, limit = distinct_fetch(k, ntotal)
        all_scores, all_ids, partial = self._search(live, vectors, fetch, category)
        row = 0
        if choose is not None and len(vectors) > 1:
            from embed.pipeline import best_cosines

            row = choose(best_cosines(all_scores, all_ids, live.higher_is_better))
        scores, ids, vector = all_scores[row], all_ids[row], vectors[row]
        while True:
            if unit_query:
                scores = clip_unit_scores(scores, live.higher_is_better)
            with self._stage("join"):
                results = self._join(scores, ids, k)
            if len(results) >= k or fetch >= limit:
                return results, partial, row
            fetch = widen(fetch, limit, DISTINCT_WIDEN_FACTOR)  # many images per product: look deeper, alone
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

    def image_file(self, product_id: str, image: str | None) -> tuple[bytes, str, str]:
        """(bytes, file name as stored, sha256) of a catalog image of this product: the stored
        path's regular file, reached without following links, whose bytes hash to the stored
        content hash (:func:`serve.image_files.read_verified`); never an arbitrary path."""
        records = self._records_of(product_id)
        chosen = records[0] if image is None else next((r for r in records if r.image == image), None)
        if chosen is None:
            raise ApiError(404, "unknown_image", f"product {product_id!r} has no image {image!r}")
        data = read_verified(chosen.path, chosen.content_hash, f"product {product_id!r}")
        return data, chosen.image, chosen.content_hash
