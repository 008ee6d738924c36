"""Held-out query photo -> catalog Recall@1/5/10, detector AP@0.5 and Fashion-MNIST P@1, trained vs untrained.

Every row is measured in the same run against the baseline: the pretrained
MobileNetV2 with the fixed projection, no training, no detection. Queries are
the sample set's shopper photos of EVAL products (never seen in training), or
with ``--dev N`` N new photos per EVAL product (the set settings are chosen on);
the catalog is all catalog shots (train and eval products).

    python bench/bench_recall.py                         # train both losses on demo-data/train/sample, then measure
    python bench/bench_recall.py --checkpoint A.ckpt ... # measure existing checkpoints only
    python bench/bench_recall.py --checkpoint A.ckpt --dev 6 --fashion-mnist 0   # on dev photos

Rows per checkpoint: without detection (whole query photo), with detection
and the catalog embedded whole, and with detection on the catalog too
(``catalog detect``: the catalog as ``imgsearch embed`` ingests it, the path
the product serves).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from embed.checkpoint import Checkpoint  # noqa: E402
from embed.pipeline import QueryPipeline, load_embedder, load_pipeline  # noqa: E402
from imgsearch.sample_data import build_sample_set  # noqa: E402
from train.evaluate import RetrievalSet, evaluate_pipeline, fashion_mnist_p_at_1  # noqa: E402


def _row(name: str, pipeline, data: RetrievalSet, catalog: str) -> dict:
    started = time.perf_counter()
    metrics = evaluate_pipeline(pipeline, data, catalog, progress=False)
    return {"model": name, "detect": pipeline.detector is not None, "catalog": catalog, **metrics,
            "seconds": time.perf_counter() - started}


def _print(rows: list[dict]) -> None:
    print("| model | detection | catalog | R@1 | R@5 | R@10 | AP@0.5 | eval s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ap = f"{r['ap@0.5']:.3f}" if "ap@0.5" in r else "-"
        print(f"| {r['model']} | {'yes' if r['detect'] else 'no'} | {r['catalog']} | {r['recall@1']:.3f} | "
              f"{r['recall@5']:.3f} | {r['recall@10']:.3f} | {ap} | {r['seconds']:.0f} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", default="demo-data/train/sample", help="sample set folder (built when missing)")
    parser.add_argument("--checkpoint", nargs="*", default=None, help="checkpoints to measure (default: train one per loss)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--dev", type=int, default=None, metavar="N",
                        help="measure on N new photos per held-out product (imgsearch.sample_data.dev_queries) instead of the eval queries")
    parser.add_argument("--fashion-mnist", type=int, default=2000, help="test images for category P@1 (0 to skip)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    sample = build_sample_set(args.sample, seed=0, progress=False)
    data = RetrievalSet.from_sample_set(sample, dev_per_product=args.dev)
    checkpoints = args.checkpoint
    train_seconds: dict[str, float] = {}
    if checkpoints is None:
        from train.commands import main as train_main

        checkpoints = []
        for loss in ("triplet", "multisimilarity"):
            out = Path(args.sample).parent / f"bench-{loss}.ckpt"
            started = time.perf_counter()
            train_main([str(sample.catalog_csv), "--output", str(out), "--epochs", str(args.epochs), "--loss", loss,
                        "--no-eval", "--progress", "off"])
            train_seconds[str(out)] = time.perf_counter() - started
            checkpoints.append(str(out))

    kind = f"dev photos ({args.dev} per product)" if args.dev else "photos"
    print(f"held-out queries: {len(data.query_images)} {kind} of {len(set(data.query_products))} eval products; "
          f"catalog: {len(data.catalog_images)} shots; 2 CPU threads\n")
    baseline = QueryPipeline(load_embedder(None, device="cpu"), None)
    rows = [_row("pretrained, no training (baseline)", baseline, data, "whole")]
    _print(rows)
    for path in checkpoints:
        extra = Checkpoint.load(path).extra
        name = f"{extra.get('train_config', {}).get('loss', '?')} ({Path(path).name})"
        trained = load_pipeline(path, device="cpu")
        rows.append(_row(name, QueryPipeline(trained.embedder, None), data, "whole"))
        rows.append(_row(name, trained, data, "whole"))
        if trained.detector is not None:
            rows.append(_row(name, trained, data, "detect"))
        _print(rows[-3 if trained.detector is not None else -2 :])
        if path in train_seconds:
            print(f"train time {name}: {train_seconds[path]:.0f} s", flush=True)

    if args.fashion_mnist:
        print(f"\nFashion-MNIST category P@1 (leave-one-out 1-NN, cosine, {args.fashion_mnist} test images)")
        base = fashion_mnist_p_at_1(baseline.embedder.embed, n=args.fashion_mnist)
        print(f"| raw pixels | {base['raw_pixels']:.3f} |\n| pretrained embedder | {base['embedding']:.3f} |", flush=True)
        for path in checkpoints:
            result = fashion_mnist_p_at_1(load_embedder(path, device="cpu").embed, n=args.fashion_mnist)
            print(f"| trained {Path(path).name} | {result['embedding']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
