"""The one timestamp format of stored records and logs (store metadata, update log, access log)."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> str:
    """Now in UTC, ISO 8601 with milliseconds and a ``Z``: ``2026-11-23T14:38:35.123Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
