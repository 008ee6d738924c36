"""Dedup's default threshold, calibrated on the catalog itself from planted copies.

A fixed similarity threshold means different things for different catalogs and embedders (on
small grey product photos 0.90 groups many distinct products). Without ``--threshold`` or a
labels file, ``imgsearch dedup`` therefore measures it: a seeded sample of the store's own images
gets one planted copy each (JPEG re-encode at a lower quality, a small resize, a small crop, or a
slight colour jitter, in turn), embedded in memory with the store's embedder and never stored.
Positives: each copy against its product (best image pair, as dedup scores products). Negatives:
each sampled product against its nearest other products (exact, over all live stored vectors).
The threshold is the lowest one whose precision on those pairs reaches the target
(:func:`index.jobs.dedup.choose_threshold`). A real duplicate among the nearest neighbours counts
as a negative, so the estimate errs towards a higher threshold, never a lower one.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable

import numpy as np

from embed.image_io import decode_image
from embed.verify import record_image_path
from imgsearch.errors import BadInput
from index.jobs.dedup import DEFAULT_THRESHOLD, choose_threshold

log = logging.getLogger(__name__)

METHOD = "planted-copies"
FALLBACK = "fixed-default"
DEFAULT_SAMPLE = 200
NEGATIVES_PER_PRODUCT = 5
MAX_IMAGES_PER_PRODUCT = 8  # query vectors per sampled product when finding its neighbours
SCAN_BLOCK = 65536
KINDS = ("jpeg", "resize", "crop", "colour")
# With --verify the similarity threshold only picks candidates for pixel verification, which then
# decides: it must let through nearly every copy (recall), not be precise. Planted copies are mild,
# so the margin below their 1st percentile leaves room for harder real re-uploads.
CANDIDATE_QUANTILE = 0.01
CANDIDATE_MARGIN = 0.10


def planted_copy(image, kind: str, rng: np.random.Generator):
    """A near-duplicate of ``image`` of the given kind (mild: what re-uploads and re-crops do)."""
    from PIL import Image, ImageEnhance

    image = image.convert("RGB")
    w, h = image.size
    if kind == "jpeg":
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=int(rng.integers(30, 51)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "resize":
        f = rng.uniform(0.6, 0.8)
        return image.resize((max(1, int(w * f)), max(1, int(h * f))), Image.BILINEAR)
    if kind == "crop":
        f = rng.uniform(0.85, 0.92)
        cw, ch = max(1, int(w * f)), max(1, int(h * f))
        dx, dy = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return image.crop((dx, dy, dx + cw, dy + ch))
    out = ImageEnhance.Brightness(image).enhance(rng.uniform(0.9, 1.1))
    out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.9, 1.1))
    return ImageEnhance.Color(out).enhance(rng.uniform(0.85, 1.15))


def fallback(reason: str) -> dict:
    return {"method": FALLBACK, "threshold": DEFAULT_THRESHOLD, "reason": reason}


def reachable_sample(store, sample: int, seed: int, image_root=None) -> list[tuple[str, int, str]]:
    """Up to ``sample`` products (seeded choice), each as (product_id, item id, image path) of one
    live item with a vector whose image file exists."""
    by_product: dict[str, list[tuple[int, str]]] = {}
    for record in store.iter_records():
        if record.path or record.image:
            by_product.setdefault(record.product_id, []).append((record.id, record_image_path(record, image_root)))
    names = sorted(by_product)
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.permutation(len(names)).tolist():
        found = next(((item, path) for item, path in by_product[names[i]] if os.path.isfile(path)), None)
        if found is not None and len(store.product_vectors(names[i])[0]):
            out.append((names[i], *found))
            if len(out) >= sample:
                break
    return out


def nearest_products(store, queries: np.ndarray, owners: list[str], n: int) -> dict[str, dict[str, float]]:
    """For each product in ``owners`` (the product of each query row): its ``n`` most similar other
    products, at their best image pair's similarity. Exact: one pass over the stored vectors."""
    m = n + MAX_IMAGES_PER_PRODUCT
    top_s = np.full((len(queries), 0), -np.inf, np.float32)
    top_i = np.zeros((len(queries), 0), np.int64)
    for ids, x in store.iter_blocks(block_size=SCAN_BLOCK):
        s = np.concatenate([top_s, queries @ x.T], axis=1)
        i = np.concatenate([top_i, np.broadcast_to(ids, (len(queries), len(ids)))], axis=1)
        keep = np.argsort(-s, axis=1, kind="stable")[:, :m]
        top_s, top_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
    uniq = np.unique(top_i)
    pid = {int(i): (r.product_id if r is not None else None) for i, r in zip(uniq, store.get_many(uniq.tolist()))}
    out: dict[str, dict[str, float]] = {}
    for row, owner in enumerate(owners):
        best = out.setdefault(owner, {})
        for score, item in zip(top_s[row].tolist(), top_i[row].tolist()):
            other = pid.get(int(item))
            if other is not None and other != owner and score > best.get(other, -np.inf):
                best[other] = score
    return {p: dict(sorted(b.items(), key=lambda kv: -kv[1])[:n]) for p, b in out.items()}


def calibrate_planted(store, embed_fn: Callable[[list], np.ndarray], target_precision: float, *,
                      sample: int = DEFAULT_SAMPLE, seed: int = 0, image_root=None,
                      negatives: int = NEGATIVES_PER_PRODUCT) -> dict:
    """The threshold from planted copies of the store's own images (module doc). ``embed_fn`` must
    be the embedder the store's vectors came from (list of RGB images -> float32 (n, dim)).
    Returns the calibration (``method`` planted-copies) or, with no image reachable or nothing to
    compare, the fixed default (``method`` fixed-default and a ``reason``)."""
    chosen = reachable_sample(store, sample, seed, image_root)
    if not chosen:
        return fallback("no image file of the store's records is reachable")
    rng = np.random.default_rng(seed)
    copies, kept = [], []
    for n, (product, _item, path) in enumerate(chosen):
        try:
            with open(path, "rb") as f:
                image = decode_image(f.read(), name=path)
        except (OSError, BadInput) as exc:
            log.debug("calibration: skipping %r: %s", path, exc)
            continue
        copies.append(planted_copy(image, KINDS[n % len(KINDS)], rng))
        kept.append(product)
    if not kept:
        return fallback("no image file of the store's records could be decoded")
    vectors = np.asarray(embed_fn(copies), np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    own = {p: store.product_vectors(p)[1][:MAX_IMAGES_PER_PRODUCT] for p in kept}
    positives = [float((own[p] @ v).max()) for p, v in zip(kept, vectors)]
    owners = [p for p in kept for _ in range(len(own[p]))]
    near = nearest_products(store, np.concatenate([own[p] for p in kept]).astype(np.float32), owners, negatives)
    pairs = {tuple(sorted((p, q))): s for p, found in near.items() for q, s in found.items()}
    if not pairs:
        return fallback("the store has no second product to compare with")
    scores = np.concatenate([positives, list(pairs.values())]).astype(np.float64)
    labels = np.r_[np.ones(len(positives), bool), np.zeros(len(pairs), bool)]
    result = choose_threshold(np.clip(scores, -1.0, 1.0), labels, target_precision)
    return {"method": METHOD, **result, **candidate_threshold(np.asarray(positives), np.asarray(list(pairs.values()))),
            "planted_copies": len(kept), "negative_pairs": len(pairs), "kinds": list(KINDS), "seed": seed}


def candidate_threshold(positives: np.ndarray, negatives: np.ndarray) -> dict:
    """The ``--verify`` candidate threshold: a margin below the planted copies' 1st percentile, with
    the share of copies and of nearest-neighbour pairs it lets through to pixel verification."""
    positives = np.clip(np.asarray(positives, np.float64), -1.0, 1.0)
    t = float(np.clip(np.quantile(positives, CANDIDATE_QUANTILE) - CANDIDATE_MARGIN, -1.0, 1.0))
    return {"candidate_threshold": round(t, 6),
            "candidate_recall": round(float(np.mean(positives >= t)), 4),
            "candidate_negative_share": round(float(np.mean(np.asarray(negatives) >= t)) if len(negatives) else 0.0, 4)}


def describe(calibration: dict) -> str:
    """The summary line's account of where the threshold came from."""
    if calibration.get("method") == METHOD and calibration.get("for") == "verify":
        return (f"candidate threshold {calibration['candidate_threshold']:.3f} calibrated on "
                f"{calibration['planted_copies']} planted copies (lets {calibration['candidate_recall']:.2f} of them "
                f"and {calibration['candidate_negative_share']:.2f} of nearest other products through to verification)")
    if calibration.get("method") == METHOD:
        return (f"threshold {calibration['threshold']:.3f} calibrated on {calibration['planted_copies']} planted "
                f"copies (precision {calibration['precision']:.2f}, recall {calibration['recall']:.2f}"
                + ("" if calibration["reached"] else f"; target {calibration['target_precision']:g} not reached") + ")")
    what = "candidate threshold" if calibration.get("for") == "verify" else "threshold"
    return f"{what} {calibration['threshold']:g} is the fixed default ({calibration['reason']})"
