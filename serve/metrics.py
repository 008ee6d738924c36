"""Prometheus metrics, one registry per app so tests and several apps in a process stay apart."""

from __future__ import annotations

import time
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGES = ("decode", "detect", "embed", "search", "join")
# Latency buckets from 0.5 ms to 5 s: a vector query is ~1 ms, an image query ~100 ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "imgsearch_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
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
        self.index_ntotal = Gauge("imgsearch_index_ntotal", "Vectors in the live index", registry=self.registry)
        self.index_info = Gauge(
            "imgsearch_index_info", "The live index version (value 1)", ["version"], registry=self.registry
        )

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds.labels(name).observe(time.perf_counter() - start)

    def set_index(self, version: str, ntotal: int) -> None:
        self.index_info.clear()
        self.index_info.labels(version).set(1)
        self.index_ntotal.set(ntotal)
