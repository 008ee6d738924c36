"""Who owns a stored item, and the guard against a catalog run that would delete most of the store.

Each record names its writer in ``source``: ``"catalog:<absolute catalog path>"`` for the catalog
file whose run last wrote it, ``"api"`` for ``POST``/``DELETE /v1/products`` (an API delete keeps
the tombstoned record's fields and names the API as its writer). Records from before the field
existed have ``None``. The rule (docs/INTERFACE.md, "Who owns a product"), applied by
:mod:`index.store.ingest`:

- a catalog row the API overwrote or deleted since that catalog's last run is left as the API
  left it while the row itself is unchanged (same fields, same image bytes as the tombstoned
  record holds); a changed row, or a new row of that product, means the catalog wins the product
  back: its rows are stored again and the API's images of the product are tombstoned;
- a run tombstones only live items it owns (its own catalog, or no recorded owner) that its
  catalog no longer lists; never the API's, never another catalog's;
- a run that would tombstone more than :data:`MASS_DELETE_FRACTION` of the store's live items
  refuses before deleting anything (:class:`MassDeleteRefused`) unless allowed.
"""

from __future__ import annotations

import os
from pathlib import Path

from imgsearch.errors import JobFailed
from index.store.records import ItemRecord

API_SOURCE = "api"
CATALOG_PREFIX = "catalog:"
UPLOADS_DIR = "uploads"  # STORE/uploads/: images written through the API
MASS_DELETE_FRACTION = 0.10
ROW_FIELDS = ("product_id", "image", "category", "metadata", "content_hash")


class MassDeleteRefused(JobFailed):
    code = "mass_delete_refused"


def catalog_source(catalog_path: str | os.PathLike) -> str:
    """The owner name of a catalog file: its absolute path as given (a symlink is not followed,
    so a cron entry pointing at a link to each day's file stays one catalog)."""
    return CATALOG_PREFIX + os.path.abspath(catalog_path)


def owner_of(record: ItemRecord, store_path: str | os.PathLike) -> str | None:
    """The record's writer; a record from before owners were recorded whose image is one of the
    store's own uploads was written through the API."""
    if record.source:
        return record.source
    if record.image.startswith(UPLOADS_DIR + "/") and record.path:
        if Path(record.path).parent == (Path(store_path) / UPLOADS_DIR).resolve():
            return API_SOURCE
    return None


def same_row(old: ItemRecord, new: ItemRecord) -> bool:
    """True when ``new`` (built from a catalog row now) says what ``old`` says, deleted or not."""
    return all(getattr(old, name) == getattr(new, name) for name in ROW_FIELDS)


def check_mass_delete(count: int, live: int, *, store_path, catalog_path, allowed: bool,
                      fraction: float = MASS_DELETE_FRACTION) -> None:
    """Raise :class:`MassDeleteRefused` when tombstoning ``count`` of ``live`` items is over ``fraction``."""
    if allowed or count == 0 or count <= fraction * live:
        return
    raise MassDeleteRefused(
        f"refusing to delete {count} of the {live} live items in store {str(store_path)!r} "
        f"({count / max(live, 1):.0%}, over {fraction:.0%}): catalog {str(catalog_path)!r} no longer lists them; "
        f"nothing was deleted (rerun with --allow-mass-delete if that is intended)")
