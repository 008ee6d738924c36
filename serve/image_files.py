"""Reading a stored catalog image for the image endpoint, without trusting what is on disk now.

The store records each image's resolved absolute path and the sha256 of its bytes. What sits
at that path may have changed since: a symlink swapped in, a FIFO, other bytes. So the file is
opened one path component at a time with ``O_NOFOLLOW`` (no link anywhere in the path is
followed), must be a regular file, is read once, and its bytes are served only if their sha256
is the recorded one: the bytes checked are the bytes sent.
"""

from __future__ import annotations

import hashlib
import os
import stat

from serve.errors import ApiError

MAX_IMAGE_FILE_BYTES = 64 << 20
_CHUNK = 1 << 20


def _open_no_follow(path: str) -> int:
    """A read-only fd of ``path`` (absolute) opened without following any symlink in it."""
    parts = [p for p in path.split(os.sep) if p]
    if not os.path.isabs(path) or not parts:
        raise FileNotFoundError(path)
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(os.sep, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY)
    try:
        for name in parts[:-1]:
            inner = os.open(name, flags | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        # O_NONBLOCK: a FIFO put there must not block the request thread on open.
        return os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)


def read_verified(path: str, content_hash: str, what: str) -> bytes:
    """The bytes of the regular file at ``path`` if their sha256 is ``content_hash``.

    404 ``image_missing`` when there is no regular file there reachable without a link, 409
    ``image_changed`` when its bytes are not the stored ones. ``what`` names the image in
    messages (never the server's path)."""
    try:
        fd = _open_no_follow(path)
    except OSError:
        raise ApiError(404, "image_missing", f"the image file of {what} is no longer on disk as a regular file") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ApiError(404, "image_missing", f"the image file of {what} is no longer on disk as a regular file")
        if info.st_size > MAX_IMAGE_FILE_BYTES:
            raise ApiError(409, "image_changed", f"the image file of {what} is {info.st_size} bytes, over the "
                           f"{MAX_IMAGE_FILE_BYTES} an image may be: not the stored image")
        chunks, size = [], 0
        while size <= MAX_IMAGE_FILE_BYTES:
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ApiError(404, "image_missing", f"the image file of {what} could not be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if not content_hash or hashlib.sha256(data).hexdigest() != content_hash:
        raise ApiError(409, "image_changed", f"the image file of {what} changed since it was stored; it is not served "
                       "until the catalog is ingested again")
    return data
