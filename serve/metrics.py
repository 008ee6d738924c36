"""Prometheus metrics: one registry per app in a single process; one sum over every gunicorn
worker when the server runs several (prometheus-client's multiprocess mode).

With ``--workers N`` each worker is its own process, so a per-process registry would make a
scrape read whichever worker answered: counters would go backwards. :func:`enable_multiprocess`
(called by ``imgsearch serve`` in the master, before the workers fork) sends every value to
per-process files in one directory, and :func:`exposition` merges them at scrape time.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import faiss
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from imgsearch import __version__

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STAGES = ("decode", "detect", "embed", "search", "join")
# Latency buckets from 0.5 ms to 5 s: a vector query is ~1 ms, an image query ~100 ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def enable_multiprocess() -> tuple[str, bool]:
    """Switch this process (and the workers it forks) to multiprocess values. Uses
    ``$PROMETHEUS_MULTIPROC_DIR`` when set, else a fresh private directory; returns
    (directory, made here: the caller removes it at exit with :func:`remove_multiprocess_dir`)."""
    directory, made = multiprocess_dir(), False
    if directory is None:
        directory, made = tempfile.mkdtemp(prefix="imgsearch-metrics-"), True
        os.environ[MULTIPROC_ENV] = directory
    Path(directory).mkdir(parents=True, exist_ok=True)
    # prometheus-client picks its value class when first imported; metrics made from here on
    # (in the workers, after the fork) write to the directory.
    values.ValueClass = values.MultiProcessValue()
    return directory, made


def remove_multiprocess_dir(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def worker_exited(pid: int) -> None:
    """Forget a dead worker's live gauges (its counters stay in the sums: they never go back)."""
    if multiprocess_dir():
        multiprocess.mark_process_dead(pid)


class WorkersProcessCollector:
    """``process_resident_memory_bytes`` and ``process_cpu_seconds_total`` summed over the live
    processes that write to the multiprocess directory, and how many they are."""

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def _pids(self) -> set[int]:
        pids = set()
        for path in self.directory.glob("*.db"):
            tail = path.stem.rsplit("_", 1)[-1]
            if tail.isdigit() and Path(f"/proc/{tail}").exists():
                pids.add(int(tail))
        return pids

    def collect(self):
        ticks, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
        rss = cpu = 0.0
        pids = self._pids()
        for pid in pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu += (int(stat[11]) + int(stat[12])) / ticks
                rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
            except (OSError, IndexError, ValueError):
                continue
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory of all workers, summed", value=rss)
        yield CounterMetricFamily("process_cpu_seconds", "CPU time of the live workers, summed", value=cpu)
        yield GaugeMetricFamily("imgsearch_workers", "Worker processes writing metrics", value=len(pids))


def exposition(metrics: ServerMetrics) -> tuple[bytes, str]:
    """(body, Content-Type) of a scrape: this process's registry, or the sum over all workers."""
    directory = multiprocess_dir()
    if directory is None:
        return generate_latest(metrics.registry), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    registry.register(WorkersProcessCollector(directory))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        if multiprocess_dir() is None:  # with several workers, WorkersProcessCollector sums them instead
            ProcessCollector(registry=self.registry)
        self.build_info = Gauge(
            "imgsearch_build_info", "imgsearch, Python and faiss versions (value 1)", ["version", "python", "faiss"],
            registry=self.registry, multiprocess_mode="max",
        )
        self.build_info.labels(__version__, platform.python_version(), faiss.__version__).set(1)
        self.requests = Counter(
            "imgsearch_requests", "HTTP requests by endpoint, method and status code", ["endpoint", "method", "code"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "imgsearch_request_seconds", "Request latency by endpoint", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "imgsearch_stage_seconds", "Latency of each search stage", ["stage"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "imgsearch_batch_size", "Queries per micro-batch (kind: search = one index call, embed = one model call)",
            ["kind"], buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry,
        )
        self.partial_responses = Counter(
            "imgsearch_partial_responses", "Queries answered without some shard server", registry=self.registry
        )
        self.shard_errors = Counter(
            "imgsearch_shard_errors", "Shard server calls that failed or timed out", ["shard", "reason"],
            registry=self.registry,
        )
        self.live_updates = Counter(
            "imgsearch_live_updates", "Admin product writes applied (put, delete)", ["op"], registry=self.registry
        )
        # Across workers: the largest live value (workers on one version agree; during a switch
        # both versions read 1 until every worker has moved).
        self.index_ntotal = Gauge("imgsearch_index_ntotal", "Vectors in the live index", registry=self.registry,
                                  multiprocess_mode="livemax")
        self.index_info = Gauge(
            "imgsearch_index_info", "The live index version (value 1; 0 once no worker serves it)", ["version"],
            registry=self.registry, multiprocess_mode="livemax",
        )
        self._version: str | None = None

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds.labels(name).observe(time.perf_counter() - start)

    def set_index(self, version: str, ntotal: int) -> None:
        # Set the old version to 0 rather than removing it: a multiprocess file keeps removed values.
        if self._version is not None and self._version != version:
            self.index_info.labels(self._version).set(0)
        self._version = version
        self.index_info.labels(version).set(1)
        self.index_ntotal.set(ntotal)
