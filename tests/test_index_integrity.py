"""Integrity of INDEX_ROOT: one writer lock for build and rebuild, GC that keeps only validated
rollback targets, and per-file checksums recorded at publish and checked at open and by
``imgsearch verify``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from helpers.pixel_embedder import PixelEmbedder

from imgsearch.cli import main
from index.ann import integrity, versions
from index.ann.build import build_version
from index.ann.search import open_index
from index.ann.sources import array_source, store_source
from index.jobs import rebuild as rb
from index.store import CatalogStore
from tests.test_jobs_rebuild import DIM, _start_and_kill_at, config, write_catalog

faiss.omp_set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def vectors(n=6_000, d=32, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A small version with every kind of file: trained, shards, id maps, re-rank vectors."""
    root = tmp_path_factory.mktemp("built")
    build_version(array_source(vectors(), metric="ip"), str(root), factory="IVF32,PQ8", shards=2, version="v0", gpu="off")
    return root


@pytest.fixture()
def root(built, tmp_path):
    """A private copy of the built version, to corrupt."""
    shutil.copytree(built, tmp_path / "root")
    return tmp_path / "root"


def _manifest(root: Path, name: str = "v0") -> dict:
    return versions.read_manifest(str(root / name))


def _rewrite_manifest(root: Path, change, name: str = "v0") -> None:
    manifest = _manifest(root, name)
    change(manifest)
    versions.write_json_atomic(str(root / name / versions.MANIFEST), manifest)


def _shard(root: Path, key: str, shard: int = 0) -> Path:
    return root / "v0" / _manifest(root)["shard_files"][shard][key]


def _zero_64k(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - 32 * 1024)
    data[start:start + 64 * 1024] = bytes(min(64 * 1024, len(data) - start))
    path.write_bytes(bytes(data))


def _shuffle_ids(path: Path) -> None:
    ids = np.fromfile(path, dtype=np.int64)
    np.random.default_rng(7).permutation(ids).tofile(path)


def _verify(root: Path, *extra: str, capsys) -> tuple[int, str, str]:
    code = main(["verify", str(root), *extra])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- checksums in the manifest


def test_manifest_records_size_and_sha256_of_every_data_file(built):
    manifest = _manifest(built)
    on_disk = set(os.listdir(built / "v0")) - {versions.MANIFEST}
    assert set(manifest["files"]) == on_disk
    assert len(on_disk) == 1 + 2 * 5  # trained + per shard: faiss, ids, sorted, order, rerank
    for name, entry in manifest["files"].items():
        data = (built / "v0" / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_good_version_opens_and_verifies(root, capsys):
    idx = open_index(str(root))
    assert idx.ntotal == 6_000
    code, out, err = _verify(root, capsys=capsys)
    assert code == 0 and err == "", err
    assert "v0: ok" in out and "11 files" in out


# ---------------------------------------------------------------- the three reported corruptions


def test_shuffled_ids_file_is_refused_at_open(root, capsys):
    _shuffle_ids(_shard(root, "ids"))
    with pytest.raises(versions.BadIndex, match=r"ids\.i64"):
        open_index(str(root))
    code, out, err = _verify(root, capsys=capsys)
    assert code == 1 and "ids.i64" in out and "sha256" in out
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_shuffled_ids_file_is_refused_even_without_checksums(root, caplog):
    _rewrite_manifest(root, lambda m: m.pop("files"))
    _shuffle_ids(_shard(root, "ids", shard=1))
    with pytest.raises(versions.BadIndex, match="sorted_ids"):
        open_index(str(root))


@pytest.mark.parametrize("key", ["rerank", "index"])
def test_64k_of_zeroed_vectors_is_refused_at_open(root, key, capsys):
    _zero_64k(_shard(root, key))
    with pytest.raises(versions.BadIndex, match="sha256"):
        open_index(str(root))
    code, out, _ = _verify(root, capsys=capsys)
    assert code == 1 and _manifest(root)["shard_files"][0][key] in out


def test_manifest_claiming_the_wrong_ntotal_is_refused(root, capsys):
    _rewrite_manifest(root, lambda m: m.update(ntotal=m["ntotal"] + 1000))
    with pytest.raises(versions.BadIndex, match="ntotal"):
        open_index(str(root))
    assert _verify(root, capsys=capsys)[0] == 1


def test_shard_ntotal_and_file_sizes_must_agree(root):
    def shrink(m):
        m["shard_files"][0]["ntotal"] -= 10
    _rewrite_manifest(root, shrink)
    with pytest.raises(versions.BadIndex):
        open_index(str(root))


def test_truncated_file_is_refused_by_its_size(root):
    path = _shard(root, "sorted_ids")
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(versions.BadIndex, match="bytes"):
        open_index(str(root))


def test_over_the_open_budget_only_verify_reads_every_byte(root, capsys, monkeypatch):
    """Big versions are hashed at open only up to the budget; cheap checks still run, and
    ``imgsearch verify`` hashes everything."""
    _zero_64k(_shard(root, "rerank"))
    monkeypatch.setattr(integrity, "OPEN_HASH_BYTES", 0)
    assert open_index(str(root)).ntotal == 6_000
    code, out, _ = _verify(root, capsys=capsys)
    assert code == 1 and "rerank.f16" in out


# ---------------------------------------------------------------- versions from before checksums


def test_version_without_checksums_opens_with_a_warning(root, caplog, capsys):
    _rewrite_manifest(root, lambda m: m.pop("files"))
    with caplog.at_level(logging.WARNING, logger="index.ann.integrity"):
        assert open_index(str(root)).ntotal == 6_000
    assert any("no checksums" in r.getMessage() for r in caplog.records)
    code, out, err = _verify(root, capsys=capsys)
    assert code == 0 and "no checksums recorded" in out, (out, err)


# ---------------------------------------------------------------- verify's input


def test_verify_bad_input_exits_2(root, tmp_path, capsys):
    assert _verify(tmp_path / "nothing-here", capsys=capsys)[0] == 2
    code, _, err = _verify(root, "--version", "no-such", capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert _verify(root, "--version", "../etc", capsys=capsys)[0] == 2
    assert _verify(root, "--version", "v0", capsys=capsys)[0] == 0


def test_verify_unreadable_manifest_is_a_failed_check(root, capsys):
    (root / "v0" / versions.MANIFEST).write_text("{not json")
    code, _, err = _verify(root, "--version", "v0", capsys=capsys)
    assert code == 1 and "manifest" in err


# ---------------------------------------------------------------- the server keeps the old version


def test_reload_of_a_corrupt_version_keeps_the_old_one_serving(tmp_path):
    from serve.app import create_app
    from serve.service import SearchService
    from tests.test_serve_updates import AUTH, TOKEN, make_env

    _, store_path, index_root = make_env(tmp_path)
    service = SearchService(index_root, store_path)
    assert service.load_current() is not None, service.not_ready_reason()
    client = create_app(service, admin_token=TOKEN).test_client()
    vector = [0.1] * 8
    for corrupt in ("ids", "ntotal"):
        name = f"v2-{corrupt}"
        build_version(store_source(service.store()), str(index_root), factory="auto", version=name)
        if corrupt == "ids":
            ids = index_root / name / _manifest(index_root, name)["shard_files"][0]["ids"]
            np.fromfile(ids, dtype=np.int64)[::-1].copy().tofile(ids)
        else:
            _rewrite_manifest(index_root, lambda m: m.update(ntotal=m["ntotal"] - 1), name=name)
        response = client.post("/v1/admin/reload", headers=AUTH)
        assert response.status_code == 500, response.get_data(as_text=True)
        body = response.get_json()["error"]
        assert body["code"] == "reload_failed" and "still serving v1" in body["message"]
        assert client.post("/v1/search", json={"vector": vector}).get_json()["index_version"] == "v1"


# ---------------------------------------------------------------- one writer lock


def _hold_lock(index_root: Path) -> subprocess.Popen:
    """Another process holding INDEX_ROOT's writer lock, as a running rebuild does."""
    code = ("import sys, time; from index.store.pidlock import JobLock; "
            f"lock = JobLock({str(index_root / '.rebuild.lock')!r}).acquire(); print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_build_refuses_while_another_process_holds_the_lock(root, tmp_path, capsys):
    np.save(tmp_path / "x.npy", vectors(500, 8))
    holder = _hold_lock(root)
    before = sorted(os.listdir(root))
    try:
        code = main(["build", "--vectors", str(tmp_path / "x.npy"), "--index-root", str(root), "--gpu", "off"])
        _, err = capsys.readouterr()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1 and f"pid {holder.pid}" in err and "lock" in err
    assert sorted(os.listdir(root)) == before and versions.read_current(str(root)) == "v0"
    # Once the holder is gone, the same build publishes.
    assert main(["build", "--vectors", str(tmp_path / "x.npy"), "--index-root", str(root), "--gpu", "off"]) == 0
    assert versions.read_current(str(root)) != "v0"


def test_rebuild_skips_while_a_build_holds_the_lock(tmp_path):
    catalog = write_catalog(tmp_path, 10)
    with versions.index_root_lock(str(tmp_path / "index")):
        res = rb.run_rebuild(config(tmp_path, catalog), PixelEmbedder(DIM))
    assert res.status == "skipped" and f"pid {os.getpid()}" in res.message
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------- GC keeps validated rollback targets


def _names_by_age(root: str) -> list[str]:
    return sorted(versions.list_versions(root), key=lambda n: os.stat(os.path.join(root, n, versions.MANIFEST)).st_mtime_ns)


def test_gc_removes_an_unvalidated_leftover_and_keeps_validated_versions(tmp_path):
    root = str(tmp_path / "index")
    catalog = write_catalog(tmp_path, 40)
    r1 = rb.run_rebuild(config(tmp_path, catalog, keep=2), PixelEmbedder(DIM)).version
    # A rebuild killed at validate leaves a committed version without rebuild.json.
    catalog = write_catalog(tmp_path, 40, changed=5)
    _start_and_kill_at(tmp_path, catalog, "validate")
    (leftover,) = set(versions.list_versions(root)) - {r1}
    assert not os.path.exists(os.path.join(root, leftover, rb.SIDECAR))
    # A version someone built by hand (never published, not the job's): never deleted by the job.
    with CatalogStore.open_readonly(tmp_path / "store") as store:
        time.sleep(0.01)
        by_hand = build_version(store_source(store), root, version="by-hand", publish=False, gpu="off").version

    r2 = rb.run_rebuild(config(tmp_path, catalog, keep=2, force=True), PixelEmbedder(DIM))
    assert leftover in r2.removed and r1 not in r2.removed
    assert set(versions.list_versions(root)) == {r1, by_hand, r2.version}

    # `imgsearch build` publishes a tuned version: a rollback target, but not the rebuild job's to delete.
    assert main(["build", "--store", str(tmp_path / "store"), "--index-root", root, "--gpu", "off"]) == 0
    built = versions.read_current(root)
    r3 = rb.run_rebuild(config(tmp_path, catalog, keep=2, force=True), PixelEmbedder(DIM))
    assert set(r3.removed) == {r1, r2.version}  # newest 2 rollback targets: the build and r3
    r4 = rb.run_rebuild(config(tmp_path, catalog, keep=2, force=True), PixelEmbedder(DIM))
    assert r4.removed == []  # the build falls out of the newest 2, but the job did not create it
    assert set(versions.list_versions(root)) == {by_hand, built, r3.version, r4.version}
    assert _names_by_age(root)[-1] == r4.version == versions.read_current(root)


def test_gc_never_counts_a_leftover_as_a_rollback_target(tmp_path):
    """keep=1 with the leftover newest: the live validated version stays, the leftover goes."""
    root = str(tmp_path / "index")
    catalog = write_catalog(tmp_path, 30)
    r1 = rb.run_rebuild(config(tmp_path, catalog, keep=1), PixelEmbedder(DIM)).version
    _start_and_kill_at(tmp_path, write_catalog(tmp_path, 30, changed=3), "validate")
    (leftover,) = set(versions.list_versions(root)) - {r1}
    assert rb.gc_versions(root, 1) == [leftover]
    assert versions.list_versions(root) == [r1] and versions.read_current(root) == r1
    manifest = json.loads(Path(root, r1, versions.MANIFEST).read_text())
    assert manifest["build_config"]["job"] == "rebuild"
