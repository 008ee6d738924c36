"""Scale-out: shard servers and the front server that fans queries out to them.

- ``imgsearch serve --shard-of INDEX_ROOT:i/n`` opens only shard files ``j`` with
  ``j % n == i`` of the version CURRENT names (build it with ``--shards`` a multiple of n).
  A shard server (only) answers ``POST /v1/shard/search`` with raw candidates::
      {"vectors": [[floats], ...], "k": int, "category": str|null}
      -> {"index_version", "shard": [i, n], "ids": [[int]], "scores": [[float]]}   (-1 ids pad)
  It needs ``Authorization: Bearer $IMGSEARCH_SHARD_TOKEN`` (``--shard-token-env``), takes at
  most MAX_SHARD_ROWS vectors and MAX_SHARD_CANDIDATES vectors x k per call, and applies the
  store's live updates first; of each added id it keeps the copy whose shard file it serves
  (:func:`serve.live.owned_ids`), so every id is held by one shard server.

- ``imgsearch serve --shards URL,URL,...`` runs a front: its "index" is a
  :class:`ShardFanout`, which posts each (micro-batched) query matrix to every shard in
  parallel with a per-shard timeout and merges the candidates into the exact top-k by
  (score, id), the same order the index uses across its own shards. Shards that fail or
  time out are skipped: the response says ``"partial": true`` and
  ``imgsearch_partial_responses_total`` / ``imgsearch_shard_errors_total`` count it. Only
  when every shard fails does the query fail (503 ``shards_unavailable``).

Exactness: with an exact factory (``Flat``) the merged ids equal the single-process ids.
With PQ + re-ranking each shard re-ranks its own best ``k * rerank_factor`` candidates, a
superset of what one process re-ranks, so recall is the same or higher.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from urllib.parse import urlsplit

import numpy as np
from flask import Flask, jsonify, request

from index import open_index
from index.ann.merge import top_k
from index.ann.sources import store_category_of
from serve.admin import check_bearer
from serve.errors import ApiError
from serve.requests import parse_category, parse_k, parse_vector, reject_unknown

log = logging.getLogger(__name__)

SHARD_SEARCH_FIELDS = frozenset({"vectors", "k", "category"})
# One shard call's size: query rows, and rows x k candidates (~2.5 MB of JSON back at most).
# A front splits bigger query matrices into calls within both.
MAX_SHARD_ROWS = 256
MAX_SHARD_CANDIDATES = 256 * 1024
DEFAULT_SHARD_TOKEN_ENV = "IMGSEARCH_SHARD_TOKEN"
DEFAULT_SHARD_TIMEOUT_MS = 1000.0


# ---------------------------------------------------------------------- shard server side

def parse_shard_of(text: str) -> tuple[str | None, int, int]:
    """``INDEX_ROOT:i/n`` or ``i/n`` -> (INDEX_ROOT or None, i, n)."""
    root, sep, spec = text.rpartition(":")
    if not sep:
        root, spec = None, text
    try:
        i_text, n_text = spec.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise ValueError(f"--shard-of must look like INDEX_ROOT:i/n, got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard-of needs 0 <= i < n, got {i}/{n} in {text!r}")
    return root or None, i, n


def shard_opener(i: int, n: int):
    """An opener (for :class:`serve.service.SearchService`) of shard i of n of CURRENT (or of
    ``version``)."""

    def open_shard(index_root, store, version: str | None = None):
        return open_index(str(index_root), version, shards=(i, n), category_of=store_category_of(store),
                          deleted_ids=np.fromiter(store.deleted_ids(), dtype=np.int64))

    open_shard.takes_version = True
    return open_shard


def register_shard_routes(app: Flask, service, *, token: str | None, token_env: str = DEFAULT_SHARD_TOKEN_ENV) -> None:
    """``POST /v1/shard/search`` (a shard server's only): ``Authorization: Bearer <token>``,
    the token being ``$token_env``'s value (unset or empty: 403 ``shard_disabled``)."""

    @app.post("/v1/shard/search")
    def shard_search():
        check_bearer(token, token_env, "shard")
        service.catch_up()  # live additions and deletions since the last call, as /v1/search does
        live = service.live()
        if live is None:
            raise ApiError(503, "not_ready", service.not_ready_reason())
        if (request.mimetype or "") != "application/json":
            raise ApiError(415, "unsupported_media_type", f"Content-Type {request.mimetype or '(none)'!r} is not supported; "
                           "send application/json")
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise ApiError(400, "bad_json", "body must be a JSON object with 'vectors' and 'k'")
        reject_unknown(body, SHARD_SEARCH_FIELDS)
        rows = body.get("vectors")
        if not isinstance(rows, list) or not rows:
            raise ApiError(400, "bad_vectors", f"vectors must be a list of 1..{MAX_SHARD_ROWS} vectors, got {str(rows)[:60]}")
        if len(rows) > MAX_SHARD_ROWS:
            raise ApiError(413, "too_many_vectors", f"a shard call takes at most {MAX_SHARD_ROWS} vectors, got {len(rows)}")
        k, category = parse_k(body.get("k")), parse_category(body.get("category"))
        if len(rows) * k > MAX_SHARD_CANDIDATES:
            raise ApiError(413, "too_many_candidates", f"{len(rows)} vectors x k {k} = {len(rows) * k} candidates, over the "
                           f"limit of {MAX_SHARD_CANDIDATES} per shard call")
        queries = np.stack([parse_vector(row, live.dim) for row in rows])
        with service._stage("search"):
            scores, ids = live.index.search(queries, k, category=category)
        scores = np.where(ids >= 0, scores, 0.0)  # JSON has no infinity: padding is marked by id -1
        return jsonify({"index_version": live.version, "shard": live.index.manifest.get("shard_of", [0, 1]),
                        "ids": ids.tolist(), "scores": scores.tolist()})


# ---------------------------------------------------------------------- front side

class ShardError(Exception):
    pass


class _Connections(threading.local):
    def __init__(self) -> None:
        self.by_url: dict[str, http.client.HTTPConnection] = {}


class ShardClient:
    """Keep-alive HTTP/1.1 to the shard servers, one connection per (pool thread, shard)."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._local = _Connections()

    def _connection(self, url: str) -> http.client.HTTPConnection:
        conn = self._local.by_url.get(url)
        if conn is None:
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname:
                raise ShardError(f"shard URL must be http://host:port, got {url!r}")
            conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=self.timeout_s)
            self._local.by_url[url] = conn
        return conn

    def request(self, url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> dict:
        for attempt in (1, 2):  # a keep-alive connection the server closed fails once: reconnect
            conn = self._connection(url)
            try:
                conn.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
                response = conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self._drop(url)
                if attempt == 2:
                    raise ShardError(f"{type(exc).__name__}: {exc}") from None
                continue
            except (OSError, http.client.HTTPException) as exc:
                self._drop(url)
                reason = "timeout" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
                raise ShardError(reason) from None
            if response.status != 200:
                raise ShardError(f"HTTP {response.status}: {data[:200].decode(errors='replace')}")
            return json.loads(data)
        raise AssertionError("unreachable")

    def _drop(self, url: str) -> None:
        conn = self._local.by_url.pop(url, None)
        if conn is not None:
            conn.close()


class ShardFanout:
    """Looks like an opened index to :class:`serve.service.SearchService` (``search_partial``,
    ``manifest``, ``ntotal``); every search goes to the shard servers."""
    is_fanout = True

    def __init__(self, urls: list[str], timeout_s: float, metrics=None, token: str | None = None):
        """``token``: the shard token sent with every shard search."""
        if not urls:
            raise ValueError("a shard front needs at least one shard URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout_s = timeout_s
        self.token = token
        self.metrics = metrics
        self.client = ShardClient(timeout_s)
        self._pool = ThreadPoolExecutor(max_workers=max(4, 8 * len(self.urls)), thread_name_prefix="shard")
        self.manifest: dict = {}
        self.ntotal = 0

    def refresh(self) -> dict:
        """Ask every shard's /readyz for its version, dim, metric and ntotal."""
        answers, errors = self._all("GET", "/readyz", None, {})
        if not answers:
            raise ShardError(f"no shard server is ready: {'; '.join(f'{u}: {e}' for u, e in errors.items())}")
        versions = sorted({a["index_version"] for a in answers.values()})
        dims = {a["dim"] for a in answers.values()}
        metrics = {a["metric"] for a in answers.values()}
        if len(dims) != 1 or len(metrics) != 1:
            raise ShardError(f"shard servers disagree on dim {sorted(dims)} or metric {sorted(metrics)}")
        if len(versions) > 1:
            log.warning("shard servers serve different versions: %s", versions)
        self.manifest = {"version": "+".join(versions), "dim": dims.pop(), "metric": metrics.pop()}
        self.ntotal = sum(int(a["ntotal"]) for a in answers.values())
        return {"ready": sorted(answers), "errors": errors}

    def forward(self, method: str, path: str, headers: dict) -> dict:
        answers, errors = self._all(method, path, None, headers)
        return {url: answers.get(url, {"error": errors.get(url)}) for url in self.urls}

    def _all(self, method: str, path: str, body: bytes | None, headers: dict):
        futures = {url: self._pool.submit(self.client.request, url, method, path, body, headers) for url in self.urls}
        done, _ = wait(futures.values(), timeout=self.timeout_s)
        answers, errors = {}, {}
        for url, future in futures.items():
            if future not in done:
                errors[url] = "timeout"
            elif future.exception() is not None:
                errors[url] = str(future.exception())
            else:
                answers[url] = future.result()
        return answers, errors

    def search_partial(self, queries: np.ndarray, k: int, *, category: str | None = None):
        """(scores n x k, ids n x k, partial): the exact top-k of the shards that answered, in
        shard calls within MAX_SHARD_ROWS rows and MAX_SHARD_CANDIDATES rows x k."""
        queries = np.asarray(queries, np.float32)
        step = max(1, min(MAX_SHARD_ROWS, MAX_SHARD_CANDIDATES // int(k)))
        if len(queries) <= step:
            return self._search_call(queries, k, category)
        parts = [self._search_call(queries[start:start + step], k, category) for start in range(0, len(queries), step)]
        return (np.vstack([p[0] for p in parts]), np.vstack([p[1] for p in parts]), any(p[2] for p in parts))

    def _search_call(self, queries: np.ndarray, k: int, category: str | None):
        body = json.dumps({"vectors": queries.tolist(), "k": int(k), "category": category}).encode()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        start = time.perf_counter()
        answers, errors = self._all("POST", "/v1/shard/search", body, headers)
        for url, reason in errors.items():
            log.warning("shard %s failed after %.0f ms: %s", url, (time.perf_counter() - start) * 1e3, reason)
            if self.metrics is not None:
                self.metrics.shard_errors.labels(url, "timeout" if reason == "timeout" else "error").inc()
        if not answers:
            raise ApiError(503, "shards_unavailable",
                           f"no shard server answered: {'; '.join(f'{u}: {e}' for u, e in errors.items())}")
        higher_is_better = self.manifest.get("metric") == "ip"
        scores, ids = merge_top_k([np.asarray(a["scores"], np.float32) for a in answers.values()],
                                  [np.asarray(a["ids"], np.int64) for a in answers.values()], k, higher_is_better)
        if errors and self.metrics is not None:
            self.metrics.partial_responses.inc(len(queries))
        return scores, ids, bool(errors)


def merge_top_k(scores: list[np.ndarray], ids: list[np.ndarray], k: int, higher_is_better: bool):
    """Exact top-k over the shards' lists by (score, id); -1 ids pad."""
    s, i = np.hstack(scores), np.hstack(ids)
    key = np.where(i >= 0, -s if higher_is_better else s, np.inf)
    order = top_k(key, i, k)
    s, i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    pad = np.take_along_axis(key, order, 1) == np.inf
    s[pad] = -np.inf if higher_is_better else np.inf
    i[pad] = -1
    if s.shape[1] < k:
        extra = k - s.shape[1]
        s = np.hstack([s, np.full((s.shape[0], extra), -np.inf if higher_is_better else np.inf, np.float32)])
        i = np.hstack([i, np.full((i.shape[0], extra), -1, np.int64)])
    return s, i


def fanout_opener(urls: list[str], timeout_s: float, metrics_of, token: str | None = None):
    """An opener for a front's SearchService: a refreshed :class:`ShardFanout` (``metrics_of()``
    gives the app's metrics once attached; ``token``: the shard token)."""
    state: dict = {}

    def open_fanout(index_root, store):
        fanout = state.get("fanout")
        if fanout is None:
            fanout = state["fanout"] = ShardFanout(urls, timeout_s, token=token)
        fanout.metrics = metrics_of()
        fanout.refresh()
        # A new object per load, so the service's swap sees a new snapshot; they share the pool.
        snapshot = ShardFanout.__new__(ShardFanout)
        snapshot.__dict__.update(fanout.__dict__)
        snapshot.manifest = dict(fanout.manifest)
        return snapshot

    return open_fanout
