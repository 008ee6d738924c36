"""Cached data for ``bench_serve.py``: a 1M x 128 normalised vector index with a store, and a
small real-photo index (the demo sample set) for image queries.

Everything lives under ``~/.cache/imgsearch/bench/serve-1m/`` and ``.../serve-images/`` and is
made once:

- ``vectors.npy``: 1,000,000 x 128 float32, L2-normalised, a seeded mixture of 1024 clusters
  (centre on the sphere + isotropic noise, renormalised), metric ip;
- ``queries.npy``: 2,000 fresh draws from the same mixture (another seed);
- ``store/``: one catalog record per vector (product ``p0000000``.., no image files, no stored
  vectors: the server only joins metadata), ids = ``index.store.item_id(product, image)``;
- ``index/``: version ``v1`` (``FACTORY``, tuned to recall@10 0.95) and ``v2``, a copy of its files
  under another name, the target of the swap-under-load test.

    .venv/bin/python bench/serve_data.py      # make (cached) and describe
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N = 1_000_000
DIM = 128
N_QUERIES = 2_000
CLUSTERS = 1024
IMAGE_PRODUCTS = 60  # real sample products for the image-query index (embedding more costs minutes)
NOISE = 0.6
# auto picks IVF16384_HNSW32,PQ64x4fs for 1M x 128; training 16k centroids takes over 30 min on
# this shared 2-core machine. Same codes (32 B fast-scan PQ + float16 re-rank), fewer lists.
FACTORY = "IVF4096,PQ64x4fs"  # per-vector noise norm relative to the unit centre: neighbours are close, not identical


def cache_root() -> Path:
    from imgsearch import assets

    root = assets.cache_dir() / "bench"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _mixture(n: int, seed: int, centres: np.ndarray, block: int = 200_000):
    rng = np.random.default_rng(seed)
    for a in range(0, n, block):
        m = min(block, n - a)
        c = centres[rng.integers(0, len(centres), m)]
        x = c + rng.standard_normal((m, DIM), dtype=np.float32) * (NOISE / np.sqrt(DIM))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield a, x.astype(np.float32)


def product_of(row: int) -> str:
    return f"p{row:07d}"


def _centres() -> np.ndarray:
    c = np.random.default_rng(0).standard_normal((CLUSTERS, DIM)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def prepare_vectors(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    vpath, qpath = folder / "vectors.npy", folder / "queries.npy"
    if not vpath.exists():
        tmp = folder / "vectors.tmp.npy"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(N, DIM))
        for a, x in _mixture(N, 1, _centres()):
            out[a:a + len(x)] = x
        out.flush()
        del out
        tmp.replace(vpath)
    if not qpath.exists():
        q = np.concatenate([x for _, x in _mixture(N_QUERIES, 2, _centres())])
        np.save(qpath, q)
    return np.load(vpath, mmap_mode="r"), np.load(qpath)


def prepare_store(folder: Path) -> tuple[Path, np.ndarray]:
    """Records only (the join reads product id, category and metadata); ids are the store's."""
    from index.store import CatalogStore, ItemRecord, item_id

    store_path, ids_path = folder / "store", folder / "ids.npy"
    done = folder / "store.done"
    if not done.exists():
        ids = np.empty(N, np.int64)
        with CatalogStore.create_or_open(store_path, dim=DIM, vector_dtype="float16", initial_map_size=1 << 30) as store:
            step = 20_000
            for a in range(0, N, step):
                records = [ItemRecord(product_of(r), f"{product_of(r)}.jpg", category=f"c{r % 16}",
                                      metadata={"title": f"Product {r}"}) for r in range(a, min(N, a + step))]
                stored = store.put(records)
                ids[a:a + len(stored)] = [s.id for s in stored]
        np.save(ids_path, ids)
        done.write_text("ok\n")
    ids = np.load(ids_path)
    # Sanity: the store's ids are item_id(product, image) (no salt collisions).
    assert ids[0] == item_id(product_of(0), f"{product_of(0)}.jpg")
    return store_path, ids


def prepare_index(folder: Path, vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray) -> Path:
    from index.ann import versions
    from index.ann.build import build_version
    from index.ann.sources import array_source

    root = folder / "index"
    if "v1" not in versions.list_versions(str(root)):
        t0 = time.monotonic()
        build_version(array_source(vectors, ids, metric="ip", description="serve-1m"), str(root),
                      factory=FACTORY, target_recall=0.95, gpu="off", publish=False, version="v1",
                      tune_queries=queries[:200])
        print(f"built v1 in {time.monotonic() - t0:.0f}s", flush=True)
    if "v2" not in versions.list_versions(str(root)):
        # The swap target: the same files under another version name (what the swap measures is
        # load + warm + switch under load, not a second 1M build on a shared 2-core machine).
        staging = versions.make_staging(str(root), "v2")
        for f in os.listdir(root / "v1"):
            if f != versions.MANIFEST:
                shutil.copyfile(root / "v1" / f, os.path.join(staging, f))
        manifest = json.loads((root / "v1" / versions.MANIFEST).read_text())
        versions.write_json_atomic(os.path.join(staging, versions.MANIFEST), dict(manifest, version="v2"))
        versions.commit_staging(str(root), staging, "v2")
    versions.set_current(str(root), "v1")
    return root


def prepare_1m() -> dict:
    folder = cache_root() / "serve-1m"
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    vectors, queries = prepare_vectors(folder)
    store_path, ids = prepare_store(folder)
    root = prepare_index(folder, vectors, ids, queries)
    return {"folder": folder, "store": store_path, "index_root": root, "queries": queries,
            "ids": ids, "seconds": time.monotonic() - t0}


def prepare_images() -> dict:
    """The demo's real sample catalog (pretrained model), for image queries."""
    from serve.demo import prepare_demo

    folder = cache_root() / "serve-images"
    demo = prepare_demo(folder, limit_products=IMAGE_PRODUCTS)
    photos = sorted(p for p in Path(demo.queries_dir).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return {"store": demo.store_path, "index_root": demo.index_root, "photos": photos}


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    info = prepare_1m()
    manifest = json.loads((Path(info["index_root"]) / "v1" / "manifest.json").read_text())
    print({k: manifest.get(k) for k in ("factory", "ntotal", "search_defaults", "measured_recall", "build_seconds")})
    if "--images" in sys.argv:
        print(len(prepare_images()["photos"]), "query photos")
