"""Access logs: one line per request on the ``imgsearch.access`` logger, on stdout, in the one
log format of :mod:`imgsearch.logs`. As JSON:

    {"ts": "2026-01-01T12:00:00.123Z", "level": "INFO", "logger": "imgsearch.access",
     "message": "127.0.0.1 POST /v1/search 200 1.93 ms", "remote": "127.0.0.1", "method": "POST", "path": "/v1/search",
     "endpoint": "/v1/search", "status": 200, "ms": 1.93, "in_bytes": 812, "out_bytes": 1290,
     "index_version": "v1", "error": null}

As text (a terminal): ``... INFO imgsearch.access: 127.0.0.1 POST /v1/search 200 1.93 ms``.
A record's ``getMessage()`` is the access fields as one JSON object, for in-process readers.
"""

from __future__ import annotations

import json
import logging

from imgsearch.clock import utc_now
from imgsearch.logs import stream_handler

access_log = logging.getLogger("imgsearch.access")


def configure_access_log(stream=None) -> None:
    for handler in [h for h in access_log.handlers if getattr(h, "_imgsearch_access", False)]:
        access_log.removeHandler(handler)  # again: the log format may have changed since
    handler = stream_handler(stream, name="stdout")
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
    path = json.dumps(entry["path"])[1:-1]  # escaped: a %0A in the URL must not start a forged text line
    summary = f"{entry['remote']} {entry['method']} {path} {entry['status']} {entry['ms']} ms"
    if error:
        summary += f" {error}"
    access_log.info("%s", json.dumps(entry, separators=(",", ":")), extra={"fields": entry, "summary": summary})
