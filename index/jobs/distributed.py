"""``--distributed ray[:ADDRESS]``: embed, build and dedup on a Ray cluster. ``ray`` is imported here only.

- **ingest** (embed, rebuild): Ray Data reads the catalog rows in blocks; an actor pool (one GPU
  per actor where the cluster has GPUs) reads each file, skips it when its content hash and model
  match the stored record, else decodes and embeds it, and writes a per-worker output file
  (pixel hash -> vector). The single writer (this process, holding the store's write lock) then
  runs the ordinary :func:`index.store.ingest.ingest_catalog` with an ``embed_fn`` that takes those
  vectors, so rejects, deletes, counts and kill-safety are exactly the single-process ones; an
  image a worker did not embed is embedded locally.
- **build**: one quantizer is trained here, then each shard is built by a Ray task with
  :func:`index.ann.build.build_shard` from that ``trained.faiss``, reading the store itself.
- **dedup**: the self-join is split by query blocks over an actor pool (each actor opens the index
  and the store read-only); per-block results are merged exactly as in the single process.

Workers read the same paths (store, index root, catalog images) as the driver: one machine or a
shared file system.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tempfile
import time
import uuid

import numpy as np

from embed.image_io import decode_image
from imgsearch.errors import BadInput, NotImplementedYet
from imgsearch.progress import Progress
from index.ann import versions
from index.ann.build import build_shard, build_version
from index.ann.search import open_index
from index.ann.sources import DEFAULT_BLOCK, store_source
from index.jobs.dedup import DedupResult, DedupWorker, PairCollector, count_live_vectors
from index.store import CatalogStore
from index.store.catalog import CatalogRow, read_catalog
from index.store.ingest import ingest_catalog

log = logging.getLogger(__name__)

IN_FLIGHT_PER_ACTOR = 2


def parse_distributed(spec: str | None) -> str | None:
    """``ray`` or ``ray:ADDRESS`` -> the Ray address ("" for a local cluster); None when absent."""
    if spec is None:
        return None
    kind, _, address = spec.partition(":")
    if kind != "ray":
        raise BadInput(f"--distributed {spec!r}: expected ray or ray:ADDRESS")
    return address


def connect(address: str | None):
    try:
        import ray
    except ImportError:
        raise NotImplementedYet("--distributed ray: ray is not installed (pip install 'imgsearch[distributed]')") from None
    if not ray.is_initialized():
        if address:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        else:
            ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    return ray


def _actors(ray, per_actor_cpus: float = 1.0) -> tuple[int, float]:
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if gpus:
        return gpus, 1.0
    return max(1, int(res.get("CPU", 1) // per_actor_cpus)), 0.0


def pixel_key(image) -> bytes:
    """Identity of a decoded image: what the driver's embed_fn sees is what a worker embedded."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.digest()


# ---------------------------------------------------------------- ingest


class _EmbedActor:
    """Ray Data callable class: rows -> per-worker output files of (pixel key, vector)."""

    def __init__(self, embedder_factory, out_dir: str, model: str | None):
        self.embedder = embedder_factory()
        self.out_dir = out_dir
        self.model = model

    def __call__(self, batch: dict) -> dict:
        images, keys = [], []
        for path, old_hash, old_model in zip(batch["path"], batch["old_hash"], batch["old_model"]):
            try:
                data = open(path, "rb").read()
            except OSError:
                continue  # the driver's ingest rejects it with the reason
            if old_hash and old_hash == hashlib.sha256(data).hexdigest() and old_model == self.model:
                continue  # unchanged: the driver keeps the stored vector
            try:
                image = decode_image(data, name=path)
            except BadInput:
                continue
            images.append(image)
            keys.append(pixel_key(image))
        rows = np.array([len(batch["path"])])  # read, skipped or embedded: the driver's progress
        if not images:
            return {"file": np.array([""]), "n": np.array([0]), "rows": rows}
        vectors = np.asarray(self.embedder.embed_catalog(images), np.float32)
        path = os.path.join(self.out_dir, f"part-{uuid.uuid4().hex}.npz")
        np.savez(path, keys=np.frombuffer(b"".join(keys), dtype="S16"), vectors=vectors)
        return {"file": np.array([path]), "n": np.array([len(images)]), "rows": rows}


def _plan_rows(catalog: str, store) -> list[dict]:
    """Catalog rows with the stored content hash/model (workers skip unchanged images themselves)."""
    from pathlib import Path


    base = Path(catalog).resolve().parent
    rows = [r for r in read_catalog(catalog) if isinstance(r, CatalogRow)]
    out = []
    for start in range(0, len(rows), 4096):
        chunk = rows[start:start + 4096]
        found = store.find_records((r.product_id, r.image) for r in chunk)
        for r, rec in zip(chunk, found):
            out.append({"path": str((base / r.image).resolve()),
                        "old_hash": rec.content_hash if rec is not None else "",
                        "old_model": (rec.model or "") if rec is not None else ""})
    return out


def distributed_ingest(catalog: str, store_path: str, embedder, address: str | None, *, batch_size: int = 32,
                       model_spec: str | None = None, embedder_factory=None, allow_mass_delete: bool = False):
    """Embed on a Ray actor pool, then ingest in this process (the single writer)."""
    ray = connect(address)
    if embedder_factory is None:
        if model_spec is not None or type(embedder).__name__ == "QueryPipeline":
            from embed.pipeline import load_pipeline

            embedder_factory = functools.partial(load_pipeline, model_spec, batch_size=batch_size)
        else:
            embedder_factory = functools.partial(_same, embedder)  # a picklable stand-in embedder
    t0 = time.monotonic()
    out_dir = tempfile.mkdtemp(prefix=".ray-embed-", dir=os.path.dirname(os.path.abspath(store_path)) or ".")
    try:
        with CatalogStore.create_or_open(store_path, dim=embedder.dim) as store:
            rows = _plan_rows(catalog, store)
            cache = _embed_on_ray(ray, rows, embedder_factory, out_dir, embedder.model_hash, batch_size)
            log.info("ray: %d rows planned, %d images embedded on the cluster in %.1f s", len(rows), len(cache),
                     time.monotonic() - t0)
            local = {"n": 0}

            def embed_fn(images):
                keys = [pixel_key(im) for im in images]
                missing = [i for i, k in enumerate(keys) if k not in cache]
                out = np.empty((len(images), embedder.dim), np.float32)
                if missing:
                    local["n"] += len(missing)
                    out[missing] = embedder.embed_catalog([images[i] for i in missing])
                hit = [i for i in range(len(images)) if i not in set(missing)]
                if hit:
                    out[hit] = np.stack([cache[keys[i]] for i in hit])
                return out

            summary = ingest_catalog(catalog, store, embed_fn, batch_size, model=embedder.model_hash,
                                     allow_mass_delete=allow_mass_delete)
            if local["n"]:
                log.info("ray: %d image(s) were embedded locally (not embedded by a worker)", local["n"])
            summary.embedded_on_cluster = len(cache)  # reported by the bench and checked by the tests
            summary.embedded_locally = local["n"]
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return summary


def _same(obj):
    return obj


def _embed_on_ray(ray, rows: list[dict], embedder_factory, out_dir: str, model: str | None, batch_size: int) -> dict:
    if not rows:
        return {}
    import ray.data

    n_actors, gpus = _actors(ray)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size, 4 * n_actors)))
    ds = ds.map_batches(_EmbedActor, fn_constructor_args=(embedder_factory, out_dir, model),
                        batch_size=batch_size, concurrency=n_actors, num_gpus=gpus or None,
                        num_cpus=0 if gpus else 1, batch_format="numpy")
    cache: dict[bytes, np.ndarray] = {}
    with Progress(len(rows), "embed on ray", unit="row") as progress:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for path in batch["file"]:
                if path:
                    with np.load(path) as part:
                        for key, vec in zip(part["keys"].tolist(), part["vectors"]):
                            cache[key] = vec
            progress.update(int(batch["rows"].sum()))
            progress.set_postfix(embedded=len(cache))
    return cache


# ---------------------------------------------------------------- build


def _store_blocks(store_path: str, block_size: int):
    store = CatalogStore.open_readonly(store_path)
    try:
        yield from store_source(store).blocks(block_size)
    finally:
        store.close()


def _build_shard_task(trained_path: str, store_path: str, shard_no: int, n_shards: int, out_dir: str, rerank: bool):
    return build_shard(trained_path, lambda bs=DEFAULT_BLOCK: _store_blocks(store_path, bs), shard_no, n_shards,
                       out_dir, rerank=rerank)


def distributed_build(source, index_root: str, address: str | None, *, store_path: str, factory: str = "auto",
                      shards: int = 1, metric: str | None = None, target_recall: float = 0.95, gpu: str = "auto",
                      seed: int = 0, on_stage=None, build_notes: dict | None = None, memory_budget: int | None = None):
    """``build_version`` with its shards built as parallel Ray tasks: train once here, tune,
    commit (not publish: the rebuild job validates first). ``build_notes`` join the manifest's build_config."""
    ray = connect(address)
    task = ray.remote(num_cpus=1)(_build_shard_task)

    def ray_shards(trained_path: str, out_dir: str, n_shards: int, rerank: bool) -> list:
        entries = ray.get([task.remote(trained_path, store_path, s, n_shards, out_dir, rerank) for s in range(n_shards)])
        return sorted(entries, key=lambda e: e["shard"])

    return build_version(source, index_root, factory=factory, shards=shards, metric=metric,
                         target_recall=target_recall, gpu=gpu, seed=seed, publish=False, shard_builder=ray_shards,
                         build_notes={"distributed": f"ray ({shards} shard task(s))", **(build_notes or {})},
                         on_stage=on_stage, memory_budget=memory_budget)


# ---------------------------------------------------------------- dedup


class _DedupActor:
    def __init__(self, store_path: str, index_root: str, version: str, cfg):
        self.store = CatalogStore.open_readonly(store_path)
        deleted = np.fromiter(self.store.deleted_ids(), dtype=np.int64)
        idx = open_index(index_root, version=version, gpu=cfg.gpu, deleted_ids=deleted)
        self.worker = DedupWorker(idx, self.store, cfg)

    def process(self, ids, x):
        return self.worker.process(ids, x)


def distributed_dedup(store_path: str, index_root: str, cfg, address: str | None):
    """The self-join split by query blocks over an actor pool; the same output as ``run_dedup``."""
    cfg.check()
    ray = connect(address)
    from ray.util import ActorPool

    t0 = time.monotonic()
    version = versions.read_current(index_root)  # every actor opens the same version
    n_actors, gpus = _actors(ray)
    actor_cls = ray.remote(num_cpus=0 if gpus else 1, num_gpus=gpus)(_DedupActor)
    pool = ActorPool([actor_cls.remote(store_path, index_root, version, cfg) for _ in range(n_actors)])
    collector = PairCollector()
    store = CatalogStore.open_readonly(store_path)
    try:
        bar = Progress(count_live_vectors(store), "dedup (ray)")
        in_flight = 0
        for ids, x in store.iter_blocks(cfg.block_size):
            pool.submit(lambda a, blk: a.process.remote(*blk), (ids, x))
            in_flight += 1
            while in_flight >= IN_FLIGHT_PER_ACTOR * n_actors:  # bounded: never the whole store in flight
                batch = pool.get_next_unordered()
                in_flight -= 1
                collector.add(batch)
                bar.update(batch.queries)
        while pool.has_next():
            batch = pool.get_next_unordered()
            collector.add(batch)
            bar.update(batch.queries)
        bar.close()
    finally:
        store.close()
    groups = collector.groups()
    return DedupResult(groups, len(collector.best), collector.queries, time.monotonic() - t0, version, cfg.threshold)
