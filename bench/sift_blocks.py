"""The ``sift-<N>`` ladder (1M, 10M, 50M ...): real SIFT descriptors made and written in blocks.

Nothing here holds a whole base in RAM. One shared POOL folder (``<cache>/bench/sift-pool/``)
holds numbered blocks ``blk-00000.npy`` ... (uint8 rows, 128 columns). Block ``b`` is the SIFT
descriptors of base scenes ``b*S .. b*S+S-1`` (S = ``scenes_per_block``), minus every row that
an earlier row of the pool (in this block or a previous one) already holds exactly. Blocks are
written atomically, in order; a run that stops part-way leaves only complete blocks, and the next
run re-hashes them and goes on from the first missing one (a block after a gap is removed,
since what it keeps depends on every block before it).

A rung ``sift-<N>`` is the first N rows of the pool (so 1M is a prefix of 10M, and both are
duplicate-free: keeping first occurrences commutes with taking a prefix), copied into its own
``base.npy`` (uint8, opened ``mmap_mode='r'``; faiss gets float32 one block at a time). Its
exact ground truth is computed block by block (``faiss.knn`` per base block, top-k merged by
(distance, row)). SIFT values are integers 0..255, so float32 L2 distances are exact integers.

Scenes: ``imgsearch.sample_data.render_scene`` (a random crop of a real photo, 1-2 tuxpaint
cut-outs pasted, photometric jitter), then a random scale in [0.4, 1] and a random rotation in
[0, 360) degrees (the inscribed centre crop, so no blank corners), grey, OpenCV SIFT with
default parameters. BASE scenes use 3 of every 4 background photos (sorted by name) and the
TRAIN-split products; QUERY scenes the other photos and the EVAL-split products, so no query
comes from a photo or product of the base. Exact duplicates are found by a 64-bit digest per
row (a collision would drop one distinct row: expected < 1e-4 rows at 50M).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

SEED = 0
POOL_VERSION = 1
SCENES_PER_BLOCK = 256  # ~ 330k descriptors per block before de-duplication
N_QUERIES = 10_000
GT_BLOCK = 1_000_000


# ------------------------------------------------------------------------------ digests
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def row_digests(rows: np.ndarray) -> np.ndarray:
    """64-bit digest of each uint8 row (splitmix64 mixing of its 8-byte words), for exact-duplicate tests."""
    words = np.ascontiguousarray(rows, dtype=np.uint8).view(np.uint64)
    h = np.full(len(words), 0x9E3779B97F4A7C15, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(words.shape[1]):
            h = h ^ words[:, j]
            h = (h ^ (h >> np.uint64(30))) * _M1
            h = (h ^ (h >> np.uint64(27))) * _M2
            h = h ^ (h >> np.uint64(31))
    return h


def keep_new(rows: np.ndarray, seen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose digest is neither in the sorted ``seen`` nor earlier in ``rows``; and the new sorted seen."""
    h = row_digests(rows)
    _, first = np.unique(h, return_index=True)
    first = np.sort(first)
    hf = h[first]
    if len(seen):
        pos = np.minimum(np.searchsorted(seen, hf), len(seen) - 1)
        fresh = seen[pos] != hf
        first, hf = first[fresh], hf[fresh]
    # numpy's stable sort of uint64 is a timsort: merging two sorted runs is linear.
    return rows[first], np.sort(np.concatenate([seen, hf]), kind="stable")


# ------------------------------------------------------------------------------- scenes
class SceneMaker:
    """Renders base or query scenes by stream number and returns their SIFT rows (uint8)."""

    def __init__(self):
        from imgsearch import sample_data as sd

        self.sd = sd
        backgrounds = sorted(sd.list_backgrounds(), key=lambda b: b[0])
        self.held = backgrounds[::4]
        self.base_bg = [b for i, b in enumerate(backgrounds) if i % 4]
        products = sd.list_products()
        train_ids, eval_ids = sd.split_products(products)
        train_set, eval_set = set(train_ids), set(eval_ids)
        self.train_p = [p for p in products if p.product_id in train_set]
        self.eval_p = [p for p in products if p.product_id in eval_set]
        self._cut: dict = {}
        self._sift = None

    def cutout(self, p):
        if p.product_id not in self._cut:
            self._cut[p.product_id] = self.sd.load_cutout(p, max_side=self.sd.SCENE_CUTOUT_MAX_SIDE)
        return self._cut[p.product_id]

    def gray(self, kind: str, stream: int) -> np.ndarray:
        from PIL import Image

        bgs, prods = (self.base_bg, self.train_p) if kind == "base" else (self.held, self.eval_p)
        rng = np.random.default_rng([SEED, 1 if kind == "base" else 2, stream])
        chosen = [prods[int(i)] for i in rng.choice(len(prods), size=int(rng.integers(1, 3)), replace=False)]
        im = self.sd.render_scene([self.cutout(p) for p in chosen], rng, bgs).image.convert("L")
        s = float(rng.uniform(0.4, 1.0))
        im = im.resize((max(32, round(im.width * s)), max(32, round(im.height * s))), Image.Resampling.BILINEAR)
        angle = float(rng.uniform(0.0, 360.0))
        w, h = im.size
        im = im.rotate(angle, Image.Resampling.BILINEAR, expand=False)
        # Largest centred crop free of the blank corners a rotation leaves (scaled inscribed box).
        f = 1.0 / (abs(np.cos(np.radians(angle))) + abs(np.sin(np.radians(angle))))
        cw, ch = max(16, int(w * f)), max(16, int(h * f))
        im = im.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
        return np.asarray(im, dtype=np.uint8)

    def descriptors(self, kind: str, stream: int) -> np.ndarray:
        import cv2

        if self._sift is None:
            self._sift = cv2.SIFT_create()
        _, d = self._sift.detectAndCompute(self.gray(kind, stream), None)
        if d is None:
            return np.empty((0, 128), np.uint8)
        # OpenCV rounds SIFT values to integers in 0..255: uint8 holds them exactly.
        if d.max() > 255 or d.min() < 0 or not np.array_equal(d, np.round(d)):
            raise RuntimeError("SIFT descriptor values are not integers in 0..255")
        return d.astype(np.uint8)


_WORKER: SceneMaker | None = None


def _worker_init():
    import cv2

    global _WORKER
    cv2.setNumThreads(1)
    _WORKER = SceneMaker()


def _worker_scene(job: tuple[str, int]) -> np.ndarray:
    return _WORKER.descriptors(*job)


class _Scenes:
    """Ordered descriptors of scene jobs, in ``workers`` processes (1: in this process)."""

    def __init__(self, workers: int):
        self.workers, self.pool, self.maker = workers, None, None

    def map(self, jobs: list) -> list:
        if self.workers <= 1:
            if self.maker is None:
                _worker_init()
                self.maker = _WORKER
            return [self.maker.descriptors(*j) for j in jobs]
        if self.pool is None:
            import multiprocessing as mp

            self.pool = mp.get_context("fork").Pool(self.workers, initializer=_worker_init)
        return self.pool.map(_worker_scene, jobs, chunksize=4)

    def close(self):
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


# --------------------------------------------------------------------------------- pool
def _block_path(pool: Path, b: int) -> Path:
    return pool / f"blk-{b:05d}.npy"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _pool_config(pool: Path, scenes_per_block: int) -> dict:
    import cv2

    cfg = {"version": POOL_VERSION, "scenes_per_block": scenes_per_block, "opencv": cv2.__version__, "seed": SEED}
    path = pool / "pool.json"
    if path.exists():
        old = json.loads(path.read_text())
        have = {k: old.get(k) for k in cfg}
        if have != cfg:
            raise SystemExit(f"{pool} was made with {have}, this code makes {cfg}: remove the folder to remake it")
        return old
    pool.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cfg) + "\n")
    os.replace(tmp, path)
    return cfg


def grow_pool(pool: Path, n: int, *, scenes_per_block: int = SCENES_PER_BLOCK, workers: int = 2,
              log=print) -> dict:
    """Append blocks to ``pool`` until it holds >= ``n`` distinct rows; resumes from complete blocks."""
    pool.mkdir(parents=True, exist_ok=True)
    _pool_config(pool, scenes_per_block)
    blocks = []
    while _block_path(pool, len(blocks)).exists():
        blocks.append(_block_path(pool, len(blocks)))
    for stray in pool.glob("blk-*.npy"):  # after a gap, or a torn temp file: made again
        if stray not in blocks:
            stray.unlink()
    seen = np.empty(0, np.uint64)
    rows = 0
    for p in blocks:  # re-hash what is there (reading the file, not holding it)
        x = np.load(p, mmap_mode="r")
        _, seen = keep_new(np.asarray(x), seen)
        rows += len(x)
    stats_path = pool / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    stats = {str(k): v for k, v in stats.items() if int(k) < len(blocks)}
    scenes = _Scenes(workers)
    t0, made, b = time.monotonic(), 0, len(blocks)
    try:
        while rows < n:
            jobs = [("base", s) for s in range(b * scenes_per_block, (b + 1) * scenes_per_block)]
            tb = time.monotonic()
            parts = scenes.map(jobs)
            raw = np.concatenate(parts) if parts else np.empty((0, 128), np.uint8)
            kept, seen = keep_new(raw, seen)
            _save_atomic(_block_path(pool, b), kept)
            dt = time.monotonic() - tb
            stats[str(b)] = {"raw": int(len(raw)), "kept": int(len(kept)), "seconds": round(dt, 2)}
            tmp = stats_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(stats) + "\n")
            os.replace(tmp, stats_path)
            rows += len(kept)
            made += len(raw)
            b += 1
            el = time.monotonic() - t0
            log(f"  sift pool: block {b - 1}: {len(raw)} raw -> {len(kept)} kept; {rows} rows "
                f"({rows / max(n, 1):.0%} of {n}), {made / el:.0f} descriptors/s, {el:.0f}s")
    finally:
        scenes.close()
    return {"blocks": b, "rows": rows, "stats": stats}


def pool_queries(pool: Path, nq: int, *, workers: int = 2) -> np.ndarray:
    """``nq`` query rows (uint8) drawn (seeded) from >= 4*nq descriptors of held-out scenes; cached."""
    path = pool / f"queries-{nq}.npy"
    if path.exists():
        return np.load(path)
    scenes = _Scenes(workers)
    chunks, count, s = [], 0, 0
    try:
        while count < 4 * nq:
            batch = scenes.map([("query", 10_000_000 + s + i) for i in range(8)])
            s += 8
            chunks += batch
            count += sum(len(c) for c in batch)
    finally:
        scenes.close()
    qall = np.concatenate(chunks)
    rng = np.random.default_rng(SEED)
    q = qall[np.sort(rng.choice(len(qall), nq, replace=False))]
    _save_atomic(path, q)
    (pool / f"queries-{nq}.json").write_text(json.dumps({"scenes": s, "pool": int(len(qall))}) + "\n")
    return q


# ---------------------------------------------------------------------------- ground truth
def blocked_knn(queries: np.ndarray, base: np.ndarray, k: int, block: int = GT_BLOCK,
                metric: str = "l2") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` over ``base`` (any dtype, e.g. a uint8 memmap), one float32 block at a time.

    Merged by (distance, row), so ties go to the lower row whatever the block size."""
    import faiss

    q = np.ascontiguousarray(queries, dtype=np.float32)
    mt = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    best_d = np.full((len(q), 0), np.inf, np.float32)
    best_i = np.empty((len(q), 0), np.int64)
    for a in range(0, base.shape[0], block):
        x = np.ascontiguousarray(base[a:a + block], dtype=np.float32)
        d, i = faiss.knn(q, x, min(k, len(x)), metric=mt)
        if metric == "ip":
            d = -d
        dd, ii = np.hstack([best_d, d]), np.hstack([best_i, i + a])
        o = np.lexsort((ii, dd), axis=1)[:, :k]
        best_d, best_i = np.take_along_axis(dd, o, 1), np.take_along_axis(ii, o, 1)
    return (-best_d if metric == "ip" else best_d), best_i


# ---------------------------------------------------------------------------------- rung
def make_rung(folder: Path, n: int, pool: Path, *, nq: int = N_QUERIES, k: int = 100,
              scenes_per_block: int = SCENES_PER_BLOCK, workers: int = 2, gt_block: int = GT_BLOCK,
              log=print) -> dict:
    """``folder/{base.npy (uint8 n x 128), queries.npy (float32), gt.npy, gt_dist.npy, meta.json}``; returns meta."""
    t0 = time.monotonic()
    folder.mkdir(parents=True, exist_ok=True)
    grown = grow_pool(pool, n, scenes_per_block=scenes_per_block, workers=workers, log=log)
    stats = grown["stats"]
    gen_seconds = sum(s["seconds"] for s in stats.values())
    raw_total = sum(s["raw"] for s in stats.values())
    # The rung: the first n rows, copied block by block.
    tmp = folder / "base.tmp.npy"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, 128))
    at, b, raw_used = 0, 0, 0
    while at < n:
        x = np.load(_block_path(pool, b), mmap_mode="r")
        m = min(len(x), n - at)
        out[at:at + m] = x[:m]
        raw_used += stats[str(b)]["raw"]
        at += m
        b += 1
    out.flush()
    del out
    os.replace(tmp, folder / "base.npy")
    base = np.load(folder / "base.npy", mmap_mode="r")
    q8 = pool_queries(pool, nq, workers=workers)
    # Query rows that are byte-equal to a base row: their own photos are held out, so any are
    # coincidences (e.g. flat patches); counted, not removed.
    seen = np.empty(n, np.uint64)
    for a in range(0, n, gt_block):
        seen[a:a + gt_block] = row_digests(base[a:a + gt_block])
    seen.sort()
    qh = row_digests(q8)
    pos = np.minimum(np.searchsorted(seen, qh), len(seen) - 1)
    q_in_base = int((seen[pos] == qh).sum())
    del seen
    tg = time.monotonic()
    dist, ids = blocked_knn(q8, base, k, gt_block)
    gt_seconds = time.monotonic() - tg
    np.save(folder / "queries.npy", q8.astype(np.float32))
    np.save(folder / "gt.npy", ids.astype(np.int64))
    np.save(folder / "gt_dist.npy", dist.astype(np.float32))
    qmeta = json.loads((pool / f"queries-{nq}.json").read_text())
    meta = {
        "source": "OpenCV SIFT (cv2.SIFT_create(), defaults) on grey real photo scenes (bench/sift_blocks.py)",
        "dtype": "uint8", "pool": str(pool), "pool_version": POOL_VERSION, "scenes_per_block": scenes_per_block,
        "base_scenes": (b * scenes_per_block), "base_blocks": b,
        "raw_descriptors_of_blocks_used": int(raw_used),  # the last block may be used in part
        "pool_raw_descriptors": int(raw_total), "pool_rows": int(grown["rows"]),
        "pool_duplicate_share": round(1 - grown["rows"] / max(raw_total, 1), 5),
        "generation_seconds_total": round(gen_seconds, 1),
        "generation_rate_per_s": round(raw_total / max(gen_seconds, 1e-9)),
        "query_scenes": qmeta["scenes"], "query_pool": qmeta["pool"], "queries_equal_to_a_base_row": q_in_base,
        "metric": "l2", "n": int(n), "d": 128, "nq": int(nq),
        "gt": f"exact, faiss.knn per {gt_block}-row block merged by (distance, row), top {k}",
        "gt_seconds": round(gt_seconds, 1), "make_seconds": round(time.monotonic() - t0, 1),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    log(f"  {folder.name}: {n} rows, GT {gt_seconds:.0f}s, {q_in_base} queries equal a base row")
    return meta
