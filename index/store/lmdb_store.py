"""The catalog store: one directory, ``STORE/``, holding an LMDB environment.

Layout of the LMDB environment (named databases; keys of items are 8-byte
big-endian ids so cursors walk them in id order):

| db           | key                            | value                                   |
|--------------|--------------------------------|-----------------------------------------|
| ``meta``     | ``b"store"``                   | JSON: format, dim, vector_dtype, created_at, model, model_checkpoint |
| ``items``    | id                             | JSON :class:`ItemRecord`                |
| ``vectors``  | id                             | raw ``dim`` floats of ``vector_dtype``  |
| ``deleted``  | id                             | empty (tombstone index)                 |
| ``products`` | blake2b-16(product_id) + id    | empty (product -> ids index)            |

Next to the environment: ``write.lock`` (flock held by the one writer, holding
its pid) and ``rejects.jsonl`` (written by :mod:`index.store.catalog`).

A record and its vector are always written in the same transaction, so a
reader (or a writer killed mid-ingest) never sees one without the other.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Self

import lmdb
import numpy as np

from imgsearch.clock import utc_now
from imgsearch.errors import BadInput
from index.store.pidlock import StoreWriteLock
from index.store.records import (
    ID_MASK,
    MAX_ID_SALTS,
    ItemRecord,
    StoreError,
    StoreNotFound,
    id_of,
    item_id,
    key_of,
    product_prefix,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
VECTOR_DTYPES = ("float16", "float32")
DEFAULT_VECTOR_DTYPE = "float16"
DEFAULT_MAP_SIZE = 64 << 20
# Readers map far more than the file holds: a read-only shared mapping costs no
# memory, and the writer can grow the file this far before a reader must remap.
READER_MAP_SIZE = 1 << 40
# Doubling from 64 MiB reaches exabytes long before this; a bound turns a
# runaway loop into an error.
MAX_MAP_GROWTHS = 48

_STORE_KEY = b"store"
_DB_NAMES = (b"meta", b"items", b"vectors", b"deleted", b"products")
# ---------------------------------------------------------------- the store


class CatalogStore:
    """Items, metadata and vectors of one catalog. Open with :meth:`create_or_open` (the one
    writer) or :meth:`open_readonly` (any number of readers, in any process, concurrently)."""

    def __init__(self, path: Path, env: lmdb.Environment, dbs: dict[bytes, Any], readonly: bool, lock: StoreWriteLock | None):
        self.path = path
        self.readonly = readonly
        self._env = env
        self._dbs = dbs
        self._lock = lock
        self._meta = self._read_meta()

    # -- opening

    @classmethod
    def create_or_open(
        cls,
        path: str | os.PathLike,
        *,
        dim: int | None = None,
        vector_dtype: str | None = None,
        initial_map_size: int = DEFAULT_MAP_SIZE,
    ) -> CatalogStore:
        """Open ``path`` for writing, creating it if needed. Raises :class:`StoreLocked` if another
        writer holds it. ``dim`` may be left None and is then fixed by the first vectors written;
        ``vector_dtype`` (default float16) is fixed at creation."""
        path = Path(path)
        if vector_dtype is not None and vector_dtype not in VECTOR_DTYPES:
            raise BadInput(f"vector_dtype {vector_dtype!r} is not one of {', '.join(VECTOR_DTYPES)}")
        if dim is not None and (not isinstance(dim, int) or dim < 1):
            raise BadInput(f"dim {dim!r} is not a positive integer")
        if path.exists() and not path.is_dir():
            raise BadInput(f"store path {str(path)!r} exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        lock = StoreWriteLock(path / "write.lock")
        lock.acquire()
        env = None
        try:
            env = cls._open_env(path, readonly=False, map_size=cls._writer_map_size(path, initial_map_size))
            # Reader slots of killed processes would otherwise pin old pages forever.
            env.reader_check()
            dbs = {name: env.open_db(name) for name in _DB_NAMES}
            store = cls(path, env, dbs, readonly=False, lock=lock)
            store._init_meta(dim, vector_dtype)
        except BaseException:
            if env is not None:
                env.close()
            lock.release()
            raise
        return store

    @classmethod
    def open_readonly(cls, path: str | os.PathLike, *, map_size: int = READER_MAP_SIZE) -> CatalogStore:
        """Open an existing store for reading; safe while a writer in another process writes."""
        path = Path(path)
        if not (path / "data.mdb").is_file():
            raise StoreNotFound(f"no catalog store at {str(path)!r} (no data.mdb); create it with `imgsearch embed`")
        env = cls._open_env(path, readonly=True, map_size=map_size)
        try:
            dbs = {name: env.open_db(name, create=False) for name in _DB_NAMES}
        except lmdb.NotFoundError:
            env.close()
            raise StoreNotFound(f"{str(path)!r} is an LMDB environment but not a catalog store") from None
        return cls(path, env, dbs, readonly=True, lock=None)

    @staticmethod
    def _open_env(path: Path, *, readonly: bool, map_size: int) -> lmdb.Environment:
        try:
            return lmdb.open(
                str(path), subdir=True, readonly=readonly, lock=True, map_size=map_size,
                max_dbs=len(_DB_NAMES), max_readers=512,
            )
        except lmdb.Error as exc:
            # Typically "already open in this process": py-lmdb allows one handle per
            # environment per process, so a process that writes must also read through its writer.
            raise StoreError(f"cannot open store {str(path)!r}: {exc}") from None

    @staticmethod
    def _writer_map_size(path: Path, initial_map_size: int) -> int:
        # Reopening an existing store: start at its size, or the first write would fail and grow.
        data = path / "data.mdb"
        existing = data.stat().st_size if data.exists() else 0
        return max(initial_map_size, existing)

    def _read_meta(self) -> dict[str, Any]:
        with self._begin_read() as txn:
            raw = txn.get(_STORE_KEY, db=self._dbs[b"meta"])
        return json.loads(raw) if raw else {}

    def _init_meta(self, dim: int | None, vector_dtype: str | None) -> None:
        meta = self._meta
        if not meta:
            meta = {"format": FORMAT_VERSION, "dim": dim, "vector_dtype": vector_dtype or DEFAULT_VECTOR_DTYPE, "created_at": utc_now()}
            self._write(lambda txn: txn.put(_STORE_KEY, json.dumps(meta).encode(), db=self._dbs[b"meta"]))
            self._meta = meta
            return
        if meta.get("format") != FORMAT_VERSION:
            raise StoreError(f"store {str(self.path)!r} has format {meta.get('format')!r}; this code reads format {FORMAT_VERSION}")
        if vector_dtype is not None and vector_dtype != meta["vector_dtype"]:
            raise BadInput(f"store {str(self.path)!r} holds {meta['vector_dtype']} vectors, not {vector_dtype!r}")
        if dim is not None and meta["dim"] is not None and dim != meta["dim"]:
            raise BadInput(f"store {str(self.path)!r} holds vectors of dim {meta['dim']}, not {dim!r}")
        if dim is not None and meta["dim"] is None:
            self._set_dim_meta(dim)

    def _set_dim_meta(self, dim: int) -> None:
        meta = {**self._meta, "dim": dim}
        self._write(lambda txn: txn.put(_STORE_KEY, json.dumps(meta).encode(), db=self._dbs[b"meta"]))
        self._meta = meta

    def _current_meta(self) -> dict[str, Any]:
        if self.readonly and self._meta.get("dim") is None:
            # A reader may have opened before the writer's first vectors fixed the dim.
            self._meta = self._read_meta()
        return self._meta

    @property
    def dim(self) -> int | None:
        return self._current_meta().get("dim")

    @property
    def vector_dtype(self) -> str:
        return self._current_meta().get("vector_dtype", DEFAULT_VECTOR_DTYPE)

    @property
    def model(self) -> str | None:
        """Hash of the embedder whose vectors the store holds, set by a completed ingest."""
        if self.readonly:
            self._meta = self._read_meta()
        return self._meta.get("model")

    @property
    def model_checkpoint(self) -> str | None:
        """Absolute path of the checkpoint that made the vectors (None: the built-in model)."""
        return (self._read_meta() if self.readonly else self._meta).get("model_checkpoint")

    def set_model(self, model: str | None, checkpoint: str | None = None) -> None:
        meta = {**self._meta, "model": model, "model_checkpoint": checkpoint}
        self._write(lambda txn: txn.put(_STORE_KEY, json.dumps(meta).encode(), db=self._dbs[b"meta"]))
        self._meta = meta

    @property
    def generation(self) -> int:
        """LMDB's last committed write transaction id: changes whenever stored data changes."""
        return int(self._env.info()["last_txnid"])

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- transactions

    def _begin_read(self) -> lmdb.Transaction:
        try:
            return self._env.begin()
        except lmdb.MapResizedError:
            # The writer grew the file past our mapping; adopt its size. Needs no other
            # transaction open in this process, which short per-call transactions ensure.
            self._env.set_mapsize(0)
            return self._env.begin()

    def _write(self, write_fn):
        """Run ``write_fn(txn)`` in one write transaction, growing the map and retrying on MapFull.

        ``write_fn`` must be safe to re-run: the aborted attempt leaves nothing behind."""
        if self.readonly:
            raise StoreError(f"store {str(self.path)!r} is open read-only")
        for _ in range(MAX_MAP_GROWTHS):
            try:
                with self._env.begin(write=True) as txn:
                    return write_fn(txn)
            except lmdb.MapFullError:
                self._grow_map()
        raise StoreError(f"store {str(self.path)!r} map size {self.map_size} still too small after {MAX_MAP_GROWTHS} doublings")

    def _grow_map(self) -> None:
        new_size = self.map_size * 2
        log.info("store %s: map full, growing map to %d MiB", self.path, new_size >> 20)
        self._env.set_mapsize(new_size)

    @property
    def map_size(self) -> int:
        return self._env.info()["map_size"]

    # -- ids

    def _find_id_in_txn(self, txn, product_id: str, image: str, *, claim: bool) -> int | None:
        """The id owned by (product_id, image): walk salts past ids owned by other items.

        With ``claim`` the first free id is returned for a new item; without, None."""
        items = self._dbs[b"items"]
        for salt in range(MAX_ID_SALTS):
            candidate = item_id(product_id, image, salt)
            raw = txn.get(key_of(candidate), db=items)
            if raw is None:
                return candidate if claim else None
            owner = ItemRecord.from_json(raw)
            if owner.product_id == product_id and owner.image == image:
                return candidate
            log.debug("item id collision: %d owned by (%r, %r), rehashing (%r, %r) with salt %d",
                        candidate, owner.product_id, owner.image, product_id, image, salt + 1)
        raise StoreError(f"no free id for ({product_id!r}, {image!r}) after {MAX_ID_SALTS} salts")

    def find_id(self, product_id: str, image: str) -> int | None:
        """The id of a stored item (deleted or not), or None if the item was never stored."""
        with self._begin_read() as txn:
            return self._find_id_in_txn(txn, product_id, image, claim=False)

    def find_records(self, pairs: Iterable[tuple[str, str]]) -> list[ItemRecord | None]:
        """Stored records of many (product_id, image) pairs, in one read transaction."""
        with self._begin_read() as txn:
            found = []
            for product_id, image in pairs:
                found_id = self._find_id_in_txn(txn, product_id, image, claim=False)
                found.append(None if found_id is None else self._get_in_txn(txn, found_id))
            return found

    def has_vectors(self, ids: Iterable[int]) -> list[bool]:
        with self._begin_read() as txn:
            return [self._get_vector_in_txn(txn, int(i)) is not None for i in ids]

    def _get_vector_in_txn(self, txn, item_id_: int) -> bytes | None:
        if not 0 <= item_id_ <= ID_MASK:
            return None
        return txn.get(key_of(item_id_), db=self._dbs[b"vectors"])

    # -- writing

    def put(self, records: list[ItemRecord], vectors: np.ndarray | None = None) -> list[ItemRecord]:
        """Write ``records`` (and, aligned with them, ``vectors``) in one transaction.

        Ids come from (product_id, image), never from ``record.id``. ``vectors=None`` updates
        the records and keeps stored vectors. Returns the records as stored."""
        records = list(records)
        if not records:
            return []
        encoded = None if vectors is None else self._encode_vectors(vectors, len(records))
        if encoded is not None and self.dim is None:
            self._set_dim_meta(encoded.shape[1])
        now = utc_now()
        return self._write(lambda txn: [self._put_in_txn(txn, rec, None if encoded is None else encoded[i], now)
                                        for i, rec in enumerate(records)])

    def _encode_vectors(self, vectors: np.ndarray, count: int) -> np.ndarray:
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[0] != count or vectors.shape[1] < 1:
            raise BadInput(f"vectors of shape {vectors.shape} do not match {count} records")
        if self.dim is not None and vectors.shape[1] != self.dim:
            raise BadInput(f"vectors of dim {vectors.shape[1]} do not fit store {str(self.path)!r} of dim {self.dim}")
        if not np.issubdtype(vectors.dtype, np.number):
            raise BadInput(f"vectors have non-numeric dtype {vectors.dtype}")
        encoded = np.ascontiguousarray(vectors, dtype=self.vector_dtype)
        if not np.isfinite(encoded).all():
            bad = int(np.flatnonzero(~np.isfinite(encoded).all(axis=1))[0])
            raise BadInput(f"vector {bad} has NaN/inf values (or overflows {self.vector_dtype}): {vectors[bad][:8]}...")
        return encoded

    def _put_in_txn(self, txn, record: ItemRecord, vector: np.ndarray | None, now: str) -> ItemRecord:
        new_id = self._find_id_in_txn(txn, record.product_id, record.image, claim=True)
        key = key_of(new_id)
        old = self._get_in_txn(txn, new_id)
        stored = dataclasses.replace(
            record,
            id=new_id,
            created_at=old.created_at if old else now,
            updated_at=now,
            deleted_at=(old.deleted_at if old and old.deleted else now) if record.deleted else None,
        )
        txn.put(key, stored.to_json(), db=self._dbs[b"items"])
        txn.put(product_prefix(stored.product_id) + key, b"", db=self._dbs[b"products"])
        if stored.deleted:
            txn.put(key, b"", db=self._dbs[b"deleted"])
        else:
            txn.delete(key, db=self._dbs[b"deleted"])
        if vector is not None:
            txn.put(key, vector.tobytes(), db=self._dbs[b"vectors"])
        return stored

    def mark_deleted(self, ids: Iterable[int], *, source: str | None = None) -> int:
        """Tombstone items by id (record and vector stay). Returns how many were newly deleted;
        unknown and already-deleted ids are ignored. ``source``: the deleter, recorded as the writer."""
        ids = [int(i) for i in ids]
        now = utc_now()
        return self._write(lambda txn: sum(self._tombstone_in_txn(txn, i, now, source) for i in ids))

    def _tombstone_in_txn(self, txn, item_id_: int, now: str, source: str | None = None) -> bool:
        record = self._get_in_txn(txn, item_id_)
        if record is None or record.deleted:
            return False
        stored = dataclasses.replace(record, deleted=True, deleted_at=now, updated_at=now, source=source or record.source)
        txn.put(key_of(item_id_), stored.to_json(), db=self._dbs[b"items"])
        txn.put(key_of(item_id_), b"", db=self._dbs[b"deleted"])
        return True

    def delete_product(self, product_id: str) -> int:
        """Tombstone every image of ``product_id``. Returns how many were newly deleted."""
        return self.mark_deleted(record.id for record in self.items_of_product(product_id))

    # -- reading

    def _get_in_txn(self, txn, item_id_: int) -> ItemRecord | None:
        if not 0 <= item_id_ <= ID_MASK:  # e.g. faiss's -1 padding: never an item
            return None
        raw = txn.get(key_of(item_id_), db=self._dbs[b"items"])
        return None if raw is None else ItemRecord.from_json(raw)

    def get(self, item_id_: int) -> ItemRecord | None:
        """The record of ``item_id_``, deleted or not; None if unknown."""
        with self._begin_read() as txn:
            return self._get_in_txn(txn, int(item_id_))

    def get_many(self, ids: Iterable[int]) -> list[ItemRecord | None]:
        with self._begin_read() as txn:
            return [self._get_in_txn(txn, int(i)) for i in ids]

    def items_of_product(self, product_id: str, *, include_deleted: bool = False) -> list[ItemRecord]:
        prefix = product_prefix(product_id)
        with self._begin_read() as txn:
            cursor = txn.cursor(db=self._dbs[b"products"])
            records = []
            if cursor.set_range(prefix):
                for key in cursor.iternext(keys=True, values=False):
                    if not key.startswith(prefix):
                        break
                    record = self._get_in_txn(txn, id_of(key[len(prefix):]))
                    # Compare the id itself too: the 128-bit prefix is a hash.
                    if record and record.product_id == product_id and (include_deleted or not record.deleted):
                        records.append(record)
            return records

    def product_vectors(self, product_id: str) -> tuple[list[int], np.ndarray]:
        """The product's live items that have a stored vector: their ids, and those vectors as float32 (n, dim)."""
        records = self.items_of_product(product_id)
        with self._begin_read() as txn:
            found = [(r.id, raw) for r in records if (raw := self._get_vector_in_txn(txn, r.id)) is not None]
        return [i for i, _ in found], self._decode_vectors([raw for _, raw in found])

    def vectors_for(self, ids: Iterable[int]) -> np.ndarray:
        """Stored vectors of ``ids`` as float32 (n, dim), deleted items included.

        Raises KeyError naming the ids that have no stored vector."""
        ids = [int(i) for i in ids]
        with self._begin_read() as txn:
            raws = [self._get_vector_in_txn(txn, i) for i in ids]
        missing = [i for i, raw in zip(ids, raws) if raw is None]
        if missing:
            raise KeyError(f"no stored vector for {len(missing)} id(s): {missing[:10]}")
        return self._decode_vectors(raws)

    def _decode_vectors(self, raws: list[bytes]) -> np.ndarray:
        if not raws:
            return np.empty((0, self.dim or 0), dtype=np.float32)
        flat = np.frombuffer(b"".join(raws), dtype=self.vector_dtype)
        return flat.reshape(len(raws), self.dim).astype(np.float32)

    def _iter_keys(self, db_name: bytes, chunk: int) -> Iterator[list[tuple[bytes, bytes, bool]]]:
        """(key, value, is_deleted) of one db in key order, a chunk per short read transaction.

        Short transactions keep a long scan from pinning old pages (the writer's file would
        grow meanwhile) and let this process adopt a grown map between chunks. The scan is
        therefore not one snapshot: items written meanwhile past the cursor are seen."""
        after: bytes | None = None
        while True:
            with self._begin_read() as txn:
                cursor = txn.cursor(db=self._dbs[db_name])
                positioned = cursor.set_range(after) if after is not None else cursor.first()
                if positioned and after is not None and cursor.key() == after:
                    positioned = cursor.next()
                pairs = []
                while positioned and len(pairs) < chunk:
                    pairs.append((cursor.key(), cursor.value()))
                    positioned = cursor.next()
                deleted = {key for key, _ in pairs if txn.get(key, db=self._dbs[b"deleted"]) is not None}
            if not pairs:
                return
            yield [(key, value, key in deleted) for key, value in pairs]
            after = pairs[-1][0]

    def iter_blocks(self, block_size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids int64 (n,), vectors float32 (n, dim)) of live items with vectors, in id
        order, at most ``block_size`` per block; memory is bounded by one block."""
        if block_size < 1:
            raise BadInput(f"block_size {block_size!r} must be >= 1")
        for chunk in self._iter_keys(b"vectors", block_size):
            live = [(key, raw) for key, raw, deleted in chunk if not deleted]
            if live:
                ids = np.fromiter((id_of(key) for key, _ in live), dtype=np.int64, count=len(live))
                yield ids, self._decode_vectors([raw for _, raw in live])

    def iter_records(self, *, include_deleted: bool = False, chunk: int = 4096) -> Iterator[ItemRecord]:
        for pairs in self._iter_keys(b"items", chunk):
            for _, raw, deleted in pairs:
                if include_deleted or not deleted:
                    yield ItemRecord.from_json(raw)

    def iter_live_ids(self, chunk: int = 65536) -> Iterator[int]:
        """Ids of items not deleted (with or without a vector)."""
        for pairs in self._iter_keys(b"items", chunk):
            yield from (id_of(key) for key, _raw, deleted in pairs if not deleted)

    def deleted_ids(self, chunk: int = 65536) -> Iterator[int]:
        for pairs in self._iter_keys(b"deleted", chunk):
            yield from (id_of(key) for key, _raw, _deleted in pairs)

    def stats(self) -> dict[str, Any]:
        with self._begin_read() as txn:
            count = txn.stat(self._dbs[b"items"])["entries"]
            deleted = txn.stat(self._dbs[b"deleted"])["entries"]
            with_vectors = txn.stat(self._dbs[b"vectors"])["entries"]
        return {
            "path": str(self.path),
            "count": count,
            "deleted": deleted,
            "live": count - deleted,
            "with_vectors": with_vectors,
            "dim": self.dim,
            "vector_dtype": self.vector_dtype,
            "model": self.model,
            "model_checkpoint": self.model_checkpoint,
            "map_size": self.map_size,
        }
