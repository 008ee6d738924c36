"""Verification of candidate duplicate pairs on their pixels (:mod:`embed.align` decides one pair):
a cached verifier over image ids, the store's products, and the thresholds chosen from labelled pairs.
"""


from __future__ import annotations

import dataclasses
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable

import numpy as np

from embed.align import (  # noqa: F401 - the verification API, in one place for callers
    DEFAULT_CANDIDATE_THRESHOLD,
    DEFAULT_MAX_DISAGREEMENT,
    ImageUnavailable,
    Match,
    Prepared,
    VerifyConfig,
    match_images,
    prepare,
)
from imgsearch.calibration import precision_cut
from imgsearch.errors import BadInput

log = logging.getLogger(__name__)


@dataclasses.dataclass
class VerifyResult:
    """Per pair: ``accepted``, ``disagreement`` (inf when not verifiable), ``overlap``; ``skipped``
    counts pairs with an unreadable image (never accepted), ``errors`` holds their first messages."""
    accepted: np.ndarray
    disagreement: np.ndarray
    overlap: np.ndarray
    skipped: int = 0
    errors: list = dataclasses.field(default_factory=list)


MAX_ERRORS_KEPT = 20


class Verifier:
    """Verifies image pairs by id, with a bounded LRU cache of prepared images (failures included,
    so a missing file is read once). ``image_of_id(id)`` returns a PIL image, a path or bytes, or
    raises :class:`ImageUnavailable` (any OSError/BadInput is treated the same)."""

    def __init__(self, image_of_id: Callable[[Hashable], object], cfg: VerifyConfig | None = None):
        self.cfg = cfg or VerifyConfig()
        self.cfg.check()
        self.image_of_id = image_of_id
        self.cache: OrderedDict[Hashable, Prepared | ImageUnavailable] = OrderedDict()
        self.pairs = self.accepted = self.skipped = 0
        self.errors: list[str] = []

    def prepared(self, key: Hashable) -> Prepared:
        hit = self.cache.get(key)
        if hit is None:
            try:
                hit = prepare(self.image_of_id(key), self.cfg)
            except ImageUnavailable as exc:
                hit = exc
            except Exception as exc:  # noqa: BLE001 - one odd image must not end a long scan; it is counted
                hit = ImageUnavailable(f"image of {key!r}: {type(exc).__name__}: {exc}")
            self.cache[key] = hit
            if len(self.cache) > self.cfg.cache_images:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(key)
        if isinstance(hit, ImageUnavailable):
            raise hit
        return hit

    def match(self, key_a: Hashable, key_b: Hashable, *, exhaustive: bool = False) -> Match | None:
        """The match of two images, or None (counted as skipped) when one cannot be read."""
        self.pairs += 1
        try:
            a, b = self.prepared(key_a), self.prepared(key_b)
        except ImageUnavailable as exc:
            self.skipped += 1
            if len(self.errors) < MAX_ERRORS_KEPT:
                self.errors.append(str(exc))
            log.debug("verify: skipped pair (%r, %r): %s", key_a, key_b, exc)
            return None
        m = match_images(a, b, self.cfg, exhaustive=exhaustive)
        self.accepted += int(m.accepted(self.cfg))
        return m


def verify_pairs(pairs: Iterable[tuple[Hashable, Hashable]], image_of_id: Callable[[Hashable], object],
                 cfg: VerifyConfig | None = None, *, exhaustive: bool = False,
                 verifier: Verifier | None = None) -> VerifyResult:
    """Verify image pairs ``(id_a, id_b)``; ``image_of_id`` maps an id to a PIL image, path or bytes.

    A pair with an unreadable image is skipped (not accepted, disagreement inf) and counted; the
    call never raises for one bad image."""
    v = verifier or Verifier(image_of_id, cfg)
    skipped0, errors0 = v.skipped, len(v.errors)
    acc, dis, ovl = [], [], []
    for key_a, key_b in pairs:
        m = v.match(key_a, key_b, exhaustive=exhaustive)
        acc.append(m is not None and m.accepted(v.cfg))
        dis.append(np.inf if m is None else m.disagreement)
        ovl.append(0.0 if m is None else m.overlap)
    return VerifyResult(np.array(acc, bool), np.array(dis, np.float32), np.array(ovl, np.float32),
                        v.skipped - skipped0, v.errors[errors0:])


# ---------------------------------------------------------------- store products


def record_image_path(record, image_root: str | os.PathLike | None = None) -> str:
    """Where a stored record's image is: its resolved ``path`` (set at ingest), else its catalog
    ``image`` (absolute, or relative to ``image_root``, default the working directory)."""
    if record.path:
        return record.path
    if not record.image:
        raise ImageUnavailable(f"item {record.id} of product {record.product_id!r} has no image path")
    if os.path.isabs(record.image) or image_root is None:
        return record.image
    return os.path.join(os.fspath(image_root), record.image)


class StoreImages:
    """``image_of_id`` for item ids of an open CatalogStore: the path of the item's image file."""

    def __init__(self, store, image_root: str | os.PathLike | None = None):
        self.store, self.image_root = store, image_root

    def __call__(self, item_id: int) -> str:
        record = self.store.get(int(item_id))
        if record is None or record.deleted:
            raise ImageUnavailable(f"item {item_id} is not in the store")
        path = record_image_path(record, self.image_root)
        if not os.path.isfile(path):
            raise ImageUnavailable(f"image of item {item_id} (product {record.product_id!r}) not found: {path!r}")
        return path


class ProductVerifier:
    """Verifies product pairs: up to ``cfg.max_image_pairs`` image pairs of the two products, most
    similar (stored vectors) first; the product pair is accepted when one image pair is."""

    def __init__(self, store, cfg: VerifyConfig | None = None, image_root: str | os.PathLike | None = None):
        self.store = store
        self.images = Verifier(StoreImages(store, image_root), cfg)
        self.cfg = self.images.cfg
        self.products: OrderedDict[str, tuple[list[int], np.ndarray]] = OrderedDict()
        self.pairs = self.accepted = self.unverifiable = 0

    def _items(self, product_id: str) -> tuple[list[int], np.ndarray]:
        hit = self.products.get(product_id)
        if hit is None:
            hit = self.store.product_vectors(product_id)
            self.products[product_id] = hit
            if len(self.products) > self.cfg.cache_images:
                self.products.popitem(last=False)
        else:
            self.products.move_to_end(product_id)
        return hit

    def image_pairs(self, product_a: str, product_b: str) -> list[tuple[int, int]]:
        ids_a, va = self._items(product_a)
        ids_b, vb = self._items(product_b)
        if not ids_a or not ids_b:
            return []
        sims = va @ vb.T
        order = np.argsort(-sims, axis=None, kind="stable")[: self.cfg.max_image_pairs]
        return [(ids_a[i // len(ids_b)], ids_b[i % len(ids_b)]) for i in order.tolist()]

    def match(self, product_a: str, product_b: str, *, exhaustive: bool = False) -> Match | None:
        """Best match over the image pairs tried; None when no image pair could be read."""
        self.pairs += 1
        best = None
        for ia, ib in self.image_pairs(product_a, product_b):
            m = self.images.match(ia, ib, exhaustive=exhaustive)
            if m is not None and (best is None or m.disagreement < best.disagreement):
                best = m
                if not exhaustive and best.accepted(self.cfg):
                    break
        if best is None:
            self.unverifiable += 1
        elif best.accepted(self.cfg):
            self.accepted += 1
        return best

    def stats(self) -> dict:
        return {"candidate_pairs": self.pairs, "verified_pairs": self.accepted, "unverifiable_pairs": self.unverifiable,
                "image_pairs_skipped": self.images.skipped, "errors": list(self.images.errors)}


# ---------------------------------------------------------------- calibration


CANDIDATE_RECALL = 0.99
CANDIDATE_MARGIN = 0.10
MIN_CANDIDATE = 0.3


def candidate_threshold(similarity: np.ndarray, labels: np.ndarray, *, candidate_recall: float = CANDIDATE_RECALL,
                        margin: float = CANDIDATE_MARGIN, min_candidate: float = MIN_CANDIDATE) -> float:
    """Recall-oriented embedding threshold: keeps ``candidate_recall`` of the labelled duplicates,
    less ``margin`` (verification supplies the precision), and not below ``min_candidate``."""
    sim = np.asarray(similarity, np.float64)
    labels = np.asarray(labels, bool)
    n_pos = int(labels.sum())
    if n_pos == 0 or labels.all():
        raise BadInput(f"calibration needs both duplicate and non-duplicate pairs; got {n_pos} of {len(labels)}")
    pos_sim = sim[labels & ~np.isnan(sim)]
    if not pos_sim.size:
        return min_candidate
    return round(max(min_candidate, float(np.quantile(pos_sim, 1.0 - candidate_recall)) - margin), 6)


def choose_verify_thresholds(similarity: np.ndarray, disagreement: np.ndarray, labels: np.ndarray,
                             target_precision: float, candidate: float | None = None) -> dict:
    """Candidate (embedding) threshold and verification threshold from labelled product pairs.

    The candidate threshold is :func:`candidate_threshold` unless given. The verification
    threshold is the largest ``max_disagreement`` whose precision over the candidates reaches
    the target (highest recall), halfway to the next higher disagreement. Recall counts every
    labelled duplicate, candidates or not; ``disagreement`` is inf for pairs not compared."""
    sim = np.asarray(similarity, np.float64)
    dis = np.asarray(disagreement, np.float64)
    labels = np.asarray(labels, bool)
    if candidate is None:
        candidate = candidate_threshold(sim, labels)
    n_pos = int(labels.sum())
    proposed = ~np.isnan(sim) & (sim >= candidate)
    cand = proposed & np.isfinite(dis)
    d, y = dis[cand], labels[cand]
    order = np.argsort(d, kind="stable")
    d, y = d[order], y[order]
    found = precision_cut(d, y, target_precision)
    if found is None:  # no candidate was compared
        threshold, reached = DEFAULT_MAX_DISAGREEMENT, False
    else:
        cut, reached = found
        if reached:
            nxt = d[cut + 1] if cut + 1 < len(d) else d[cut] + 0.01
            threshold = float((d[cut] + nxt) / 2.0)
        else:  # unreachable: the highest-precision prefix
            threshold = float(d[cut])
    accepted = cand & (dis <= threshold)
    tp_at = int((accepted & labels).sum())
    return {"threshold": round(candidate, 6), "verify_threshold": round(threshold, 6),
            "precision": round(tp_at / max(int(accepted.sum()), 1), 4), "recall": round(tp_at / n_pos, 4),
            "candidate_recall": round(float((proposed & labels).sum()) / n_pos, 4),
            "target_precision": target_precision, "reached": reached, "positives": n_pos,
            "negatives": int((~labels).sum()), "accepted": int(accepted.sum())}
