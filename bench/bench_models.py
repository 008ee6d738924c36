"""One table: fixed projection, catalog-learned projection, trained model; fp32 and int8 ONNX Runtime on the CPU.

Rows: 3 models x 2 runtimes.

- models: "fixed" = the built-in pretrained model (checkpoint None); "catalog" = the pretrained
  trunk with the PCA-whitening fitted, without labels, on the sample set's catalog shots
  (``embed.whitening.fit_catalog_net`` + ``save_projection`` into a temp dir, as
  ``imgsearch embed`` does for a new store, index/jobs/embed_model.py); "trained" =
  ``--trained`` (demo-data/train/model.ckpt; skipped with a note when missing);
- runtimes: "onnxruntime" (fp32, the CPU default) and "int8" (static QDQ, embed/quantize.py),
  calibrated as bench/bench_embed.py does (its ``calibration_images``: train products' catalog
  shots + one pasted-into-a-photo crop each, never the held-out products).

Columns:

- held-out R@1 / R@10: bench/bench_projection.py's evaluation -- the sample set's eval
  (held-out) products' query photos, query = ground-truth box + 10 % margin, against every
  catalog shot, product-level (``train.evaluate.cosine_recall``); each row embeds both sides
  with its own model and runtime;
- images/s: the runner alone on one preprocessed batch of 32 catalog shots, 2 threads, best of
  ``--rounds`` rounds; the rounds interleave the two runtimes of one model (bench_embed's
  ``best_rate``);
- Fashion-MNIST P@1: leave-one-out 1-NN by cosine on ``--fashion-mnist`` (2,000) seeded test
  images (``train.evaluate.fashion_mnist_p_at_1``), with that model and runtime.

    nice -n 5 .venv/bin/python bench/bench_models.py [--sample demo-data/train/sample] [--rounds 3] [--fashion-mnist 2000]

Writes bench/results/bench_models.json (rewritten after each model, so a cut-off run keeps its rows).
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_embed import BATCH, THREADS, best_rate, calibration_images  # noqa: E402
from bench.bench_projection import MARGIN  # noqa: E402
from embed.image_io import decode_image  # noqa: E402
from embed.model import EmbedderConfig  # noqa: E402
from embed.pipeline import crop_with_margin, load_embedder  # noqa: E402
from embed.quantize import CALIBRATION_CHUNK  # noqa: E402
from embed.whitening import DEFAULT_POWER, DEFAULT_SHRINKAGE, fit_catalog_net, save_projection  # noqa: E402
from imgsearch.argtypes import positive_int  # noqa: E402
from imgsearch.sample_data import build_sample_set, read_queries  # noqa: E402
from train.evaluate import cosine_recall, fashion_mnist_p_at_1  # noqa: E402
from train.training_data import read_catalog  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RUNTIMES = ("onnxruntime", "int8")


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def fit_catalog_checkpoint(catalog_paths: list, folder: Path) -> tuple[str, dict]:
    started = time.perf_counter()
    net = fit_catalog_net(catalog_paths, EmbedderConfig())
    seconds = time.perf_counter() - started
    path = folder / "projection.ckpt"
    info = {"method": "pca-whitening of GeM features", "images": net.fit_images, "power": DEFAULT_POWER,
            "shrinkage": DEFAULT_SHRINKAGE, "seconds": round(seconds, 3)}
    save_projection(net, path, info)
    return str(path), info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", default="demo-data/train/sample", help="sample set folder (built when missing)")
    parser.add_argument("--trained", default="demo-data/train/model.ckpt", help="the trained model's checkpoint")
    parser.add_argument("--fashion-mnist", type=positive_int, default=2000, help="Fashion-MNIST test images for P@1")
    parser.add_argument("--rounds", type=positive_int, default=3, help="timing rounds (best kept)")
    parser.add_argument("--models", default="fixed,catalog,trained", help="comma-separated subset of fixed,catalog,trained")
    parser.add_argument("--out", default=str(RESULTS / "bench_models.json"))
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    command = "nice -n 5 .venv/bin/python bench/bench_models.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = {"command": command.strip(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "load_average_start": load_average(), "threads": THREADS, "batch": BATCH, "rounds": args.rounds,
              "evaluation": "bench_projection.py: eval-product query photos, true box + 10% margin, vs every catalog shot",
              "rows": [], "notes": []}
    started = time.perf_counter()

    sample = build_sample_set(args.sample, seed=0, progress=False)
    catalog = read_catalog(sample.catalog_csv)
    catalog_ids = [row.product_id for row in catalog]
    gallery = [decode_image(row.image) for row in catalog]
    eval_ids, train_ids = set(sample.eval_ids), set(sample.train_ids)
    queries = [q for q in read_queries(sample) if q["product_id"] in eval_ids]
    query_ids = [q["product_id"] for q in queries]
    crops = [crop_with_margin(decode_image(q["image"]), q["box"], MARGIN) for q in queries]
    calibration = calibration_images(catalog_ids, gallery, train_ids)
    result |= {"sample": str(sample.root), "n_catalog": len(catalog), "n_queries": len(queries),
               "n_eval_products": len(set(query_ids)), "calibration_images": len(calibration),
               "calibration_chunk": CALIBRATION_CHUNK}
    print(f"sample set {sample.root}: {len(catalog)} catalog shots, {len(queries)} held-out photos of "
          f"{len(set(query_ids))} eval products; int8 calibration: {len(calibration)} train-product images; "
          f"{THREADS} threads, batch {BATCH}, best of {args.rounds} rounds; Fashion-MNIST {args.fashion_mnist}", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        result["load_average_end"] = load_average()
        result["seconds"] = round(time.perf_counter() - started, 1)
        out.write_text(json.dumps(result, indent=1) + "\n")

    with tempfile.TemporaryDirectory(prefix="bench_models_") as tmp:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            info = {}
            if model == "fixed":
                checkpoint = None
            elif model == "catalog":
                checkpoint, info = fit_catalog_checkpoint([row.image for row in catalog], Path(tmp))
                print(f"catalog projection fitted on {info['images']} catalog shots in {info['seconds']:.1f} s", flush=True)
            elif model == "trained":
                checkpoint = args.trained
                if not os.path.isfile(checkpoint):
                    note = f"trained: {checkpoint} is missing, skipped"
                    print(note, flush=True)
                    result["notes"].append(note)
                    continue
            else:
                raise SystemExit(f"unknown model {model!r}")
            embedders = {}
            for runtime in RUNTIMES:
                t0 = time.perf_counter()
                embedder = load_embedder(checkpoint, device="cpu", runtime=runtime,
                                         calibration=calibration if runtime == "int8" else None)
                if embedder.runtime != runtime:
                    note = f"{model}/{runtime}: unavailable here (fell back to {embedder.runtime}), skipped"
                    print(note, flush=True)
                    result["notes"].append(note)
                    continue
                embedders[runtime] = (embedder, time.perf_counter() - t0)
            if not embedders:
                continue
            x = next(iter(embedders.values()))[0].preprocess(gallery[:BATCH])
            rates = {name: [] for name in embedders}
            for _ in range(args.rounds):  # interleaved across this model's runtimes
                for name, (embedder, _) in embedders.items():
                    rates[name].append(best_rate(embedder.runner, x, 1))
            for name, (embedder, build_s) in embedders.items():
                t0 = time.perf_counter()
                g = embedder.embed(gallery)
                recall = cosine_recall(embedder.embed(crops), query_ids, g, catalog_ids, (1, 10))
                fm = fashion_mnist_p_at_1(embedder.embed, n=args.fashion_mnist)
                row = {"model": model, "checkpoint": checkpoint if model != "catalog" else "(temp) projection.ckpt",
                       "runtime": name, "recall@1": recall[1], "recall@10": recall[10],
                       "images_per_s": max(rates[name]), "rounds_images_per_s": rates[name],
                       "fashion_mnist_p@1": fm["embedding"], "fashion_mnist_n": fm["n"],
                       "fashion_mnist_raw_pixels_p@1": fm["raw_pixels"], "build_s": round(build_s, 1),
                       "eval_s": round(time.perf_counter() - t0, 1), "model_hash": embedder.model_hash}
                if name == "int8":
                    row["int8_graph_source"] = embedder.runner.source
                if info:
                    row["projection_fit"] = info
                result["rows"].append(row)
                print(f"  {model:8} {name:12} R@1 {recall[1]:.3f}  R@10 {recall[10]:.3f}  {row['images_per_s']:7.1f} img/s  "
                      f"FM P@1 {fm['embedding']:.3f}  (build {build_s:.0f} s, eval {row['eval_s']:.0f} s, "
                      f"{time.perf_counter() - started:.0f} s total)", flush=True)
            del embedders
            write()

    write()
    print("\n| model | runtime | held-out R@1 | R@10 | images/s | Fashion-MNIST P@1 |")
    print("|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['model']} | {'fp32' if r['runtime'] == 'onnxruntime' else 'int8'} | {r['recall@1']:.3f} | "
              f"{r['recall@10']:.3f} | {r['images_per_s']:.1f} | {r['fashion_mnist_p@1']:.3f} |")
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"\nload average start {result['load_average_start']}, end {result['load_average_end']}; "
          f"{result['seconds']:.0f} s; results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
