"""Catalog reading and ingest: rejects, idempotency, deletes, and the cross-process guarantees
(concurrent readers while a writer ingests; a SIGKILLed writer leaves a resumable store)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgsearch.errors import BadInput, JobFailed
from index.store import CatalogStore
from index.store.catalog import CatalogRow, Reject, read_catalog
from index.store.ingest import ingest_catalog

HELPER = Path(__file__).parent / "helpers" / "store_writer.py"
_spec = importlib.util.spec_from_file_location("store_writer", HELPER)
store_writer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(store_writer)
embed_stats = store_writer.embed_stats


class CountingEmbed:
    """The deterministic test embedder, counting the images it is asked for."""

    def __init__(self):
        self.images = 0
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        self.images += len(images)
        return embed_stats(images)


def make_image(path: Path, seed: int, size=(6, 4), fmt="PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows), encoding="utf-8")
    return path


def simple_catalog(root: Path, count: int, name="catalog.csv") -> Path:
    for i in range(count):
        make_image(root / "img" / f"{i}.png", seed=i)
    rows = [[f"p{i // 2}", f"img/{i}.png", "shoes" if i % 2 else "hats", f"title {i}"] for i in range(count)]
    return write_csv(root / name, ["product_id", "image", "category", "title"], rows)


def read_rejects(store: CatalogStore) -> list[dict]:
    return [json.loads(line) for line in (store.path / "rejects.jsonl").read_text().splitlines()]


@pytest.fixture
def store(tmp_path):
    with CatalogStore.create_or_open(tmp_path / "store", vector_dtype="float32") as opened:
        yield opened


# ---------------------------------------------------------------- reading


def test_read_csv_keeps_extra_columns_as_metadata_and_counts_physical_lines(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text(
        "product_id,image,category,title,price\n"
        "p1,a.png,shoes,Red shoe,10\n"
        "\n"
        'p2,b.png,,"two\nline title",20\n'
        "p3,c.png,hats,Hat,5,extra\n"
        "p4,d.png\n",
        encoding="utf-8",
    )
    rows = list(read_catalog(path))
    assert rows[0] == CatalogRow(2, "p1", "a.png", "shoes", {"title": "Red shoe", "price": "10"})
    assert rows[1] == CatalogRow(4, "p2", "b.png", None, {"title": "two\nline title", "price": "20"})
    assert isinstance(rows[2], Reject) and rows[2].line == 6 and "6 fields" in rows[2].reason
    assert rows[3] == CatalogRow(7, "p4", "d.png", None, {})  # short rows: absent cells are absent


def test_read_jsonl_lines_start_at_one_and_keep_any_json_metadata(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"product_id": "p1", "image": "a.png", "category": "shoes", "tags": ["red"], "price": 10.5},
        "",
        "{not json",
        "[1, 2]",
        {"product_id": 7, "image": "b.png"},
        {"product_id": "", "image": "c.png"},
        {"product_id": "p3"},
    ])
    rows = list(read_catalog(path))
    assert rows[0] == CatalogRow(1, "p1", "a.png", "shoes", {"tags": ["red"], "price": 10.5})
    assert (rows[1].line, rows[1].reason.split(":")[0]) == (3, "invalid JSON")
    assert (rows[2].line, rows[2].reason.split(":")[0]) == (4, "not a JSON object")
    assert rows[3] == CatalogRow(5, "7", "b.png", None, {})
    assert (rows[4].line, rows[4].reason) == (6, "empty product_id: ''")
    assert (rows[5].line, rows[5].product_id, rows[5].reason) == (7, "p3", "empty image path: None")


def test_read_catalog_refuses_unreadable_catalogs(tmp_path):
    with pytest.raises(BadInput, match="missing.csv"):
        list(read_catalog(tmp_path / "missing.csv"))
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(BadInput, match="'.txt'"):
        list(read_catalog(tmp_path / "c.txt"))
    (tmp_path / "c.csv").write_text("id,picture\n1,a.png\n")
    with pytest.raises(BadInput, match=r"\['product_id', 'image'\]"):
        list(read_catalog(tmp_path / "c.csv"))


def test_non_utf8_bytes_reject_their_row_only(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes(b"product_id,image\np\xff1,a.png\np2,b.png\n")
    rows = list(read_catalog(path))
    assert isinstance(rows[0], Reject) and rows[0].line == 2 and rows[0].reason == "not valid UTF-8"
    assert rows[1] == CatalogRow(3, "p2", "b.png", None, {})


# ---------------------------------------------------------------- ingest


def test_ingest_stores_records_and_vectors(tmp_path, store):
    catalog = simple_catalog(tmp_path, 5)
    embed = CountingEmbed()
    summary = ingest_catalog(catalog, store, embed, batch_size=2, progress=False)
    assert (summary.added, summary.changed, summary.unchanged, summary.rejected, summary.deleted) == (5, 0, 0, 0, 0)
    assert embed.images == 5 and embed.calls == 3
    records = {r.image: r for r in store.iter_records()}
    record = records["img/3.png"]
    assert (record.product_id, record.category, record.metadata) == ("p1", "shoes", {"title": "title 3"})
    assert Path(record.path) == (tmp_path / "img" / "3.png").resolve()
    assert len(record.content_hash) == 64
    expected = embed_stats([Image.open(tmp_path / "img" / "3.png").convert("RGB")])
    np.testing.assert_allclose(store.vectors_for([record.id]), expected)
    assert read_rejects(store) == []
    assert store.stats()["dim"] == store_writer.EMBED_DIM


def test_second_ingest_embeds_nothing_and_a_changed_image_is_re_embedded(tmp_path, store):
    catalog = simple_catalog(tmp_path, 6)
    ingest_catalog(catalog, store, CountingEmbed(), batch_size=4, progress=False)
    ids_before = sorted(r.id for r in store.iter_records())

    embed = CountingEmbed()
    summary = ingest_catalog(catalog, store, embed, batch_size=4, progress=False)
    assert embed.images == 0
    assert (summary.added, summary.changed, summary.unchanged, summary.updated) == (0, 0, 6, 0)
    assert sorted(r.id for r in store.iter_records()) == ids_before  # stable ids

    make_image(tmp_path / "img" / "2.png", seed=100, size=(5, 5))
    summary = ingest_catalog(catalog, store, embed, batch_size=4, progress=False)
    assert embed.images == 1 and (summary.changed, summary.unchanged) == (1, 5)
    changed_id = store.find_id("p1", "img/2.png")
    expected = embed_stats([Image.open(tmp_path / "img" / "2.png").convert("RGB")])
    np.testing.assert_allclose(store.vectors_for([changed_id]), expected)


def test_ids_are_the_same_when_another_process_ingests_the_same_catalog(tmp_path, store):
    catalog = simple_catalog(tmp_path, 4)
    ingest_catalog(catalog, store, CountingEmbed(), progress=False)
    subprocess.run([sys.executable, str(HELPER), "ingest", str(tmp_path / "other"), "--catalog", str(catalog)],
                   check=True, capture_output=True)
    with CatalogStore.open_readonly(tmp_path / "other") as other:
        assert sorted(r.id for r in other.iter_records()) == sorted(r.id for r in store.iter_records())


def test_metadata_change_rewrites_the_record_without_embedding(tmp_path, store):
    catalog = simple_catalog(tmp_path, 3)
    ingest_catalog(catalog, store, CountingEmbed(), progress=False)
    write_csv(catalog, ["product_id", "image", "category", "color"],
              [["p0", "img/0.png", "boots", "red"], ["p0", "img/1.png", "shoes", ""], ["p1", "img/2.png", "hats", ""]])
    embed = CountingEmbed()
    summary = ingest_catalog(catalog, store, embed, progress=False)
    assert embed.images == 0 and (summary.updated, summary.unchanged) == (3, 0)
    record = store.get(store.find_id("p0", "img/0.png"))
    assert (record.category, record.metadata) == ("boots", {"color": "red"})


def test_every_reject_kind_is_reported_once_with_its_line_and_the_job_goes_on(tmp_path, store):
    make_image(tmp_path / "good.png", seed=1)
    make_image(tmp_path / "good2.jpg", seed=2, fmt="JPEG")
    make_image(tmp_path / "huge.png", seed=3, size=(40, 40))
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    catalog = write_csv(tmp_path / "c.csv", ["product_id", "image"], [
        ["p1", "good.png"],      # line 2
        ["p2", "missing.png"],   # 3
        ["p3", "text.png"],      # 4
        ["", "good.png"],        # 5
        ["p4", "empty.png"],     # 6
        ["p5", "huge.png"],      # 7
        ["p1", "good.png"],      # 8: duplicate of line 2
        ["p6", "good2.jpg"],     # 9
        ["p7", ""],              # 10
    ])
    for _ in range(2):  # a second run rewrites the file: each reject still appears once
        summary = ingest_catalog(catalog, store, CountingEmbed(), batch_size=3, progress=False, max_pixels=1000)
        rejects = read_rejects(store)
        assert summary.rejected == 7 == len(rejects)
    assert store.stats()["live"] == 2
    by_line = {r["line"]: r for r in rejects}
    assert sorted(by_line) == [3, 4, 5, 6, 7, 8, 10]
    assert by_line[3]["reason"].startswith("missing file") and "missing.png" in by_line[3]["reason"]
    assert by_line[4]["reason"].startswith("undecodable_image")
    assert by_line[5]["reason"] == "empty product_id: ''" and by_line[5]["image"] == "good.png"
    assert by_line[6]["reason"].startswith("undecodable_image") and "empty" in by_line[6]["reason"]
    assert by_line[7]["reason"].startswith("image_too_large") and "40x40" in by_line[7]["reason"]
    assert by_line[8]["reason"].startswith("duplicate of")
    assert by_line[10]["reason"] == "empty image path: ''"
    assert set(by_line[3]) == {"line", "product_id", "image", "reason"}
    assert summary.line().endswith(f"rejected 7 (see {store.path / 'rejects.jsonl'}) in {summary.seconds:.1f} s")
    assert not list(store.path.glob(".rejects*"))


def test_duplicate_rows_within_one_batch_are_rejected(tmp_path, store):
    make_image(tmp_path / "a.png", seed=1)
    catalog = write_csv(tmp_path / "c.csv", ["product_id", "image"], [["p", "a.png"], ["p", "a.png"]])
    embed = CountingEmbed()
    summary = ingest_catalog(catalog, store, embed, batch_size=10, progress=False)
    assert (summary.added, summary.rejected, embed.images) == (1, 1, 1)
    assert read_rejects(store)[0]["reason"] == "duplicate of line 2: same product_id and image"


def test_nothing_stored_is_lost_when_its_row_turns_bad(tmp_path, store):
    catalog = simple_catalog(tmp_path, 3)
    ingest_catalog(catalog, store, CountingEmbed(), progress=False)
    before = {r.id: store.vectors_for([r.id]) for r in store.iter_records()}
    (tmp_path / "img" / "0.png").write_bytes(b"\x89PNG truncated")
    (tmp_path / "img" / "1.png").unlink()
    summary = ingest_catalog(catalog, store, CountingEmbed(), progress=False)
    assert (summary.rejected, summary.deleted, summary.unchanged) == (2, 0, 1)
    assert store.stats()["live"] == 3
    for item, vector in before.items():
        np.testing.assert_array_equal(store.vectors_for([item]), vector)


def test_items_missing_from_the_catalog_are_deleted_and_come_back_without_embedding(tmp_path, store):
    catalog = simple_catalog(tmp_path, 4)
    ingest_catalog(catalog, store, CountingEmbed(), progress=False)
    rows = list(csv.reader(catalog.open()))
    write_csv(catalog, rows[0], rows[1:3])  # keep img/0 and img/1: half the store goes (over the mass-delete guard)
    summary = ingest_catalog(catalog, store, CountingEmbed(), progress=False, allow_mass_delete=True)
    assert (summary.deleted, summary.unchanged) == (2, 2)
    gone = store.find_id("p1", "img/2.png")
    assert store.get(gone).deleted and set(store.deleted_ids()) == {gone, store.find_id("p1", "img/3.png")}
    assert sorted(len(ids) for ids, _ in store.iter_blocks()) == [2]

    write_csv(catalog, rows[0], rows[1:])
    embed = CountingEmbed()
    summary = ingest_catalog(catalog, store, embed, progress=False)
    assert (summary.added, summary.unchanged, embed.images) == (2, 2, 0)
    assert store.stats()["deleted"] == 0

    write_csv(catalog, rows[0], rows[1:2])
    summary = ingest_catalog(catalog, store, embed, progress=False, mark_missing_deleted=False)
    assert summary.deleted == 0 and store.stats()["deleted"] == 0


def test_an_empty_catalog_deletes_nothing(tmp_path, store):
    catalog = simple_catalog(tmp_path, 2)
    ingest_catalog(catalog, store, CountingEmbed(), progress=False)
    write_csv(catalog, ["product_id", "image"], [])
    assert ingest_catalog(catalog, store, CountingEmbed(), progress=False).deleted == 0
    assert store.stats()["live"] == 2


def test_jsonl_catalog_ingests_with_relative_paths_from_its_folder(tmp_path, store):
    make_image(tmp_path / "cat" / "pics" / "a.png", seed=1)
    catalog = write_jsonl(tmp_path / "cat" / "c.jsonl", [{"product_id": "p", "image": "pics/a.png", "brand": "acme"}])
    cwd = os.getcwd()
    os.chdir(tmp_path)  # relative to the catalog's folder, not the working directory
    try:
        summary = ingest_catalog(Path("cat/c.jsonl"), store, CountingEmbed(), progress=False)
    finally:
        os.chdir(cwd)
    assert summary.added == 1
    record = next(store.iter_records())
    assert record.metadata == {"brand": "acme"} and Path(record.path) == (catalog.parent / "pics" / "a.png").resolve()


def test_a_bad_embed_fn_fails_the_job_and_keeps_earlier_batches(tmp_path, store):
    catalog = simple_catalog(tmp_path, 4)

    def embed_then_break(images):
        if embed_then_break.calls:
            return np.zeros((len(images) + 1, 8), np.float32)
        embed_then_break.calls += 1
        return embed_stats(images)

    embed_then_break.calls = 0
    with pytest.raises(JobFailed, match=r"shape \(3, 8\)"):
        ingest_catalog(catalog, store, embed_then_break, batch_size=2, progress=False)
    assert store.stats()["with_vectors"] == 2
    assert not list(store.path.glob(".rejects*"))


def test_ingest_needs_a_writer(tmp_path, store):
    catalog = simple_catalog(tmp_path, 1)
    store.close()
    with CatalogStore.open_readonly(store.path) as reader, pytest.raises(BadInput, match="read-only"):
        ingest_catalog(catalog, reader, CountingEmbed(), progress=False)


def test_progress_logs_plain_lines_when_not_a_tty(tmp_path, store, caplog):
    catalog = simple_catalog(tmp_path, 2)
    with caplog.at_level("INFO", logger="index.store.ingest"):
        ingest_catalog(catalog, store, CountingEmbed(), progress=True)
    assert any("done: 2 rows; added 2" in message for message in caplog.messages)


# ---------------------------------------------------------------- other processes


def _start_helper(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HELPER), *args], stdout=subprocess.PIPE, text=True, **kwargs)


def test_readers_in_other_processes_see_consistent_items_while_a_writer_ingests(tmp_path):
    total, batch = 160, 8
    catalog = simple_catalog(tmp_path, total)
    path = tmp_path / "store"
    stop = tmp_path / "stop"
    with CatalogStore.create_or_open(path, vector_dtype="float32", initial_map_size=64 << 10) as store:
        readers = [
            _start_helper("read", str(path), "--stop", str(stop), "--batch-size", str(batch), "--total", str(total),
                          "--map-size", str(map_size))
            for map_size in (64 << 10, 1 << 40)  # the small one must adopt the grown map
        ]
        try:
            assert [reader.stdout.readline().strip() for reader in readers] == ["ready", "ready"]
            summary = ingest_catalog(catalog, store, store_writer.slow_embed(0.05), batch_size=batch, progress=False)
            assert summary.added == total
            grown_to = store.map_size
        finally:
            stop.touch()
            reports = [json.loads(reader.communicate(timeout=120)[0].splitlines()[-1]) for reader in readers]
    assert grown_to > 64 << 10
    for report in reports:
        assert report["errors"] == []
        assert report["rounds"] >= 3 and report["max_seen"] == total
    assert max(reports[0]["map_sizes"]) > 64 << 10


def test_a_writer_killed_mid_ingest_leaves_a_store_that_opens_and_resumes(tmp_path):
    total, batch = 300, 8
    for i in range(total):
        make_image(tmp_path / "img" / f"{i}.png", seed=i, size=(3 + i % 5, 2 + i % 3))
    catalog = write_jsonl(tmp_path / "c.jsonl", [{"product_id": f"p{i}", "image": f"img/{i}.png"} for i in range(total)])
    path = tmp_path / "store"
    writer = _start_helper("ingest", str(path), "--catalog", str(catalog), "--batch-size", str(batch),
                           "--delay", "0.1", "--map-size", str(64 << 10))
    assert writer.stdout.readline().strip() == "opened"
    stored_at_kill = _wait_for_vectors(path, at_least=10 * batch, timeout=60)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert writer.returncode == -signal.SIGKILL
    assert stored_at_kill < total, "the writer finished before it was killed; slow it down"
    assert list(path.glob(".rejects.jsonl.*.tmp")), "the killed run leaves its temp rejects file"

    with CatalogStore.create_or_open(path) as store:  # the dead writer's lock is gone
        stats = store.stats()
        assert stats["count"] == stats["with_vectors"] and stats["count"] % batch == 0
        assert stored_at_kill <= stats["count"] < total
        _assert_vectors_match_images(store)
        embed = CountingEmbed()
        summary = ingest_catalog(catalog, store, embed, batch_size=batch, progress=False)
        assert embed.images == total - stats["count"]
        assert (summary.added, summary.unchanged, summary.rejected) == (total - stats["count"], stats["count"], 0)
        assert store.stats()["count"] == store.stats()["with_vectors"] == total
        _assert_vectors_match_images(store)
    assert not list(path.glob(".rejects*")), "the killed run's temp rejects file is cleaned up"


def _wait_for_vectors(path: Path, at_least: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (path / "data.mdb").exists():
            with CatalogStore.open_readonly(path) as reader:
                stored = reader.stats()["with_vectors"]
            if stored >= at_least:
                return stored
        time.sleep(0.02)
    raise AssertionError(f"the writer stored fewer than {at_least} vectors in {timeout} s")


def _assert_vectors_match_images(store: CatalogStore) -> None:
    for ids, vectors in store.iter_blocks(64):
        for record, vector in zip(store.get_many(ids), vectors):
            expected = embed_stats([Image.open(record.path).convert("RGB")])[0]
            np.testing.assert_allclose(vector, expected, rtol=1e-6, err_msg=record.image)
