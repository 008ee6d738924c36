"""Rebuild: an incremental cron run (1% of the images changed) against a full rebuild, in one run.

The catalog is N real files (small random 32x32 PNGs, one product each) and the job is the real
``run_rebuild`` (ingest diff -> build -> validate -> publish -> GC). The embedder is the torch-free
``PixelEmbedder`` (64-d): embedding N photos with the real model on 2 shared cores would take
~N x 50 ms, so the vectors are synthetic; scan (read + sha256 of every file, store lookups),
build and validate are the real code paths. Reported per stage: ingest (scan + embed + store),
build (train + add + tune), validate, and the total; ``full`` starts from an empty store and
index root, ``incremental`` is the next cron run after 1% of the images were redrawn.

Optional ``--ray``: the same incremental run and full run with ``--distributed ray`` (a local
cluster, num_cpus=2), checked to index the same ids.

    .venv/bin/python bench/bench_rebuild.py --n 100000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_images(folder: Path, n: int, changed: int = 0, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = ["product_id,image,category"]
    for i in range(n):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        path = folder / "img" / f"{i // 1000:03d}" / f"{i}.png"
        if changed and i % (n // changed) == 0:
            Image.fromarray(255 - pixels).save(path)
        elif not changed:
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(pixels).save(path)
        lines.append(f"p{i},img/{i // 1000:03d}/{i}.png,c{i % 10}")
    catalog = folder / "catalog.csv"
    catalog.write_text("\n".join(lines) + "\n")
    return catalog


def one_run(catalog: Path, store: Path, root: Path, embedder, **kw) -> dict:
    from index.jobs import rebuild as rb

    t0 = time.monotonic()
    res = rb.run_rebuild(rb.RebuildConfig(catalog=str(catalog), store=str(store), index_root=str(root), gpu="off",
                                          batch_size=256, **kw), embedder)
    total = time.monotonic() - t0
    v = res.validation
    return {"status": res.status, "added": res.ingest.added, "changed": res.ingest.changed,
            "unchanged": res.ingest.unchanged, "ingest_s": round(res.ingest.seconds, 1),
            "build_s": round(res.build_seconds, 1), "validate_s": v.get("seconds"), "total_s": round(total, 1),
            "recall@10": v.get("recall"), "ntotal": v.get("ntotal")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--changed", type=float, default=0.01)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--ray", action="store_true")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    os.environ.setdefault("IMGSEARCH_THREADS", "2")
    from helpers.pixel_embedder import PixelEmbedder

    emb = PixelEmbedder(args.dim)
    work = Path(tempfile.mkdtemp(prefix="bench-rebuild-", dir=args.workdir))
    out = {"n": args.n, "changed": int(args.n * args.changed), "embedder": emb.model_hash}
    t0 = time.monotonic()
    catalog = write_images(work, args.n)
    out["write_images_s"] = round(time.monotonic() - t0, 1)
    out["full"] = one_run(catalog, work / "store", work / "index", emb)
    print(json.dumps(out), flush=True)
    write_images(work, args.n, changed=int(args.n * args.changed))
    out["incremental"] = one_run(catalog, work / "store", work / "index", emb)
    print(json.dumps(out), flush=True)
    if args.ray:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        out["ray_full"] = one_run(catalog, work / "store-ray", work / "index-ray", emb, distributed="ray", shards=2)
        from index.store import CatalogStore

        ids = []
        for s in ("store", "store-ray"):
            with CatalogStore.open_readonly(work / s) as st:
                ids.append(np.concatenate([b[0] for b in st.iter_blocks(1 << 20)]))
        out["ray_same_ids"] = bool(np.array_equal(*ids))
        ray.shutdown()
    out["workdir"] = str(work)
    print(json.dumps(out, indent=1), flush=True)
    shutil.rmtree(work / "img", ignore_errors=True)


if __name__ == "__main__":
    main()
