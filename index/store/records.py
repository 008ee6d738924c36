"""Catalog items: their stable int64 ids, the record stored per image, the store's errors, and
the join of search hits to distinct products."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from typing import Any

import numpy as np

from imgsearch.errors import BadInput, ImgsearchError


class StoreError(ImgsearchError):
    """The store cannot be opened or written (missing, locked, inconsistent)."""
    code = "store_error"


class StoreNotFound(StoreError, BadInput):
    code = "store_not_found"
    exit_status = 2


class StoreLocked(StoreError):
    """Another process holds the store's write lock."""
    code = "store_locked"


# ---------------------------------------------------------------- ids

# Salted rehashes tried before giving up on an id; one collision in 2**63 is
# already rare, several in a row mean the hash function is broken.
MAX_ID_SALTS = 64
ID_MASK = (1 << 63) - 1

ID_STRUCT = struct.Struct(">Q")


# ---------------------------------------------------------------- ids


def _hash64(payload: bytes) -> int:
    """63-bit non-negative hash; a module function so tests can force collisions."""
    digest = hashlib.blake2b(payload, digest_size=8, person=b"imgsearch-item").digest()
    return int.from_bytes(digest, "big") & ID_MASK


def _id_payload(product_id: str, image: str, salt: int) -> bytes:
    # Length-prefixed fields: no choice of strings can make two pairs encode alike.
    pid, img = product_id.encode("utf-8"), image.encode("utf-8")
    return b"".join((struct.pack(">I", len(pid)), pid, struct.pack(">I", len(img)), img, struct.pack(">I", salt)))


def item_id(product_id: str, image: str, salt: int = 0) -> int:
    """The stable int64 id of the catalog item (product_id, image path as given in the catalog).

    Non-negative and below 2**63, so it is a valid faiss id and never the -1 padding.
    The store uses ``salt`` > 0 only when a different item already owns the salt-0 id.
    """
    return _hash64(_id_payload(product_id, image, salt))


def key_of(item_id_: int) -> bytes:
    return ID_STRUCT.pack(item_id_)


def id_of(key: bytes) -> int:
    return ID_STRUCT.unpack(key)[0]


def product_prefix(product_id: str) -> bytes:
    # Fixed-width prefix: LMDB keys are capped at 511 bytes, product ids are not.
    return hashlib.blake2b(product_id.encode("utf-8"), digest_size=16).digest()


# ---------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class ItemRecord:
    """One catalog image. ``id`` and the timestamps are assigned by the store on write."""
    product_id: str
    image: str  # the path as given in the catalog
    path: str = ""  # the resolved absolute path it was read from
    category: str | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    content_hash: str = ""  # sha256 hex of the image file's bytes
    deleted: bool = False
    id: int | None = None
    created_at: str | None = None
    updated_at: str | None = None
    deleted_at: str | None = None
    model: str | None = None  # hash of the embedder that made the stored vector (None: unknown)
    # Who wrote it last: "catalog:<abs path>" or "api" (index.store.ownership); None: written before owners were recorded.
    source: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> ItemRecord:
        return cls(**json.loads(data))

    def same_content_and_fields(self, other: ItemRecord) -> bool:
        """True when writing ``other`` over ``self`` would change nothing but timestamps."""
        fields = ("product_id", "image", "path", "category", "metadata", "content_hash", "deleted")
        return all(getattr(self, name) == getattr(other, name) for name in fields)


def product_results(store, scores: np.ndarray, ids: np.ndarray, k: int) -> list[dict]:
    """Search hits (best first, -1 padded) -> up to ``k`` distinct live products, each at its best image's score.

    Records are read in chunks, so a query whose first k hits are k products decodes k records,
    not all of them; deleted items and ids the store no longer has are skipped.
    """
    valid = ids >= 0
    ids, scores = ids[valid].tolist(), scores[valid].tolist()
    best: dict[str, dict] = {}
    start = 0
    while start < len(ids) and len(best) < k:
        chunk = max(8, (k - len(best)) + (k - len(best)) // 4)
        for score, record in zip(scores[start:start + chunk], store.get_many(ids[start:start + chunk])):
            if record is None or record.deleted or record.product_id in best:
                continue
            best[record.product_id] = {"product_id": record.product_id, "score": round(float(score), 6),
                                       "category": record.category, "image": record.image, "metadata": record.metadata}
            if len(best) == k:
                break
        start += chunk
    return list(best.values())
