"""Which region of a query photo to embed: held-out R@1 / R@10 of region policies, per checkpoint.

``QueryPipeline`` embeds candidate regions of a query photo (the detector's best boxes down to
``CANDIDATE_THRESHOLD``, the union of the two best, and the whole photo) and answers with the one
that matches the catalog best. This measures that policy against alternatives on the same detections and vectors, so only
the policy differs between columns:

- ``best match``: the pipeline's policy, :meth:`embed.pipeline.QueryEmbedding.choose`: the
  candidate whose nearest catalog shot is closest, plus ``MATCH_SCORE_WEIGHT`` x its detector score;
- ``best match, no merge``: the same without the merged box (``merge_boxes=False``);
- ``best match + gap``: the same, plus ``GAP_WEIGHT`` x (its best product's score - its runner-up
  product's score): a region whose best match stands out is likelier the product (a ratio test);
- ``detector's choice``: the best box scoring at least the threshold (0.3), else the whole photo
  (the pipeline's policy before best match, and still the catalog images' region);
- ``best box``: the best box at any score (down to ``AP_SCORE_THRESHOLD``), else the whole photo;
- ``box + whole``: below the threshold, the normalised sum of the best box's and the whole
  photo's vectors;
- ``flip TTA``: the detector's choice, each vector (query and catalog) the normalised sum of the
  image's and its mirror image's;
- ``true box``: the true box cropped the same way (the embedder alone; not a policy).

It also lists the photos each checkpoint misses at R@10, so misses shared by every model stand
out. Queries are the sample set's held-out shopper photos, or with ``--dev N`` N new photos per
held-out product (:func:`imgsearch.sample_data.dev_queries`), the set to choose settings on so that
the eval queries stay unseen by the choice. The catalog is every catalog shot, embedded as
``imgsearch embed`` ingests it (through the detector; ``--catalog detect``, the default) or whole
(``--catalog whole``), as ``evaluate_pipeline``'s ``catalog_mode``.

    .venv/bin/python bench/bench_region_policy.py A.ckpt [B.ckpt ...] [--sample DIR] [--dev 6] [--catalog whole]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from embed.image_io import load_rgb  # noqa: E402
from embed.pipeline import MATCH_SCORE_WEIGHT, MERGED, QueryEmbedding, crop_with_margin, load_pipeline  # noqa: E402
from imgsearch.sample_data import build_sample_set  # noqa: E402
from train.evaluate import AP_SCORE_THRESHOLD, RetrievalSet, answering_vectors, box_iou, ranked_products  # noqa: E402

POLICIES = ("best match", "best match, no merge", "best match + gap", "detector's choice", "best box", "box + whole", "flip TTA", "true box")
GAP_WEIGHT = 1.0  # "best match + gap": merit + this x (best product score - runner-up product score)
DETECT_BATCH = 16


def normalised(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def mirrored(images: list[Image.Image]) -> list[Image.Image]:
    return [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images]


def hits(queries: np.ndarray, catalog: np.ndarray, data: RetrievalSet) -> tuple[np.ndarray, np.ndarray]:
    """Per query: true product ranked first, and within the first 10 distinct products."""
    ranked = ranked_products(queries @ catalog.T, data.catalog_products, depth=10)
    top1 = np.array([r[0] == t for r, t in zip(ranked, data.query_products)])
    top10 = np.array([t in r for r, t in zip(ranked, data.query_products)])
    return top1, top10


def measure(checkpoint: str, data: RetrievalSet, photos: list[Image.Image], catalog: list[Image.Image],
            catalog_mode: str = "detect") -> dict:
    pipeline = load_pipeline(checkpoint, device="cpu")
    if pipeline.detector is None:
        raise SystemExit(f"{checkpoint} has no trained detector: there is no region to choose")
    threshold = pipeline.keep_threshold
    embed = pipeline.embedder.embed
    found = [d for s in range(0, len(photos), DETECT_BATCH) for d in pipeline.detector.detect(photos[s:s + DETECT_BATCH], AP_SCORE_THRESHOLD)]
    confident = np.array([len(d) > 0 and d.scores[0] >= threshold for d in found])
    boxes = [crop_with_margin(im, d.boxes[0], pipeline.margin) if len(d) else im for im, d in zip(photos, found)]
    true_boxes = [crop_with_margin(im, np.array(b), pipeline.margin) for im, b in zip(photos, data.query_boxes)]
    whole, box, truth = embed(photos), embed(boxes), embed(true_boxes)
    default = np.where(confident[:, None], box, whole)
    default_regions = [b if ok else p for b, p, ok in zip(boxes, photos, confident)]
    default_mirror = embed(mirrored(default_regions))
    embed_catalog = pipeline.embed_catalog if catalog_mode == "detect" else embed
    cat = embed_catalog(catalog)
    cat_tta = normalised(cat + embed_catalog(mirrored(catalog)))
    # The pipeline's own candidates from the same detections, answered as the server answers.
    queries = pipeline.embed_regions(photos, [pipeline.regions_of(im, d) for im, d in zip(photos, found)])
    unmerged = [without_merged(q) for q in queries]
    policies = {
        "best match": (answering_vectors(queries, cat), cat),
        "best match, no merge": (answering_vectors(unmerged, cat), cat),
        "best match + gap": (gap_answering_vectors(queries, cat, data.catalog_products), cat),
        "detector's choice": (default, cat),
        "best box": (box, cat),
        "box + whole": (np.where(confident[:, None], box, normalised(box + whole)), cat),
        "flip TTA": (normalised(default + default_mirror), cat_tta),
        "true box": (truth, cat),
    }
    result = {name: hits(q, c, data) for name, (q, c) in policies.items()}
    top_iou = np.array([box_iou(d.boxes[:1], np.array([b]))[0, 0] if len(d) else 0.0 for d, b in zip(found, data.query_boxes)])
    return {"policies": result, "below_threshold": int((~confident).sum()), "threshold": threshold,
            "top_box_hit": float(np.mean(top_iou >= 0.5))}


def without_merged(query: QueryEmbedding) -> QueryEmbedding:
    """The candidates ``merge_boxes=False`` gives (the same regions in the same order, less the merged box)."""
    keep = [i for i, r in enumerate(query.regions) if r.source != MERGED]
    return QueryEmbedding(query.image_size, [query.regions[i] for i in keep], query.vectors[keep])


def gap_answering_vectors(queries: list[QueryEmbedding], catalog: np.ndarray, catalog_products: list[str]) -> np.ndarray:
    """Like ``answering_vectors``, with the distinctiveness of each region's best product added to its merit."""
    _, owner = np.unique(np.array(catalog_products), return_inverse=True)
    chosen = []
    for q in queries:
        product_scores = np.full((len(q.vectors), owner.max() + 1), -np.inf)
        for row, sims in zip(product_scores, q.vectors @ catalog.T):
            np.maximum.at(row, owner, sims)
        best_two = -np.sort(-product_scores, axis=1)[:, :2]
        gap = best_two[:, 0] - best_two[:, 1] if best_two.shape[1] > 1 else np.zeros(len(best_two))
        merit = best_two[:, 0] + GAP_WEIGHT * gap + MATCH_SCORE_WEIGHT * np.array([r.score for r in q.regions])
        chosen.append(q.vectors[int(np.argmax(merit))])
    return np.stack(chosen)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="trained checkpoints (with a detector)")
    parser.add_argument("--sample", default=None, help="sample set folder (default: the benchmarks' full sample set)")
    parser.add_argument("--dev", type=int, default=None, metavar="N",
                        help="measure on N new photos per held-out product instead of the eval queries")
    parser.add_argument("--catalog", choices=["detect", "whole"], default="detect",
                        help="embed the catalog through the detector as `imgsearch embed` does (default), or whole")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.sample is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import datasets  # bench/datasets.py

        sample = datasets.full_sample_set()
    else:
        sample = build_sample_set(args.sample, seed=0, progress=False)
    data = RetrievalSet.from_sample_set(sample, dev_per_product=args.dev)
    photos = [load_rgb(p) for p in data.query_images]
    catalog = [load_rgb(p) for p in data.catalog_images]
    kind = f"dev photos ({args.dev} per product)" if args.dev else "eval queries"
    print(f"{len(photos)} {kind} of {len(set(data.query_products))} held-out products; catalog {len(catalog)} shots, "
          f"embedded {'through the detector' if args.catalog == 'detect' else 'whole'}\n")
    print("| checkpoint | top box IoU >= 0.5 | photos under the threshold | " + " | ".join(f"{p} R@1 / R@10" for p in POLICIES) + " |")
    print("|---|---|---|" + "---|" * len(POLICIES))
    misses = {}
    for checkpoint in args.checkpoints:
        m = measure(checkpoint, data, photos, catalog, args.catalog)
        cells = [f"{t1.mean():.3f} / {t10.mean():.3f}" for t1, t10 in (m["policies"][p] for p in POLICIES)]
        print(f"| {checkpoint} | {m['top_box_hit']:.3f} | {m['below_threshold']} (< {m['threshold']}) | " + " | ".join(cells) + " |",
              flush=True)
        misses[checkpoint] = {i for i, ok in enumerate(m["policies"]["best match"][1]) if not ok}
    shared = set.intersection(*misses.values())
    print(f"\nR@10 misses of the pipeline's policy (best match): {', '.join(f'{c}: {len(s)}' for c, s in misses.items())}; "
          f"missed by every checkpoint ({len(shared)}):")
    for i in sorted(shared):
        name = data.query_images[i] if isinstance(data.query_images[i], str) else f"dev photo #{i}"
        print(f"  {name}  ({data.query_products[i]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
