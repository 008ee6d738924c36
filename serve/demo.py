"""``imgsearch demo``: real sample photos -> store -> index version, ready to serve.

Every step is idempotent: a second run reuses the sample set, embeds nothing
new (content hashes), and keeps the live index when it already holds this
model's vectors. Without a trained checkpoint the demo serves the pretrained
trunk with the catalog projection (fitted once on the sample catalog, no labels: ``WORKDIR/projection.ckpt``)
and trains a model in the background (:mod:`serve.demo_train`,
:func:`start_trainer`); the server switches to it once its version is published.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from imgsearch.sample_data import build_sample_set
from index.ann import versions
from index.ann.build import build_version
from index.ann.sources import store_source
from index.store import CatalogStore
from index.store.ingest import ingest_catalog

log = logging.getLogger(__name__)

DEMO_SEED = 0
DEMO_CHECKPOINT = "train/model.ckpt"  # `make train-demo` (or the demo's background job) writes the trained model here
PROJECTION_CHECKPOINT = "projection.ckpt"  # the pretrained phase's model: whitened on the sample catalog
STATUS_FILE = "train-status.json"


@dataclass(frozen=True)
class Demo:
    index_root: Path
    store_path: Path
    queries_dir: Path
    checkpoint: Path | None
    model_hash: str


def prepare_demo(workdir: Path, limit_products: int | None = None) -> Demo:
    workdir.mkdir(parents=True, exist_ok=True)
    sample = build_sample_set(workdir / "sample", seed=DEMO_SEED, limit_products=limit_products)
    checkpoint = workdir / DEMO_CHECKPOINT
    checkpoint = checkpoint if checkpoint.is_file() else None
    log.info("demo model: %s", checkpoint or "pretrained MobileNetV2 trunk with the catalog projection (training one in the background)")
    model_hash = embed_and_index(workdir, checkpoint)
    return Demo(workdir / "index", store_path_of(workdir, model_hash), Path(sample.root) / "queries", checkpoint, model_hash)


def store_path_of(workdir: Path, model_hash: str) -> Path:
    return workdir / f"store-{model_hash[:12]}"  # vectors of another model never mix with these: one store per model


def embed_and_index(workdir: Path, checkpoint: Path | None, on_build=None) -> str:
    """Embed the demo catalog with ``checkpoint``'s model (None: the pretrained trunk with the catalog
    projection, or the fixed one for a catalog too small to fit it) into that model's store and make
    a version of it live in ``workdir/index``; returns the model's hash."""
    from embed.pipeline import load_pipeline

    if checkpoint is None:
        checkpoint = catalog_projection(workdir)
    pipeline = load_pipeline(str(checkpoint) if checkpoint else None)
    store_path = store_path_of(workdir, pipeline.model_hash)
    with CatalogStore.create_or_open(store_path, dim=pipeline.dim) as store:
        summary = ingest_catalog(workdir / "sample" / "catalog.csv", store, pipeline.embed_catalog, batch_size=32,
                                 model=pipeline.model_hash, model_checkpoint=checkpoint)
        log.info("demo catalog: %s", summary.line())
        if on_build is not None:
            on_build()
        _ensure_index(store, workdir / "index", pipeline.model_hash)
    return pipeline.model_hash


def catalog_projection(workdir: Path) -> Path | None:
    """``workdir/projection.ckpt``, fitted on the sample catalog unless it already was on this very
    catalog (a second demo reuses it: same model, nothing embedded again); None: too few images."""
    from index.jobs.embed_model import catalog_sha256, fit_projection

    catalog, path = workdir / "sample" / "catalog.csv", workdir / PROJECTION_CHECKPOINT
    try:
        fitted_on = json.loads(path.with_name(path.name + ".json").read_text())["projection"]["catalog_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        fitted_on = None
    if path.is_file() and fitted_on == catalog_sha256(catalog):
        return path
    fitted = fit_projection(catalog, path, command="demo", hint="")
    return None if fitted is None else Path(fitted)


def start_trainer(workdir: Path, url: str, extra_args: list[str] | None = None) -> subprocess.Popen:
    """The background job (:mod:`serve.demo_train`) training the demo's model; it logs to
    ``workdir/train-job.log`` and stops when its parent (the demo's server) does."""
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_WAIT_POLICY": "PASSIVE"}  # as `make train-demo` runs
    job_log = open(workdir / "train-job.log", "ab")  # noqa: SIM115 - the child holds it
    try:
        return subprocess.Popen([sys.executable, "-m", "serve.demo_train", "--workdir", str(workdir.resolve()),
                                 "--status", str((workdir / STATUS_FILE).resolve()), "--url", url, *(extra_args or [])],
                                stdin=subprocess.DEVNULL, stdout=job_log, stderr=job_log, env=env)
    finally:
        job_log.close()


def _ensure_index(store, index_root: Path, model_hash: str) -> None:
    source = dataclasses.replace(store_source(store), model=model_hash)
    try:
        manifest = versions.read_manifest(versions.version_dir(str(index_root)))
        if manifest.get("model") == model_hash and int(manifest["ntotal"]) == source.n:
            log.info("demo index: keeping live version %s", manifest["version"])
            return
    except Exception as exc:  # noqa: BLE001 - no usable live version: build one
        log.info("demo index: building (%s)", exc)
    with versions.index_root_lock(str(index_root)):  # INDEX_ROOT's one writer lock, as `imgsearch build` takes
        result = build_version(source, str(index_root), factory="auto", target_recall=0.95, build_notes={"job": "build"})
    log.info("demo index: published %s (%d vectors)", result.version, result.manifest["ntotal"])
