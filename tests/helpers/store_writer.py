"""Child-process roles for the store tests (run as a script: ``python store_writer.py ROLE ...``).

Real processes, not threads: the tests are about LMDB's cross-process MVCC, the
flock write lock, and what a SIGKILL leaves behind.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

EMBED_DIM = 8


def embed_stats(images) -> np.ndarray:
    """A deterministic stand-in embedder: per-channel mean and std, aspect ratio, area."""
    rows = []
    for image in images:
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        width, height = image.size
        rows.append([*pixels.mean(axis=(0, 1)), *pixels.std(axis=(0, 1)), width / height, width * height / 100.0])
    return np.asarray(rows, dtype=np.float32).reshape(len(images), EMBED_DIM)


def slow_embed(delay: float):
    def embed(images):
        time.sleep(delay)
        return embed_stats(images)

    return embed


def role_ingest(args) -> None:
    from index.store import CatalogStore
    from index.store.ingest import ingest_catalog

    with CatalogStore.create_or_open(args.store, vector_dtype="float32", initial_map_size=args.map_size) as store:
        print("opened", flush=True)
        summary = ingest_catalog(args.catalog, store, slow_embed(args.delay), batch_size=args.batch_size, progress=False)
    print(json.dumps({"added": summary.added}), flush=True)


def role_hold_lock(args) -> None:
    from index.store import CatalogStore

    with CatalogStore.create_or_open(args.store):
        print("locked", flush=True)
        time.sleep(60)


def role_read(args) -> None:
    """Read until ``--stop`` exists, checking every item seen: record and vector agree, and
    the snapshot holds whole batches. Prints one JSON report."""
    from embed.image_io import decode_image
    from index.store import CatalogStore

    stop = Path(args.stop)
    report = {"rounds": 0, "max_seen": 0, "errors": [], "map_sizes": set()}
    expected_cache: dict[str, np.ndarray] = {}
    store = CatalogStore.open_readonly(args.store, map_size=args.map_size)
    print("ready", flush=True)
    while True:
        stopping = stop.exists()  # read once more after the writer finished
        stats = store.stats()
        report["map_sizes"].add(stats["map_size"])
        if stats["count"] != stats["with_vectors"]:
            report["errors"].append(f"count {stats['count']} != with_vectors {stats['with_vectors']}")
        if stats["count"] % args.batch_size and stats["count"] != args.total:
            report["errors"].append(f"count {stats['count']} is not whole batches of {args.batch_size}")
        seen = 0
        for ids, vectors in store.iter_blocks(block_size=37):
            for record, vector in zip(store.get_many(ids), vectors):
                if record.path not in expected_cache:
                    expected_cache[record.path] = embed_stats([decode_image(record.path)])[0]
                if not np.allclose(vector, expected_cache[record.path], atol=1e-6):
                    report["errors"].append(f"vector of {record.id} disagrees with its record {record.image}")
            seen += len(ids)
        report["max_seen"] = max(report["max_seen"], seen)
        report["rounds"] += 1
        if stopping:
            break
        time.sleep(0.005)  # leave CPU to the writer on a shared machine
    store.close()
    report["map_sizes"] = sorted(report["map_sizes"])
    print(json.dumps(report), flush=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["ingest", "hold-lock", "read"])
    parser.add_argument("store")
    parser.add_argument("--catalog")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--map-size", type=int, default=1 << 20)
    parser.add_argument("--stop")
    parser.add_argument("--total", type=int, default=-1)
    args = parser.parse_args(argv)
    {"ingest": role_ingest, "hold-lock": role_hold_lock, "read": role_read}[args.role](args)


if __name__ == "__main__":
    main(sys.argv[1:])
