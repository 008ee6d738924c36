"""--distributed ray: on a local Ray cluster started here (num_cpus=2), outputs equal the single process's."""

from __future__ import annotations

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import helpers.pixel_embedder  # noqa: E402
from helpers.pixel_embedder import PixelEmbedder  # noqa: E402

from tests.test_jobs_dedup import build_index, planted_store  # noqa: E402
from tests.test_jobs_rebuild import DIM, config, write_catalog  # noqa: E402

# Ray workers do not have tests/ on their path: the stand-in embedder travels by value.
ray.cloudpickle.register_pickle_by_value(helpers.pixel_embedder)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _store_content(path):
    from index.store import CatalogStore

    with CatalogStore.open_readonly(path) as store:
        blocks = list(store.iter_blocks(100_000))
        recs = {r.id: (r.product_id, r.content_hash, r.model, r.deleted) for r in store.iter_records(include_deleted=True)}
    return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks]), recs


def test_ray_ingest_equals_single_process(cluster, tmp_path, caplog, monkeypatch):
    import logging

    from index.jobs.distributed import distributed_ingest
    from index.store import CatalogStore
    from index.store.ingest import ingest_catalog

    emb = PixelEmbedder(DIM)
    catalog = write_catalog(tmp_path, 80)
    with catalog.open("a") as f:
        f.write("prod-bad,img/missing.png,x\n")
    with CatalogStore.create_or_open(tmp_path / "single", dim=DIM) as store:
        single = ingest_catalog(catalog, store, emb.embed_catalog, 16, progress=False, model=emb.model_hash)
    monkeypatch.setenv("IMGSEARCH_PROGRESS_INTERVAL_S", "0")
    caplog.set_level(logging.INFO, logger="imgsearch.progress")
    dist = distributed_ingest(str(catalog), str(tmp_path / "ray"), emb, "", batch_size=16)
    # Progress of the cluster's embedding and of the local write, as every long job reports it.
    lines = [r.getMessage() for r in caplog.records if r.name == "imgsearch.progress"]
    assert any(line.startswith("embed on ray: 81/81 row (100%)") for line in lines), lines
    assert any(line.startswith("embed ") and "81/81" in line and "on ray" not in line for line in lines), lines
    assert (dist.added, dist.rejected) == (single.added, single.rejected) == (80, 1)
    assert (dist.embedded_on_cluster, dist.embedded_locally) == (80, 0)  # the workers did the embedding
    a, b = _store_content(tmp_path / "single"), _store_content(tmp_path / "ray")
    assert (a[0] == b[0]).all() and np.array_equal(a[1], b[1]) and a[2] == b[2]
    # A second distributed run over 10 changed images re-embeds exactly those.
    catalog = write_catalog(tmp_path, 80, changed=10)
    again = distributed_ingest(str(catalog), str(tmp_path / "ray"), emb, "", batch_size=16)
    assert (again.changed, again.unchanged) == (10, 70)
    assert (again.embedded_on_cluster, again.embedded_locally) == (10, 0)


def test_ray_dedup_equals_single_process(cluster, tmp_path):
    from index.jobs import dedup
    from index.jobs.distributed import distributed_dedup
    from index.store import CatalogStore

    store_path, truth = planted_store(tmp_path)
    build_index(store_path, tmp_path / "index")
    cfg = dedup.DedupConfig(threshold=0.9, block_size=50, gpu="off")
    with CatalogStore.open_readonly(store_path) as store:
        single = dedup.run_dedup(store, str(tmp_path / "index"), cfg, progress=False)
    dist = distributed_dedup(str(store_path), str(tmp_path / "index"), cfg, "")
    assert dist.groups == single.groups and dist.queries == single.queries
    assert {(a, b) for g in dist.groups for a, b, _ in g["pairs"]} == truth


def test_ray_rebuild_with_parallel_shards(cluster, tmp_path):
    from index.ann import versions
    from index.ann.build import build_version
    from index.ann.search import open_index
    from index.ann.sources import store_source
    from index.jobs import rebuild as rb
    from index.store import CatalogStore

    catalog = write_catalog(tmp_path, 150)
    res = rb.run_rebuild(config(tmp_path, catalog, distributed="ray", shards=3, factory="IVF4,Flat"), PixelEmbedder(DIM))
    assert res.status == "published" and res.validation["ntotal"] == 150
    manifest = versions.read_manifest(versions.version_dir(str(tmp_path / "index")))
    assert manifest["shards"] == 3 and manifest["model"] == PixelEmbedder(DIM).model_hash
    assert manifest["build_config"]["distributed"] == "ray (3 shard task(s))" and manifest["measured_recall"] is not None
    with CatalogStore.open_readonly(tmp_path / "store") as store:
        ref = build_version(store_source(store), str(tmp_path / "ref"), factory="IVF4,Flat", shards=3, gpu="off")
        ids, x = next(store.iter_blocks(40))
    got = open_index(str(tmp_path / "index")).search(x, 10)
    want = open_index(str(tmp_path / "ref")).search(x, 10)
    assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0])
    assert ref.manifest["ntotal"] == manifest["ntotal"]
