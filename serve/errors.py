"""Every error leaves the server as ``{"error": {"code": ..., "message": ...}}``."""

from __future__ import annotations

import logging
import os
import re

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from imgsearch.errors import ImgsearchError

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})  # e.g. Retry-After on a 503


class ClientTooSlow(TimeoutError):
    """A request's head or body did not arrive by its deadline (raised by the socket reads of
    :mod:`serve.worker`; answered 408)."""


def error_response(status: int, code: str, message: str, headers: dict | None = None):
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


# An absolute filesystem path inside a message: "/" not preceded by a word, a dot or a URL's "//".
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/[^\s'\"`,;:()\[\]{}<>]+")


def without_paths(text: str, named: dict[str, str]) -> str:
    """``text`` with the folders of ``named`` (path -> the name callers know, e.g. INDEX_ROOT)
    put by their names, and any other absolute path by ``<path>``: what a server tells a caller
    names no server file (its log keeps them)."""
    replace: dict[str, str] = {}
    for path, name in named.items():
        if path:
            for form in {path, os.path.abspath(path), os.path.realpath(path)}:
                replace[form] = name
    for path in sorted(replace, key=len, reverse=True):
        text = text.replace(path, replace[path])
    return _ABSOLUTE_PATH.sub("<path>", text)


def _snake(name: str) -> str:
    return name.lower().replace(" ", "_").replace("-", "_")


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.errorhandler(ClientTooSlow)
    def _too_slow(exc: ClientTooSlow):
        return error_response(408, "request_timeout", str(exc))

    @app.errorhandler(ImgsearchError)
    def _domain_error(exc: ImgsearchError):
        return error_response(exc.http_status, exc.code, str(exc))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if exc.code == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            return error_response(413, "body_too_large", f"request body is over the limit of {limit} bytes")
        return error_response(exc.code or 500, _snake(exc.name), exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal_error", f"internal error: {type(exc).__name__}")
