"""Held-out accuracy of one training stage (embedder or detector) alone, across a sweep of run settings.

Each stage of ``imgsearch train`` (``train/engine.py``) learns on maps of a frozen MobileNetV2
prefix, so a stage can be trained and measured on its own, without the other stage and without
checkpoints. This script renders the training data ONCE per sweep and trains a fresh stage per
run spec on it, so runs differ only in what the spec changes. It measures what the defaults in
``TrainConfig`` were chosen on (the numbers quoted there and in BENCHMARKS.md).

``embedder``: the shopper views of every TRAIN product of the full sample set (its catalog
shot(s) + ``--views`` shopper crops, ``TrainingData.labelled_views``) and the held-out set
(``TrainingData.retrieval_set``: the sample set's EVAL query photos cropped to their TRUE box
with the pipeline's margin, ``PIPELINE_MARGIN``, and every catalog shot) are letterboxed to
224 px uint8 once and cached on disk. Per run: a fresh ``EmbeddingNet.pretrained`` (seeded
with the run's ``seed``, as ``TrainingRun.fresh``), an ``EmbedderStage`` trained for EPOCHS on
the run's first VIEWS shopper views of each product (the views come from one seeded stream
per product, so the first VIEWS of ``--views`` are exactly what ``shopper_views=VIEWS`` renders)
plus the catalog shots; after each epoch the held-out product-level Recall@1/5/10
(``ValidationCache.recall``, what ``imgsearch train`` logs as ``val_recall@K``). After the last
epoch also a flip-TTA row: each query and catalog vector is the normalised sum of the image's
and its mirror image's vectors; and category transfer, Fashion-MNIST P@1 on ``--fashion-mnist``
seeded test images through the trained network (``train.evaluate.fashion_mnist_p_at_1``; 0
skips it). Detection plays no part: the queries are true-box crops.

``detector``: ``--scenes`` composite scenes of TRAIN products (``TrainingData.scenes``, one
seeded stream, so the first SCENES of them are what ``scenes=SCENES`` renders) are rendered
and cached through ``DetectorStage.cache`` (frozen maps + targets; kept in memory, built once
per distinct FROM). Per run: a fresh ``ProductDetector.pretrained`` (seeded), a ``DetectorStage``
trained for EPOCHS with PASSES passes per epoch over the first SCENES cached scenes; after each
epoch, on the sample set's held-out query photos (EVAL products, never in a scene): AP@0.5
(``train.evaluate.average_precision``, detections down to score ``AP_SCORE_THRESHOLD``) and the
share of photos whose best-scoring box has IoU >= 0.5 with the true box (what the pipeline
crops: it embeds the top box).

Run specs (``--runs``, comma-separated and/or repeated), all integers but LOSS:

    embedder:  FROM:VIEWS:EPOCHS:LOSS[:KEY=VALUE...]
               FROM = embed_trainable_from (trunk blocks [FROM:] learn, 1..19), VIEWS =
               shopper_views (<= --views), LOSS = triplet | multisimilarity | ...
               (a PK batch's K shrinks to VIEWS + 1 when that is fewer: EmbedderStage.sampler)
               KEY in: seed, products_per_batch, views_per_batch, embed_lr, embed_trunk_lr, weight_decay,
               head_init, transfer_weight
    detector:  FROM:SCENES:EPOCHS:PASSES[:KEY=VALUE...]
               FROM = detector_trainable_from (1..19; below 14 the stride-16 map learns too), SCENES = scenes (<= --scenes),
               PASSES = detector_passes
               KEY in: seed, scene_batch, detector_lr, weight_decay

KEYs are ``TrainConfig`` fields, values parsed by the field's type; every other setting is
``TrainConfig``'s default. A run's ``seed`` seeds only its training (network init, batch order);
the data are rendered with ``--seed``. Fields that would change the shared data (image sizes,
``max_products``, the split) are fixed per sweep, and the other stage's fields are refused.

Seconds: ``render`` (printed once) is making the cached images; ``cache s`` is the frozen
prefix over the run's data (embedder: views + held-out set, mirrors included; detector:
rendering + prefix over all ``--scenes``), built once per FROM and shared by the runs with that
FROM, so they show the same number; ``train s`` is the epochs' training steps only (the
per-epoch held-out evaluation is timed apart). 2 CPU threads by default: compare seconds
within one run of this script only (the host's cores are shared).

    .venv/bin/python bench/bench_train_sweep.py embedder --views 24 --runs 17:7:4:triplet,14:24:4:triplet [--output e.json]
    .venv/bin/python bench/bench_train_sweep.py detector --scenes 4800 --runs 14:1200:4:4,14:4800:4:1 [--output d.json]
    .venv/bin/python bench/bench_train_sweep.py embedder --max-products 20 --views 2 --runs 17:2:1:triplet   # smoke, ~1 min
    .venv/bin/python bench/bench_train_sweep.py detector --scenes 32 --runs 17:32:1:1                       # smoke, ~1 min

A smoke detector run reads AP 0: after a few dozen steps every box score is still under
``AP_SCORE_THRESHOLD`` (0.05; the heads start from a 0.01 prior), so nothing is detected.

``--output`` JSON is rewritten (atomically) after every run, with ``"complete": false`` until the
last, so a sweep that dies keeps its finished runs. The rendered embedder images are cached under
``$IMGSEARCH_CACHE/bench/train_sweep/views-<sample set>-seed<S>-v<VIEWS>-p<MAX|all>-<SIZE>px/``
(.npy files, memory-mapped; ~150 kB per view, ~1 GB at 24 views), written to a temp folder
that then replaces the target, so an interrupted build leaves nothing half-written. The sample
set is ``$IMGSEARCH_CACHE/bench/sample_set_full`` (built with seed 0 when missing).
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads its OpenMP runtime

import argparse  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, fields, replace  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from imgsearch.argtypes import positive_int  # noqa: E402
from imgsearch.errors import BadInput  # noqa: E402
from train.engine import TrainConfig  # noqa: E402

VIEWS_CACHE_VERSION = 1  # bump when what the views cache holds changes
DETECT_BATCH = 16  # query photos per detector call in the evaluation
IOU = 0.5

# Spec grammar: the positional fields of each subcommand, then the KEY=VALUE fields it may vary.
POSITIONAL = {
    "embedder": ("embed_trainable_from", "shopper_views", "epochs", "loss"),
    "detector": ("detector_trainable_from", "scenes", "epochs", "detector_passes"),
}
SPEC_NAMES = {"embedder": "FROM:VIEWS:EPOCHS:LOSS", "detector": "FROM:SCENES:EPOCHS:PASSES"}
KEYS = {
    "embedder": ("seed", "products_per_batch", "views_per_batch", "embed_lr", "embed_trunk_lr", "weight_decay",
                 "head_init", "transfer_weight"),
    "detector": ("seed", "scene_batch", "detector_lr", "weight_decay"),
}
FIXED_PER_SWEEP = {
    "max_products": "fixed per sweep: use --max-products",
    "heldout_fraction": "the sample set's split.json fixes the split",
    "image_size": "fixed per sweep (the cached views are letterboxed at TrainConfig's default)",
    "detector_image_size": "fixed per sweep (TrainConfig's default)",
    "detector": "each subcommand trains one stage only",
}
FIELD_TYPES = {"int": int, "float": float, "str": str}


class SpecError(ValueError):
    pass


@dataclass
class Run:
    spec: str
    config: TrainConfig
    size: int  # views (embedder) or scenes (detector) this run trains on


def parse_value(spec: str, key: str, text: str):
    kind = {f.name: f.type for f in fields(TrainConfig)}[key]
    kind = kind if isinstance(kind, str) else kind.__name__
    try:
        return FIELD_TYPES[kind](text)
    except (KeyError, ValueError):
        raise SpecError(f"run {spec!r}: {key}={text!r} is not a valid {kind}") from None


def parse_spec(command: str, spec: str, base: TrainConfig) -> Run:
    """One run spec -> its resolved TrainConfig (TrainConfig's own validation included)."""
    parts = spec.strip().split(":")
    positional = POSITIONAL[command]
    if len(parts) < len(positional) or any(not p for p in parts):
        raise SpecError(f"run {spec!r}: expected {SPEC_NAMES[command]}[:KEY=VALUE...]")
    values: dict = {}
    for name, text in zip(positional, parts):
        values[name] = parse_value(spec, name, text)
        if isinstance(values[name], int) and values[name] < 1:
            raise SpecError(f"run {spec!r}: {name} must be >= 1, got {values[name]}")
    known = {f.name for f in fields(TrainConfig)}
    for item in parts[len(positional):]:
        key, sep, text = item.partition("=")
        if not sep or not key or not text:
            raise SpecError(f"run {spec!r}: {item!r} is not KEY=VALUE")
        if key not in known:
            raise SpecError(f"run {spec!r}: unknown key {key!r} (not a TrainConfig field); allowed: {', '.join(KEYS[command])}")
        if key in positional:
            raise SpecError(f"run {spec!r}: {key} is set by its position in {SPEC_NAMES[command]}, not as a key")
        if key not in KEYS[command]:
            why = FIXED_PER_SWEEP.get(key, f"not used by the {command} stage")
            raise SpecError(f"run {spec!r}: key {key!r} cannot vary per run: {why}; allowed: {', '.join(KEYS[command])}")
        if key in values:
            raise SpecError(f"run {spec!r}: {key} given twice")
        values[key] = parse_value(spec, key, text)
    try:
        config = replace(base, **values)
    except BadInput as exc:
        raise SpecError(f"run {spec!r}: {exc}") from None
    return Run(spec.strip(), config, values[positional[1]])


def parse_runs(command: str, texts: list[str], base: TrainConfig) -> list[Run]:
    specs = [s for text in texts for s in text.split(",") if s.strip()]
    if not specs:
        raise SpecError("no run specs")
    return [parse_spec(command, s, base) for s in specs]


# ---------------------------------------------------------------------------- shared


def cache_root() -> Path:
    import datasets  # bench/datasets.py

    return datasets.cache_root()


def machine() -> dict:
    return {"nproc": os.cpu_count(), "load_avg": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__}


def load_avg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


# ---------------------------------------------------------------------------- embedder


@dataclass
class ViewSet:
    """Letterboxed uint8 images (memory-mapped): train views and the held-out queries/catalog."""

    folder: Path
    train: np.ndarray  # (n, s, s, 3)
    train_labels: np.ndarray  # product label (index into train_products)
    train_view: np.ndarray  # -1: a catalog shot; k >= 0: the product's k-th shopper view
    queries: np.ndarray
    query_labels: np.ndarray  # index into products
    catalog: np.ndarray
    catalog_labels: np.ndarray
    products: list[str]
    meta: dict

    @classmethod
    def load(cls, folder: Path) -> ViewSet:
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r")
                  for name in ("train", "train_labels", "train_view", "queries", "query_labels", "catalog", "catalog_labels")}
        meta = json.loads((folder / "meta.json").read_text())
        return cls(folder, products=meta["products"], meta=meta, **arrays)


def _write_views(folder: Path, data, size: int) -> None:
    """Render every array of a ViewSet into ``folder`` (meta.json last)."""
    from embed.pipeline import crop_with_margin
    from embed.preprocess import Preprocessor
    from train.commands import PIPELINE_MARGIN
    from train.commands import _open_rgb as open_rgb  # how `imgsearch train` opens the held-out images
    from train.frozen import prefetched

    pre = Preprocessor(size)
    started = time.perf_counter()
    n = data.n_views
    train = np.lib.format.open_memmap(folder / "train.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    labels, view, pending = np.empty(n, np.int64), np.empty(n, np.int64), []
    rows = [len(data.rows_of(p)) for p in data.train_products]
    i, current, k = 0, -1, 0
    for label, image in prefetched(data.labelled_views()):
        if label != current:
            current, k = label, 0
        labels[i], view[i] = label, (k - rows[label] if k >= rows[label] else -1)
        pending.append(image)
        i, k = i + 1, k + 1
        if len(pending) == 64:
            train[i - len(pending):i] = pre.to_uint8(pending)
            pending.clear()
    if pending:
        train[i - len(pending):i] = pre.to_uint8(pending)
    if i != n:
        raise RuntimeError(f"expected {n} views, rendered {i}")
    train.flush()
    del train
    np.save(folder / "train_labels.npy", labels)
    np.save(folder / "train_view.npy", view)

    retrieval = data.retrieval_set()
    if retrieval is None:
        raise SystemExit(f"{data.catalog_path}: no held-out queries to measure on")
    products = sorted(set(retrieval.catalog_products) | set(retrieval.query_products))  # as validation_cache
    label = {p: j for j, p in enumerate(products)}
    crops = [crop_with_margin(open_rgb(im), box, PIPELINE_MARGIN) for im, box in zip(retrieval.query_images, retrieval.query_boxes)]
    np.save(folder / "queries.npy", pre.to_uint8(crops))
    np.save(folder / "query_labels.npy", np.array([label[p] for p in retrieval.query_products], np.int64))
    np.save(folder / "catalog.npy", pre.to_uint8([open_rgb(im) for im in retrieval.catalog_images]))
    np.save(folder / "catalog_labels.npy", np.array([label[p] for p in retrieval.catalog_products], np.int64))
    meta = {"version": VIEWS_CACHE_VERSION, "catalog": str(data.catalog_path), "seed": data.config.seed,
            "shopper_views": data.config.shopper_views, "max_products": data.config.max_products, "image_size": size,
            "train_products": data.train_products, "products": products, "n_views": n,
            "n_queries": len(crops), "n_catalog": len(retrieval.catalog_images),
            "render_seconds": round(time.perf_counter() - started, 1)}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")  # last: marks a complete folder


def view_set(ss, views: int, seed: int, max_products: int | None, size: int) -> ViewSet:
    """The cached ViewSet for these settings, rendered (once, atomically) when missing."""
    from train.commands import TrainingData

    tag = hashlib.sha1(json.dumps(ss.config, sort_keys=True).encode()).hexdigest()[:8]
    folder = cache_root() / "train_sweep" / f"views-{tag}-seed{seed}-v{views}-p{max_products or 'all'}-{size}px"
    if (folder / "meta.json").exists():
        cached = ViewSet.load(folder)
        if cached.meta.get("version") == VIEWS_CACHE_VERSION:
            return cached
        shutil.rmtree(folder)
    data = TrainingData.from_catalog(ss.catalog_csv, TrainConfig(shopper_views=views, seed=seed, max_products=max_products,
                                                                 image_size=size))
    print(f"rendering {data.n_views} views of {len(data.train_products)} train products + the held-out set "
          f"into {folder} (once) ...", flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        _write_views(tmp, data, size)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same folder first: keep theirs
            if not (folder / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ViewSet.load(folder)


def prefix_maps(stage, images: np.ndarray, flip: bool = False, batch: int = 64) -> torch.Tensor:
    """uint8 NHWC letterboxed images -> the stage's frozen-prefix maps (float16), as ``EmbedderStage.cache`` makes them."""
    mean = torch.tensor(stage.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(stage.preprocess.std).view(1, 3, 1, 1)
    out = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        chunk = np.array(chunk[:, :, ::-1] if flip else chunk, order="C")  # a writable copy; axis 2 is the width: flip mirrors
        # Preprocessor.__call__ from its to_uint8 output on: NHWC permuted is NCHW channels_last.
        x = torch.from_numpy(chunk).permute(0, 3, 1, 2).float().div_(255.0)
        out.append(stage._prefix(x.sub_(mean).div_(std).contiguous(memory_format=torch.channels_last)))
    return torch.cat(out)


@dataclass
class EmbedderMaps:
    trainable_from: int
    train: torch.Tensor
    queries: torch.Tensor
    catalog: torch.Tensor
    queries_flipped: torch.Tensor
    catalog_flipped: torch.Tensor
    seconds: float


def flip_tta_recall(stage, validation, maps: EmbedderMaps) -> dict[int, float]:
    from train.engine import ViewCache
    from train.evaluate import cosine_recall

    def both(plain: ViewCache, flipped: torch.Tensor) -> np.ndarray:
        v = stage.vectors(plain) + stage.vectors(ViewCache(flipped, plain.labels))
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    q, c = both(validation.queries, maps.queries_flipped), both(validation.catalog, maps.catalog_flipped)
    products = validation.products
    return cosine_recall(q, [products[i] for i in validation.queries.labels], c, [products[i] for i in validation.catalog.labels])


def run_embedder(args, runs: list[Run], ss, save) -> list[dict]:
    """Every run in turn; ``save(rows, settings)`` after each."""
    from embed.model import EmbedderConfig, EmbeddingNet
    from train.engine import EmbedderStage, ValidationCache, ViewCache

    size = TrainConfig().image_size
    started = time.perf_counter()
    views = view_set(ss, args.views, args.seed, args.max_products, size)
    print(f"views ready in {time.perf_counter() - started:.0f} s (rendered once in {views.meta['render_seconds']:.0f} s): "
          f"{len(views.train)} train images of {len(views.meta['train_products'])} products "
          f"({args.views} shopper views + catalog shots each); held out: {len(views.queries)} true-box query crops, "
          f"{len(views.catalog)} catalog shots", flush=True)
    settings = {"views": args.views, "views_cache": str(views.folder), "render_seconds": views.meta["render_seconds"],
                "train_images": len(views.train), "train_products": len(views.meta["train_products"]),
                "n_queries": len(views.queries), "n_catalog": len(views.catalog)}
    maps: EmbedderMaps | None = None  # of the last FROM only: an early FROM's maps are large
    rows = []
    for run in runs:
        conf = run.config
        torch.manual_seed(conf.seed)  # as TrainingRun.fresh
        net = EmbeddingNet.pretrained(EmbedderConfig(image_size=conf.image_size, projection_bn=False))
        stage = EmbedderStage(net, conf)
        if maps is None or maps.trainable_from != conf.embed_trainable_from:
            maps = None
            t0 = time.perf_counter()
            built = [prefix_maps(stage, a, f) for a, f in ((views.train, False), (views.queries, False), (views.catalog, False),
                                                           (views.queries, True), (views.catalog, True))]
            maps = EmbedderMaps(conf.embed_trainable_from, *built, seconds=time.perf_counter() - t0)
        keep = np.flatnonzero(np.asarray(views.train_view) < run.size)  # catalog shots (-1) and the first VIEWS
        train = ViewCache(maps.train[torch.from_numpy(keep)], np.asarray(views.train_labels)[keep])
        validation = ValidationCache(ViewCache(maps.queries, np.asarray(views.query_labels)),
                                     ViewCache(maps.catalog, np.asarray(views.catalog_labels)), views.products)
        stage.start(train)  # as TrainingRun.fit before its first epoch
        history, train_s, eval_s = timed_epochs(run.spec, conf, stage, train, partial(recall_metrics, validation, stage),
                                                recall_line)
        tta = flip_tta_recall(stage, validation, maps)
        fashion = fashion_mnist(net, args.fashion_mnist)
        last = history[-1]
        rows.append({"spec": run.spec, "config": conf.to_dict(), "train_views": len(train),
                     "recall@1": last["recall@1"], "recall@5": last["recall@5"], "recall@10": last["recall@10"],
                     **{f"flip_tta_recall@{k}": v for k, v in tta.items()}, "fashion_mnist_p@1": fashion,
                     "cache_seconds": round(maps.seconds, 1), "train_seconds": round(train_s, 1),
                     "eval_seconds": round(eval_s, 1), "history": history})
        print_embedder_rows(rows[-1:], header=False)
        save(rows, settings)
    return rows


def fashion_mnist(net, n: int) -> float | None:
    """Category transfer of the trained network: Fashion-MNIST P@1 on ``n`` seeded test images (None when n is 0),
    embedded as ``imgsearch embed`` embeds (``embed.pipeline.Embedder``, eager torch: the network as trained)."""
    from embed.pipeline import Embedder
    from train.evaluate import fashion_mnist_p_at_1

    if not n:
        return None
    embedder = Embedder(net, model_hash="sweep-run", device="cpu", runtime="eager")
    return round(fashion_mnist_p_at_1(embedder.embed, n=n)["embedding"], 4)


def recall_metrics(validation, stage) -> dict[str, float]:
    return {k.replace("val_", ""): v for k, v in validation.recall(stage).items()}


def recall_line(metrics: dict) -> str:
    return f"R@1 {metrics['recall@1']:.3f}  R@5 {metrics['recall@5']:.3f}  R@10 {metrics['recall@10']:.3f}"


def ap_metrics(detector, photos, truth) -> dict[str, float]:
    ap, top = detector_scores(detector, photos, truth)
    return {"ap@0.5": ap, "top_iou>=0.5": top}


def ap_line(steps: int, metrics: dict) -> str:
    return f"AP@0.5 {metrics['ap@0.5']:.3f}  top IoU>=0.5 {metrics['top_iou>=0.5']:.3f}  ({steps} steps)"


def timed_epochs(spec: str, conf, stage, data, evaluate, describe) -> tuple[list[dict], float, float]:
    """Train ``stage`` on ``data`` for ``conf.epochs`` epochs, each seeded as ``TrainingRun.fit`` seeds it.

    Returns the per-epoch rows (epoch, loss, ``evaluate()``'s metrics, train seconds) and the
    total train and evaluation seconds; prints one line per epoch (``describe(metrics)``).
    """
    history, train_s, eval_s = [], 0.0, 0.0
    for epoch in range(conf.epochs):
        torch.manual_seed(conf.seed * 1000 + epoch)
        t0 = time.perf_counter()
        loss = stage.train_epoch(data, epoch)
        t1 = time.perf_counter()
        metrics = evaluate()
        t2 = time.perf_counter()
        train_s, eval_s = train_s + t1 - t0, eval_s + t2 - t1
        history.append({"epoch": epoch + 1, "loss": loss, **metrics, "train_seconds": round(t1 - t0, 2)})
        print(f"  {spec} epoch {epoch + 1}/{conf.epochs}: loss {loss:.4f}  {describe(metrics)}  "
              f"(train {t1 - t0:.1f} s, eval {t2 - t1:.1f} s)", flush=True)
    return history, train_s, eval_s


EMBEDDER_HEADER = ("| run | R@1 | R@5 | R@10 | flip-TTA R@1 | flip-TTA R@10 | Fashion-MNIST P@1 | train views | cache s | train s |\n"
                   "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def print_embedder_rows(rows: list[dict], header: bool = True) -> None:
    if header:
        print(EMBEDDER_HEADER)
    for r in rows:
        print(f"| {r['spec']} | {r['recall@1']:.3f} | {r['recall@5']:.3f} | {r['recall@10']:.3f} | "
              f"{r['flip_tta_recall@1']:.3f} | {r['flip_tta_recall@10']:.3f} | "
              f"{'-' if r.get('fashion_mnist_p@1') is None else format(r['fashion_mnist_p@1'], '.3f')} | {r['train_views']} | "
              f"{r['cache_seconds']:.0f} | {r['train_seconds']:.0f} |", flush=True)


# ---------------------------------------------------------------------------- detector


def detector_scores(detector, photos: list, truth: list[np.ndarray]) -> tuple[float, float]:
    """(AP@0.5, share of photos whose top box has IoU >= 0.5) on the held-out query photos."""
    from train.evaluate import AP_SCORE_THRESHOLD, average_precision, box_iou

    detector.eval()
    found = [d for start in range(0, len(photos), DETECT_BATCH)
             for d in detector.detect(photos[start:start + DETECT_BATCH], AP_SCORE_THRESHOLD)]
    ap = average_precision([(d.boxes, d.scores) for d in found], truth, IOU)
    top = float(np.mean([len(d) > 0 and box_iou(d.boxes[:1], t)[0, 0] >= IOU for d, t in zip(found, truth)]))
    return ap, top


def run_detector(args, runs: list[Run], ss, save) -> list[dict]:
    """Every run in turn; ``save(rows, settings)`` after each."""
    from embed.detector import DetectorConfig, ProductDetector
    from embed.image_io import load_rgb
    from train.commands import TrainingData
    from train.engine import DetectorStage, SceneCache

    data = TrainingData.from_catalog(ss.catalog_csv, TrainConfig(scenes=args.scenes, seed=args.seed, max_products=args.max_products))
    retrieval = data.retrieval_set()
    if retrieval is None:
        raise SystemExit(f"{ss.catalog_csv}: no held-out queries to measure on")
    photos = [load_rgb(p) for p in retrieval.query_images]  # as train.evaluate.query_pass decodes them
    truth = [np.array([b], dtype=np.float32) for b in retrieval.query_boxes]
    print(f"{args.scenes} scenes of {len(data.train_products)} train products (rendered while caching, per FROM); "
          f"held out: {len(photos)} query photos of {len(set(retrieval.query_products))} eval products", flush=True)
    settings = {"scenes": args.scenes, "train_products": len(data.train_products), "n_queries": len(photos)}
    cached: tuple[int, SceneCache, float] | None = None  # (FROM, cache, seconds) of the last FROM only
    rows = []
    for run in runs:
        conf = run.config
        torch.manual_seed(conf.seed)
        detector = ProductDetector.pretrained(DetectorConfig(image_size=conf.detector_image_size))
        stage = DetectorStage(detector, conf)
        if cached is None or cached[0] != conf.detector_trainable_from:
            cached = None
            t0 = time.perf_counter()
            full = stage.cache(data.scenes(), args.scenes, progress=False)
            cached = (conf.detector_trainable_from, full, time.perf_counter() - t0)
        _, full, cache_s = cached
        n = run.size
        scenes = full.first(n)
        history, train_s, eval_s = timed_epochs(run.spec, conf, stage, scenes, partial(ap_metrics, detector, photos, truth),
                                                partial(ap_line, stage.steps_per_epoch(scenes)))
        last = history[-1]
        rows.append({"spec": run.spec, "config": conf.to_dict(), "scenes": n, "ap@0.5": last["ap@0.5"],
                     "top_iou>=0.5": last["top_iou>=0.5"], "cache_seconds": round(cache_s, 1),
                     "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1), "history": history})
        print_detector_rows(rows[-1:], header=False)
        save(rows, settings)
    return rows


DETECTOR_HEADER = "| run | AP@0.5 | top box IoU>=0.5 | cache s | train s |\n|---|---:|---:|---:|---:|"


def print_detector_rows(rows: list[dict], header: bool = True) -> None:
    if header:
        print(DETECTOR_HEADER)
    for r in rows:
        print(f"| {r['spec']} | {r['ap@0.5']:.3f} | {r['top_iou>=0.5']:.3f} | {r['cache_seconds']:.0f} | "
              f"{r['train_seconds']:.0f} |", flush=True)


# ---------------------------------------------------------------------------- main


def at_least_2(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 (one batch needs two products), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="run specs: see the module docstring (or --help of a subcommand)")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, amount, default in (("embedder", "views", "max VIEWS of the runs"), ("detector", "scenes", "max SCENES of the runs")):
        p = sub.add_parser(command, formatter_class=argparse.RawDescriptionHelpFormatter,
                           description=f"run spec: {SPEC_NAMES[command]}[:KEY=VALUE...], KEY in: {', '.join(KEYS[command])}")
        p.add_argument("--runs", nargs="+", required=True, metavar="SPEC[,SPEC...]",
                       help=f"{SPEC_NAMES[command]}[:KEY=VALUE...] (comma-separated and/or several)")
        p.add_argument(f"--{amount}", type=positive_int, default=None,
                       help=f"{amount} to render (default: the {default}); every run uses its first ones")
        p.add_argument("--max-products", type=at_least_2, default=None, metavar="N",
                       help="train on N train products only (TrainConfig.max_products; smoke runs); the held-out set is whole")
        p.add_argument("--seed", type=int, default=0, help="seed of the rendered data (default 0)")
        p.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
        p.add_argument("--output", type=Path, default=None, metavar="JSON", help="also write the results here")
        if command == "embedder":
            p.add_argument("--fashion-mnist", type=int, default=2000, metavar="N",
                           help="Fashion-MNIST test images for the category-transfer P@1 of each run (0: skip)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    amount = "views" if args.command == "embedder" else "scenes"
    try:
        runs = parse_runs(args.command, args.runs, TrainConfig(max_products=args.max_products, detector=args.command == "detector"))
    except SpecError as exc:
        parser.error(str(exc))
    largest = max(r.size for r in runs)
    if getattr(args, amount) is None:
        setattr(args, amount, largest)
    elif largest > getattr(args, amount):
        parser.error(f"a run wants {largest} {amount} but --{amount} renders {getattr(args, amount)}")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    load_before = load_avg()
    print(f"{args.command} sweep, {len(runs)} run(s); load {load_before}; {os.cpu_count()} cores (shared), "
          f"{args.threads} torch threads", flush=True)
    import datasets  # bench/datasets.py

    ss = datasets.full_sample_set()
    t0 = time.monotonic()
    run, print_rows = (run_embedder, print_embedder_rows) if args.command == "embedder" else (run_detector, print_detector_rows)

    def save(rows: list[dict], settings: dict) -> None:
        """The results so far as JSON (after every run, so a sweep that dies keeps its finished runs)."""
        if args.output is None:
            return
        result = {
            "date": datetime.date.today().isoformat(),
            "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
            "machine": machine() | {"load_avg_before": load_before},
            "settings": {"subcommand": args.command, "seed": args.seed, "max_products": args.max_products,
                         "threads": args.threads, "sample_set": str(ss.root), **settings},
            "complete": len(rows) == len(runs),
            "rows": rows,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_name(f".{args.output.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, args.output)

    rows = run(args, runs, ss, save)
    print()
    print_rows(rows)
    print(f"\n{time.monotonic() - t0:.0f} s in all; load {load_before} before, {load_avg()} after")
    if args.output is not None:
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
