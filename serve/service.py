"""Query execution for the server: the live index snapshot, the store join, distinct products.

The live index is an immutable snapshot object swapped by one attribute
assignment, so a request that started on the old version finishes on it, and
per-request search parameters are passed per call, never written into a
shared index object.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serve.errors import ApiError
from serve.requests import SearchRequest

log = logging.getLogger(__name__)

# Several images of one product collapse to one result, so fetch more candidates than k.
OVERFETCH = 4
MIN_EXTRA_CANDIDATES = 32


@dataclass(frozen=True)
class LiveIndex:
    version: str
    index: Any  # the object index.open_index returns
    dim: int
    ntotal: int
    higher_is_better: bool


class SearchService:
    def __init__(self, index_root: str | Path, store_path: str | Path, embedder=None, embedder_loader=None):
        self.index_root = Path(index_root)
        self.store_path = Path(store_path)
        self._embedder = embedder
        self._embedder_loader = embedder_loader
        self._embedder_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._live: LiveIndex | None = None
        self._last_error = "no index loaded yet"
        self._store = None
        self.metrics = None

    def attach_metrics(self, metrics) -> None:
        self.metrics = metrics
        if self._live is not None:
            metrics.set_index(self._live.version, self._live.ntotal)

    # ------------------------------------------------------------------ lifecycle

    def live(self) -> LiveIndex | None:
        return self._live

    def not_ready_reason(self) -> str:
        return f"no index loaded: {self._last_error}"

    def store(self):
        if self._store is None:
            from index.store import CatalogStore

            self._store = CatalogStore.open_readonly(self.store_path)
        return self._store

    def load_current(self) -> LiveIndex | None:
        """Open the version CURRENT names and make it live; on failure keep the old one."""
        with self._reload_lock:
            try:
                from index import open_index
                from index.sources import store_category_of

                store = self.store()
                opened = open_index(
                    str(self.index_root),
                    category_of=store_category_of(store),
                    deleted_ids=np.fromiter(store.deleted_ids(), dtype=np.int64),
                )
                manifest = opened.manifest
                live = LiveIndex(
                    version=str(manifest["version"]),
                    index=opened,
                    dim=int(manifest["dim"]),
                    ntotal=int(opened.ntotal),
                    higher_is_better=manifest["metric"] == "ip",
                )
                self._warm(live)
            except Exception as exc:  # noqa: BLE001 - any failure leaves the old version serving
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.warning("index not loaded from %s: %s", self.index_root, self._last_error)
                return self._live
            self._live = live
            if self.metrics is not None:
                self.metrics.set_index(live.version, live.ntotal)
            log.info("serving index version %s (%d vectors)", live.version, live.ntotal)
            return live

    @staticmethod
    def _warm(live: LiveIndex) -> None:
        """One query before going live, so the first real request pays no page-in cost."""
        if live.ntotal:
            live.index.search(np.zeros((1, live.dim), dtype=np.float32), 1)

    def embedder(self):
        with self._embedder_lock:
            if self._embedder is None:
                if self._embedder_loader is None:
                    raise ApiError(503, "no_embedder", "this server has no image embedder; send a 'vector' query")
                self._embedder = self._embedder_loader()
            return self._embedder

    def warm_embedder(self) -> None:
        from PIL import Image

        self.embedder().embed_queries([Image.new("RGB", (224, 224), (128, 128, 128))])

    # ------------------------------------------------------------------ queries

    def _stage(self, name: str):
        return self.metrics.stage(name)

    def search(self, live: LiveIndex, query: SearchRequest) -> dict:
        detections: list[dict] = []
        if query.vector is not None:
            vector = query.vector
        else:
            vector, detections = self._embed_query_image(query.image)
        if vector.shape[-1] != live.dim:
            raise ApiError(500, "dimension_mismatch", f"the embedder makes {vector.shape[-1]}-d vectors, the index holds {live.dim}-d")
        results = self._distinct_products(live, vector.reshape(1, -1), query.k, query.category)
        return {"detections": detections, "results": results}

    def _embed_query_image(self, data: bytes) -> tuple[np.ndarray, list[dict]]:
        from embed.image_io import decode_image

        with self._stage("decode"):
            image = decode_image(data)
        (query,) = self.embedder().embed_queries([image], stage=self._stage)
        return query.best, query.detections()

    def _distinct_products(self, live: LiveIndex, vector: np.ndarray, k: int, category: str | None) -> list[dict]:
        """Top k distinct products (best image each), optionally of one category."""
        if live.ntotal == 0:
            return []
        fetch = min(live.ntotal, max(k * OVERFETCH, k + MIN_EXTRA_CANDIDATES))
        while True:
            with self._stage("search"):
                scores, ids = live.index.search(vector, fetch, category=category)
            with self._stage("join"):
                results = self._join(scores[0], ids[0], k)
            if len(results) >= k or fetch >= live.ntotal:
                return results
            fetch = min(live.ntotal, fetch * 4)

    def _join(self, scores: np.ndarray, ids: np.ndarray, k: int) -> list[dict]:
        valid = ids >= 0
        records = self.store().get_many(ids[valid].tolist())
        best: dict[str, dict] = {}
        for score, record in zip(scores[valid].tolist(), records):
            if record is None or record.deleted or record.product_id in best:
                continue
            best[record.product_id] = {
                "product_id": record.product_id,
                "score": round(float(score), 6),
                "category": record.category,
                "image": record.image,
                "metadata": record.metadata,
            }
            if len(best) == k:
                break
        return list(best.values())

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

