"""Peak memory and range agreement of the int8 embedder's chunked calibration (embed/quantize.py).

Each measurement runs in a fresh subprocess so its peak RSS (ru_maxrss) is the calibration's
own: ``--chunk N`` with N = the image count is one collect_data call over everything (what
quantize_static does with a reader); anything smaller is the chunked path. The range table
compares chunked Percentile ranges against the one-call ones on a small set, in units of the
one-call histogram's bin width (2 * max|x| / 2048).

    .venv/bin/python bench/bench_int8_calibration.py [--images 300] [--chunks 32] [--single 64] [--compare 64]

Calibration images: catalog shots and pasted-into-a-photo crops of the sample products, as
bench_embed.py calibrates. Writes bench/results/bench_int8_calibration.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"


def calibration_batch(n: int, checkpoint: str | None) -> tuple[bytes, np.ndarray]:
    """The fp32 embedder graph and ``n`` preprocessed product photos (catalog shots, then crops in scenes)."""
    import torch

    from embed.pipeline import crop_with_margin, load_embedder
    from embed.runtime import OnnxModel
    from imgsearch.sample_data.products import catalog_shot, list_products, load_cutout
    from imgsearch.sample_data.scenes import list_backgrounds, render_scene

    torch.set_num_threads(2)
    embedder = load_embedder(checkpoint, device="cpu", runtime="eager")
    products = list_products()
    backgrounds = list_backgrounds()
    images = []
    for k in range(n):
        product = products[(k // 2) % len(products)]
        if k % 2 == 0:
            images.append(catalog_shot(product))
        else:
            render = render_scene([load_cutout(product, max_side=256)], np.random.default_rng([99, k]), backgrounds)
            images.append(crop_with_margin(render.image, render.boxes[0], 0.10))
    batch = embedder.preprocess(images).numpy()
    net = embedder.net
    size = batch.shape[-1]
    fp32 = OnnxModel("embedder", net, torch.zeros(2, 3, size, size), ["vectors"], net.config.to_dict(), 2)
    return fp32.graph, batch


def child(args) -> int:
    """One measurement: calibrate (or quantize) ``--images`` images ``--chunk`` at a time; print JSON."""
    from embed.quantize import QuantSettings, calibration_ranges

    graph, batch = calibration_batch(args.images, args.checkpoint)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    ranges = calibration_ranges(graph, batch, QuantSettings(), chunk=args.chunk)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"images": args.images, "chunk": args.chunk, "seconds": seconds,
           "peak_rss_gb": peak / 2**20, "rss_before_calibration_gb": before / 2**20}
    if args.dump:
        out["ranges"] = ranges
    print("RESULT " + json.dumps(out))
    return 0


def run_child(images: int, chunk: int, checkpoint: str | None, dump: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", "--images", str(images), "--chunk", str(chunk)]
    cmd += ["--checkpoint", checkpoint] if checkpoint else []
    cmd += ["--dump"] if dump else []
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="images for the chunked peak-RSS run")
    parser.add_argument("--chunks", type=int, nargs="+", default=[32])
    parser.add_argument("--single", type=int, default=64, help="images for the one-call peak-RSS run (0: skip; 300 needs ~18 GB)")
    parser.add_argument("--compare", type=int, default=64, help="images for the chunked vs one-call range comparison")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--dump", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    runs = []
    for images, chunk in [(args.images, c) for c in args.chunks] + ([(args.single, args.single)] if args.single else []):
        r = run_child(images, chunk, args.checkpoint)
        runs.append(r)
        print(f"calibrate {images:4d} images, chunk {chunk:4d}: peak RSS {r['peak_rss_gb']:.2f} GB "
              f"(before calibration {r['rss_before_calibration_gb']:.2f} GB), {r['seconds']:.1f} s", flush=True)

    comparison = []
    if args.compare:
        single = run_child(args.compare, args.compare, args.checkpoint, dump=True)["ranges"]
        for chunk in sorted({c for c in (8, 16, 32) if c < args.compare}):
            chunked = run_child(args.compare, chunk, args.checkpoint, dump=True)["ranges"]
            widths, exact = [], 0
            for name, (lo, hi) in single.items():
                bin_width = 2 * max(abs(lo), abs(hi)) / 2048 or 1.0  # lower bound of the one-call bin width
                clo, chi = chunked[name]
                widths.append(max(abs(clo - lo), abs(chi - hi)) / bin_width)
                exact += (clo, chi) == (lo, hi)
            row = {"chunk": chunk, "tensors": len(single), "identical": exact,
                   "max_dev_in_bins": max(widths), "median_dev_in_bins": float(np.median(widths)),
                   "max_rel_dev": max(max(abs(chunked[n][i] - v[i]) for i in (0, 1)) / max(abs(v[0]), abs(v[1]), 1e-12)
                                      for n, v in single.items())}
            comparison.append(row)
            print(f"ranges, {args.compare} images, chunk {chunk} vs one call: {exact}/{len(single)} identical, "
                  f"max deviation {row['max_dev_in_bins']:.2f} bins (median {row['median_dev_in_bins']:.2f}), "
                  f"max relative {row['max_rel_dev']:.2e}", flush=True)

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bench_int8_calibration.json"
    out.write_text(json.dumps({"command": " ".join(["bench/bench_int8_calibration.py", *sys.argv[1:]]),
                               "model": args.checkpoint or "pretrained", "runs": runs, "range_comparison": comparison},
                              indent=1) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
