"""Versioned index directories under INDEX_ROOT and the atomic CURRENT pointer.

Layout::

    INDEX_ROOT/CURRENT                 name of the live version (one line), replaced atomically
    INDEX_ROOT/<version>/manifest.json the version's resolved config; written last
    INDEX_ROOT/.staging-<version>/     a build in progress; never named by CURRENT

A version is built in a staging directory, its manifest is written last, then the whole
directory is renamed into place (``os.replace`` is atomic within a file system) and only then
is CURRENT replaced. A reader that reads CURRENT therefore always finds a complete version.
Old versions are kept: a reader that resolved the previous CURRENT can still open it.

Every writer of INDEX_ROOT (``imgsearch build``, ``imgsearch rebuild``, the demo) holds
``INDEX_ROOT/.rebuild.lock`` (:func:`index_root_lock`: flock + pid, dropped by the kernel when
the holder dies) for its whole run, so two writers never publish, clean up or collect at once.
The manifest's ``build_config.job`` names the writer that built the version (``build`` or
``rebuild``), and ``files`` the size and sha256 of every data file (:mod:`index.ann.integrity`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time

from imgsearch.atomic import fsync_dir, write_bytes_atomic
from imgsearch.errors import BadInput, JobFailed
from index.store.pidlock import AlreadyRunning, JobLock

CURRENT = "CURRENT"
MANIFEST = "manifest.json"
STAGING_PREFIX = ".staging-"
LOCK_FILE = ".rebuild.lock"  # the one writer lock of INDEX_ROOT (named when only rebuild took it)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class NoIndex(BadInput):
    """INDEX_ROOT has no usable version (no CURRENT, or a version without a manifest)."""

    code = "no_index"
    http_status = 503


class BadIndex(NoIndex):
    """A version whose files fail an integrity check (size, checksum, header, counts): never opened."""

    code = "bad_index"


class IndexRootLocked(JobFailed):
    """Another writer holds INDEX_ROOT's lock."""

    code = "index_root_locked"

    def __init__(self, index_root: str, pid: str):
        super().__init__(f"another writer (pid {pid}) holds the lock of INDEX_ROOT {index_root!r} ({LOCK_FILE}); "
                         "one writer at a time, nothing written")
        self.pid = pid


class IndexRootLock:
    """The writer lock of INDEX_ROOT, taken without waiting: :class:`IndexRootLocked` names the holder."""

    def __init__(self, index_root: str):
        self.index_root = os.fspath(index_root)
        self._lock = JobLock(os.path.join(self.index_root, LOCK_FILE))

    def acquire(self) -> IndexRootLock:
        os.makedirs(self.index_root, exist_ok=True)
        try:
            self._lock.acquire()
        except AlreadyRunning as exc:
            raise IndexRootLocked(self.index_root, exc.pid) from None
        return self

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> IndexRootLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def index_root_lock(index_root: str) -> IndexRootLock:
    """``with index_root_lock(root):`` around everything a writer does to INDEX_ROOT."""
    return IndexRootLock(index_root)


def built_by(manifest: dict) -> str | None:
    """The job that built a version (``build_config.job``): "build", "rebuild", or None (the
    Python API, or a version from before the field existed)."""
    return (manifest.get("build_config") or {}).get("job")


def new_version_name() -> str:
    # Sortable by creation time; the random tail keeps two builds in the same second apart.
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name or "") or name.startswith(STAGING_PREFIX):
        raise BadInput(f"bad index version name {name!r}")
    return name


def write_json_atomic(path: str, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def make_staging(index_root: str, name: str) -> str:
    os.makedirs(index_root, exist_ok=True)
    path = os.path.join(index_root, STAGING_PREFIX + check_name(name))
    os.makedirs(path)
    return path


def discard_staging(path: str) -> None:
    if os.path.basename(path).startswith(STAGING_PREFIX):
        shutil.rmtree(path, ignore_errors=True)


def commit_staging(index_root: str, staging: str, name: str) -> str:
    """Rename a finished staging dir to INDEX_ROOT/<name>. Needs its manifest already written."""
    if not os.path.isfile(os.path.join(staging, MANIFEST)):
        raise JobFailed(f"refusing to commit {staging!r}: it has no {MANIFEST}")
    final = os.path.join(index_root, check_name(name))
    if os.path.exists(final):
        raise JobFailed(f"index version {name!r} already exists in {index_root!r}")
    fsync_dir(staging)
    os.replace(staging, final)
    fsync_dir(index_root)
    return final


def set_current(index_root: str, name: str) -> None:
    """Point CURRENT at a complete version (atomically)."""
    read_manifest(version_dir(index_root, name))  # refuses a version without a manifest
    write_bytes_atomic(os.path.join(index_root, CURRENT), (name + "\n").encode())


def read_current(index_root: str) -> str:
    try:
        with open(os.path.join(index_root, CURRENT)) as f:
            name = f.read().strip()
    except FileNotFoundError:
        raise NoIndex(f"no index in {index_root!r}: {CURRENT} is missing (run `imgsearch build`)") from None
    return check_name(name)


def version_dir(index_root: str, name: str | None = None) -> str:
    return os.path.join(index_root, check_name(name or read_current(index_root)))


def read_manifest(vdir: str) -> dict:
    """The manifest of a version dir; a dir without one is never opened (NoIndex)."""
    path = os.path.join(vdir, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise NoIndex(f"index version {vdir!r} has no {MANIFEST}; refusing to open it") from None
    except (OSError, ValueError) as exc:
        raise NoIndex(f"index version {vdir!r}: unreadable {MANIFEST}: {exc}") from None
    if not isinstance(manifest, dict) or "version" not in manifest:
        raise NoIndex(f"index version {vdir!r}: {MANIFEST} is not an index manifest")
    return manifest


def list_versions(index_root: str) -> list[str]:
    """Complete versions (with a manifest), oldest first."""
    try:
        names = sorted(os.listdir(index_root))
    except FileNotFoundError:
        return []
    return [n for n in names if _NAME.fullmatch(n) and not n.startswith(STAGING_PREFIX)
            and os.path.isfile(os.path.join(index_root, n, MANIFEST))]
