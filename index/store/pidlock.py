"""An exclusive ``flock`` on a file that also holds the holder's pid (store writer, rebuild job).

The kernel drops the lock when its holder dies (even by SIGKILL), so a killed run never
blocks the next one, and there is no stale-lock cleanup to get wrong.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from index.store.records import StoreLocked


class AlreadyRunning(Exception):
    def __init__(self, pid: str):
        super().__init__(f"pid {pid}")
        self.pid = pid


class JobLock:
    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._fd: int | None = None

    def acquire(self) -> JobLock:
        """Take the lock without waiting; raises :class:`AlreadyRunning` naming the holder's pid."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AlreadyRunning(holder) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock; the file stays for the next run
            self._fd = None

    def __enter__(self) -> JobLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class StoreWriteLock:
    """The pid lock on ``STORE/write.lock``, reported as :class:`StoreLocked` when another writer holds it."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = JobLock(path)

    def acquire(self) -> None:
        try:
            self._lock.acquire()
        except AlreadyRunning as exc:
            raise StoreLocked(
                f"store {str(self.path.parent)!r} is locked for writing by pid {exc.pid} "
                f"(flock on {str(self.path)!r}); one writer at a time"
            ) from None

    def release(self) -> None:
        self._lock.release()
