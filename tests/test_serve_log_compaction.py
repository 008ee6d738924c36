"""Compaction of the updates log (serve/updates.py): lossless for every reader, including
readers in other processes that are mid-way through the log, and safe under concurrent
appends (real processes) and crashes.

Readers here apply entries to a set of present ids, as the service applies them to an index:
an add makes an id present, a delete absent, and re-applying either is harmless."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from serve import updates
from serve.updates import LogCursor, UpdateLog
from tests.test_serve_updates import AUTH, _client, _png_b64, _top, make_env

REPO = Path(__file__).resolve().parents[1]


class Reader:
    """A tailing reader with its own cursor, like one served index version."""

    def __init__(self, log: UpdateLog, base=(), covered=None):
        self.log = log
        self.cursor = LogCursor(covered=covered)
        self.present = set(base)
        self.applied = 0  # entries applied, re-reads included
        self.must_cover = []

    def poll(self) -> int:
        if not self.log.changed(self.cursor):
            return 0
        got = self.log.read(self.cursor)
        if got.must_cover:
            self.must_cover.append(got.must_cover)
        for entry in got.entries:
            gen = entry.get("gen")
            if self.cursor.covered is not None and gen is not None and gen <= self.cursor.covered:
                continue
            self.present.update(entry.get("add", []))
            self.present.difference_update(entry.get("delete", []))
            self.applied += 1
        self.cursor.offset, self.cursor.epoch, self.cursor.stat = got.offset, got.epoch, got.stat
        return len(got.entries)


def final_state(ops, base=()):
    present = set(base)
    for entry in ops:
        present.update(entry.get("add", []))
        present.difference_update(entry.get("delete", []))
    return present


def churn(n, start_gen=1):
    """Admin writes on 7 products: each write replaces a product's image (its ids cycle through
    3 images), and every fifth write deletes the product; one store generation per write."""
    ops = []
    for k in range(n):
        pid, turn = k % 7, k // 7
        new, old = 1000 * pid + turn % 3, 1000 * pid + (turn - 1) % 3
        ops.append({"at": "t", "pid": 1, "gen": start_gen + len(ops), "add": [new], "delete": [old] if turn else []})
        if k % 5 == 4:
            ops.append({"at": "t", "pid": 1, "gen": start_gen + len(ops), "add": [], "delete": [new]})
    return ops


@pytest.fixture()
def log(tmp_path):
    return UpdateLog(tmp_path)


def test_compaction_keeps_the_net_effect_and_shrinks_the_log(log):
    ops = churn(60)
    for entry in ops:
        log.append(entry)
    before = log.size()
    fresh_before = Reader(log)
    fresh_before.poll()
    result = log.compact()
    assert result is not None and result["epoch"] == 1 and result["dropped_lines"] == 0
    assert log.size() == result["bytes_after"] < before / 3
    header, _ = log.header()
    assert header["epoch"] == 1 and header["replaces"] == {"epoch": 0, "size": before}
    fresh_after = Reader(log)
    fresh_after.poll()
    assert fresh_after.present == fresh_before.present == final_state(ops)
    assert log.compact() is None  # already compact: nothing worth rewriting
    again = log.compact(force=True)
    assert again["epoch"] == 2 and again["lines_after"] == result["lines_after"]


def test_a_reader_behind_or_level_with_the_compaction_misses_nothing(log):
    ops = churn(40)
    level, behind, fresh_then = Reader(log), Reader(log), None
    for n, entry in enumerate(ops):
        log.append(entry)
        if n == 9:
            behind.poll()  # stops reading a quarter of the way in
    level.poll()  # read everything the compaction will replace
    log.compact()
    applied_before = level.applied
    later = churn(10, start_gen=100)
    for entry in later:
        log.append(entry)
    fresh_then = Reader(log)
    for reader in (level, behind, fresh_then):
        reader.poll()
        assert reader.present == final_state(ops + later)
        assert reader.must_cover == []  # nothing was dropped, only collapsed
    # Level with the rewrite: it goes on after the compacted section, each new entry once.
    assert level.applied - applied_before == len(later)
    assert not level.log.changed(level.cursor)


def test_reader_two_compactions_behind_replays_the_newest_file(log):
    ops = churn(30)
    reader = Reader(log)
    for n, entry in enumerate(ops):
        log.append(entry)
        if n == 3:
            reader.poll()
        if n in (10, 20):
            log.compact(force=True)
    reader.poll()
    assert reader.present == final_state(ops) and log.header()[0]["epoch"] == 2


def test_a_log_recreated_under_a_reader_is_replayed_not_read_at_old_offsets(log):
    first = churn(20)
    for entry in first:
        log.append(entry)
    reader = Reader(log)
    reader.poll()
    os.unlink(log.path)  # someone removed it; the next write starts a new file
    log.append({"at": "t", "pid": 1, "gen": 500, "add": [7], "delete": []})
    reader.poll()
    assert 7 in reader.present and reader.present == final_state(first) | {7}


APPENDER = r"""
import sys
from serve.updates import UpdateLog
store, worker, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
log = UpdateLog(store)
for k in range(n):
    item = worker * 100000 + k
    log.append({"at": "t", "pid": worker, "add": [item], "delete": [item - 3] if k % 4 == 3 else []})
"""


def test_compaction_under_concurrent_appends_from_processes_loses_no_entry(log, tmp_path):
    workers, per_worker = 3, 150
    tailer = Reader(log)
    stop = threading.Event()
    errors = []

    def tail():
        while not stop.is_set():
            try:
                tailer.poll()
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    thread = threading.Thread(target=tail, daemon=True)
    thread.start()
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(tmp_path), str(w + 1), str(per_worker)], cwd=REPO)
             for w in range(workers)]
    compactions = 0
    try:
        while any(p.poll() is None for p in procs):
            if log.compact(force=True):
                compactions += 1
    finally:
        for p in procs:
            assert p.wait(timeout=120) == 0
        stop.set()
        thread.join(30)
    assert not errors, errors
    expected = set()
    for w in range(1, workers + 1):
        added = {w * 100000 + k for k in range(per_worker)}
        expected |= added - {w * 100000 + k - 3 for k in range(per_worker) if k % 4 == 3}
    assert compactions >= 2
    fresh = Reader(log)
    fresh.poll()
    tailer.poll()
    assert fresh.present == tailer.present == expected
    log.compact(force=True)
    final = Reader(log)
    final.poll()
    assert final.present == expected


def test_coverage_drops_the_built_in_prefix_and_says_so(log):
    ops = churn(50)  # gens 1..60
    caught_up, behind = Reader(log), Reader(log)
    for n, entry in enumerate(ops):
        log.append(entry)
        if n == 2:
            behind.poll()
    caught_up.poll()
    before = log.size()
    result = log.compact(30, store_generation=ops[-1]["gen"])
    assert result["dropped_through"] == 30 and result["dropped_lines"] > 0 and result["bytes_after"] < before / 3
    assert all(e["gen"] > 30 for e in log.read(LogCursor()).entries)
    # A version built at generation >= 30: the dropped lines are in it.
    built = Reader(log, base=final_state([e for e in ops if e["gen"] <= 35]), covered=35)
    built.poll()
    assert built.present == final_state(ops) and built.must_cover == [30]
    # Caught up before the rewrite: nothing missing.
    caught_up.poll()
    assert caught_up.must_cover == [] and caught_up.present == final_state(ops)
    # Behind, on a version that does not hold them: told what it misses (the service then
    # refills from the store).
    behind.poll()
    assert behind.must_cover == [30]


def test_nothing_is_dropped_when_the_log_names_a_newer_store(log):
    for entry in churn(10, start_gen=900):
        log.append(entry)
    result = log.compact(1000, store_generation=5, force=True)  # the store was replaced: gens restart
    assert result["dropped_lines"] == 0 and result["dropped_through"] == 0


def test_old_lines_without_a_generation_are_bounded_by_the_next_one(log):
    log.append({"at": "t", "pid": 1, "add": [1], "delete": []})  # written before lines had "gen"
    log.append({"at": "t", "pid": 1, "gen": 10, "add": [2], "delete": []})
    log.append({"at": "t", "pid": 1, "add": [3], "delete": []})  # unbounded: kept
    result = log.compact(10)
    assert result["dropped_lines"] == 2
    assert [e["add"] for e in log.read(LogCursor()).entries] == [[3]]


def test_a_crash_mid_compaction_leaves_the_old_log_and_its_litter_is_cleared(log, monkeypatch):
    ops = churn(30)
    for entry in ops:
        log.append(entry)
    before = log.path.read_bytes()

    def crash(src, dst):
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        log.compact(force=True)
    monkeypatch.undo()
    assert log.path.read_bytes() == before
    stale = log.path.parent / f".{updates.LOG_NAME}.999.dead.tmp"  # what a SIGKILL before the rename leaves
    stale.write_bytes(b"half a rewrite")
    reader = Reader(log)
    reader.poll()
    assert reader.present == final_state(ops)
    log.compact(force=True)
    assert not stale.exists() and not list(log.path.parent.glob(f".{updates.LOG_NAME}.*.tmp"))
    reader.poll()
    assert reader.present == final_state(ops)


def test_a_half_written_line_is_ended_by_the_next_append_and_skipped(log, caplog):
    log.append({"at": "t", "pid": 1, "gen": 1, "add": [1], "delete": []})
    with open(log.path, "ab") as f:
        f.write(b'{"at":"t","pid":2,"gen":2,"add":[2')  # the writer was killed here
    reader = Reader(log)
    reader.poll()
    assert reader.present == {1}
    log.append({"at": "t", "pid": 3, "gen": 3, "add": [3], "delete": []})
    reader.poll()
    assert reader.present == {1, 3} and "unreadable updates-log line" in caplog.text
    log.compact(force=True)
    assert b'"add":[2' not in log.path.read_bytes()
    fresh = Reader(log)
    fresh.poll()
    assert fresh.present == {1, 3}


def test_compact_if_large_waits_for_the_log_to_double(log):
    for entry in churn(40):
        log.append(entry)
    assert log.compact_if_large(min_bytes=log.size() + 1) is None
    first = log.compact_if_large(min_bytes=100)
    assert first is not None
    assert log.compact_if_large(min_bytes=100) is None  # not doubled since
    while log.size() < 2 * first["bytes_after"]:
        log.append({"at": "t", "pid": 1, "gen": 10_000, "add": [10_000 + log.size()], "delete": []})
    assert log.compact_if_large(min_bytes=100) is not None


# ---------------------------------------------------------------- in the service (real store, index, writer child)

@pytest.fixture()
def env(tmp_path):
    return make_env(tmp_path)


def _write_sidecar(index_root, version, store_path, generation):
    """What ``imgsearch rebuild`` records next to a version it built (index.jobs.rebuild)."""
    (Path(index_root) / version / updates.BUILD_SIDECAR).write_text(
        json.dumps({"store": str(store_path), "store_generation": generation}))


def test_reload_compacts_the_log_and_every_worker_still_sees_every_update(env, tmp_path_factory):
    import shutil

    from index.ann import versions
    from index.ann.build import build_version
    from index.ann.sources import store_source

    _, store_path, index_root = env
    a, client_a = _client(env)  # two workers of one server
    b, client_b = _client(env)
    store = a.store()
    _write_sidecar(index_root, "v1", store_path, store.generation)
    early = tmp_path_factory.mktemp("inflight")  # a build that started before the writes below
    build_version(store_source(store), str(early), factory="auto", version="v3", publish=False)

    green, green_vector = _png_b64((20, 220, 20))
    blue, blue_vector = _png_b64((10, 10, 240), seed=7)
    assert client_a.post("/v1/products", json={"product_id": "green", "image_base64": green}, headers=AUTH).status_code == 201
    assert _top(client_b, green_vector)[0] == "green"  # b has read the log this far
    assert client_a.post("/v1/products", json={"product_id": "p", "image_base64": green}, headers=AUTH).status_code == 201
    assert client_a.post("/v1/products", json={"product_id": "p", "image_base64": blue}, headers=AUTH).status_code == 200
    assert client_a.delete("/v1/products/item-05", headers=AUTH).status_code == 200
    log = UpdateLog(store_path)
    grown = log.size()

    # The rebuild: a version built from the store as it is now, the old one collected.
    generation = store.generation
    build_version(store_source(store), str(index_root), factory="auto", version="v2")
    _write_sidecar(index_root, "v2", store_path, generation)
    shutil.rmtree(index_root / "v1")
    response = client_a.post("/v1/admin/reload", headers=AUTH)
    assert response.status_code == 200 and response.get_json()["index_version"] == "v2"
    header, head_len = log.header()
    assert header["dropped_through"] == generation and log.size() == head_len < grown  # all built in

    # b is still on v1 (gone from disk, built before the dropped lines) and behind: it is
    # brought up to date from the store, and sees what a sees.
    vector_05 = store.vectors_for([store.items_of_product("item-05", include_deleted=True)[0].id])[0].tolist()
    for client in (client_a, client_b):
        assert _top(client, blue_vector)[0] == "p" and _top(client, green_vector)[0] == "green"
        assert "item-05" not in _top(client, vector_05, k=14)
    assert a.live().ntotal == b.live().ntotal == 13

    # A write after the compaction reaches both; a worker started now, and one on the
    # in-flight build (committed after the compaction, before the writes), see the same.
    late, late_vector = _png_b64((240, 240, 20), seed=9)
    assert client_b.post("/v1/products", json={"product_id": "late", "image_base64": late}, headers=AUTH).status_code == 201
    c, client_c = _client(env)
    os.replace(early / "v3", index_root / "v3")
    versions.set_current(str(index_root), "v3")
    d, client_d = _client(env)
    assert d.live().version == "v3" and c.live().version == "v2"
    for client in (client_a, client_b, client_c, client_d):
        assert _top(client, late_vector)[0] == "late"
        assert _top(client, blue_vector)[0] == "p" and _top(client, green_vector)[0] == "green"
        assert "item-05" not in _top(client, vector_05, k=15)
    assert a.live().ntotal == b.live().ntotal == c.live().ntotal == d.live().ntotal == 14


def test_nothing_is_dropped_while_a_version_does_not_say_what_it_holds(env):
    from index.ann.build import build_version
    from index.ann.sources import store_source

    _, store_path, index_root = env
    service, client = _client(env)
    green, green_vector = _png_b64((20, 220, 20))
    client.post("/v1/products", json={"product_id": "green", "image_base64": green}, headers=AUTH)
    build_version(store_source(service.store()), str(index_root), factory="auto", version="v2")
    # v1 as a version from before builds recorded their store generation (or from --vectors):
    manifest_path = Path(index_root) / "v1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["store"]
    manifest_path.write_text(json.dumps(manifest))
    assert client.post("/v1/admin/reload", headers=AUTH).status_code == 200
    header, _ = UpdateLog(store_path).header()
    assert header is None or header["dropped_through"] == 0
    fresh, fresh_client = _client(env)
    assert _top(fresh_client, green_vector)[0] == "green" and fresh.live().ntotal == 13


def test_a_plain_build_records_its_store_generation_so_the_log_shrinks_without_rebuild(env):
    """``imgsearch build --store`` (no rebuild job, no rebuild.json): the manifest says which
    store writes the version holds, and a reload to it drops every line it holds."""
    import shutil

    from index.ann.build import build_version
    from index.ann.sources import store_source

    _, store_path, index_root = env
    service, client = _client(env)
    green, green_vector = _png_b64((20, 220, 20))
    assert client.post("/v1/products", json={"product_id": "green", "image_base64": green}, headers=AUTH).status_code == 201
    log = UpdateLog(store_path)
    assert len(log.read(LogCursor()).entries) == 1
    generation = service.store().generation
    built = build_version(store_source(service.store()), str(index_root), factory="auto", version="v2")
    assert built.manifest["store"] == {"path": os.path.abspath(store_path), "generation": generation}
    assert updates.version_coverage(built.path, store_path) == generation
    assert updates.version_coverage(built.path, store_path.parent / "another-store") is None
    shutil.rmtree(index_root / "v1")
    assert client.post("/v1/admin/reload", headers=AUTH).status_code == 200
    header, head_len = log.header()
    assert header["dropped_through"] == generation and log.size() == head_len  # the header alone
    assert log.read(LogCursor()).entries == []
    fresh, fresh_client = _client(env)
    assert _top(fresh_client, green_vector)[0] == "green" and fresh.live().ntotal == 13
