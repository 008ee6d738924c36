"""The catalog store: reading catalog files, ingesting them, the LMDB store of records and
vectors, and the pid locks its writers take.

``catalog``: CSV / JSONL rows -> :class:`~index.store.catalog.CatalogRow` or a reject.
``ingest``: a catalog run against the store (what changed is embedded, stored, deleted).
``records``: item ids, :class:`ItemRecord`, the join of search hits to products.
``lmdb_store``: :class:`CatalogStore`. ``pidlock``: one writer at a time.
``ownership``: who wrote an item (a catalog file or the API), and the mass-delete guard.
"""

from index.store.lmdb_store import CatalogStore
from index.store.records import ItemRecord, StoreError, StoreLocked, StoreNotFound, item_id, product_results

__all__ = ["CatalogStore", "ItemRecord", "StoreError", "StoreLocked", "StoreNotFound", "item_id", "product_results"]
