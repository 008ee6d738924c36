"""Run the app under gunicorn (production) from the ``imgsearch serve``/``demo`` commands."""

from __future__ import annotations

import logging

from gunicorn.app.base import BaseApplication

log = logging.getLogger(__name__)


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


def run_gunicorn(app_factory, host: str, port: int, workers: int = 1, threads: int = 8, preload: bool = True) -> None:
    """Serve ``app_factory()`` with gunicorn.

    With ``preload`` the app (and so the memory-mapped index) is loaded once in
    the master and shared with the workers by fork, not copied N times.
    """
    options = {
        "bind": f"{host}:{port}",
        "workers": workers,
        "worker_class": "gthread",
        "threads": threads,
        "preload_app": preload,
        "timeout": 120,
        "keepalive": 30,  # clients and shard fronts reuse connections
        "graceful_timeout": 10,
        "accesslog": None,  # the app writes its own structured access lines
        "errorlog": "-",
        "loglevel": "info",
    }
    log.info("serving on http://%s:%d (%d workers x %d threads)", host, port, workers, threads)
    _GunicornApp(app_factory, options).run()
