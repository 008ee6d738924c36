"""Ray against single-process on one catalog: same outputs, and the wall time of each.

The catalog is N real photos (default 10,000): the tuxpaint catalog shots of the sample
products (imgsearch.sample_data), each drawn several times through a random shopper-ish transform
(random crop and scale, sometimes a recolour, JPEG quality 60-95), one product per image.
The embedder is the real default pipeline (``embed.pipeline.load_pipeline``: ImageNet
MobileNetV2 + GeM + projection, ONNX Runtime on CPU; ``--checkpoint`` for a trained one).

Per path, timed separately:
- ``rebuild`` (ingest = read + hash + embed + store, build, validate, publish) via
  ``index.jobs.rebuild.run_rebuild``; single process vs ``distributed="ray"`` (embedding on a
  Ray Data actor pool, index shards built by Ray tasks);
- ``dedup`` (the k-NN self-join) via ``run_dedup`` vs ``distributed_dedup``.

Checked: the two stores hold the same ids and (to float tolerance) the same vectors, both
versions index the same ids, and both scans find the same duplicate groups. Ray runs as a local
cluster (``ray.init(num_cpus=2)``) on this machine, so its numbers show the overhead of the
distributed path where it cannot gain; on a cluster the embed stage scales with actors.

    .venv/bin/python bench/bench_ray.py --n 10000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

from bench_index import run_info, write_results  # noqa: E402


def _variant(shot, rng):
    """A distinct shopper-ish copy: random crop and scale, sometimes a recolour (exact duplicate
    images would make recall@10 a matter of tie order)."""
    from bench_dedup import _transform
    from PIL import Image

    w, h = shot.size
    cw, ch = int(w * rng.uniform(0.8, 1.0)), int(h * rng.uniform(0.8, 1.0))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    scale = rng.uniform(0.4, 1.0)
    image = shot.crop((x, y, x + cw, y + ch)).resize((max(16, int(cw * scale)), max(16, int(ch * scale))), Image.BILINEAR)
    return _transform(image, 3, rng) if rng.random() < 0.3 else image


def write_catalog(folder: Path, n: int, seed: int = 0) -> Path:
    from imgsearch.sample_data import catalog_shot, list_products

    rng = np.random.default_rng(seed)
    products = list_products()
    shots = {}
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = ["product_id,image,category"]
    for i in range(n):
        p = products[i % len(products)]
        if p.product_id not in shots:
            shots[p.product_id] = catalog_shot(p)
        image = _variant(shots[p.product_id], rng) if i >= len(products) else shots[p.product_id]
        name = f"img/{i:06d}.jpg"
        image.save(folder / name, "JPEG", quality=int(rng.integers(60, 96)))
        lines.append(f"item-{i:06d},{name},{p.category}")
    catalog = folder / "catalog.csv"
    catalog.write_text("\n".join(lines) + "\n")
    return catalog


def store_content(path: Path):
    from index.store import CatalogStore

    with CatalogStore.open_readonly(path) as store:
        blocks = list(store.iter_blocks(1 << 20))
    ids = np.concatenate([b[0] for b in blocks])
    vectors = np.concatenate([b[1] for b in blocks]).astype(np.float32)
    order = np.argsort(ids)
    return ids[order], vectors[order]


def indexed_ids(index_root: Path) -> np.ndarray:
    from index.ann.search import open_index

    idx = open_index(str(index_root))
    return np.sort(idx.indexed_ids())


def run_path(name: str, catalog: Path, work: Path, args, pipeline, distributed: str | None) -> dict:
    from index.jobs import dedup
    from index.jobs import rebuild as rb
    from index.store import CatalogStore

    cfg = rb.RebuildConfig(catalog=str(catalog), store=str(work / f"store-{name}"), index_root=str(work / f"index-{name}"),
                           gpu="off", batch_size=args.batch_size, distributed=distributed,
                           shards=2 if distributed else None, model_spec=args.checkpoint)
    t0 = time.monotonic()
    res = rb.run_rebuild(cfg, pipeline)
    rebuild_s = time.monotonic() - t0
    dcfg = dedup.DedupConfig(threshold=args.threshold, gpu="off")
    t0 = time.monotonic()
    if distributed:
        from index.jobs.distributed import distributed_dedup

        found = distributed_dedup(cfg.store, cfg.index_root, dcfg, "")
    else:
        with CatalogStore.open_readonly(cfg.store) as store:
            found = dedup.run_dedup(store, cfg.index_root, dcfg, progress=False)
    dedup_s = time.monotonic() - t0
    out = {"status": res.status, "added": res.ingest.added, "ingest_s": round(res.ingest.seconds, 1),
           "build_s": round(res.build_seconds, 1), "validate_s": res.validation.get("seconds"),
           "recall@10": res.validation.get("recall"), "rebuild_wall_s": round(rebuild_s, 2),
           "dedup_wall_s": round(dedup_s, 2), "dedup_groups": len(found.groups)}
    if distributed:
        out["embedded_on_cluster"] = getattr(res.ingest, "embedded_on_cluster", None)
    print(f"{name}: {json.dumps(out)}", flush=True)
    return out, found.groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--output", default=str(REPO / "bench" / "results" / "bench_ray.json"))
    args = ap.parse_args()
    import ray

    from embed.pipeline import load_pipeline

    work = Path(tempfile.mkdtemp(prefix="bench-ray-", dir=args.workdir))
    t0 = time.monotonic()
    catalog = write_catalog(work, args.n)
    res = {**run_info(), "n": args.n, "write_catalog_s": round(time.monotonic() - t0, 1), "checkpoint": args.checkpoint}
    pipeline = load_pipeline(args.checkpoint, batch_size=args.batch_size)
    res["model"] = pipeline.model_hash[:16]
    res["single"], groups_single = run_path("single", catalog, work, args, pipeline, None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        res["ray"], groups_ray = run_path("ray", catalog, work, args, pipeline, "ray")
    finally:
        ray.shutdown()
    ids_a, vec_a = store_content(work / "store-single")
    ids_b, vec_b = store_content(work / "store-ray")
    pairs = [{(a, b) for g in groups for a, b, _ in g["pairs"]} for groups in (groups_single, groups_ray)]
    res["same"] = {
        "store_ids": bool(np.array_equal(ids_a, ids_b)),
        "max_abs_vector_diff": float(np.abs(vec_a - vec_b).max()) if np.array_equal(ids_a, ids_b) else None,
        "indexed_ids": bool(np.array_equal(indexed_ids(work / "index-single"), indexed_ids(work / "index-ray"))),
        "dedup_groups": [sorted(g["products"]) for g in groups_single] == [sorted(g["products"]) for g in groups_ray],
        "dedup_pairs_single": len(pairs[0]), "dedup_pairs_ray": len(pairs[1]),
        "dedup_pairs_common": len(pairs[0] & pairs[1]),
    }
    res["ray_over_single_wall"] = {
        "rebuild": round(res["ray"]["rebuild_wall_s"] / max(res["single"]["rebuild_wall_s"], 0.01), 2),
        "dedup": round(res["ray"]["dedup_wall_s"] / max(res["single"]["dedup_wall_s"], 0.01), 2)}
    res["workdir"] = str(work)
    print(json.dumps(res, indent=1), flush=True)
    write_results(args.output, res)


if __name__ == "__main__":
    main()
