"""The updates log: how live additions and deletions reach every server process's index.

``STORE/serve-updates.jsonl`` is appended (by :mod:`serve.store_writer`, under the store's
write lock, so log order is commit order) after each committed store write, one JSON line per
write::
    {"at": "...Z", "pid": 123, "gen": 4711, "add": [item ids], "delete": [item ids]}

``gen`` is the store's generation (LMDB transaction id) after the write. The vectors themselves
are read from the store (LMDB readers see every commit). Each served index version keeps a
:class:`LogCursor`; every request compares the log's ``stat`` with it (one ``stat``) and applies
new lines, so a write made through any process or worker is visible to the next query of every
worker. A newly loaded version replays the log before it goes live, skipping lines its build
already holds (``gen`` at or below the store generation the build read, when the version
records it: ``rebuild.json``'s ``store_generation``). Replay is idempotent: re-adding a vector
the index holds supersedes it with itself, and deleting twice is deleting once.

Compaction (:meth:`UpdateLog.compact`) keeps the log from growing forever. Under the log's own
lock (``serve-updates.lock``: appends hold it for one write; compaction never takes the store's
write lock, so it cannot make an ``imgsearch embed`` or ``rebuild`` fail as "locked"), it
rewrites the log to a temporary file and ``os.replace``s it in:
- only the last operation on each id is kept (every version replays the same final state: an
  add reads the store's current vector, a delete tombstones), in the original order, ``gen``
  kept, so the rewrite is lossless for any version, old or new;
- a prefix of lines whose ``gen`` every version under INDEX_ROOT already holds (the lowest
  recorded build generation; none if any version lacks one) is dropped. The header records
  the highest dropped ``gen`` (``dropped_through``): a version that cannot show it holds
  those is brought up to date from the store instead (see :mod:`serve.service`);
- the first line is a header ``{"epoch": E, "replaces": {"epoch": E-1, "size": C},
  "applied_prefix": P, "dropped_through": D, "compacted_bytes": S, ...}``. A reader's cursor
  holds (epoch, byte offset, stat signature). The rewrite is a new inode and a new epoch, so a
  cursor never applies an offset of one file to another: a reader that had read exactly the
  C bytes of the old file continues after the compacted section; any other reader replays the
  compacted section (idempotent) and, unless its version holds the dropped lines (or it had
  read past P, the end of the dropped lines), is refilled from the store.

Crash safety: the rewrite is fsynced before the rename and the directory after it, with the
lock held throughout, so the log is always the old or the new file, never a mix, and no
append can land in the replaced file. A leftover temporary file is removed by the next
compaction. A line left half-written by a killed writer is terminated by the next append and
skipped (logged) by readers and compaction.
"""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imgsearch.atomic import fsync_dir, write_bytes_atomic
from imgsearch.clock import utc_now
from index.ann import versions

log = logging.getLogger(__name__)

LOG_NAME = "serve-updates.jsonl"
LOCK_NAME = "serve-updates.lock"
HEADER_PREFIX = b'{"epoch":'  # the header is the only line that starts with its epoch
MANIFEST_NAME = "manifest.json"  # index.ann.versions.MANIFEST
BUILD_SIDECAR = "rebuild.json"  # index.jobs.rebuild.SIDECAR: {"store": path, "store_generation": int, ...}
# The store writer compacts (without dropping anything) once the log passes this size and has
# at least doubled since its last compaction: amortised O(1) rewriting per appended byte.
COMPACT_MIN_BYTES = 4 << 20
# A compaction that drops nothing is written only when it saves at least this fraction.
MIN_SAVING = 0.25


@dataclass
class LogCursor:
    offset: int = 0  # bytes of the log file (of ``epoch``) applied to this index version
    ntotal: int | None = None  # the version's searchable count after those updates
    epoch: int | None = None  # the log file's epoch ``offset`` counts in; None: nothing read yet
    stat: tuple | None = None  # (dev, inode, size, mtime_ns) at the last read: equal -> nothing new
    covered: int | None = None  # store generation the version's build read (lines <= it are built in)


@dataclass
class LogRead:
    entries: list[dict]
    offset: int
    epoch: int | None
    stat: tuple | None
    must_cover: int = 0  # lines with gen <= this were dropped and are not in this reader's state
    rewritten: bool = False  # the log was compacted since the cursor's read


def _signature(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read_header(first_line: bytes) -> tuple[dict | None, int]:
    """(header or None, its length in bytes: where the entries start) from a log's first line."""
    if not first_line.startswith(HEADER_PREFIX) or not first_line.endswith(b"\n"):
        return None, 0
    try:
        header = json.loads(first_line)
    except ValueError:
        return None, 0
    if not (isinstance(header, dict) and isinstance(header.get("epoch"), int)):
        return None, 0
    return header, len(first_line)


def _entries(data: bytes, base: int, where: str) -> list[tuple[int, dict]]:
    """(offset just past the line, entry) of each complete entry line in ``data`` (which starts
    at byte ``base`` of the file); undecodable lines are logged and skipped."""
    out = []
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        line = data[pos:nl]
        pos = nl + 1
        if not line.strip() or line.startswith(HEADER_PREFIX):
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            log.error("%s: skipping an unreadable updates-log line at byte %d (%s): %r", where, base + pos - len(line) - 1,
                      exc, line[:120])
            continue
        out.append((base + pos, entry))
    return out


def version_coverage(version_dir: str | os.PathLike, store_path: str | os.PathLike) -> int | None:
    """The store generation an index version was built from, if it records one for this store
    (the manifest's ``store``, written by every build from a store; older versions: the rebuild
    job's ``rebuild.json``); None when unknown."""
    for name, path_key, generation_key in ((MANIFEST_NAME, ("store", "path"), ("store", "generation")),
                                           (BUILD_SIDECAR, ("store",), ("store_generation",))):
        try:
            with open(os.path.join(version_dir, name)) as f:
                record = json.load(f)
            path, generation = record, record
            for key in path_key:
                path = path[key]
            for key in generation_key:
                generation = generation[key]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if os.path.realpath(path) != os.path.realpath(store_path):
            return None  # built from another store: its generations mean nothing here
        if isinstance(generation, int) and not isinstance(generation, bool):
            return generation
    return None


def covered_through(index_root: str | os.PathLike, store_path: str | os.PathLike) -> int:
    """The store generation every version under INDEX_ROOT was built from or after: log lines
    at or below it are in every version that can be loaded. 0 when some version does not say."""
    names = versions.list_versions(str(index_root))
    gens = [version_coverage(os.path.join(index_root, name), store_path) for name in names]
    if not gens or any(g is None for g in gens):
        return 0
    return min(gens)


class UpdateLog:
    def __init__(self, store_path: str | Path):
        self.path = Path(store_path) / LOG_NAME
        self.lock_path = Path(store_path) / LOCK_NAME

    def size(self) -> int:
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            return 0

    def changed(self, cursor: LogCursor) -> bool:
        """One ``stat``: has the log changed since ``cursor`` last read it?"""
        try:
            return _signature(os.stat(self.path)) != cursor.stat
        except FileNotFoundError:
            return False

    @contextmanager
    def locked(self):
        """The log's own lock (blocking ``flock``): appends and compaction exclude each other."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # drops the flock

    # ------------------------------------------------------------------ reading

    def header(self) -> tuple[dict | None, int]:
        """(header or None, its length in bytes) of the current log file."""
        try:
            with open(self.path, "rb") as f:
                first = f.readline()
        except FileNotFoundError:
            return None, 0
        return _read_header(first)

    def read(self, cursor: LogCursor) -> LogRead:
        """Complete entries the cursor has not applied, and where it stands after them.

        The same file (inode and epoch) continues at the cursor's offset. A rewritten file
        (compaction, or a log deleted and recreated) continues after its compacted section
        when the cursor had read exactly what that section replaces; otherwise the whole file
        is replayed and ``must_cover`` says which dropped lines the reader's version must hold.
        """
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return LogRead([], cursor.offset, cursor.epoch, cursor.stat)
        with f:
            st = os.fstat(f.fileno())
            first = f.readline()
            header, head_len = _read_header(first)
            epoch = header["epoch"] if header else 0
            same_file = (cursor.epoch == epoch and cursor.stat is not None and cursor.stat[:2] == _signature(st)[:2]
                         and head_len <= cursor.offset <= st.st_size)
            must_cover, rewritten = 0, cursor.epoch is not None and not same_file
            if same_file:
                start = cursor.offset
            else:
                replaces = (header or {}).get("replaces") or {}
                if (header and cursor.epoch is not None and replaces.get("epoch") == cursor.epoch
                        and replaces.get("size") == cursor.offset):
                    start = head_len + int(header["compacted_bytes"])  # read all it replaces: go on after it
                else:
                    start = head_len  # replay everything (idempotent)
                    dropped = int((header or {}).get("dropped_through") or 0)
                    caught_up = (cursor.epoch is not None and replaces.get("epoch") == cursor.epoch
                                 and cursor.offset >= int(header.get("applied_prefix") or 0))
                    must_cover = 0 if caught_up else dropped
            f.seek(start)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written is left for next time
        entries = [entry for _, entry in _entries(data[:end], start, str(self.path))]
        return LogRead(entries, start + end, epoch, _signature(st), must_cover, rewritten)

    # ------------------------------------------------------------------ writing

    def append(self, entry: dict) -> None:
        """One line, written whole and fsynced; the caller holds the store's write lock (so log
        order is commit order), and this takes the log's lock (so no compaction is mid-rewrite)."""
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        with self.locked():
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line  # a killed writer's half line: end it, so this one stays whole
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                fsync_dir(str(self.path.parent))

    def compact(self, covered: int = 0, *, store_generation: int | None = None, force: bool = False) -> dict | None:
        """Rewrite the log to its net effect, dropping the prefix of lines with ``gen <= covered``.

        ``covered``: a store generation every index version that can be loaded was built from
        or after (:func:`covered_through`); 0 drops nothing. ``store_generation``: the store's
        generation now; a log with a higher ``gen`` comes from another store (restored or
        replaced), and then nothing is dropped. Without ``force``, a rewrite that drops nothing
        and saves less than MIN_SAVING is skipped. Returns what was done, or None if skipped.
        """
        with self.locked():
            self._remove_stale_temps()
            try:
                data = self.path.read_bytes()
            except FileNotFoundError:
                return None
            header, head_len = _read_header(data[:data.find(b"\n") + 1])
            old_epoch = header["epoch"] if header else 0
            complete = data.rfind(b"\n") + 1
            if complete < len(data):
                log.warning("%s: dropping %d bytes of a half-written last line (its writer was killed)",
                            self.path, len(data) - complete)
            lines = _entries(data[head_len:complete], head_len, str(self.path))
            entries = [entry for _, entry in lines]

            # An upper bound of each line's generation: its own, else the next line's (commit order).
            bound: list[int | None] = [None] * len(entries)
            nxt = None
            for n in range(len(entries) - 1, -1, -1):
                gen = entries[n].get("gen")
                if isinstance(gen, int) and not isinstance(gen, bool):
                    nxt = gen if nxt is None else min(gen, nxt)
                bound[n] = nxt
            known = [b for b in bound if b is not None]
            if store_generation is not None and known and max(known) > store_generation:
                log.warning("%s: the log names store generation %d, the store is at %d (another store?): dropping nothing",
                            self.path, max(known), store_generation)
                covered = 0
            n_drop = 0
            while n_drop < len(entries) and covered > 0 and bound[n_drop] is not None and bound[n_drop] <= covered:
                n_drop += 1
            applied_prefix = lines[n_drop - 1][0] if n_drop else 0
            dropped_through = int((header or {}).get("dropped_through") or 0)
            if n_drop:
                dropped_through = max(dropped_through, bound[n_drop - 1])

            # Net effect of the rest: each id keeps only its last operation (a delete after an
            # add in the same line is the later one, as the service applies them).
            seen: set[int] = set()
            kept: list[dict] = []
            for n in range(len(entries) - 1, n_drop - 1, -1):
                entry = entries[n]
                delete = [i for i in entry.get("delete", []) if i not in seen]
                seen.update(delete)
                add = [i for i in entry.get("add", []) if i not in seen]
                seen.update(add)
                if add or delete:
                    out = {**entry, "add": add, "delete": delete}
                    if bound[n] is not None:
                        out["gen"] = bound[n]  # an old line without one: the next line's bounds it
                    kept.append(out)
            kept.reverse()
            body = b"".join((json.dumps(e, separators=(",", ":")) + "\n").encode() for e in kept)
            if not force and not n_drop and len(body) > (1 - MIN_SAVING) * (complete - head_len):
                return None
            new_header = {"epoch": old_epoch + 1, "replaces": {"epoch": old_epoch, "size": len(data)},
                          "applied_prefix": applied_prefix, "dropped_through": dropped_through,
                          "compacted_bytes": len(body), "at": utc_now(), "pid": os.getpid()}
            head = (json.dumps(new_header, separators=(",", ":")) + "\n").encode()
            assert head.startswith(HEADER_PREFIX)

            write_bytes_atomic(str(self.path), head + body)  # temp + fsync + os.replace + fsync dir
        result = {"epoch": old_epoch + 1, "bytes_before": len(data), "bytes_after": len(head) + len(body),
                  "lines_before": len(entries), "lines_after": len(kept), "dropped_lines": n_drop,
                  "dropped_through": dropped_through}
        log.info("compacted the updates log %s: %s", self.path, result)
        return result

    def compact_if_large(self, min_bytes: int = COMPACT_MIN_BYTES) -> dict | None:
        """Compact (dropping nothing) once the log passes ``min_bytes`` and has doubled since
        its last compaction."""
        size = self.size()
        if size < min_bytes:
            return None
        header, head_len = self.header()
        if header is not None and size < 2 * (head_len + int(header.get("compacted_bytes") or 0)):
            return None
        return self.compact(force=True)

    def _remove_stale_temps(self) -> None:
        """Temporary files of compactions killed before their rename (we hold the lock: no live
        compaction owns one)."""
        for path in glob.glob(os.path.join(glob.escape(str(self.path.parent)), f".{LOG_NAME}.*.tmp")):
            try:
                os.unlink(path)
                log.warning("removed %s, left by a killed compaction", path)
            except FileNotFoundError:
                pass
