"""``imgsearch demo``: real sample photos -> store -> index version, ready to serve.

Every step is idempotent: a second run reuses the sample set, embeds nothing
new (content hashes), and keeps the live index when it already holds this
model's vectors.
"""

from __future__ import annotations

import dataclasses
import logging
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
DEMO_CHECKPOINT = "train/model.ckpt"  # `make train-demo` writes the trained model here


@dataclass(frozen=True)
class Demo:
    index_root: Path
    store_path: Path
    queries_dir: Path
    checkpoint: Path | None
    model_hash: str


def prepare_demo(workdir: Path, limit_products: int | None = None) -> Demo:
    from embed.pipeline import load_pipeline

    workdir.mkdir(parents=True, exist_ok=True)
    sample = build_sample_set(workdir / "sample", seed=DEMO_SEED, limit_products=limit_products)
    checkpoint = workdir / DEMO_CHECKPOINT
    checkpoint = checkpoint if checkpoint.is_file() else None
    log.info("demo model: %s", checkpoint or "pretrained MobileNetV2 trunk with a fixed projection (run `make train-demo` to train one)")
    pipeline = load_pipeline(str(checkpoint) if checkpoint else None)

    # Vectors from another model must never mix with these: one store per model.
    store_path = workdir / f"store-{pipeline.model_hash[:12]}"
    with CatalogStore.create_or_open(store_path, dim=pipeline.dim) as store:
        summary = ingest_catalog(sample.catalog_csv, store, pipeline.embed_catalog, batch_size=32, model=pipeline.model_hash)
        log.info("demo catalog: %s", summary.line())
        index_root = workdir / "index"
        _ensure_index(store, index_root, pipeline.model_hash)
    return Demo(index_root, store_path, Path(sample.root) / "queries", checkpoint, pipeline.model_hash)


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
