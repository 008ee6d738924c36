"""The untrained embedder's projection: the fixed seeded orthogonal map vs a PCA-whitening learned from the catalog.

Every learned variant is fitted on gallery images only, without labels (the
sample set's catalog shots; for Fashion-MNIST, 2,000 of its train images, as a
catalog would be), never on the query photos. Measured on one cached trunk pass
per image and scale (GeM features under /tmp), so the variants differ only in
the projection:

- held-out R@1 / R@10: the sample set's eval photos (query = ground-truth box
  crop + the pipeline's 10 % margin) against every catalog shot, product-level;
- Fashion-MNIST P@1: leave-one-out 1-NN by cosine on 2,000 test images;
- images/s: trunk + GeM (+ projection) at batch 32, 224 px, 2 threads, best of
  the rounds (multi-scale runs the trunk at 1, 1/sqrt2 and 1/2 of 224 px and
  averages the GeM features before projecting).

    .venv/bin/python bench/bench_projection.py [--sample demo-data/train/sample] [--rounds 3]

Writes bench/results/bench_projection.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embed.image_io import decode_image  # noqa: E402
from embed.model import EmbeddingNet  # noqa: E402
from embed.pipeline import crop_with_margin  # noqa: E402
from embed.preprocess import Preprocessor  # noqa: E402
from embed.whitening import fit_whitening, pooled_features  # noqa: E402
from imgsearch.argtypes import positive_int  # noqa: E402
from imgsearch.sample_data import build_sample_set, load_fashion_mnist, read_queries  # noqa: E402
from train.evaluate import cosine_recall, fashion_mnist_pick, fashion_mnist_pils, knn_precision_at_1  # noqa: E402
from train.training_data import read_catalog  # noqa: E402

SCALES = (1.0, 2 ** -0.5, 0.5)
BATCH, SIZE, THREADS, MARGIN, DIM = 32, 224, 2, 0.10, 128
RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path("/tmp/imgsearch_bench_projection")
# name -> (multi-scale?, projection: "fixed" or (eigenvalue power, shrinkage as a share of the mean eigenvalue))
VARIANTS = {
    "fixed orthogonal (today)": (False, "fixed"),
    "PCA-128 (no whitening)": (False, (0.0, 0.0)),
    "PCA-whiten power -0.5": (False, (0.5, 0.0)),
    "PCA-whiten power -0.5, shrink 0.1": (False, (0.5, 0.1)),
    "PCA-whiten power -0.25": (False, (0.25, 0.0)),
    "PCA-whiten power -0.25, shrink 0.1": (False, (0.25, 0.1)),
    "multi-scale, fixed orthogonal": (True, "fixed"),
    "multi-scale, PCA-whiten -0.5, shrink 0.1": (True, (0.5, 0.1)),
    "multi-scale, PCA-whiten -0.25": (True, (0.25, 0.0)),
}


def scaled(batch: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return batch
    side = int(round(batch.shape[-1] * scale))
    return F.interpolate(batch, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


def features(net, preprocess, images: list, name: str) -> np.ndarray:
    """(n_scales, n, 1280) GeM features, cached by name and image count."""
    path = CACHE / f"{name}_{len(images)}.npy"
    if path.is_file():
        return np.load(path)
    out = np.empty((len(SCALES), len(images), 1280), dtype=np.float32)
    for start in range(0, len(images), BATCH):
        batch = preprocess(images[start : start + BATCH])
        for s, scale in enumerate(SCALES):
            out[s, start : start + len(batch)] = pooled_features(net, scaled(batch, scale)).numpy()
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    return out


def project(feats: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    y = feats @ weight.T + bias
    return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)


def projection_for(spec, fit_feats: np.ndarray, fixed: tuple[np.ndarray, np.ndarray]):
    if spec == "fixed":
        return fixed
    power, shrinkage = spec
    return fit_whitening(fit_feats, DIM, power=power, shrinkage=shrinkage)


def rate(net, rounds: int, multi: bool) -> float:
    x = torch.randn(BATCH, 3, SIZE, SIZE)

    def run():
        with torch.no_grad():
            pooled = [pooled_features(net, scaled(x, s)) for s in (SCALES if multi else (1.0,))]
            return net.head.projection(torch.stack(pooled).mean(0))

    run()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return BATCH / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", default="demo-data/train/sample", help="sample set folder (built when missing)")
    parser.add_argument("--fashion-mnist", type=positive_int, default=2000, help="test images for P@1, and train images to fit on")
    parser.add_argument("--rounds", type=positive_int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    net = EmbeddingNet.pretrained()
    preprocess = Preprocessor(SIZE)
    fixed = (net.head.projection.weight.detach().numpy().copy(), np.zeros(DIM, dtype=np.float32))

    sample = build_sample_set(args.sample, seed=0, progress=False)
    catalog = read_catalog(sample.catalog_csv)
    catalog_ids = [row.product_id for row in catalog]
    eval_ids = set(sample.eval_ids)
    queries = [q for q in read_queries(sample) if q["product_id"] in eval_ids]
    query_ids = [q["product_id"] for q in queries]
    tag = hashlib.sha256(json.dumps([str(sample.root), len(catalog), len(queries)]).encode()).hexdigest()[:8]
    started = time.perf_counter()
    cat_f = features(net, preprocess, [decode_image(row.image) for row in catalog], f"catalog_{tag}")
    query_f = features(net, preprocess, [crop_with_margin(decode_image(q["image"]), q["box"], MARGIN) for q in queries],
                       f"queries_{tag}")
    test_images, test_labels = load_fashion_mnist("test")
    pick = fashion_mnist_pick(len(test_images), args.fashion_mnist)
    test_images, test_labels = test_images[pick], test_labels[pick]
    train_images, _ = load_fashion_mnist("train")  # labels unused: the whitening is unsupervised
    train_images = train_images[fashion_mnist_pick(len(train_images), args.fashion_mnist, seed=1)]
    fm_test = features(net, preprocess, fashion_mnist_pils(test_images), "fm_test")
    fm_train = features(net, preprocess, fashion_mnist_pils(train_images), "fm_train")
    print(f"features: {time.perf_counter() - started:.0f} s (cached under {CACHE}); catalog {len(catalog)} shots, "
          f"{len(queries)} held-out photos of {len(set(query_ids))} eval products, Fashion-MNIST {len(test_labels)} "
          f"test / {len(train_images)} train (fit); {THREADS} CPU threads\n")

    rates = {multi: rate(net, args.rounds, multi) for multi in (False, True)}
    rows = []
    for name, (multi, spec) in VARIANTS.items():
        pick_scales = (lambda f: f.mean(axis=0)) if multi else (lambda f: f[0])
        gallery_feats, fm_fit = pick_scales(cat_f), pick_scales(fm_train)
        weight, bias = projection_for(spec, gallery_feats, fixed)
        gallery = project(gallery_feats, weight, bias)
        recall = cosine_recall(project(pick_scales(query_f), weight, bias), query_ids, gallery, catalog_ids, (1, 10))
        fm_weight, fm_bias = projection_for(spec, fm_fit, fixed)
        p_at_1 = knn_precision_at_1(project(pick_scales(fm_test), fm_weight, fm_bias), test_labels)
        rows.append({"variant": name, "multi_scale": multi, "projection": spec, "recall@1": recall[1],
                     "recall@10": recall[10], "fashion_mnist_p@1": p_at_1, "images_per_s": rates[multi]})

    print("| projection | held-out R@1 | R@10 | Fashion-MNIST P@1 | images/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['recall@1']:.3f} | {r['recall@10']:.3f} | {r['fashion_mnist_p@1']:.3f} | "
              f"{r['images_per_s']:.1f} |")
    base = rows[0]
    winners = [r["variant"] for r in rows[1:]
               if r["recall@1"] > base["recall@1"] and r["fashion_mnist_p@1"] > base["fashion_mnist_p@1"]]
    print(f"\nbeat the fixed projection on both held-out R@1 and Fashion-MNIST P@1: {winners or 'none'}")
    RESULTS.mkdir(exist_ok=True)
    result = {"command": "bench/bench_projection.py " + " ".join(sys.argv[1:]), "threads": THREADS,
              "n_catalog": len(catalog), "n_queries": len(queries), "n_fashion_mnist": int(len(test_labels)),
              "scales": list(SCALES), "rows": rows, "winners": winners}
    (RESULTS / "bench_projection.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
