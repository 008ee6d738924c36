"""The one log format of every ``imgsearch`` command, the server's workers and gunicorn included.

- ``text`` (a terminal): ``2026-12-07 03:20:20,485 INFO index.ann.build: built ...``;
- ``json`` (anything else: a pipe, a file, journald, ``docker logs``): one object per line,
  ``{"ts", "level", "logger", "message"}``, plus ``exc`` for a traceback and, on the access log,
  the access fields (:mod:`serve.accesslog`).

``auto`` (the default of ``imgsearch --log-format``) picks ``text`` when stderr is a terminal.
Operational lines go to stderr, access lines to stdout, in the same format. Third-party
loggers (faiss's loader, gunicorn's start-up chatter, PIL, urllib3, numexpr) log at WARNING
unless ``-v``. A record may carry ``fields`` (a dict merged into its JSON object) and
``summary`` (its message in both formats instead of ``getMessage()``).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

FORMATS = ("auto", "text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers of libraries that log at INFO on every run (faiss: "Loading faiss with AVX2 support"
# and the failed tries before it; gunicorn: "Booting worker ..." and such at every start).
QUIET_LOGGERS = ("faiss", "gunicorn.error", "PIL", "urllib3", "numexpr", "filelock", "matplotlib")
_RESERVED = ("ts", "level", "logger", "message")

_state = {"json": None, "verbose": False}  # json None: configure_logging not run yet (resolved as auto)


def _message(record: logging.LogRecord) -> str:
    summary = getattr(record, "summary", None)
    return summary if summary is not None else record.getMessage()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": _message(record),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update((k, v) for k, v in fields.items() if k not in _RESERVED)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # ASCII only: a path with undecodable bytes (surrogate escapes) still writes to any stream.
        return json.dumps(entry, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _message(record)
        return super().formatMessage(record)


class _CurrentStream(logging.StreamHandler):
    """A handler on whatever ``sys.<name>`` is when it writes, not when it was made (a test
    harness or a daemon may replace the stream)."""

    def __init__(self, name: str):
        logging.Handler.__init__(self)
        self._name = name

    @property
    def stream(self):
        return getattr(sys, self._name)


def uses_json() -> bool:
    if _state["json"] is None:
        _state["json"] = _resolve("auto")
    return _state["json"]


def _resolve(fmt: str) -> bool:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "auto":
        isatty = getattr(sys.stderr, "isatty", None)
        return not (isatty is not None and isatty())
    return fmt == "json"


def formatter() -> logging.Formatter:
    return JsonFormatter() if uses_json() else TextFormatter()


def stream_handler(stream=None, name: str = "stderr") -> logging.Handler:
    """A handler in the chosen format, on ``stream`` or else on the current ``sys.<name>``."""
    handler = logging.StreamHandler(stream) if stream is not None else _CurrentStream(name)
    handler.setFormatter(formatter())
    handler._imgsearch = True
    return handler


def _quiet_level() -> int:
    return logging.NOTSET if _state["verbose"] else logging.WARNING


def configure_logging(fmt: str = "auto", verbose: bool = False) -> None:
    """Root logger on stderr in ``fmt`` (``auto``, ``text`` or ``json``), DEBUG with ``verbose``
    else INFO; third-party loggers at WARNING unless ``verbose``. Calling it again replaces
    what the previous call installed. A host program (or a test harness) that gave the root
    logger handlers of its own keeps them, as with :func:`logging.basicConfig`."""
    _state["json"], _state["verbose"] = _resolve(fmt), bool(verbose)
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_imgsearch", False)]
    for handler in ours:
        root.removeHandler(handler)
    if not root.handlers:
        root.addHandler(stream_handler())
        root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(_quiet_level())


def adopt(logger: logging.Logger) -> None:
    """Send a library logger that installs its own handlers (gunicorn's) through the root
    handlers instead, so its lines have the same format, at the level policy above."""
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True
    quiet = any(logger.name == n or logger.name.startswith(n + ".") for n in QUIET_LOGGERS)
    logger.setLevel(_quiet_level() if quiet else logging.NOTSET)
