"""Evaluation: product-level Recall@K, detector AP@0.5, Fashion-MNIST category P@1.

Recall@K is product-level: the catalog may hold several images of a product,
so the ranking is collapsed to distinct products (best image first) and a
query counts as found at K when its product is among the first K of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from embed.image_io import load_rgb
from imgsearch.errors import BadInput
from imgsearch.progress import Progress
from imgsearch.sample_data import dev_queries, load_fashion_mnist, read_queries
from train.training_data import read_catalog

DEFAULT_KS = (1, 5, 10)


def ranked_products(scores: np.ndarray, catalog_products: Sequence[str], depth: int | None = None) -> list[list[str]]:
    """Per query row of ``scores`` (higher = closer), the distinct catalog products, best first."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] != len(catalog_products):
        raise BadInput(f"scores must be (n_queries, {len(catalog_products)}), got {scores.shape}")
    catalog_products = list(catalog_products)
    ranked = []
    for row in scores:
        seen: dict[str, None] = {}
        for j in np.argsort(-row, kind="stable"):
            seen.setdefault(catalog_products[j])
            if depth is not None and len(seen) >= depth:
                break
        ranked.append(list(seen))
    return ranked


def recall_at_k(ranked: Sequence[Sequence[str]], truths: Sequence[str], ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    """Share of queries whose true product is among the first K distinct products of their ranking."""
    if len(ranked) != len(truths):
        raise BadInput(f"{len(ranked)} rankings but {len(truths)} true products")
    if not ranked:
        raise BadInput("recall needs at least one query")
    if any(not (isinstance(k, int) and k >= 1) for k in ks):
        raise BadInput(f"every K must be a positive int, got {list(ks)}")
    return {k: float(np.mean([truth in list(r)[:k] for r, truth in zip(ranked, truths)])) for k in ks}


def cosine_recall(queries: np.ndarray, query_products: Sequence[str], catalog: np.ndarray,
                  catalog_products: Sequence[str], ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    """Recall@K of unit-vector queries against unit-vector catalog rows, by inner product."""
    ranked = ranked_products(queries @ catalog.T, catalog_products, depth=max(ks))
    return recall_at_k(ranked, query_products, ks)


# ---------------------------------------------------------------- detection


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of (n, 4) and (m, 4) x1y1x2y2 boxes."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def average_precision(predictions: Sequence[tuple[np.ndarray, np.ndarray]], ground_truths: Sequence[np.ndarray],
                      iou_threshold: float = 0.5) -> float:
    """VOC-style all-point AP of one class.

    ``predictions[i]``: (boxes (k, 4), scores (k,)) of image i; ``ground_truths[i]``:
    its true boxes (g, 4). Detections are matched greedily, best score first, each
    true box at most once (a second hit on it is a false positive).
    """
    if len(predictions) != len(ground_truths):
        raise BadInput(f"{len(predictions)} prediction lists but {len(ground_truths)} ground-truth lists")
    n_true = sum(len(np.asarray(g).reshape(-1, 4)) for g in ground_truths)
    if n_true == 0:
        raise BadInput("AP needs at least one ground-truth box")
    records = []  # (score, image index, detection index)
    for i, (_boxes, scores) in enumerate(predictions):
        records += [(float(s), i, j) for j, s in enumerate(np.asarray(scores).reshape(-1))]
    records.sort(key=lambda r: -r[0])
    taken = [np.zeros(len(np.asarray(g).reshape(-1, 4)), dtype=bool) for g in ground_truths]
    hits = np.zeros(len(records))
    for r, (_, i, j) in enumerate(records):
        truth = np.asarray(ground_truths[i]).reshape(-1, 4)
        if not len(truth):
            continue
        ious = box_iou(np.asarray(predictions[i][0]).reshape(-1, 4)[j : j + 1], truth)[0]
        best = int(np.argmax(ious))
        if ious[best] >= iou_threshold and not taken[i][best]:
            taken[i][best] = True
            hits[r] = 1
    true_pos = np.cumsum(hits)
    recall = true_pos / n_true
    precision = true_pos / np.arange(1, len(records) + 1)
    # All-point interpolation: precision made monotone from the right, integrated over recall steps.
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


# ---------------------------------------------------------------- category kNN


def knn_precision_at_1(vectors: np.ndarray, labels: Sequence[int]) -> float:
    """Leave-one-out 1-NN by cosine: the share of items whose nearest other item has their label."""
    x = np.asarray(vectors, dtype=np.float32).reshape(len(labels), -1)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    similarity = x @ x.T
    np.fill_diagonal(similarity, -np.inf)
    labels = np.asarray(labels)
    return float(np.mean(labels[np.argmax(similarity, axis=1)] == labels))


def fashion_mnist_pick(total: int, n: int, seed: int = 0) -> np.ndarray:
    """The seeded, sorted pick of ``n`` of ``total`` Fashion-MNIST images every category measurement uses."""
    return np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))


def fashion_mnist_pils(images: np.ndarray) -> list:
    """Fashion-MNIST uint8 28 x 28 -> RGB PIL images, inverted: white-on-black becomes a product on a light studio background."""
    return [Image.fromarray(255 - im).convert("RGB") for im in images]


def fashion_mnist_p_at_1(embed_images: Callable[[list], np.ndarray], n: int = 2000, seed: int = 0) -> dict[str, float]:
    """Category P@1 on ``n`` Fashion-MNIST test images (seeded pick): the embedder's vs raw pixels'."""
    images, labels = load_fashion_mnist("test")
    pick = fashion_mnist_pick(len(images), n, seed)
    images, labels = images[pick], labels[pick]
    return {
        "embedding": knn_precision_at_1(embed_images(fashion_mnist_pils(images)), labels),
        "raw_pixels": knn_precision_at_1(images.reshape(len(images), -1).astype(np.float32), labels),
        "n": int(len(images)),
    }


# ---------------------------------------------------------------- the held-out retrieval run


@dataclass
class RetrievalSet:
    """Held-out queries (image paths, true product, true box) and the catalog to search."""
    query_images: list  # paths, or in-memory images for dev photos
    query_products: list[str]
    query_boxes: list[tuple[float, float, float, float]]
    catalog_images: list[str]
    catalog_products: list[str]

    @classmethod
    def from_sample_set(cls, sample_set, eval_ids: Sequence[str] | None = None, limit_queries: int | None = None,
                        dev_per_product: int | None = None) -> RetrievalSet:
        """The eval queries against the whole catalog; with ``dev_per_product``, that many dev photos
        per held-out product (:func:`imgsearch.sample_data.dev_queries`, in-memory images) instead."""
        keep = set(eval_ids if eval_ids is not None else sample_set.eval_ids)
        rows = read_queries(sample_set) if dev_per_product is None else dev_queries(sample_set, dev_per_product)
        queries = [q for q in rows if q["product_id"] in keep][:limit_queries]
        catalog = read_catalog(sample_set.catalog_csv)
        return cls(
            query_images=[q["image"] for q in queries],
            query_products=[q["product_id"] for q in queries],
            query_boxes=[tuple(q["box"]) for q in queries],
            catalog_images=[row.image for row in catalog],
            catalog_products=[row.product_id for row in catalog],
        )


AP_SCORE_THRESHOLD = 0.05  # AP needs the low-score tail of the detections, not only those the pipeline keeps


def query_pass(pipeline, images: list, ap_threshold: float = AP_SCORE_THRESHOLD) -> tuple[list, list | None]:
    """Each query's :class:`embed.pipeline.QueryEmbedding` by ``pipeline``'s path, plus every detection down to ``ap_threshold``.

    The same regions and vectors as ``pipeline.embed_queries(images)`` (the
    detector's choice, then the candidates), with one detector pass serving both
    the recall and the AP measurement.
    """
    decoded = [load_rgb(im) for im in images]
    found: list = [None] * len(decoded)
    if pipeline.detector is not None:
        found = pipeline.detector.detect(decoded, min(ap_threshold, pipeline.candidate_threshold, pipeline.keep_threshold))
    queries = pipeline.embed_regions(decoded, [pipeline.regions_of(image, dets) for image, dets in zip(decoded, found)])
    if pipeline.detector is None:
        return queries, None
    return queries, [(d.boxes[d.scores >= ap_threshold], d.scores[d.scores >= ap_threshold]) for d in found]


def answering_vectors(queries: list, catalog: np.ndarray) -> np.ndarray:
    """Per query, the vector of the region a search of ``catalog`` (exact, by inner product) answers with."""
    return np.stack([q.vectors[q.choose((q.vectors @ catalog.T).max(axis=1))] for q in queries])


def evaluate_pipeline(pipeline, data: RetrievalSet, catalog_mode: str = "whole", ks: Sequence[int] = DEFAULT_KS,
                      progress: bool | None = None, batch: int = 16) -> dict:
    """Recall@K of ``pipeline`` (an :class:`embed.pipeline.QueryPipeline`): queries detect -> crop -> embed,
    each answered by its best-matching region as the server does; with a detector, also its AP@0.5
    on the queries' true boxes.

    ``catalog_mode``: ``whole`` embeds each clean catalog shot as is; ``detect``
    sends it through the same detect -> crop path as the queries.
    """
    if catalog_mode not in ("whole", "detect"):
        raise BadInput(f"catalog_mode must be 'whole' or 'detect', got {catalog_mode!r}")
    if catalog_mode == "whole":
        catalog = pipeline.embedder.embed(data.catalog_images)
    else:
        catalog = pipeline.embed_catalog(data.catalog_images)
    vectors, predictions = [], []
    # None is "auto": a bar on a terminal and timed plain lines otherwise; only False is silent.
    with Progress(len(data.query_images), "eval queries", "queries", enabled=progress is not False) as bar:
        for start in range(0, len(data.query_images), batch):
            chunk = data.query_images[start : start + batch]
            queries, p = query_pass(pipeline, chunk)
            vectors.append(answering_vectors(queries, catalog))
            predictions += p or []
            bar.update(len(chunk))
    recall = cosine_recall(np.concatenate(vectors), data.query_products, catalog, data.catalog_products, ks)
    metrics = {f"recall@{k}": v for k, v in recall.items()}
    if pipeline.detector is not None:
        metrics["ap@0.5"] = average_precision(predictions, [np.array([b], dtype=np.float32) for b in data.query_boxes])
    metrics["n_queries"] = len(data.query_images)
    metrics["n_catalog"] = len(data.catalog_images)
    return metrics
