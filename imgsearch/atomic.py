"""Files that appear whole or not at all: a temp file in the target's folder, fsync, ``os.replace``.

One writer for every artifact a reader may open while it is being replaced: index manifests and
CURRENT, the update log, dedup outputs, model checkpoints, the ONNX cache. A killed writer leaves
at most a ``.<name>.<random>.tmp`` file beside the target, never a torn target.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in ``path`` durable (best effort: some filesystems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A binary file to write that replaces ``path`` (its folder must exist) only when the block ends without error.

    ``mode``: the new file's permissions (mkstemp's are 0600; readers may be other users).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def check_dir_creatable(path: str | os.PathLike) -> None:
    """Raise the OSError that creating folder ``path`` would raise (a file where a folder is needed),
    before a job creates anything: a job that cannot write its output leaves nothing behind."""
    path = Path(os.path.abspath(path))
    for folder in (path, *path.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                blocker = "it" if folder == path else repr(str(folder))
                raise NotADirectoryError(errno.ENOTDIR, f"Not a directory ({blocker} is a file)", str(path))
            return
