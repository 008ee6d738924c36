"""``imgsearch rebuild CATALOG --store STORE --index-root ROOT``: the cron entry.

Stages (each logged as ``rebuild: stage NAME``):
1. **lock**: INDEX_ROOT's one writer lock (``versions.index_root_lock``: flock + pid on
   ``INDEX_ROOT/.rebuild.lock``, also held by ``imgsearch build``). A second run exits 0 with
   "another writer of INDEX_ROOT is running (pid N)".
2. **ingest**: the catalog diff into the store (new/changed images embedded, missing products
   tombstoned, unchanged ones skipped by content hash *and* model hash; products written through
   the API since are left alone, and a run deleting over 10% of the store fails first unless
   ``allow_mass_delete``: :mod:`index.store.ownership`).
3. **train** / **add**: a new version from the store's live vectors (same factory and shard
   count as the live version when that factory was chosen by hand, else ``auto``), built with
   ``publish=False``: it lands in ``INDEX_ROOT/<version>/`` but CURRENT is not touched.
4. **validate**: recall@10 against exact search on queries the build never saw, ntotal equals the
   store's live vector count, known items' own vectors find them, the manifest's model is the
   embedder's. A failure deletes the new version and exits 1 with the numbers.
5. **publish**: CURRENT is replaced atomically (``versions.set_current``).
6. **notify** (optional): ``POST URL/v1/admin/reload`` with ``$IMGSEARCH_ADMIN_TOKEN``; failures
   are logged, not fatal.
7. **gc**: keep the live version and the newest ``--keep`` validated ones (see
   :func:`gc_versions`); delete this job's other versions, never anyone else's.

A run killed at any point leaves CURRENT at the previous good version: the store is written
in kill-safe transactions, a version is complete before it is named, and CURRENT changes in
one rename. The next run removes leftover staging folders and finishes the job. When the
store has not changed since the live version was built (same LMDB transaction id, recorded in
the version's ``rebuild.json``), the run publishes nothing new (``--force`` rebuilds anyway).

``run_rebuild(..., on_stage=fn)`` calls ``fn(name)`` as each stage begins (one of ``STAGES``),
for a caller that reports progress or must act at a known point.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

import numpy as np

from imgsearch.errors import BadInput, JobFailed
from index.ann import tune, versions
from index.ann.build import StageCallback, build_version
from index.ann.search import open_index
from index.ann.sources import sample_rows, store_source
from index.jobs.distributed import distributed_build, distributed_ingest, parse_distributed
from index.store import CatalogStore
from index.store.ingest import ingest_catalog

log = logging.getLogger(__name__)

LOCK_FILE = versions.LOCK_FILE
SIDECAR = "rebuild.json"
STAGES = ("lock", "ingest", "train", "add", "tune", "validate", "publish", "notify", "gc")
VALIDATION_QUERIES = 300
SMOKE_ITEMS = 32
NOTIFY_TIMEOUT = 10.0


class ValidationFailed(JobFailed):
    code = "validation_failed"


@dataclasses.dataclass
class RebuildConfig:
    catalog: str
    store: str
    index_root: str
    keep: int = 3
    target_recall: float = 0.95
    factory: str | None = None  # None: the live version's hand-picked factory, else auto
    shards: int | None = None  # None: the live version's shard count, else 1
    gpu: str = "auto"
    batch_size: int = 32
    notify: Sequence[str] = ()
    force: bool = False
    seed: int = 0
    distributed: str | None = None  # "ray" or "ray:ADDRESS"
    # The checkpoint embedded with (Ray workers load it themselves): --model, else the one the store records
    # (index.jobs.embed_model resolves it); None: the built-in model.
    model_spec: str | None = None
    allow_mass_delete: bool = False  # let ingest delete over ownership.MASS_DELETE_FRACTION of the store
    memory_budget: int | None = None  # --ram-budget in bytes: what the new version may hold in RAM


@dataclasses.dataclass
class RebuildResult:
    status: str  # "published", "unchanged", "skipped" (another run holds the lock)
    version: str | None = None
    previous: str | None = None
    ingest: object = None
    build_seconds: float = 0.0
    validation: dict = dataclasses.field(default_factory=dict)
    removed: list = dataclasses.field(default_factory=list)
    notified: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    message: str = ""

    def line(self) -> str:
        ing = self.ingest
        counts = (f"added {ing.added}, changed {ing.changed}, deleted {ing.deleted}, rejected {ing.rejected}"
                  if ing is not None else "nothing ingested")
        if self.status == "published":
            v = self.validation
            return (f"published {self.version} (was {self.previous}): {counts}; build {self.build_seconds:.1f} s; "
                    f"recall@10 {v.get('recall', float('nan')):.3f}, ntotal {v.get('ntotal')}; "
                    f"removed {len(self.removed)} old version(s); total {self.seconds:.1f} s")
        if self.status == "unchanged":
            return f"no changes: {counts}; live version {self.version} is current; total {self.seconds:.1f} s"
        return self.message


# ---------------------------------------------------------------- helpers


def live_version(index_root: str) -> tuple[str | None, dict | None]:
    try:
        name = versions.read_current(index_root)
        return name, versions.read_manifest(versions.version_dir(index_root, name))
    except versions.NoIndex:
        return None, None


def read_sidecar(index_root: str, name: str | None) -> dict:
    if not name:
        return {}
    try:
        with open(os.path.join(index_root, name, SIDECAR)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def build_plan(cfg: RebuildConfig, live_manifest: dict | None, n: int) -> tuple[str, int, str | None]:
    """(factory, shards, metric): explicit options, else the live version's, else auto."""
    factory, shards, metric = cfg.factory, cfg.shards, None
    if live_manifest:
        metric = live_manifest.get("metric")
        reasons = (live_manifest.get("factory_choice") or {}).get("reasons") or []
        if factory is None and "given by the caller" in reasons:
            factory = live_manifest.get("factory")
        if shards is None:
            shards = int(live_manifest.get("shards") or 1)
    return factory or "auto", max(1, min(shards or 1, n)), metric


def remove_stale_staging(index_root: str) -> list[str]:
    """Staging folders of killed builds (safe: the caller holds INDEX_ROOT's writer lock, as every build does)."""
    removed = []
    try:
        names = os.listdir(index_root)
    except FileNotFoundError:
        return removed
    for name in names:
        if name.startswith(versions.STAGING_PREFIX):
            shutil.rmtree(os.path.join(index_root, name), ignore_errors=True)
            removed.append(name)
    if removed:
        log.info("removed %d leftover staging folder(s): %s", len(removed), ", ".join(sorted(removed)))
    return removed


def remove_version(index_root: str, name: str) -> None:
    """Rename out of the version namespace first (one atomic step), then delete at leisure."""
    trash = os.path.join(index_root, f"{versions.STAGING_PREFIX}gc-{name}")
    os.replace(os.path.join(index_root, name), trash)
    versions.fsync_dir(index_root)
    shutil.rmtree(trash, ignore_errors=True)


def gc_versions(index_root: str, keep: int) -> list[str]:
    """Keep the live version and the newest ``keep`` rollback targets; delete this job's other versions.

    A rollback target is a validated version: one with ``rebuild.json`` (this job validated it
    before publishing) or one that ``imgsearch build`` tuned and published (manifest
    ``build_config.job == "build"``). A version this job built but never validated (killed at
    validate: a manifest, no ``rebuild.json``) is never a target, and is deleted. The job deletes
    only what it created (``rebuild.json`` or ``job == "rebuild"``): versions of ``imgsearch
    build``, of the Python API or copied in by hand are left alone, and do not count unless validated.
    """
    if keep < 1:
        raise BadInput(f"--keep must be >= 1, got {keep}")
    live, _ = live_version(index_root)
    # Oldest first. Names start with a UTC second; two builds in one second tie there, so order
    # by when each manifest was written (the last step of a build).
    names = sorted(versions.list_versions(index_root), key=lambda n: (
        os.stat(os.path.join(index_root, n, versions.MANIFEST)).st_mtime_ns, n))
    ours, targets = set(), []
    for name in names:
        try:
            built_by = versions.built_by(versions.read_manifest(os.path.join(index_root, name)))
        except versions.NoIndex:
            continue  # unreadable: not provably ours, and no rollback target
        validated = os.path.isfile(os.path.join(index_root, name, SIDECAR))
        if validated or built_by == "rebuild":
            ours.add(name)
        if validated or built_by == "build":
            targets.append(name)
    kept = set(targets[-keep:]) | ({live} if live else set())
    removed = []
    for name in names:
        if name in ours and name not in kept:
            remove_version(index_root, name)
            removed.append(name)
    if removed:
        log.info("gc: removed %d old version(s): %s", len(removed), ", ".join(removed))
    return removed


def notify_servers(urls: Sequence[str], version: str, token: str | None = None) -> dict:
    """POST URL/v1/admin/reload (no body, as the endpoint takes) to each server; {url: "ok" | error
    text}. "ok" only when the server answers that it now serves ``version``. Never raises."""
    token = token if token is not None else os.environ.get("IMGSEARCH_ADMIN_TOKEN", "")
    out = {}
    for url in urls:
        target = url.rstrip("/")
        if not target.endswith("/v1/admin/reload"):
            target += "/v1/admin/reload"
        out[url] = _reload_server(target, version, token)
        if out[url] == "ok":
            log.info("notified %s: reloaded %s", target, version)
        else:
            log.warning("notify %s failed (the new version is published anyway): %s", target, out[url])
    return out


def _reload_server(target: str, version: str, token: str) -> str:
    req = urllib.request.Request(target, data=b"", method="POST", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=NOTIFY_TIMEOUT) as resp:
            answer = json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read())["error"]["message"]
        except Exception:  # noqa: BLE001 - not the JSON error body: the status says enough
            detail = exc.reason
        return f"HTTP {exc.code}: {detail}"
    except Exception as exc:  # noqa: BLE001 - a dead server must not fail the rebuild
        return f"{type(exc).__name__}: {exc}"
    serving = answer.get("index_version") if isinstance(answer, dict) else None
    return "ok" if serving == version else f"the server reloaded {serving!r}, not the published {version!r}"


# ---------------------------------------------------------------- validation


def validate_version(index_root: str, name: str, source, *, target_recall: float, model: str | None,
                     seed: int = 0, n_queries: int = VALIDATION_QUERIES, smoke_items: int = SMOKE_ITEMS) -> dict:
    """Check a built (unpublished) version through the real read path; raise ValidationFailed."""
    t0 = time.monotonic()
    idx = open_index(index_root, version=name)
    metric = idx.metric
    # Fresh queries (another seed than the build's tuning): recall the build could not overfit.
    queries = tune.noisy_queries(source, min(n_queries, source.n), seed + 1000, metric)
    truth = tune.ground_truth(source, queries, tune.K, metric)
    _, found = idx.search(queries, tune.K)
    recall = tune.recall_at(found, truth.ids, ties=truth.ties)  # an equally close twin is a hit, as in the build
    # Smoke: known items' own vectors find them (or an equally close twin: exact duplicates tie).
    smoke_ids, smoke_x = sample_rows(source, min(smoke_items, source.n), seed + 2000)
    scores, ids = idx.search(smoke_x, tune.K)
    own = np.einsum("nd,nd->n", smoke_x, smoke_x) if metric == "ip" else np.zeros(len(smoke_x), np.float32)
    hit = (ids == smoke_ids[:, None]).any(axis=1)
    tie = (scores[:, 0] >= own - 1e-3) if metric == "ip" else (scores[:, 0] <= own + 1e-3)
    smoke_found = int((hit | tie).sum())
    out = {"recall": round(float(recall), 4), "target_recall": target_recall, "queries": int(len(queries)),
           "ntotal": int(idx.ntotal), "store_vectors": int(source.n), "smoke_found": smoke_found,
           "smoke_items": int(len(smoke_ids)), "model": idx.manifest.get("model"), "expected_model": model,
           "seconds": round(time.monotonic() - t0, 3)}
    problems = []
    if recall < target_recall:
        problems.append(f"recall@10 {recall:.4f} < target {target_recall:.4f} on {len(queries)} queries")
    if idx.ntotal != source.n:
        problems.append(f"ntotal {idx.ntotal} != store live vectors {source.n}")
    if smoke_found < len(smoke_ids):
        problems.append(f"smoke: {smoke_found}/{len(smoke_ids)} known items found by their own vectors")
    if model is not None and idx.manifest.get("model") != model:
        problems.append(f"manifest model {idx.manifest.get('model')!r} != embedder {model!r}")
    if problems:
        raise ValidationFailed(f"validation of {name} failed: {'; '.join(problems)} "
                               f"(recall@10 {recall:.4f}, ntotal {idx.ntotal}, store {source.n}, "
                               f"smoke {smoke_found}/{len(smoke_ids)}); nothing published")
    return out


# ---------------------------------------------------------------- the job


def run_rebuild(cfg: RebuildConfig, embedder, on_stage: StageCallback | None = None) -> RebuildResult:
    """The whole cron job. ``embedder``: ``.embed_catalog(images) -> (n, dim)``, ``.model_hash``, ``.dim``.
    ``on_stage(name)``: called as each stage begins (after it is logged)."""
    t0 = time.monotonic()
    stage = _stage_reporter(on_stage)
    os.makedirs(cfg.index_root, exist_ok=True)
    lock = versions.index_root_lock(cfg.index_root)
    try:
        lock.acquire()
    except versions.IndexRootLocked as exc:
        msg = f"another writer of INDEX_ROOT is running (pid {exc.pid}); this run does nothing"
        log.info(msg)
        return RebuildResult("skipped", message=msg)
    try:
        stage("lock")
        remove_stale_staging(cfg.index_root)
        result = _run_locked(cfg, embedder, stage)
    finally:
        lock.release()
    result.seconds = time.monotonic() - t0
    return result


def _stage_reporter(on_stage: StageCallback | None) -> StageCallback:
    def stage(name: str) -> None:
        log.info("rebuild: stage %s", name)
        if on_stage is not None:
            on_stage(name)
    return stage


def _ingest(cfg: RebuildConfig, embedder, stage: StageCallback):
    stage("ingest")
    if cfg.distributed:
        return distributed_ingest(cfg.catalog, cfg.store, embedder, parse_distributed(cfg.distributed),
                                  batch_size=cfg.batch_size, model_spec=cfg.model_spec,
                                  allow_mass_delete=cfg.allow_mass_delete)
    with CatalogStore.create_or_open(cfg.store, dim=embedder.dim) as store:
        return ingest_catalog(cfg.catalog, store, embedder.embed_catalog, cfg.batch_size, progress=True,
                              model=embedder.model_hash, allow_mass_delete=cfg.allow_mass_delete,
                              model_checkpoint=cfg.model_spec)


def _run_locked(cfg: RebuildConfig, embedder, stage: StageCallback) -> RebuildResult:
    previous, live_manifest = live_version(cfg.index_root)
    summary = _ingest(cfg, embedder, stage)
    log.info("rebuild: ingest %s", summary.line())

    store = CatalogStore.open_readonly(cfg.store)
    try:
        generation = store.generation
        sidecar = read_sidecar(cfg.index_root, previous)
        if (not cfg.force and previous and sidecar.get("store_generation") == generation
                and sidecar.get("store") == os.path.abspath(cfg.store)
                and live_manifest.get("model") == embedder.model_hash):
            return RebuildResult("unchanged", version=previous, previous=previous, ingest=summary)
        source = store_source(store)
        if source.model != embedder.model_hash:
            raise JobFailed(f"store {cfg.store!r} holds vectors of model {source.model!r}, not {embedder.model_hash!r}")
        factory, shards, metric = build_plan(cfg, live_manifest, source.n)
        t_build = time.monotonic()
        build = _build(cfg, source, factory, shards, metric, stage)
        build_seconds = time.monotonic() - t_build
        name = build.version
        try:
            stage("validate")
            validation = validate_version(cfg.index_root, name, source, target_recall=cfg.target_recall,
                                          model=embedder.model_hash, seed=cfg.seed)
            versions.write_json_atomic(os.path.join(build.path, SIDECAR), {
                "store": os.path.abspath(cfg.store), "store_generation": generation,
                "catalog": os.path.abspath(cfg.catalog), "ingest": dataclasses.asdict(summary),
                "validation": validation, "build_seconds": round(build_seconds, 3), "previous": previous})
        except BaseException:
            remove_version(cfg.index_root, name)
            raise
    finally:
        store.close()
    stage("publish")
    versions.set_current(cfg.index_root, name)
    log.info("rebuild: published %s (was %s)", name, previous)
    notified = {}
    if cfg.notify:
        stage("notify")
        notified = notify_servers(cfg.notify, name)
    stage("gc")
    removed = gc_versions(cfg.index_root, cfg.keep)
    return RebuildResult("published", version=name, previous=previous, ingest=summary, build_seconds=build_seconds,
                         validation=validation, removed=removed, notified=notified)


def _build(cfg: RebuildConfig, source, factory: str, shards: int, metric: str | None, stage: StageCallback):
    if cfg.distributed:
        return distributed_build(source, cfg.index_root, parse_distributed(cfg.distributed), store_path=cfg.store,
                                 factory=factory, shards=shards, metric=metric, target_recall=cfg.target_recall,
                                 gpu=cfg.gpu, seed=cfg.seed, on_stage=stage, build_notes={"job": "rebuild"},
                                 memory_budget=cfg.memory_budget)
    return build_version(source, cfg.index_root, factory=factory, shards=shards, metric=metric,
                         target_recall=cfg.target_recall, gpu=cfg.gpu, seed=cfg.seed, publish=False, on_stage=stage,
                         build_notes={"job": "rebuild"}, memory_budget=cfg.memory_budget)
