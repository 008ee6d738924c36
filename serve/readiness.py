"""Workers that have no index take no requests while a sibling worker serves.

Gunicorn's workers share one listening socket, so a worker that accepts connections gets its
share of the traffic whatever its ``/readyz`` says. A worker whose index did not load (CURRENT's
version and every older one fail, see :meth:`serve.live.LiveVersions.load_current`) therefore:

- when a sibling has an index live, does not start accepting: it stays in gunicorn's
  ``post_worker_init`` hook, retrying the load every few seconds (and telling the master it
  is alive), and accepts only once its own index is live;
- when no worker has one, accepts and answers 503 ``not_ready`` (nobody can do better), and
  steps aside (a graceful exit: the master starts a fresh worker, which then holds back) as
  soon as a sibling has an index live while it still has none.

Which workers have an index live is a small array of pids in shared memory, made by the master
before it forks the workers.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

RETRY_S = 2.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ReadyBoard:
    """The pids of the workers that have an index live (0: a free slot)."""

    def __init__(self, slots: int):
        self._pids = multiprocessing.Array("q", max(1, slots) * 2)  # respawned workers may overlap dying ones

    def mark(self, pid: int) -> None:
        with self._pids.get_lock():
            if pid in self._pids[:]:
                return
            for n, held in enumerate(self._pids[:]):
                if held == 0 or not _alive(held):
                    self._pids[n] = pid
                    return

    def clear(self, pid: int) -> None:
        with self._pids.get_lock():
            for n, held in enumerate(self._pids[:]):
                if held == pid:
                    self._pids[n] = 0

    def others_ready(self, pid: int) -> bool:
        with self._pids.get_lock():
            held = self._pids[:]
        return any(p and p != pid and _alive(p) for p in held)


def worker_hooks(board: ReadyBoard, is_ready: Callable[[], bool], retry: Callable[[], object],
                 retry_s: float = RETRY_S) -> dict:
    """Gunicorn settings (``post_worker_init``, ``worker_exit``, ``child_exit``) that keep a
    worker without an index off the socket while a sibling serves. ``is_ready()`` and
    ``retry()`` act on the calling worker's own service."""

    def post_worker_init(worker) -> None:
        pid = os.getpid()
        held_back = False
        while not is_ready() and board.others_ready(pid):
            if not held_back:
                log.warning("worker %d: no index version loads; taking no requests while another worker serves, "
                            "retrying every %.0f s", pid, retry_s)
                held_back = True
            for _ in range(max(1, int(retry_s / 0.5))):
                if not worker.alive or os.getppid() != worker.ppid:
                    sys.exit(0)
                worker.notify()
                time.sleep(0.5)
            retry()
        if is_ready():
            board.mark(pid)
            if held_back:
                log.info("worker %d: index loaded; taking requests", pid)
            return
        threading.Thread(target=_step_aside, args=(pid,), name="step-aside", daemon=True).start()

    def _step_aside(pid: int) -> None:
        while True:
            time.sleep(retry_s)
            if is_ready():
                board.mark(pid)
                return
            if board.others_ready(pid):
                log.warning("worker %d: another worker serves an index and this one has none: restarting, to take "
                            "no requests until one loads", pid)
                os.kill(pid, signal.SIGTERM)  # gunicorn's graceful worker exit; the master starts a new one
                return

    def worker_exit(server, worker) -> None:
        board.clear(os.getpid())

    def child_exit(server, worker) -> None:
        board.clear(worker.pid)

    return {"post_worker_init": post_worker_init, "worker_exit": worker_exit, "child_exit": child_exit}
