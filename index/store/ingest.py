"""Ingesting a catalog into a :class:`CatalogStore`.

Ingest is resumable and idempotent: each batch of records and vectors is one
transaction, and an image whose bytes hash as before is not embedded again, so
re-running after a crash (or on an unchanged catalog) only does what is left.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Self

import numpy as np
from PIL import Image

from embed.image_io import DEFAULT_MAX_PIXELS, decode_image
from imgsearch.errors import BadInput, JobFailed
from imgsearch.progress import Progress
from index.store import ownership
from index.store.catalog import CSV_SUFFIXES, JSONL_SUFFIXES, REJECTS_FILE, CatalogRow, Reject, read_catalog
from index.store.lmdb_store import CatalogStore
from index.store.ownership import API_SOURCE, MASS_DELETE_FRACTION
from index.store.records import ItemRecord

log = logging.getLogger(__name__)

DELETE_CHUNK = 10_000

EmbedFn = Callable[[list[Image.Image]], np.ndarray]



@dataclasses.dataclass
class IngestSummary:
    added: int = 0  # new items, and deleted ones that came back
    changed: int = 0  # image bytes changed, or a product's image replaced by another file: re-embedded
    unchanged: int = 0  # nothing to do
    updated: int = 0  # same image, new category/metadata/path: record rewritten, not embedded
    deleted: int = 0  # stored items absent from this catalog (or the API's, replaced by it), now tombstoned
    rejected: int = 0
    api_owned: int = 0  # rows left as the API left them: it rewrote or deleted them since, and the row is unchanged
    seconds: float = 0.0
    rejects_path: str | None = None
    added_embedded: int = 0  # the part of ``added`` that needed embedding

    @property
    def embedded(self) -> int:
        return self.added_embedded + self.changed

    def counts(self) -> str:
        api = f"api-owned {self.api_owned}, " if self.api_owned else ""
        return (f"added {self.added}, changed {self.changed}, unchanged {self.unchanged}, updated {self.updated}, "
                f"deleted {self.deleted}, {api}rejected {self.rejected}")

    def line(self) -> str:
        text = self.counts()
        if self.rejected:
            text += f" (see {self.rejects_path})"
        return text + f" in {self.seconds:.1f} s"


@dataclasses.dataclass
class _PendingEmbed:
    record: ItemRecord
    image: Image.Image
    is_new: bool  # counts as added (new or revived), else as changed


def ingest_catalog(
    catalog_path: str | os.PathLike,
    store: CatalogStore,
    embed_fn: EmbedFn,
    batch_size: int = 64,
    progress: bool = True,
    *,
    mark_missing_deleted: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    model: str | None = None,
    allow_mass_delete: bool = False,
    max_delete_fraction: float = MASS_DELETE_FRACTION,
    model_checkpoint: str | os.PathLike | None = None,
) -> IngestSummary:
    """Bring ``store`` in line with the catalog: embed new and changed images with ``embed_fn``
    (list of RGB images -> float32 (n, dim)), rewrite changed records, and (with
    ``mark_missing_deleted``) tombstone stored items this catalog wrote and no longer lists.

    Ownership (:mod:`index.store.ownership`): records carry their writer; rows the API rewrote or
    deleted since are left alone unless the row changed, and other catalogs' items are never
    deleted. The deletes come last, counted first: more than ``max_delete_fraction`` of the
    store's live items raises :class:`~index.store.ownership.MassDeleteRefused` before any delete
    (the run's adds and updates are kept; ``rejects.jsonl`` and the store's model stay as they
    were) unless ``allow_mass_delete``.

    Bad rows go to ``STORE/rejects.jsonl`` (replaced at the end of each run) and the job goes on.

    ``model`` (the embedder's hash) is recorded on every embedded record and, once a run
    completes, in the store's meta. A stored vector is reused only when its record carries the
    same model: after a model change every item is embedded again (resumably: a killed run's
    re-embedded items are not redone), and live items left with another model's vector (rows
    rejected this run) are tombstoned, so the store never mixes two models' vectors.
    ``model_checkpoint`` (that model's file, None for the built-in one) is recorded beside it.
    """
    if batch_size < 1:
        raise BadInput(f"batch_size {batch_size!r} must be >= 1")
    if store.readonly:
        raise BadInput(f"store {str(store.path)!r} is open read-only; ingest needs CatalogStore.create_or_open")
    job = _Ingest(Path(catalog_path), store, embed_fn, batch_size, progress, max_pixels, model,
                  allow_mass_delete=allow_mass_delete, max_delete_fraction=max_delete_fraction)
    job.checkpoint = os.path.abspath(model_checkpoint) if model_checkpoint else None
    return job.run(mark_missing_deleted)


class _Ingest:
    def __init__(self, catalog_path: Path, store: CatalogStore, embed_fn: EmbedFn, batch_size: int, progress: bool,
                 max_pixels: int, model: str | None = None, *, allow_mass_delete: bool = False,
                 max_delete_fraction: float = MASS_DELETE_FRACTION):
        self.model = model
        # A model change (or a store of unknown model): no stored vector may be reused as is.
        self.model_changed = model is not None and store.model != model
        self.catalog_path = catalog_path
        self.catalog_dir = catalog_path.resolve().parent
        self.store = store
        self.embed_fn = embed_fn
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.summary = IngestSummary(rejects_path=str(store.path / REJECTS_FILE))
        self.rows_read = 0
        # Ids of stored items this catalog lists (rejected rows included: a bad row never
        # costs the item stored from an earlier good run). Also catches duplicate rows.
        self.seen_ids: set[int] = set()
        self.pending_embeds: list[_PendingEmbed] = []
        self.pending_new_pairs: dict[tuple[str, str], int] = {}  # not yet stored -> line
        self.pending_updates: list[ItemRecord] = []
        self.progress = _Progress(progress, catalog_path)
        self.source = ownership.catalog_source(catalog_path)
        # Rows the API holds (product -> rows), until this run finds the catalog changed that product.
        self.held: dict[str, list[tuple[CatalogRow, ItemRecord, bool]]] = {}
        self.won: set[str] = set()  # products whose catalog rows changed over the API's writes
        self.added_of_product: dict[str, int] = {}  # new images embedded this run, per product
        self.dropped_ids: list[int] = []  # catalog items this run tombstoned
        self.allow_mass_delete, self.max_delete_fraction = allow_mass_delete, max_delete_fraction

    def run(self, mark_missing_deleted: bool) -> IngestSummary:
        started = time.monotonic()
        rows = read_catalog(self.catalog_path)
        try:
            with _RejectsWriter(self.store.path / REJECTS_FILE) as rejects:
                self.rejects = rejects
                for chunk in _chunked(rows, self.batch_size):
                    self._process_chunk(chunk)
                    self._flush(final=False)
                    self.progress.update(len(chunk), self.summary)
                self._flush(final=True)
                self._delete(mark_missing_deleted)
                if self.model_changed or (self.model and self.store.model_checkpoint != self.checkpoint):
                    self.store.set_model(self.model, self.checkpoint)
                rejects.commit()
        finally:
            self.progress.close_bar()
        self.summary.seconds = time.monotonic() - started
        self.progress.log_done(self.summary)
        return self.summary

    def _process_chunk(self, chunk: list[CatalogRow | Reject]) -> None:
        self.rows_read += len(chunk)
        rows = [row for row in chunk if isinstance(row, CatalogRow)]
        stored = iter(self._lookup_stored(rows))
        for row in chunk:
            if isinstance(row, Reject):
                self._reject(row)
            else:
                self._process_row(row, *next(stored))

    def _lookup_stored(self, rows: list[CatalogRow]) -> list[tuple[ItemRecord | None, bool]]:
        """(stored record or None, whether it has a vector) for each row."""
        records = self.store.find_records((row.product_id, row.image) for row in rows)
        found_ids = [record.id for record in records if record is not None]
        has_vector = dict(zip(found_ids, self.store.has_vectors(found_ids)))
        return [(record, record is not None and has_vector[record.id]) for record in records]

    def _process_row(self, row: CatalogRow, old: ItemRecord | None, old_has_vector: bool) -> None:
        duplicate_of = self._duplicate_of(row, old)
        if duplicate_of is not None:
            self._reject(Reject(row.line, row.product_id, row.image, f"duplicate of {duplicate_of}: same product_id and image"))
            return
        self._apply_row(row, old, old_has_vector)

    def _apply_row(self, row: CatalogRow, old: ItemRecord | None, old_has_vector: bool, *, won: bool = False) -> None:
        path = (self.catalog_dir / row.image).resolve()
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self._reject(Reject(row.line, row.product_id, row.image, f"missing file: {str(path)!r}"))
            return
        except OSError as exc:
            self._reject(Reject(row.line, row.product_id, row.image, f"cannot read {str(path)!r}: {exc.strerror or exc}"))
            return
        record = ItemRecord(product_id=row.product_id, image=row.image, path=str(path), category=row.category,
                            metadata=row.metadata, content_hash=hashlib.sha256(data).hexdigest(), model=self.model,
                            source=self.source)
        if not won and not self._catalog_writes(row, record, old, old_has_vector):
            return
        same_model = self.model is None or (old is not None and old.model == self.model)
        if old is not None and old_has_vector and old.content_hash == record.content_hash and same_model:
            record = dataclasses.replace(record, model=old.model)
            self._keep_vector(record, old)
            return
        try:
            image = decode_image(data, max_pixels=self.max_pixels, name=str(path))
        except BadInput as exc:
            self._reject(Reject(row.line, row.product_id, row.image, f"{exc.code}: {exc}"))
            return
        self.pending_embeds.append(_PendingEmbed(record, image, is_new=old is None or old.deleted))
        if old is None:
            self.pending_new_pairs[(row.product_id, row.image)] = row.line

    def _catalog_writes(self, row: CatalogRow, record: ItemRecord, old: ItemRecord | None, old_has_vector: bool) -> bool:
        """Whether this run writes the row; False holds it: the API rewrote or deleted it since, and it is unchanged."""
        product = row.product_id
        if old is None or (old.deleted and old.source != API_SOURCE):
            # New to the store, or back in the catalog: a catalog change, which wins a product the API wrote.
            if product not in self.won and self._api_wrote(product):
                self._win(product)
            return True
        if old.source != API_SOURCE:
            return True
        if product in self.won or not ownership.same_row(old, record) or self._catalog_holds(product):
            self._win(product)
            return True
        self.held.setdefault(product, []).append((row, old, old_has_vector))
        self.summary.api_owned += 1
        return False

    def _api_wrote(self, product_id: str) -> bool:
        return any(ownership.owner_of(r, self.store.path) == API_SOURCE
                   for r in self.store.items_of_product(product_id, include_deleted=True))

    def _catalog_holds(self, product_id: str) -> bool:
        """A live catalog item of the product: a catalog already won it back (a run killed midway did)."""
        return any(ownership.owner_of(r, self.store.path) != API_SOURCE for r in self.store.items_of_product(product_id))

    def _win(self, product_id: str) -> None:
        """The catalog takes the product back: the API's live images of it go first (so a run killed
        here finds the changed row still the API's and wins again), then the rows held so far are written."""
        if product_id in self.won:
            return
        self.won.add(product_id)
        api_live = [r.id for r in self.store.items_of_product(product_id)
                    if ownership.owner_of(r, self.store.path) == API_SOURCE]
        if api_live:
            self.summary.deleted += self.store.mark_deleted(api_live, source=self.source)
        for row, old, old_has_vector in self.held.pop(product_id, []):
            self.summary.api_owned -= 1
            self._apply_row(row, old, old_has_vector, won=True)

    def _duplicate_of(self, row: CatalogRow, old: ItemRecord | None) -> str | None:
        if old is None:
            line = self.pending_new_pairs.get((row.product_id, row.image))
            return None if line is None else f"line {line}"
        if old.id in self.seen_ids:
            return "an earlier row"
        self.seen_ids.add(old.id)
        return None

    def _keep_vector(self, record: ItemRecord, old: ItemRecord) -> None:
        if old.same_content_and_fields(record):
            if old.source != record.source:  # this catalog now owns it (a record from before owners, or another catalog's)
                self.pending_updates.append(record)
            self.summary.unchanged += 1
        elif old.deleted:
            self.pending_updates.append(record)
            self.summary.added += 1
        else:
            self.pending_updates.append(record)
            self.summary.updated += 1

    def _reject(self, reject: Reject) -> None:
        self.rejects.write(reject)
        self.summary.rejected += 1

    def _flush(self, *, final: bool) -> None:
        """Store pending updates, and embed whole batches (the last, partial one when ``final``).

        Only called between chunks, so every chunk's lookups see all earlier rows stored."""
        if self.pending_updates:
            self.store.put(self.pending_updates)
            self.pending_updates = []
        while len(self.pending_embeds) >= self.batch_size or (final and self.pending_embeds):
            batch, self.pending_embeds = self.pending_embeds[: self.batch_size], self.pending_embeds[self.batch_size:]
            self._embed_and_store(batch)

    def _embed_and_store(self, batch: list[_PendingEmbed]) -> None:
        vectors = self._embed([pending.image for pending in batch])
        stored = self.store.put([pending.record for pending in batch], vectors)
        for pending, record in zip(batch, stored):
            self.seen_ids.add(record.id)
            self.pending_new_pairs.pop((record.product_id, record.image), None)
            if pending.is_new:
                self.summary.added += 1
                self.summary.added_embedded += 1
                self.added_of_product[record.product_id] = self.added_of_product.get(record.product_id, 0) + 1
            else:
                self.summary.changed += 1

    def _embed(self, images: list[Image.Image]) -> np.ndarray:
        vectors = self.embed_fn(images)
        shape = getattr(vectors, "shape", None)
        if shape is None or len(shape) != 2 or shape[0] != len(images):
            raise JobFailed(f"embed_fn returned shape {shape} for {len(images)} images; expected ({len(images)}, dim)")
        vectors = np.asarray(vectors, dtype=np.float32)
        if not np.isfinite(vectors).all():
            raise JobFailed(f"embed_fn returned NaN/inf values for a batch of {len(images)} images")
        return vectors

    def _delete(self, mark_missing_deleted: bool) -> None:
        """Tombstone what this run drops, after counting it against the mass-delete guard."""
        missing = mark_missing_deleted
        if missing and self.rows_read == 0:
            # An empty file is far likelier a mistake than a request to delete everything.
            log.warning("catalog %s has no rows; not deleting the %d stored items", self.catalog_path, self.store.stats()["live"])
            missing = False
        if not missing and not self.model_changed:
            return
        count = self._deletes_not_replaced(missing)
        ownership.check_mass_delete(count, self.store.stats()["live"], store_path=self.store.path,
                                    catalog_path=self.catalog_path, allowed=self.allow_mass_delete,
                                    fraction=self.max_delete_fraction)
        for chunk in _chunked(self._doomed(missing), DELETE_CHUNK):
            self.summary.deleted += self.store.mark_deleted(chunk)
            if self.added_of_product:
                self.dropped_ids.extend(chunk)
        self._count_replaced_images()

    def _deletes_not_replaced(self, missing: bool) -> int:
        """What the guard counts: drops, less those that pair with an image added to the same product
        (a replaced image is a change, as the summary reports it)."""
        if not self.added_of_product:
            return sum(1 for _ in self._doomed(missing))
        dropped: dict[str | None, int] = {}
        for chunk in _chunked(self._doomed(missing), DELETE_CHUNK):
            for record in self.store.get_many(chunk):
                key = record.product_id if record is not None else None
                dropped[key] = dropped.get(key, 0) + 1
        return sum(n - min(n, self.added_of_product.get(p, 0)) for p, n in dropped.items())

    def _count_replaced_images(self) -> None:
        """A product whose image was replaced by another file shows up as one image added and one
        dropped; the user sees one changed image, so count each such add/drop pair as changed."""
        if not self.added_of_product:
            return
        dropped: dict[str, int] = {}
        for chunk in _chunked(self.dropped_ids, DELETE_CHUNK):
            for record in self.store.get_many(chunk):
                if record is not None and record.product_id in self.added_of_product:
                    dropped[record.product_id] = dropped.get(record.product_id, 0) + 1
        for product, n in dropped.items():
            replaced = min(n, self.added_of_product[product])
            self.summary.added -= replaced
            self.summary.added_embedded -= replaced
            self.summary.deleted -= replaced
            self.summary.changed += replaced

    def _doomed(self, missing: bool) -> Iterator[int]:
        """Live ids to tombstone: owned by this catalog (or by no one recorded) and no longer listed
        (``missing``); and after a model change, vectors of another model (their rows were rejected)."""
        if self.model_changed:
            for record in self.store.iter_records():
                if record.model != self.model or (missing and self._dropped(record)):
                    yield record.id
            return
        unseen = (i for i in self.store.iter_live_ids() if i not in self.seen_ids)
        for chunk in _chunked(unseen, DELETE_CHUNK):
            yield from (r.id for r in self.store.get_many(chunk) if r is not None and not r.deleted and self._dropped(r))

    def _dropped(self, record: ItemRecord) -> bool:
        return record.id not in self.seen_ids and ownership.owner_of(record, self.store.path) in (self.source, None)


def _chunked(rows: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------- side outputs


class _RejectsWriter:
    """Streams rejects to a temp file beside the store; :meth:`commit` replaces ``rejects.jsonl``
    atomically, so the file always holds exactly one whole run's rejects."""

    def __init__(self, final_path: Path):
        self.final_path = final_path
        self.temp_path = final_path.with_name(f".{final_path.name}.{os.getpid()}.tmp")
        self._handle = None

    def __enter__(self) -> Self:
        self._remove_stale_temps()
        self._handle = self.temp_path.open("w", encoding="utf-8")
        return self

    def _remove_stale_temps(self) -> None:
        # Left by killed runs; safe to remove because the caller holds the store's write lock.
        for stale in self.final_path.parent.glob(f".{self.final_path.name}.*.tmp"):
            stale.unlink(missing_ok=True)

    def write(self, reject: Reject) -> None:
        self._handle.write(reject.to_json() + "\n")

    def commit(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self.temp_path, self.final_path)

    def __exit__(self, exc_type, *_exc) -> None:
        if not self._handle.closed:
            self._handle.close()
        self.temp_path.unlink(missing_ok=True)


class _Progress:
    """Ingest's use of :class:`imgsearch.progress.Progress`: rows against the catalog's row count,
    with the embedded/rejected counts; made at the first batch so a catalog that cannot be read
    shows no progress at all."""

    def __init__(self, enabled: bool, catalog_path: Path):
        self.enabled = enabled
        self.catalog_path = catalog_path
        self.rows = 0
        self.bar: Progress | None = None

    def _start(self) -> Progress:
        if self.bar is None:
            self.bar = Progress(count_catalog_rows(self.catalog_path), f"embed {self.catalog_path.name}", "rows",
                                enabled=self.enabled)
        return self.bar

    def update(self, rows: int, summary: IngestSummary) -> None:
        self.rows += rows
        if self.enabled:
            bar = self._start()
            bar.set_postfix(embedded=summary.embedded, rejected=summary.rejected)
            bar.update(rows)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def log_done(self, summary: IngestSummary) -> None:
        if self.enabled:
            self._start().close()  # an empty catalog still gets its one line
            log.info("ingest %s done: %d rows; %s", self.catalog_path, self.rows, summary.line())


def count_catalog_rows(path: Path) -> int | None:
    """The rows :func:`read_catalog` will yield (good and bad), by one pass over the file without
    decoding images; None when the file cannot be read that way (the ingest then says why)."""
    try:
        if path.suffix.lower() in CSV_SUFFIXES:
            with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
                return max(0, sum(1 for cells in csv.reader(handle) if cells) - 1)  # less the header
        if path.suffix.lower() in JSONL_SUFFIXES:
            with path.open("rb") as handle:
                return sum(1 for raw in handle if raw.strip())
    except (OSError, csv.Error):
        pass
    return None
