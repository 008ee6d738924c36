"""Embedding speed and accuracy on the CPU: plain torchvision MobileNetV2 vs our runtimes; detector latency.

Prints three tables:
1. throughput (images/s, forward only, batch 32, 224 px, 2 threads; ms@1: one crop) for a plain fp32 eager
   torchvision MobileNetV2 and each embedder runtime, with each runtime's max abs / cosine
   deviation from fp32 eager embeddings and its Recall@1 on the real sample set
   (held-out tuxpaint products pasted into real photos, query = ground-truth box + 10 % margin,
   gallery = every product's catalog shot); "R@1 mix" searches this runtime's query vectors
   against the fp32 (eager) catalog, as int8 queries would search a catalog embedded in fp32.
   The int8 runtime (ONNX Runtime QDQ) is calibrated on train products only: their catalog shots
   plus one pasted-into-a-photo crop each (300 images at --products 200), never the held-out ones,
   16 images per calibration pass (embed/quantize.py; "build s" includes it unless the graph was cached);
2. detector latency per photo (SSDlite vs Faster R-CNN on the same MobileNetV2 trunk);
3. the shared-trunk alternative: RoI-pooled features of one whole-photo trunk pass vs crop -> re-embed.

Timing rounds interleave the variants and keep each one's best round, because the CPU is shared.

    .venv/bin/python bench/bench_embed.py [--products 200] [--rounds 5] [--checkpoint demo-data/train/model.ckpt]

Writes bench/results/bench_embed.json (bench_embed_ckpt.json with --checkpoint).
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # torchvision's Python roi_align fallback would compile for 17 s

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embed.detector import DetectorConfig, ProductDetector  # noqa: E402
from embed.image_io import decode_image  # noqa: E402
from embed.pipeline import crop_with_margin, load_embedder  # noqa: E402
from embed.preprocess import Preprocessor  # noqa: E402
from embed.quantize import CALIBRATION_CHUNK  # noqa: E402
from embed.torchvision_compat import torchvision  # noqa: E402
from imgsearch import assets  # noqa: E402
from imgsearch.argtypes import positive_int  # noqa: E402

BATCH, SIZE, THREADS = 32, 224, 2
RESULTS = Path(__file__).resolve().parent / "results"


def best_rate(fn, x: torch.Tensor, rounds: int) -> float:
    """Images/s of the fastest of ``rounds`` timed calls (after one warm-up)."""
    fn(x)
    best = min(_timed(fn, x) for _ in range(rounds))
    return len(x) / best


def _timed(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def plain_mobilenet_v2():
    """The reference: torchvision's MobileNetV2 as shipped, fp32, NCHW, eager, under no_grad."""
    net = torchvision.models.mobilenet_v2(weights=None)
    net.load_state_dict(torch.load(assets.mobilenet_v2_weights(), weights_only=True))
    net.eval()

    def forward(x):
        with torch.no_grad():
            return net(x.contiguous())

    return forward


def sample_eval_set(n_products: int):
    from imgsearch.sample_data import build_sample_set, read_queries

    root = assets.cache_dir() / "bench" / f"sample_set_{n_products}"
    sample = build_sample_set(root, seed=0, limit_products=n_products, progress=False)
    import csv

    with open(sample.catalog_csv, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    gallery_ids = [r["product_id"] for r in rows]
    gallery = [decode_image(sample.root / r["image"]) for r in rows]
    queries = read_queries(sample)
    photos = [decode_image(q["image"]) for q in queries]
    return gallery_ids, gallery, queries, photos, set(sample.train_ids)


def calibration_images(gallery_ids, gallery, train_ids) -> list:
    """Train products only: each one's catalog shot, and one crop of it pasted into a real background photo."""
    from imgsearch.sample_data.products import list_products, load_cutout
    from imgsearch.sample_data.scenes import list_backgrounds, render_scene

    products = {p.product_id: p for p in list_products()}
    backgrounds = list_backgrounds()
    shots = [im for pid, im in zip(gallery_ids, gallery) if pid in train_ids]
    crops = []
    for k, pid in enumerate(pid for pid in gallery_ids if pid in train_ids):
        render = render_scene([load_cutout(products[pid], max_side=256)], np.random.default_rng([99, k]), backgrounds)
        crops.append(crop_with_margin(render.image, render.boxes[0], 0.10))
    return shots + crops


def recall_at_1(query_vectors, query_ids, gallery_vectors, gallery_ids) -> float:
    top = (query_vectors @ gallery_vectors.T).argmax(axis=1)
    return float(np.mean([gallery_ids[t] == q for t, q in zip(top, query_ids)]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=positive_int, default=200, help="sample-set size (a quarter are held out as queries)")
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--checkpoint", default=None, help="embedder checkpoint (default: the pretrained MobileNetV2)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)

    gallery_ids, gallery, queries, photos, train_ids = sample_eval_set(args.products)
    crops = [crop_with_margin(p, q["box"], 0.10) for p, q in zip(photos, queries)]
    query_ids = [q["product_id"] for q in queries]
    calibration = calibration_images(gallery_ids, gallery, train_ids)
    print(f"sample set: {len(gallery)} catalog products, {len(queries)} held-out query photos; "
          f"{THREADS} threads, batch {BATCH}, {SIZE} px, best of {args.rounds} rounds; "
          f"model: {args.checkpoint or 'pretrained'}; int8 calibration: {len(calibration)} train-product images\n")

    runtimes = ["eager", "torchscript", "int8", "onnxruntime"]
    embedders = {}
    for name in runtimes:
        start = time.perf_counter()
        embedder = load_embedder(args.checkpoint, device="cpu", runtime=name, calibration=calibration if name == "int8" else None)
        if embedder.runtime != name:
            print(f"  {name}: unavailable here, skipped")
            continue
        embedders[name] = (embedder, time.perf_counter() - start)

    x = embedders["eager"][0].preprocess(gallery[:BATCH])
    plain = plain_mobilenet_v2()
    rates = {"plain": []} | {name: [] for name in embedders}
    for _ in range(args.rounds):  # interleaved: each round times every variant once
        rates["plain"].append(best_rate(plain, x, 1))
        for name, (embedder, _) in embedders.items():
            rates[name].append(best_rate(embedder.runner, x, 1))
    base_rate = max(rates["plain"])

    reference = None
    one = x[:1].clone()
    rows = []
    print(f"{'variant':<34}{'build s':>8}{'img/s':>8}{'x plain':>8}{'ms@1':>7}{'max|dv|':>10}{'min cos':>9}{'R@1':>7}{'R@1 mix':>8}")
    plain_ms = 1000 / best_rate(plain, one, args.rounds)
    print(f"{'torchvision MobileNetV2 fp32 eager':<34}{'':>8}{base_rate:8.1f}{1.0:8.2f}{plain_ms:7.1f}{'':>10}{'':>9}{'':>7}")
    for name, (embedder, build_s) in embedders.items():
        q = embedder.embed(crops)
        g = embedder.embed(gallery)
        if reference is None:
            reference = (q, g)
        dev = max(np.abs(q - reference[0]).max(), np.abs(g - reference[1]).max())
        cos = min((q * reference[0]).sum(1).min(), (g * reference[1]).sum(1).min())
        r1 = recall_at_1(q, query_ids, g, gallery_ids)
        mixed = recall_at_1(q, query_ids, reference[1], gallery_ids)
        rate = max(rates[name])
        ms_one = 1000 / best_rate(embedder.runner, one, args.rounds)  # a query: one crop at a time
        print(f"{'embedder ' + name:<34}{build_s:8.1f}{rate:8.1f}{rate / base_rate:8.2f}{ms_one:7.1f}{dev:10.2e}{cos:9.4f}{r1:7.3f}{mixed:8.3f}")
        rows.append({"runtime": name, "build_s": build_s, "images_per_s": rate, "x_plain": rate / base_rate, "ms_at_1": ms_one,
                     "max_abs_dv": float(dev), "min_cos": float(cos), "recall_at_1": r1, "recall_at_1_mixed_fp32_catalog": mixed,
                     "rounds_images_per_s": rates[name]}
                    | ({"int8_graph_source": embedder.runner.source, "calibration_chunk": CALIBRATION_CHUNK} if name == "int8" else {}))
    summary = int8_summary(rows)
    result = {"command": " ".join(["bench/bench_embed.py", *sys.argv[1:]]), "model": args.checkpoint or "pretrained",
              "products": len(gallery), "queries": len(queries), "calibration_images": len(calibration), "threads": THREADS,
              "batch": BATCH, "rounds": args.rounds, "plain_images_per_s": base_rate, "runtimes": rows, "int8_vs_onnxruntime": summary}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("bench_embed_ckpt.json" if args.checkpoint else "bench_embed.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results: {out}")
    whole = recall_at_1(embedders["eager"][0].embed(photos), query_ids, reference[1], gallery_ids)
    print(f"\n(eager, whole photo as query instead of the box crop: R@1 {whole:.3f} -- what a detector buys)")

    start = time.perf_counter()
    prep = embedders["eager"][0].preprocess
    prep(crops[:BATCH])
    print(f"preprocessing (letterbox + normalise), per crop: {1000 * (time.perf_counter() - start) / BATCH:.2f} ms")

    print(f"\n{'detector (untrained heads)':<34}{'build s':>8}{'ms/photo':>9}")
    photo = photos[0]
    for arch in ("ssdlite", "fasterrcnn"):
        start = time.perf_counter()
        detector = ProductDetector.pretrained(DetectorConfig(arch=arch))
        build_s = time.perf_counter() - start
        detect_one = functools.partial(detector.detect, score_threshold=0.0)
        detect_one([photo])
        best = min(_timed(detect_one, [photo]) for _ in range(args.rounds))
        print(f"{arch + f' ({detector.config.image_size} px)':<34}{build_s:8.1f}{1000 * best:9.1f}")

    shared_trunk_table(embedders["eager"][0], photos, queries, query_ids, reference[1], gallery_ids)
    return 0


def int8_summary(rows: list[dict]) -> dict | None:
    """int8 against the fp32 ONNX embedder: the bar is <= 0.01 R@1 lost and >= 1.5x its images/s."""
    by_name = {r["runtime"]: r for r in rows}
    if "int8" not in by_name or "onnxruntime" not in by_name:
        return None
    int8, fp32 = by_name["int8"], by_name["onnxruntime"]
    summary = {"recall_at_1_lost": fp32["recall_at_1"] - int8["recall_at_1"],
               "mixed_recall_at_1_lost": fp32["recall_at_1"] - int8["recall_at_1_mixed_fp32_catalog"],
               "speedup": int8["images_per_s"] / fp32["images_per_s"]}
    summary["meets_bar"] = summary["recall_at_1_lost"] <= 0.01 and summary["speedup"] >= 1.5
    print(f"\nint8 vs fp32 onnxruntime: R@1 {summary['recall_at_1_lost']:+.3f} lost (mixed: {summary['mixed_recall_at_1_lost']:+.3f}), "
          f"{summary['speedup']:.2f}x images/s; meets the bar (<= 0.01 lost, >= 1.5x): {summary['meets_bar']}")
    return summary


def shared_trunk_table(embedder, photos, queries, query_ids, gallery_vectors, gallery_ids) -> None:
    """Would one trunk pass over the photo (as the detector makes) serve the embedding head too?

    The photo is letterboxed to the detector's 320 px; the box is RoI-aligned on the stride-32
    map and fed to the same head. Compared with crop -> letterbox 224 -> trunk -> head.
    """
    net = embedder.net
    size = DetectorConfig().image_size
    vectors = []
    with torch.inference_mode():
        for photo, query in zip(photos, queries):
            scale = size / max(photo.size)
            fmap = net.trunk(Preprocessor(size)([photo]))
            pad_x, pad_y = (size - photo.width * scale) / 2, (size - photo.height * scale) / 2
            x1, y1, x2, y2 = query["box"]
            box = torch.tensor([[0, x1 * scale + pad_x, y1 * scale + pad_y, x2 * scale + pad_x, y2 * scale + pad_y]], dtype=torch.float32)
            pooled = torchvision.ops.roi_align(fmap, box, output_size=3, spatial_scale=1 / 32, sampling_ratio=2, aligned=True)
            vectors.append(net.embed_features(pooled)[0].numpy())
    r1 = recall_at_1(np.stack(vectors), query_ids, gallery_vectors, gallery_ids)
    print(f"\nshared trunk (RoI-align on the {size} px photo's stride-32 map): R@1 {r1:.3f}")


if __name__ == "__main__":
    sys.exit(main())
