"""The updates log: how live additions and deletions reach every server process's index.

``STORE/serve-updates.jsonl`` is appended (under the store's write lock, by
:mod:`serve.store_writer`) after each committed store write, one JSON line per write:

    {"at": "...Z", "pid": 123, "add": [item ids], "delete": [item ids]}

The vectors themselves are read from the store (LMDB readers see every commit). Each served
index version keeps a byte offset (:class:`LogCursor`); every request compares the log's size
with it (one ``stat``) and applies new lines, so a write made through any process or worker is
visible to the next query of every worker. A newly loaded version replays the whole log before
it goes live (re-adding a vector the build already holds only supersedes it with itself).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

LOG_NAME = "serve-updates.jsonl"


@dataclass
class LogCursor:
    offset: int = 0  # bytes of the log applied to this index version
    ntotal: int | None = None  # the version's searchable count after those updates


class UpdateLog:
    def __init__(self, store_path: str | Path):
        self.path = Path(store_path) / LOG_NAME

    def size(self) -> int:
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            return 0

    def read_from(self, offset: int) -> tuple[list[dict], int]:
        """Complete lines after ``offset`` and the offset past the last of them."""
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return [], offset
        end = data.rfind(b"\n") + 1  # a line still being written is left for next time
        entries = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
        return entries, offset + end

    def append(self, entry: dict) -> None:
        """One line, written whole and fsynced; the caller holds the store's write lock."""
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
