"""Run the app under gunicorn (production) from the ``imgsearch serve``/``demo`` commands."""

from __future__ import annotations

import errno
import logging
import socket

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger as GunicornLogger

from imgsearch import logs
from imgsearch.errors import BadInput, JobFailed
from serve.app import DEFAULT_MAX_BODY_BYTES
from serve.worker import DEFAULT_BODY_TIMEOUT_S, DEFAULT_HEADER_TIMEOUT_S, JsonThreadWorker

log = logging.getLogger(__name__)


def check_bindable(host: str, port: int) -> None:
    """Raise one clear error when ``host:port`` cannot be listened on (busy, not ours, no such
    address), before anything starts: gunicorn itself retries for seconds and logs every try."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if not 0 <= port <= 65535:
        raise BadInput(f"cannot listen on {where}: the port must be in 0..65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise BadInput(f"cannot listen on {where}: unknown host ({exc})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn does: TIME_WAIT is no obstacle
        try:
            probe.bind(address)
        except OSError as exc:
            hint = " (another server is there: stop it or pick another --port)" if exc.errno == errno.EADDRINUSE else ""
            raise JobFailed(f"cannot listen on {where}: {exc.strerror or exc}{hint}") from None


class SharedFormatLogger(GunicornLogger):
    """Gunicorn's error log through the root handlers (:mod:`imgsearch.logs`): the same format as
    every other line, its start-up chatter at WARNING unless ``-v``. Gunicorn runs ``setup`` again
    on a config reload, which re-adds its own handler: adopt again each time."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        logs.adopt(self.error_log)
        logs.adopt(self.access_log)


class _GunicornApp(BaseApplication):
    def __init__(self, app_factory, options: dict):
        self._app_factory = app_factory
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self):
        return self._app_factory()


def run_gunicorn(app_factory, host: str, port: int, workers: int = 1, threads: int = 8, preload: bool = True,
                 hooks: dict | None = None, header_timeout: float = DEFAULT_HEADER_TIMEOUT_S,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT_S, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
    """Serve ``app_factory()`` with gunicorn.

    With ``preload`` the app (and so the memory-mapped index) is loaded once in
    the master and shared with the workers by fork, not copied N times. ``hooks``: extra
    gunicorn settings (server hooks such as ``post_worker_init``). The workers are
    :class:`serve.worker.JsonThreadWorker`: requests are read ahead without holding a thread,
    a head must arrive within ``header_timeout`` s of its first byte and a body within
    ``body_timeout`` s of its head (else 408), and gunicorn's refusals are JSON.
    """
    check_bindable(host, port)
    options = {
        "bind": f"{host}:{port}",
        "workers": workers,
        "worker_class": JsonThreadWorker.configured(header_timeout, body_timeout, max_body_bytes),
        "threads": threads,
        "preload_app": preload,
        "timeout": 120,
        "keepalive": 30,  # clients and shard fronts reuse connections
        "graceful_timeout": 10,
        "accesslog": None,  # the app writes its own structured access lines
        "errorlog": "-",
        "loglevel": "info",  # SharedFormatLogger then defers to imgsearch.logs (WARNING unless -v)
        "logger_class": SharedFormatLogger,
        **(hooks or {}),
    }
    log.info("serving on http://%s:%d (%d workers x %d threads)", host, port, workers, threads)
    _GunicornApp(app_factory, options).run()
