"""Version directories, manifests and the atomic CURRENT pointer."""

import os
import shutil
import threading

import faiss
import numpy as np
import pytest

from index.ann import versions
from index.ann.build import build_version
from index.ann.search import open_index
from index.ann.sources import array_source

faiss.omp_set_num_threads(1)


def vectors(n=3_000, d=16, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("root"))
    build_version(array_source(vectors(), metric="ip"), root, version="v0")
    return root


def test_layout_current_and_manifest(built):
    assert versions.read_current(built) == "v0"
    assert versions.list_versions(built) == ["v0"]
    assert not [n for n in os.listdir(built) if n.startswith(versions.STAGING_PREFIX)]
    idx = open_index(built)
    assert idx.version == "v0" and idx.ntotal == 3_000 and idx.manifest["metric"] == "ip"


def test_version_without_manifest_is_never_opened(built):
    half = os.path.join(built, "half")
    shutil.copytree(os.path.join(built, "v0"), half)
    os.unlink(os.path.join(half, versions.MANIFEST))
    with pytest.raises(versions.NoIndex, match="manifest"):
        open_index(built, version="half")
    with pytest.raises(versions.NoIndex):
        versions.set_current(built, "half")  # CURRENT never names it either
    assert versions.read_current(built) == "v0" and "half" not in versions.list_versions(built)
    shutil.rmtree(half)


def test_missing_current_and_bad_names(tmp_path):
    with pytest.raises(versions.NoIndex, match="CURRENT"):
        open_index(str(tmp_path))
    (tmp_path / "CURRENT").write_text("../etc\n")
    with pytest.raises(versions.BadInput):
        open_index(str(tmp_path))


def test_failed_build_leaves_no_trace(tmp_path):
    root = str(tmp_path)
    with pytest.raises(versions.BadInput):
        build_version(array_source(vectors(), metric="ip"), root, factory="IVF64,PQ5x4fs")
    assert os.listdir(root) == [] or versions.list_versions(root) == []
    assert not os.path.exists(os.path.join(root, versions.CURRENT))


def _publish_copy(root: str, name: str) -> None:
    """Publish like a build does: staging dir, manifest last, rename, then CURRENT."""
    staging = versions.make_staging(root, name)
    src = os.path.join(root, "v0")
    for f in os.listdir(src):
        if f != versions.MANIFEST:
            shutil.copy(os.path.join(src, f), staging)
    manifest = versions.read_manifest(src)
    manifest["version"] = name
    versions.write_json_atomic(os.path.join(staging, versions.MANIFEST), manifest)
    versions.commit_staging(root, staging, name)
    versions.set_current(root, name)


def test_current_swap_under_concurrent_readers(built):
    stop, errors, seen = threading.Event(), [], set()
    q = vectors(4, seed=1)

    def reader():
        while not stop.is_set():
            try:
                idx = open_index(built)
                assert os.path.basename(idx.path) == idx.version  # never a half/mixed version
                _, ids = idx.search(q, 5)
                assert (ids >= 0).all() and idx.ntotal == 3_000
                seen.add(idx.version)
            except Exception as exc:  # noqa: BLE001 - any failure fails the test
                errors.append(repr(exc))
                return

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(1, 16):
            _publish_copy(built, f"v{i}")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert versions.read_current(built) == "v15" and len(seen) >= 2
