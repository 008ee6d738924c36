"""Store writes for the server, run in a short-lived child process.

Why a child: py-lmdb allows one handle per environment per process, and a server process
already reads through its read-only handle; and the store has one writer at a time (flock),
which a long-lived server must not hold, or ``imgsearch embed``/``rebuild`` could never write.
So each admin write spawns ``python -m serve.store_writer STORE``, which takes the write lock,
commits, appends one line to the updates log (:mod:`serve.updates`), prints the result as
JSON and exits (after releasing the store's lock, it compacts the log once the log has grown
past ``serve.updates.COMPACT_MIN_BYTES``). Any number of workers or front processes can do
this; the lock serialises them, and a busy store answers 503 ``store_locked``.

Requests (one JSON object on stdin):
- ``{"op": "put_product", "record": {...ItemRecord fields...}, "vector": [floats], "upload":
  {"path": "STORE/uploads/<sha256>.<ext>", "image_base64": "..."}}``: save the upload (under the
  lock; removed again when the record is not stored), store the image, then tombstone the
  product's other images (the product becomes exactly this image);
- ``{"op": "delete_product", "product_id": "..."}``: tombstone every image of the product.

Every record written or tombstoned here names the API as its writer (``source: "api"``), so a
later catalog run leaves it alone (:mod:`index.store.ownership`).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

from imgsearch.atomic import write_bytes_atomic
from imgsearch.clock import utc_now
from index.store import CatalogStore, ItemRecord, StoreLocked
from index.store.ownership import API_SOURCE
from serve.errors import ApiError
from serve.updates import UpdateLog

WRITER_TIMEOUT_S = 60
EXIT_LOCKED = 3


def run_writer(store_path, request: dict, timeout_s: float = WRITER_TIMEOUT_S) -> dict:
    """Run one write in a child process; its JSON answer, or an ApiError naming the failure."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "serve.store_writer", str(store_path)],
            input=json.dumps(request).encode(), capture_output=True, timeout=timeout_s,
            env={**os.environ, "PYTHONPATH": _repo_path()},
        )
    except subprocess.TimeoutExpired:
        raise ApiError(503, "store_timeout", f"the store write to {str(store_path)!r} took over {timeout_s}s") from None
    message = done.stderr.decode(errors="replace").strip().splitlines()
    reason = message[-1] if message else f"exit status {done.returncode}"
    if done.returncode == EXIT_LOCKED:
        raise ApiError(503, "store_locked", f"{reason}; retry later")
    if done.returncode != 0:
        raise ApiError(500, "store_write_failed", f"writing store {str(store_path)!r} failed: {reason}")
    return json.loads(done.stdout)


def _repo_path() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def _put_product(store, request: dict) -> dict:
    import numpy as np


    record = ItemRecord(**{**request["record"], "source": API_SOURCE})
    vector = np.asarray(request["vector"], dtype=np.float32)[None, :]
    before = store.items_of_product(record.product_id)
    created = _save_upload(request.get("upload"))
    try:
        (stored,) = store.put([record], vector)
    except BaseException:
        if created is not None:  # nothing refers to it: an error leaves the store as it was
            created.unlink(missing_ok=True)
        raise
    stale = [r.id for r in before if r.id != stored.id]
    if stale:
        store.mark_deleted(stale, source=API_SOURCE)
    return {"item_id": stored.id, "created": not before, "add": [stored.id], "delete": stale}


def _save_upload(upload: dict | None) -> Path | None:
    """Write the uploaded bytes at their content-addressed path; the path when this call created it."""
    if not upload:
        return None
    path = Path(upload["path"])
    if path.exists():  # the same bytes, already uploaded (maybe for another product): shared
        return None
    path.parent.mkdir(exist_ok=True)
    write_bytes_atomic(path, base64.b64decode(upload["image_base64"]))
    return path


def _delete_product(store, request: dict) -> dict:
    ids = [r.id for r in store.items_of_product(request["product_id"])]
    if ids:
        store.mark_deleted(ids, source=API_SOURCE)
    return {"deleted": len(ids), "add": [], "delete": ids}


def main(argv: list[str]) -> int:
    store_path = argv[0]
    request = json.loads(sys.stdin.buffer.read())
    handler = {"put_product": _put_product, "delete_product": _delete_product}[request["op"]]
    try:
        store = CatalogStore.create_or_open(store_path)
    except StoreLocked as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_LOCKED
    updates = UpdateLog(store_path)
    with store:
        result = handler(store, request)
        if result["add"] or result["delete"]:
            # After the commit, under the same lock: log order is commit order, and ``gen`` (the
            # store's generation after this write) tells which index builds already hold it.
            updates.append({"at": utc_now(), "pid": os.getpid(), "gen": store.generation,
                            "add": result["add"], "delete": result["delete"]})
    print(json.dumps(result), flush=True)
    try:  # the store's lock is released: a long log is compacted without blocking other store writers
        updates.compact_if_large()
    except Exception as exc:  # noqa: BLE001 - the write is done; the old log is still valid
        print(f"updates log not compacted: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
