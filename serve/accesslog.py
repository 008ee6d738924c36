"""Structured access logs: one JSON object per request on the ``imgsearch.access`` logger.

    {"ts": "2026-01-01T12:00:00.123Z", "remote": "127.0.0.1", "method": "POST", "path": "/v1/search",
     "endpoint": "/v1/search", "status": 200, "ms": 1.93, "in_bytes": 812, "out_bytes": 1290,
     "index_version": "v1", "error": null}

``configure_access_log()`` sends them to stdout as bare JSON lines (no prefix), apart from the
plain-text operational log on stderr.
"""

from __future__ import annotations

import json
import logging
import sys

from imgsearch.clock import utc_now

access_log = logging.getLogger("imgsearch.access")


def configure_access_log(stream=None) -> None:
    if any(getattr(h, "_imgsearch_access", False) for h in access_log.handlers):
        return
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._imgsearch_access = True
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False


def log_request(request, response, endpoint: str, seconds: float, index_version: str | None) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    error = None
    if response.status_code >= 400 and response.is_json:
        body = response.get_json(silent=True) or {}
        error = (body.get("error") or {}).get("code")
    entry = {
        "ts": utc_now(),
        "remote": request.remote_addr,
        "method": request.method,
        "path": request.path,
        "endpoint": endpoint,
        "status": response.status_code,
        "ms": round(seconds * 1e3, 3),
        "in_bytes": request.content_length or 0,
        "out_bytes": int(response.headers.get("Content-Length") or 0),
        "index_version": index_version,
        "error": error,
    }
    access_log.info(json.dumps(entry, separators=(",", ":")))
