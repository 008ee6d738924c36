"""The live index version of one server process: loading it, swapping it, keeping it current.

A :class:`LiveIndex` is an immutable snapshot swapped by one attribute assignment, so a request
that started on the old version finishes on it. :class:`LiveVersions` owns that swap:

- ``reload``: open the version CURRENT names, warm it, apply the live updates since its build,
  then make it live (on failure the old one keeps serving);
- ``watch_current``: poll CURRENT and reload when it names another version;
- ``catch_up``: apply the store's updates-log entries written since the live index last looked
  (one ``stat`` when there are none), and after a reload compact the log.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from index import open_index
from index.ann import build, versions
from index.ann.sources import store_category_of
from serve.errors import ApiError, without_paths
from serve.updates import BUILD_SIDECAR, LogCursor, UpdateLog, covered_through, version_coverage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveIndex:
    version: str
    index: Any  # the object index.open_index returns (or a shard fan-out with the same search)
    dim: int
    higher_is_better: bool
    sharded: bool = False  # a front server over shard servers: responses carry "partial"
    cursor: LogCursor = field(default_factory=LogCursor, compare=False)  # updates log applied so far
    # The embedder and store this version is searched with (serve.models.Backend); None: the server's own.
    backend: Any = field(default=None, compare=False)

    @property
    def ntotal(self) -> int:
        """Searchable vectors; counted when loaded and after each applied update, not per query."""
        if self.cursor.ntotal is None:
            self.cursor.ntotal = int(self.index.ntotal)
        return self.cursor.ntotal


def run_search(index, queries: np.ndarray, fetch: int, category: str | None):
    """(scores, ids, partial) of one search call; only a shard fan-out can be partial."""
    if hasattr(index, "search_partial"):
        return index.search_partial(queries, fetch, category=category)
    scores, ids = index.search(queries, fetch, category=category)
    return scores, ids, False


def default_opener(index_root: Path, store, version: str | None = None):
    """The full live version CURRENT names (or ``version``), with the store's categories and deletions."""
    return open_index(
        str(index_root),
        version,
        category_of=store_category_of(store),
        deleted_ids=np.fromiter(store.deleted_ids(), dtype=np.int64),
    )


default_opener.takes_version = True  # LiveVersions may fall back to an older version with it


def owned_ids(index, ids: np.ndarray) -> np.ndarray:
    """Which of ``ids`` an opened index holds new copies of: all of them, except on a shard
    server (``manifest["shard_of"] == [i, n]``), which owns the ids the version's build would
    put in the shard files it serves (file ``splitmix64(id) % files``, served by ``file % n``)."""
    shard = index.manifest.get("shard_of") if hasattr(index, "manifest") else None
    if not isinstance(shard, list) or ids.size == 0:
        return np.ones(ids.shape, bool)
    i, n = (int(v) for v in shard)
    files = len(index.manifest["shard_files"])
    return build.shard_of(ids, files) % n == i


def fallback_candidates(index_root: Path, current: str) -> list[str]:
    """Versions a process with nothing live may start on when ``current`` (CURRENT's) does not
    load: those with a manifest written before CURRENT was (so published before it; a version
    built after the last publish never was), except one ``rebuild`` built and never validated
    (no ``rebuild.json``), newest first."""
    try:
        published = os.stat(os.path.join(index_root, versions.CURRENT)).st_mtime_ns
    except OSError:
        return []

    def written(name: str) -> int:
        try:
            return os.stat(os.path.join(index_root, name, versions.MANIFEST)).st_mtime_ns
        except OSError:
            return published + 1

    def unvalidated(name: str) -> bool:
        vdir = os.path.join(index_root, name)
        try:
            job = (versions.read_manifest(vdir).get("build_config") or {}).get("job")
        except versions.NoIndex:
            return True
        return job == "rebuild" and not os.path.isfile(os.path.join(vdir, BUILD_SIDECAR))

    names = [n for n in versions.list_versions(str(index_root))
             if n != current and written(n) <= published and not unvalidated(n)]
    return sorted(names, key=lambda n: (written(n), n), reverse=True)


class LiveVersions:
    """The live version of INDEX_ROOT for one process, and the live updates applied to it."""

    def __init__(self, index_root: Path, store_path: Path, store: Callable, *, opener=None,
                 updates: UpdateLog | None = None, metrics: Callable = lambda: None, policy=None):
        """``store()``: the process's read-only CatalogStore; ``metrics()``: the ServerMetrics or None;
        ``policy``: a :class:`serve.models.ModelPolicy` choosing each version's model and store."""
        self.index_root = Path(index_root)
        self.store_path = Path(store_path)
        self.updates = updates
        self._store = store
        self._metrics = metrics
        self._opener = opener or default_opener
        self.policy = policy if getattr(self._opener, "takes_version", False) else None
        self._reload_lock = threading.Lock()
        self._apply_lock = threading.Lock()
        self._live: LiveIndex | None = None
        self._last_error = "no index loaded yet"
        self._watch: threading.Thread | None = None
        self.refused: set[str] = set()  # versions the model policy refused (an admin reload still retries)

    def live(self) -> LiveIndex | None:
        return self._live

    def not_ready_reason(self) -> str:
        return f"no index loaded: {self._last_error}"

    def reload(self, version: str | None = None) -> LiveIndex:
        """Load, warm and bring up to date the version CURRENT names (or ``version``), then swap it in.

        Requests keep being answered by the old version meanwhile; on failure it stays live
        and ``ApiError(500, "reload_failed")`` names the reason."""
        with self._reload_lock:
            try:
                version, backend = self._backend_for(version)
                store = backend.store if backend is not None else self._store()
                if version is None:
                    opened = self._opener(self.index_root, store)
                else:
                    opened = self._opener(self.index_root, store, version=version)
                manifest = opened.manifest
                live = LiveIndex(
                    version=str(manifest["version"]),
                    index=opened,
                    dim=int(manifest["dim"]),
                    higher_is_better=manifest["metric"] == "ip",
                    sharded=bool(getattr(opened, "is_fanout", False)),
                    backend=backend,
                )
                if getattr(opened, "path", None):
                    live.cursor.covered = version_coverage(opened.path, self.parts(live)[2])
                self._warm(live)
                self._catch_up(live)  # live additions since the build, before anyone sees it
            except Exception as exc:  # noqa: BLE001 - any failure leaves the old version serving
                detail = f"{type(exc).__name__}: {exc}"
                log.warning("index not loaded from %s: %s", self.index_root, detail)
                # Callers (the unauthenticated /readyz among them) get the reason without server paths.
                self._last_error = without_paths(detail, {str(self.index_root): "INDEX_ROOT", str(self.store_path): "STORE"})
                raise ApiError(500, "reload_failed", f"could not load the index CURRENT names in INDEX_ROOT: "
                               f"{self._last_error}; still serving {self._live.version if self._live else 'nothing'}") from None
            self._live = live
            self._publish_index_metrics(live)
            log.info("serving index version %s (%d vectors)", live.version, live.ntotal)
            if not live.sharded:
                self.compact_updates()
            return live

    def _backend_for(self, version: str | None):
        """(version to open, its Backend or None) under the model policy: the version is named
        first, so CURRENT moving meanwhile cannot pair one version's model with another's files."""
        current = self._live.backend if self._live is not None else None
        if self.policy is None:
            return version, current
        version = version or versions.read_current(str(self.index_root))
        manifest = versions.read_manifest(versions.version_dir(str(self.index_root), version))
        try:
            return version, self.policy.backend_for(manifest, current, starting=self._live is None)
        except Exception:
            self.refused.add(version)  # the CURRENT watch does not load its model again every interval
            raise

    def parts(self, live: LiveIndex | None):
        """(updates log, store(), store path) that ``live`` (default: the live version) is served with."""
        live = live if live is not None else self._live
        backend = live.backend if live is not None else None
        if backend is not None:
            return backend.updates, lambda: backend.store, backend.store_path
        return self.updates, self._store, self.store_path

    def compact_updates(self) -> dict | None:
        """Compact the updates log (see :mod:`serve.updates`): drop the lines every version
        under INDEX_ROOT holds, reduce the rest to the last operation per id. Never raises."""
        updates, store, store_path = self.parts(None)
        if updates is None or not updates.size():
            return None
        try:
            return updates.compact(covered_through(self.index_root, store_path), store_generation=store().generation)
        except Exception as exc:  # noqa: BLE001 - a failed compaction leaves the old log, still valid
            log.warning("updates log %s not compacted: %s: %s", updates.path, type(exc).__name__, exc)
            return None

    def load_current(self) -> LiveIndex | None:
        """Open the version CURRENT names and make it live; on failure keep the old one.

        With nothing live yet (a starting worker), a CURRENT that does not load falls back to
        the newest older version that does (:func:`fallback_candidates`); if none loads, the
        process stays not ready."""
        try:
            return self.reload()
        except ApiError:
            if self._live is None and getattr(self._opener, "takes_version", False):
                self._load_fallback()
            return self._live

    def _load_fallback(self) -> None:
        try:
            current = versions.read_current(str(self.index_root))
        except Exception:  # noqa: BLE001 - no CURRENT (or a bad one): nothing was ever published
            return
        reason = self._last_error
        for name in fallback_candidates(self.index_root, current):
            try:
                live = self.reload(version=name)
            except ApiError:
                continue
            log.warning("CURRENT names %s, which did not load (%s): serving the older version %s until it does",
                        current, reason, live.version)
            return
        self._last_error = reason

    def _publish_index_metrics(self, live: LiveIndex) -> None:
        metrics = self._metrics()
        if metrics is not None:
            metrics.set_index(live.version, live.ntotal)

    @staticmethod
    def _warm(live: LiveIndex) -> None:
        """One query before going live, so the first real request pays no page-in cost."""
        if live.ntotal:
            run_search(live.index, np.zeros((1, live.dim), dtype=np.float32), 1, None)

    def watch_current(self, interval_s: float) -> None:
        """Poll CURRENT every ``interval_s`` and reload when it names another version."""

        def loop() -> None:
            while True:
                time.sleep(interval_s)
                try:
                    name = versions.read_current(str(self.index_root))
                    if self._live is None or (name != self._live.version and name not in self.refused):
                        log.info("CURRENT names %s: reloading", name)
                        self.load_current()
                except Exception as exc:  # noqa: BLE001 - the watch must outlive a bad CURRENT
                    log.warning("watching CURRENT in %s: %s", self.index_root, exc)

        if interval_s > 0 and self._watch is None:
            self._watch = threading.Thread(target=loop, name="current-watch", daemon=True)
            self._watch.start()

    def catch_up(self) -> None:
        """Apply updates-log entries written since the live index last looked (one stat if none)."""
        live = self._live
        if live is not None:
            self._catch_up(live)

    def _catch_up(self, live: LiveIndex) -> None:
        updates, store, _ = self.parts(live)
        if updates is None or live.sharded or not updates.changed(live.cursor):
            return
        with self._apply_lock:
            cursor = live.cursor
            got = updates.read(cursor)
            if got.rewritten:
                log.info("updates log %s was compacted: version %s re-reads it from epoch %s", updates.path,
                         live.version, got.epoch)
            if got.must_cover and (cursor.covered is None or cursor.covered < got.must_cover):
                self._fill_from_store(live, got.must_cover)
            for entry in got.entries:
                gen = entry.get("gen")
                if cursor.covered is not None and isinstance(gen, int) and gen <= cursor.covered:
                    continue  # committed before this version's build read the store: built in
                added = np.asarray(entry.get("add", []), np.int64)
                deleted = np.asarray(entry.get("delete", []), np.int64)
                mine = owned_ids(live.index, added)
                if not mine.all():  # a shard server: another one holds the new copies of these
                    added, deleted = added[mine], np.concatenate([deleted, added[~mine]])
                try:
                    if added.size:
                        live.index.add(added, store().vectors_for(added.tolist()))
                    if deleted.size:
                        live.index.delete(deleted)
                except Exception as exc:  # noqa: BLE001 - a bad entry must not fail the queries that found it
                    log.error("updates log entry %s not applied to version %s: %s: %s", entry, live.version,
                              type(exc).__name__, exc)
            cursor.offset, cursor.epoch, cursor.stat = got.offset, got.epoch, got.stat
            cursor.ntotal = int(live.index.ntotal)
        if live is self._live:
            self._publish_index_metrics(live)

    def _fill_from_store(self, live: LiveIndex, dropped_through: int) -> None:
        """Bring ``live`` up to the store when the updates log no longer holds lines it needs.

        Compaction dropped lines up to store generation ``dropped_through``, which this version
        cannot show it was built from (it has no ``rebuild.json``, or an older one). The store
        is the truth: every stored, undeleted vector the version does not hold is added, every
        deleted item is tombstoned; the log's remaining lines are then replayed on top. A full
        pass over the store's ids: slow on a large store, but only a version older than the
        compacted log (or built without a recorded generation) ever needs it."""
        log.warning("version %s was not built from store generation %d or later, and the updates log no longer "
                    "holds those lines: adding the store's missing items from the store itself", live.version,
                    dropped_through)
        store = self.parts(live)[1]()
        indexed = getattr(live.index, "indexed_ids", None)
        if indexed is None:
            log.error("version %s cannot list its ids: live updates up to store generation %d may be missing",
                      live.version, dropped_through)
            return
        have = np.unique(indexed(searchable=True))
        chunk = 1 << 16
        added = 0
        ids = np.fromiter(store.iter_live_ids(), dtype=np.int64)
        missing = np.setdiff1d(ids, have, assume_unique=False)
        missing = missing[owned_ids(live.index, missing)]
        for start in range(0, missing.size, chunk):
            part = missing[start:start + chunk]
            part = part[np.asarray(store.has_vectors(part.tolist()), dtype=bool)]
            if part.size:
                live.index.add(part, store.vectors_for(part.tolist()))
                added += int(part.size)
        deleted = np.fromiter(store.deleted_ids(), dtype=np.int64)
        if deleted.size:
            live.index.delete(deleted)
        log.warning("version %s: %d item(s) added from the store, %d tombstoned", live.version, added, deleted.size)
