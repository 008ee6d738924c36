"""The LMDB catalog store: ids, records and vectors, deletes, streaming, locking, map growth."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import index.store.lmdb_store as store_module
from imgsearch.errors import BadInput
from index.store import CatalogStore, ItemRecord, StoreLocked, StoreNotFound, item_id

HELPER = Path(__file__).parent / "helpers" / "store_writer.py"
DIM = 8


def make_records(count: int, *, product_of=lambda i: f"p{i // 2}", metadata_bytes: int = 0) -> list[ItemRecord]:
    return [
        ItemRecord(product_id=product_of(i), image=f"img/{i}.png", path=f"/data/img/{i}.png", category="shoes" if i % 3 else None,
                   metadata={"title": f"item {i}", "pad": "x" * metadata_bytes}, content_hash=f"{i:064x}")
        for i in range(count)
    ]


def make_vectors(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)


@pytest.fixture
def store(tmp_path):
    with CatalogStore.create_or_open(tmp_path / "store", dim=DIM, vector_dtype="float32") as opened:
        yield opened


# ---------------------------------------------------------------- ids


@settings(max_examples=200, deadline=None)
@given(product_id=st.text(), image=st.text())
def test_item_id_is_stable_non_negative_int63(product_id, image):
    first = item_id(product_id, image)
    assert first == item_id(product_id, image)
    assert 0 <= first < 2**63
    assert item_id(product_id, image, salt=1) != first


def test_item_id_encoding_keeps_field_boundaries():
    assert item_id("ab", "c") != item_id("a", "bc")
    assert item_id("a", "") != item_id("", "a")


def test_item_id_is_the_same_in_another_process():
    pairs = [("p1", "a.jpg"), ("ünïcode", "dir/ß.png"), ("", "")]
    code = f"from index.store import item_id; print([item_id(p, i) for p, i in {pairs!r}])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str([item_id(p, i) for p, i in pairs])


def test_id_collision_is_resolved_deterministically(store, monkeypatch):
    real_item_id = store_module.item_id

    def colliding_item_id(product_id, image, salt=0):
        return 42 if salt == 0 else real_item_id(product_id, image, salt)

    monkeypatch.setattr(store_module, "item_id", colliding_item_id)
    first, second = store.put(make_records(2), make_vectors(2))
    assert first.id == 42
    assert second.id == real_item_id(second.product_id, second.image, 1)
    # Rewriting and looking up find the same ids, in either order.
    again = store.put(list(reversed(make_records(2))), make_vectors(2)[::-1])
    assert [r.id for r in again] == [second.id, first.id]
    assert store.find_id(first.product_id, first.image) == 42
    assert store.find_id(second.product_id, second.image) == second.id
    assert store.find_id("never", "stored") is None
    assert store.stats()["count"] == 2


# ---------------------------------------------------------------- records and vectors


@pytest.mark.parametrize("vector_dtype, atol", [("float32", 0.0), ("float16", 2e-3)])
def test_vectors_round_trip_in_the_chosen_dtype(tmp_path, vector_dtype, atol):
    vectors = make_vectors(5)
    with CatalogStore.create_or_open(tmp_path / "s", vector_dtype=vector_dtype) as store:
        assert store.dim is None  # fixed by the first vectors
        stored = store.put(make_records(5), vectors)
        assert store.dim == DIM
    with CatalogStore.open_readonly(tmp_path / "s") as reader:
        assert (reader.dim, reader.vector_dtype) == (DIM, vector_dtype)
        back = reader.vectors_for([r.id for r in stored])
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, vectors, atol=atol, rtol=atol)
    stored_bytes = (tmp_path / "s" / "data.mdb").stat().st_size
    assert stored_bytes > 0


def test_store_meta_is_checked_on_reopen(tmp_path):
    with CatalogStore.create_or_open(tmp_path / "s", dim=4, vector_dtype="float16"):
        pass
    with pytest.raises(BadInput, match="float16"):
        CatalogStore.create_or_open(tmp_path / "s", vector_dtype="float32")
    with pytest.raises(BadInput, match="dim 4"):
        CatalogStore.create_or_open(tmp_path / "s", dim=8)
    with pytest.raises(BadInput, match="'float64'"):
        CatalogStore.create_or_open(tmp_path / "t", vector_dtype="float64")
    with pytest.raises(StoreNotFound, match="nowhere"):
        CatalogStore.open_readonly(tmp_path / "nowhere")


def test_bad_vectors_are_refused_and_nothing_is_written(store):
    with pytest.raises(BadInput, match=r"shape \(3, 8\)"):
        store.put(make_records(2), make_vectors(3))
    with pytest.raises(BadInput, match="dim 5"):
        store.put(make_records(2), np.zeros((2, 5), np.float32))
    bad = make_vectors(2)
    bad[1, 3] = np.nan
    with pytest.raises(BadInput, match="vector 1"):
        store.put(make_records(2), bad)
    assert store.stats()["count"] == 0


def test_records_round_trip_with_timestamps(store):
    first = store.put(make_records(3), make_vectors(3))
    got = store.get(first[1].id)
    assert got == first[1]
    assert got.metadata["title"] == "item 1" and got.category == "shoes"
    assert got.created_at and got.created_at == got.updated_at
    assert store.get(123) is None
    assert store.get_many([first[0].id, 123, -1, 2**64]) == [first[0], None, None, None]
    # Rewriting keeps created_at; vectors=None keeps the stored vector.
    rewritten = store.put([ItemRecord(**{**_fields(first[0]), "category": "hats"})])[0]
    assert rewritten.created_at == first[0].created_at and rewritten.category == "hats"
    np.testing.assert_array_equal(store.vectors_for([first[0].id]), make_vectors(3)[:1])
    with pytest.raises(KeyError, match=r"\[123, -1\]"):
        store.vectors_for([first[0].id, 123, -1])


def _fields(record: ItemRecord) -> dict:
    return {name: getattr(record, name) for name in ("product_id", "image", "path", "category", "metadata", "content_hash")}


def test_items_of_product(store):
    stored = store.put(make_records(6), make_vectors(6))  # products p0, p0, p1, p1, p2, p2
    assert {r.id for r in store.items_of_product("p1")} == {stored[2].id, stored[3].id}
    assert store.items_of_product("p9") == []


def test_product_results_keep_each_live_products_best_hit_up_to_k(store):
    from index.store import product_results

    stored = store.put(make_records(8), make_vectors(8))  # products p0..p3, two images each
    store.mark_deleted([stored[4].id])  # p2's first image
    ids = np.array([stored[1].id, stored[0].id, stored[4].id, 999_999, stored[5].id, stored[2].id, stored[6].id, -1, -1])
    scores = np.linspace(0.9, 0.1, len(ids)).astype(np.float32)
    got = product_results(store, scores, ids, k=3)
    assert [r["product_id"] for r in got] == ["p0", "p2", "p1"]  # p0 at its best image; deleted and unknown ids skipped
    assert got[0]["score"] == round(float(scores[0]), 6) and got[1]["score"] == round(float(scores[4]), 6)
    assert got[0]["image"] == stored[1].image and got[0]["metadata"] == stored[1].metadata
    assert [r["product_id"] for r in product_results(store, scores, ids, k=10)] == ["p0", "p2", "p1", "p3"]


def test_product_vectors_are_the_live_items_with_a_stored_vector(store):
    stored = store.put(make_records(6), make_vectors(6))  # products p0, p0, p1, p1, p2, p2
    without_vector = store.put([ItemRecord(product_id="p1", image="img/extra.png", path="/data/img/extra.png")])[0]
    store.mark_deleted([stored[3].id])
    ids, vectors = store.product_vectors("p1")
    assert ids == [stored[2].id] and without_vector.id not in ids
    np.testing.assert_array_equal(vectors, make_vectors(6)[2:3])
    ids, vectors = store.product_vectors("p9")
    assert ids == [] and vectors.shape == (0, DIM) and vectors.dtype == np.float32


# ---------------------------------------------------------------- deletes and streaming


def test_deletes_by_id_and_by_product_keep_the_record(store):
    stored = store.put(make_records(6), make_vectors(6))
    assert store.mark_deleted([stored[0].id, 999, -1]) == 1
    assert store.mark_deleted([stored[0].id]) == 0  # already deleted
    assert store.delete_product("p2") == 2
    assert store.delete_product("p2") == 0
    deleted = {stored[0].id, stored[4].id, stored[5].id}
    assert set(store.deleted_ids()) == deleted
    tombstone = store.get(stored[4].id)
    assert tombstone.deleted and tombstone.deleted_at and tombstone.metadata == stored[4].metadata
    assert store.items_of_product("p2") == []
    assert len(store.items_of_product("p2", include_deleted=True)) == 2
    assert {r.id for r in store.iter_records()} == {r.id for r in stored} - deleted
    assert len(list(store.iter_records(include_deleted=True))) == 6
    stats = store.stats()
    assert (stats["count"], stats["deleted"], stats["live"], stats["with_vectors"]) == (6, 3, 3, 6)
    # Writing a deleted item again brings it back.
    revived = store.put([ItemRecord(**_fields(stored[4]))])[0]
    assert not revived.deleted and revived.deleted_at is None
    assert set(store.deleted_ids()) == deleted - {stored[4].id}


@pytest.mark.parametrize("block_size", [1, 3, 7, 1000])
def test_iter_blocks_streams_live_items_with_vectors(store, block_size):
    vectors = make_vectors(20)
    stored = store.put(make_records(20), vectors)
    store.put(make_records(22)[20:])  # records without vectors are not indexable
    store.mark_deleted([stored[3].id, stored[11].id])
    blocks = list(store.iter_blocks(block_size))
    assert all(0 < len(ids) <= block_size for ids, _ in blocks)
    ids = np.concatenate([ids for ids, _ in blocks])
    got = np.concatenate([vecs for _, vecs in blocks])
    assert ids.dtype == np.int64 and got.dtype == np.float32 and got.shape == (18, DIM)
    assert list(ids) == sorted(ids)
    expected = {r.id: v for r, v in zip(stored, vectors) if r.id not in (stored[3].id, stored[11].id)}
    assert set(ids.tolist()) == set(expected)
    for item, vector in zip(ids.tolist(), got):
        np.testing.assert_array_equal(vector, expected[item])


def test_iter_blocks_of_an_empty_store(store):
    assert list(store.iter_blocks(10)) == []
    with pytest.raises(BadInput, match="0"):
        list(store.iter_blocks(0))


def test_writes_can_interleave_with_a_scan_in_the_same_process(store):
    stored = store.put(make_records(50), make_vectors(50))
    for i, live_id in enumerate(store.iter_live_ids(chunk=7)):
        if i % 2:
            store.mark_deleted([live_id])
    assert store.stats()["deleted"] == 25
    assert store.stats()["count"] == len(stored)


# ---------------------------------------------------------------- locking, growth


def test_second_writer_gets_a_clear_error_naming_the_holder(tmp_path):
    path = tmp_path / "s"
    holder = subprocess.Popen([sys.executable, str(HELPER), "hold-lock", str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLocked, match=f"pid {holder.pid}"):
            CatalogStore.create_or_open(path)
        with CatalogStore.open_readonly(path) as reader:  # readers are never blocked
            assert reader.stats()["count"] == 0
    finally:
        holder.kill()
        holder.wait()
    # The kernel drops the flock of a dead holder.
    with CatalogStore.create_or_open(path) as store:
        assert store.stats()["count"] == 0


def test_second_writer_in_the_same_process_is_refused(store):
    with pytest.raises(StoreLocked, match=f"pid {os.getpid()}"):
        CatalogStore.create_or_open(store.path)


def test_readonly_store_refuses_writes(tmp_path):
    # One handle per process: a process that writes reads through its writer.
    with CatalogStore.create_or_open(tmp_path / "s"), pytest.raises(store_module.StoreError, match="already open"):
        CatalogStore.open_readonly(tmp_path / "s")
    with CatalogStore.open_readonly(tmp_path / "s") as reader, pytest.raises(store_module.StoreError, match="read-only"):
        reader.put(make_records(1), make_vectors(1))


def test_map_grows_as_needed_and_other_processes_still_read(tmp_path):
    path = tmp_path / "s"
    initial = 64 << 10
    stored = []
    with CatalogStore.create_or_open(path, vector_dtype="float32", initial_map_size=initial) as store:
        assert store.map_size == initial
        for batch in range(10):
            records = make_records(400, product_of=lambda i, b=batch: f"b{b}-{i}", metadata_bytes=200)
            records = [ItemRecord(**{**_fields(r), "image": f"{batch}/{r.image}"}) for r in records]
            stored += store.put(records, make_vectors(400, seed=batch))
        grown = store.map_size
        assert grown >= initial * 2**4, "the map should have doubled several times"
        assert store.stats()["count"] == 4000
    # A reader whose own map is smaller than the data adopts the grown size.
    code = (
        "import sys; from index.store import CatalogStore\n"
        f"s = CatalogStore.open_readonly({str(path)!r}, map_size={initial})\n"
        "print(s.stats()['count'], sum(len(ids) for ids, _ in s.iter_blocks(1000)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["4000", "4000"]
    # Reopening for writing starts from the grown size, not the small initial one.
    with CatalogStore.create_or_open(path, initial_map_size=initial) as store:
        assert store.map_size >= (path / "data.mdb").stat().st_size
        np.testing.assert_array_equal(store.vectors_for([stored[-1].id]), make_vectors(400, seed=9)[-1:])
