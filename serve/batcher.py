"""Micro-batching: queries that arrive within a short window run as one batch.

Request threads call :meth:`MicroBatcher.submit` and block on a future; a batcher thread
(``threads`` of them run batches side by side) takes the first queued job, then keeps collecting until the window closes, the batch is full,
or no other query is on its way (:class:`Arrivals`: a query that entered the search handler
and has not reached a batcher yet). So a lone query never waits for the window, and under
concurrency the queries that are already being parsed join the same batch.

``run_batch(jobs) -> results`` gets the jobs in arrival order and returns one result per job;
a result that is an ``Exception`` is raised in that job's request thread only.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

log = logging.getLogger(__name__)

DEFAULT_WINDOW_MS = 2.0
DEFAULT_MAX_BATCH = 64


class Arrivals:
    """How many queries are between the search handler's entry and a batcher's queue."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._local = threading.local()

    @property
    def count(self) -> int:
        return self._count

    def enter(self) -> None:
        if getattr(self._local, "waiting", False):
            return
        with self._lock:
            self._count += 1
        self._local.waiting = True

    def leave(self) -> None:
        """Idempotent per request: called on submit, and again (no-op) when the handler exits."""
        if not getattr(self._local, "waiting", False):
            return
        self._local.waiting = False
        with self._lock:
            self._count -= 1


class MicroBatcher:
    def __init__(self, run_batch: Callable[[list], list], *, window_ms: float = DEFAULT_WINDOW_MS,
                 max_batch: int = DEFAULT_MAX_BATCH, arrivals: Arrivals | None = None,
                 on_batch: Callable[[int], None] | None = None, name: str = "batcher", threads: int = 1):
        if window_ms < 0 or max_batch < 1 or threads < 1:
            raise ValueError(f"window_ms must be >= 0, max_batch and threads >= 1, got {window_ms}, {max_batch}, {threads}")
        self._run_batch = run_batch
        self.window_s = window_ms / 1e3
        self.max_batch = max_batch
        self.arrivals = arrivals or Arrivals()
        self._on_batch = on_batch
        self._name = name
        # queue.Queue, not SimpleQueue: with several batcher threads taking from one
        # SimpleQueue, CPython 3.11's get(timeout=...) can block forever when another
        # consumer takes the item it was woken for (seen as a hung test in CI).
        self._queue: queue.Queue = queue.Queue()
        self._n_threads = threads
        self._threads: list[threading.Thread] = []
        self._start_lock = threading.Lock()

    def submit(self, job):
        """Run ``job`` in the next batch and return its result (or raise its exception)."""
        self._ensure_thread()
        future: Future = Future()
        self._queue.put((job, future))
        self.arrivals.leave()
        return future.result()

    def _ensure_thread(self) -> None:
        # Started lazily, in the process that serves (gunicorn workers fork before any request).
        if len(self._threads) < self._n_threads:
            with self._start_lock:
                while len(self._threads) < self._n_threads:
                    thread = threading.Thread(target=self._loop, name=f"{self._name}-{len(self._threads)}", daemon=True)
                    thread.start()
                    self._threads.append(thread)

    def _collect(self) -> list:
        batch = [self._queue.get()]
        deadline = time.perf_counter() + self.window_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or self.arrivals.count <= 0:
                break
            try:  # someone is on the way: wait for them, a little at a time
                batch.append(self._queue.get(timeout=min(remaining, 0.0005)))
            except queue.Empty:
                pass
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            jobs = [job for job, _ in batch]
            try:
                results = self._run_batch(jobs)
                if len(results) != len(jobs):
                    raise RuntimeError(f"{self._name}: {len(results)} results for {len(jobs)} jobs")
            except BaseException as exc:  # noqa: BLE001 - every waiter must be woken
                log.exception("%s: batch of %d failed", self._name, len(jobs))
                results = [exc] * len(jobs)
            if self._on_batch is not None:
                try:
                    self._on_batch(len(jobs))
                except Exception:  # noqa: BLE001 - a metrics failure must not lose the answers
                    log.exception("%s: on_batch hook failed", self._name)
            for (_, future), result in zip(batch, results):
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
