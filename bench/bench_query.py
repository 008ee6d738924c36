"""Image-query latency on the CPU: the trained detector's cost, stage by stage, and decode -> detect -> crop -> embed.

Prints these tables, on real shopper photos (the sample set's held-out query photos) and a trained checkpoint:

1. where a detection's time goes, torchvision's SSD forward (the old ``detect``) vs the new path
   (numpy preprocessing, network on a runtime, postprocess over the candidates only), median ms per stage;
2. NMS kernels on random boxes: the torch reference loop vs the numpy kernel registered as ``torchvision::nms``;
3. detector ms per photo, one photo per call: torchvision forward (before), eager network, ONNX Runtime;
4. ``QueryPipeline.embed_queries`` p50/p99, one JPEG per call (decode + detect + crop + embed): before
   (torchvision detector; embedder: torch normalisation, spin-waiting ONNX Runtime) vs after
   (``load_pipeline`` defaults: ONNX Runtime detector, numpy normalisation, no spin-waiting), at the
   detector's own threshold and at ``--crop-threshold`` (so that crops are embedded too);
5. ``load_pipeline`` time with an empty vs a warm ONNX cache;
6. with ``--http``: image queries through ``imgsearch serve`` on a 60-product index of the model, at
   concurrency 1 and 4 (``--http-before CHECKOUT`` adds a server running older code, e.g. a ``git archive``).

Every timing round runs the variants interleaved, photo by photo, because the 2 cores are shared; compare
ratios within one run. ``uptime``'s load is printed before and after.

    .venv/bin/python bench/bench_query.py [--model demo-data/train/model.ckpt] [--photos 40] [--rounds 3] [--http]
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import embed.runtime as runtime  # noqa: E402
from embed import torchvision_ops  # noqa: E402
from embed.detector import detector_input  # noqa: E402
from embed.pipeline import QueryPipeline, load_detector, load_embedder, load_pipeline  # noqa: E402
from embed.preprocess import Preprocessor  # noqa: E402
from imgsearch import assets  # noqa: E402
from imgsearch.argtypes import positive_int  # noqa: E402

THREADS = 2
DEFAULT_MODEL = Path("demo-data/train/model.ckpt")


def load_avg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def query_photos(n: int) -> list[bytes]:
    """JPEG bytes of the sample set's held-out shopper photos (bench_embed's set, built on first use)."""
    from imgsearch.sample_data import build_sample_set, read_queries

    sample = build_sample_set(assets.cache_dir() / "bench" / "sample_set_200", seed=0, limit_products=200, progress=False)
    return [Path(q["image"]).read_bytes() for q in read_queries(sample)[:n]]


def ms(seconds: list[float]) -> np.ndarray:
    return 1000 * np.asarray(seconds)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def stage_table(reference, fast, images, rounds: int) -> None:
    """Median ms per stage: torchvision's forward split at its seams, and the new path's three steps."""
    ssd = reference.model
    old = {k: [] for k in ("to tensor", "transform (normalise, resize)", "backbone (trunk + extras)", "heads",
                           "anchors", "postprocess (decode, top-k, NMS, rescale)")}
    new = {k: [] for k in ("preprocess (numpy resize + normalise)", "network (ONNX Runtime)",
                           "postprocess (candidates only)")}
    runner = fast._net_runner()
    for _ in range(rounds):
        for image in images:
            with torch.inference_mode():
                t = [time.perf_counter()]
                x = [torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255.0)]
                t.append(time.perf_counter())
                batch, _ = ssd.transform(x)
                t.append(time.perf_counter())
                maps = list(ssd.backbone(batch.tensors).values())
                t.append(time.perf_counter())
                heads = ssd.head(maps)
                t.append(time.perf_counter())
                anchors = ssd.anchor_generator(batch, maps)
                t.append(time.perf_counter())
                found = ssd.postprocess_detections(heads, anchors, batch.image_sizes)
                ssd.transform.postprocess(found, batch.image_sizes, [(image.height, image.width)])
                t.append(time.perf_counter())
            for key, a, b in zip(old, t, t[1:]):
                old[key].append(b - a)
            t = [time.perf_counter()]
            array = detector_input(image, fast.config.image_size)[None]
            t.append(time.perf_counter())
            logits, regression = runner(array)
            t.append(time.perf_counter())
            with torch.inference_mode():
                fast._select(logits[0], regression[0], image, fast.config.score_threshold)
            t.append(time.perf_counter())
            for key, a, b in zip(new, t, t[1:]):
                new[key].append(b - a)
    print(f"\n1. where a detection's time goes (median ms per photo, threshold {fast.config.score_threshold}, "
          f"{len(images)} photos x {rounds} rounds, interleaved)")
    for title, stages in (("torchvision SSD forward (before)", old), ("new path", new)):
        total = sum(np.median(ms(v)) for v in stages.values())
        print(f"  {title}: {total:.1f} ms")
        for key, values in stages.items():
            med = np.median(ms(values))
            print(f"    {key:<44}{med:8.2f} ms {100 * med / total:5.1f} %")


def nms_table() -> None:
    rng = np.random.default_rng(0)
    print("\n2. NMS, IoU 0.5, random boxes (ms per call, best of 5)")
    print(f"  {'boxes':>6}{'kept':>6}{'torch reference':>17}{'numpy kernel':>14}{'x':>7}")
    for n in (100, 300, 1000, 3000):
        xy = rng.uniform(0, 300, (n, 2))
        boxes = torch.from_numpy(np.concatenate([xy, xy + rng.uniform(20, 150, (n, 2))], 1).astype(np.float32))
        scores = torch.from_numpy(rng.random(n).astype(np.float32))
        kept = torchvision_ops.nms_kernel(boxes, scores, 0.5)
        assert kept.tolist() == torchvision_ops.nms_reference_kernel(boxes, scores, 0.5).tolist()
        best = {}
        for _ in range(5):
            for kernel in (torchvision_ops.nms_reference_kernel, torchvision_ops.nms_kernel):
                best[kernel] = min(best.get(kernel, 1e9), timed(kernel, boxes, scores, 0.5))
        ref, new = (1000 * best[k] for k in (torchvision_ops.nms_reference_kernel, torchvision_ops.nms_kernel))
        print(f"  {n:>6}{len(kept):>6}{ref:17.2f}{new:14.2f}{ref / new:7.1f}")


def percentiles(values: list[float]) -> str:
    v = ms(values)
    return f"{np.percentile(v, 50):8.1f}{np.percentile(v, 99):8.1f}{v.mean():8.1f}"


def detector_table(detectors: dict, images, rounds: int, thresholds) -> None:
    print(f"\n3. detector ms per photo, one photo per call ({len(images)} photos x {rounds} rounds, interleaved)")
    print(f"  {'runtime':<30}{'threshold':>10}{'p50':>8}{'p99':>8}{'mean':>8}{'x before':>9}")
    for threshold in thresholds:
        times = {name: [] for name in detectors}
        for _ in range(rounds):
            for image in images:
                for name, det in detectors.items():
                    times[name].append(timed(det.detect, [image], threshold))
        base = np.median(times["torchvision (before)"])
        for name, values in times.items():
            print(f"  {name:<30}{threshold:>10}{percentiles(values)}{base / np.median(values):9.2f}")


def e2e_table(pipelines: dict, bodies: list[bytes], rounds: int) -> None:
    print(f"\n4. QueryPipeline.embed_queries, one JPEG per call ({len(bodies)} photos x {rounds} rounds, interleaved)")
    print(f"  {'pipeline':<44}{'p50':>8}{'p99':>8}{'mean':>8}{'x before':>9}{'regions':>9}")
    times = {name: [] for name in pipelines}
    regions = {name: 0 for name in pipelines}
    for _ in range(rounds):
        for body in bodies:
            for name, pipeline in pipelines.items():
                start = time.perf_counter()
                (result,) = pipeline.embed_queries([body])
                times[name].append(time.perf_counter() - start)
                regions[name] += len(result.regions)  # embedded: boxes and, for candidates, the whole photo
    for name, values in times.items():
        base = np.median(times[name.replace("after", "before")])
        print(f"  {name:<44}{percentiles(values)}{base / np.median(values):9.2f}{regions[name] / rounds / len(bodies):9.2f}")


@contextlib.contextmanager
def spinning(on: bool):
    """The embedder's ONNX Runtime as before this change (spin-waiting pool) or as now."""
    saved = runtime.ORT_ALLOW_SPINNING
    runtime.ORT_ALLOW_SPINNING = on
    try:
        yield
    finally:
        runtime.ORT_ALLOW_SPINNING = saved


def startup_table(model: Path) -> None:
    print("\n5. load_pipeline (checkpoint -> embedder + detector on ONNX Runtime), seconds")
    with tempfile.TemporaryDirectory() as folder:
        os.environ[runtime.ONNX_CACHE_ENV] = folder
        try:
            cold = timed(load_pipeline, str(model), "cpu")
            warm = timed(load_pipeline, str(model), "cpu")
            files = sorted(p.name.split("-")[0] for p in Path(folder).glob("*.onnx"))
        finally:
            del os.environ[runtime.ONNX_CACHE_ENV]
    print(f"  empty cache (exports {files}): {cold:.1f} s; warm cache: {warm:.1f} s")


def http_table(model: Path, server_repos: list[tuple[str, Path]], requests: int, seconds: float) -> None:
    """Image queries through ``imgsearch serve`` (gunicorn, micro-batching) on a 60-product index of this model.

    ``server_repos``: (label, checkout) pairs; each server runs that checkout's code (``python -m imgsearch``
    from its folder), so an older checkout (``git archive``) gives a before-this-change row.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_serve
    from serve_data import IMAGE_PRODUCTS

    from embed.checkpoint import Checkpoint
    from serve.demo import DEMO_CHECKPOINT, prepare_demo

    workdir = assets.cache_dir() / "bench" / f"query-http-{Checkpoint.load(model).weights_sha256[:12]}"
    (workdir / DEMO_CHECKPOINT).parent.mkdir(parents=True, exist_ok=True)
    if not (workdir / DEMO_CHECKPOINT).exists():
        (workdir / DEMO_CHECKPOINT).symlink_to(model.resolve())
    demo = prepare_demo(workdir, limit_products=IMAGE_PRODUCTS)
    photos = sorted(p for p in Path(demo.queries_dir).rglob("*.jpg"))
    bodies, ctype = bench_serve.image_bodies(photos, 200)
    print(f"\n6. image queries over HTTP (k={bench_serve.K}; {len(photos)} query photos, {IMAGE_PRODUCTS}-product index; "
          f"at most {requests} requests or {seconds:.0f} s per row)")
    print(f"  {'server code':<28}{'concurrency':>12}{'requests':>9}{'p50':>8}{'p99':>8}{'req/s':>7}{'non-2xx':>8}")
    for label, repo in server_repos:
        server = _server(repo, demo.index_root, demo.store_path, model.resolve())
        try:
            for concurrency in (1, 4):
                r = bench_serve.run_load(server.port, bodies, ctype, concurrency, requests, seconds)
                print(f"  {label:<28}{concurrency:>12}{r['n']:>9}{r['p50']:8.1f}{r['p99']:8.1f}{r['qps']:7.1f}{r['non2xx']:>8}",
                      flush=True)
        finally:
            server.stop()


def _server(repo: Path, index_root, store, model: Path):
    """bench_serve.Server, but running the code of ``repo``."""
    import bench_serve

    return bench_serve.Server(index_root, store, "--threads", "16", "--model", str(model), log_name="query-server",
                              repo=repo).wait_ready(timeout_s=600)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a trained checkpoint (make train-demo)")
    parser.add_argument("--photos", type=positive_int, default=40)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--crop-threshold", type=float, default=0.05,
                        help="a lower detector threshold for a second e2e row, so that crops are embedded (default 0.05)")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--http", action="store_true", help="also run image queries through `imgsearch serve` (table 6)")
    parser.add_argument("--http-before", type=Path, default=None, metavar="CHECKOUT",
                        help="with --http, also serve from this checkout (e.g. `git archive HEAD` of the old code)")
    parser.add_argument("--http-requests", type=positive_int, default=60)
    parser.add_argument("--skip-inprocess", action="store_true", help="only tables 5-6")
    args = parser.parse_args()
    if not args.model.is_file():
        parser.error(f"no checkpoint at {args.model}: run `make train-demo` or pass --model")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(THREADS)
    print(f"load {load_avg()}; {os.cpu_count()} cores (shared), {THREADS} threads; model {args.model}")

    if not args.skip_inprocess:
        inprocess_tables(args)
    if not args.skip_startup:
        startup_table(args.model)
    if args.http:
        repos = ([("before (--http-before)", args.http_before)] if args.http_before else []) + [
            ("this checkout", Path(__file__).resolve().parents[1])]
        http_table(args.model, repos, args.http_requests, 60.0)
    print(f"\nload {load_avg()}")
    return 0


class TorchNormalisingPreprocessor(Preprocessor):
    """The embedder's preprocessing before it normalised in numpy: the same values, by torch ops (the "before" rows)."""

    def __call__(self, images) -> torch.Tensor:
        x = torch.from_numpy(self.to_uint8(images)).permute(0, 3, 1, 2).float().div_(255.0)
        mean, std = torch.tensor(self.mean).view(1, 3, 1, 1), torch.tensor(self.std).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std).contiguous(memory_format=torch.channels_last)


def inprocess_tables(args) -> None:
    from embed.image_io import decode_image

    bodies = query_photos(args.photos)
    images = [decode_image(b) for b in bodies]
    detectors = {}
    for name, detector_runtime in (("torchvision (before)", "torchvision"), ("eager network", "eager"), ("onnxruntime", "onnxruntime")):
        detectors[name] = load_detector(str(args.model))
        detectors[name].use_runtime(detector_runtime)
    sizes = np.array([im.size for im in images])
    print(f"{len(images)} query photos, {sizes.min(0)}..{sizes.max(0)} px; detector runtimes: "
          f"{[d.runtime for d in detectors.values()]}")

    stage_table(detectors["torchvision (before)"], detectors["onnxruntime"], images[:20], args.rounds)
    nms_table()
    threshold = detectors["onnxruntime"].config.score_threshold
    detector_table(detectors, images, args.rounds, (threshold, 0.0))

    with spinning(True):
        before = load_embedder(str(args.model), device="cpu")
    before.preprocess = TorchNormalisingPreprocessor(before.config.image_size)
    after = load_pipeline(str(args.model), device="cpu")
    pipelines = {}
    for thr in (None, args.crop_threshold):
        tag = "" if thr is None else f", threshold {thr}"
        pipelines[f"before{tag}"] = QueryPipeline(before, detectors["torchvision (before)"], score_threshold=thr)
        pipelines[f"after{tag}"] = QueryPipeline(after.embedder, after.detector, score_threshold=thr)
    e2e_table(pipelines, bodies, args.rounds)


if __name__ == "__main__":
    sys.exit(main())
