"""Serving benchmark: a real ``imgsearch serve`` on 127.0.0.1 under a bounded load.

Prints tables of p50/p99 latency, throughput and non-2xx counts:

1. in-process vs HTTP at concurrency 1 (same index, same parameters, same join): the HTTP overhead;
2. vector queries on a 1M x 128 index (``bench/serve_data.py``) at concurrency 1, 8, 32, with
   micro-batching (2 ms window) and without (``--batch-window-ms 0``);
3. image queries (multipart JPEG uploads of real sample query photos; detect -> embed -> search)
   on a small real-photo index (60 sample products: embedding a bigger catalog costs minutes on
   this machine; search is a minor part of an image query's cost) at concurrency 1, 8, 32, with
   and without batching;
4. swap under load: vector load at concurrency 8 while CURRENT is switched to another version
   and ``POST /v1/admin/reload`` is called; zero failed requests, new version visible after.

Every load level is bounded in count and in time. The client is Python (``http.client``,
keep-alive, one connection per client thread) spread over several processes so the client's
GIL is not the bottleneck.

    .venv/bin/python bench/bench_serve.py [--quick] [--seconds S] [--skip-images]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

TOKEN = "bench-token"
K = 10


# ---------------------------------------------------------------------- server processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``imgsearch serve`` in its own session, logging to a file; ``repo`` runs another checkout's code."""

    def __init__(self, index_root, store, *extra: str, log_name: str = "server", repo: Path = REPO):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "imgsearch-bench-serve"
        log_dir.mkdir(exist_ok=True)
        self.log_path = log_dir / f"{log_name}-{self.port}.log"
        self._log = open(self.log_path, "wb")
        args = [sys.executable, "-m", "imgsearch", "serve", "--index-root", str(index_root), "--store", str(store),
                "--host", "127.0.0.1", "--port", str(self.port), *extra]
        env = {**os.environ, "IMGSEARCH_ADMIN_TOKEN": TOKEN, "TORCHDYNAMO_DISABLE": "1"}
        if Path(repo).resolve() != REPO.resolve():
            env["PYTHONPATH"] = str(repo)
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, cwd=repo, env=env,
                                     start_new_session=True)

    def wait_ready(self, timeout_s: float = 300) -> Server:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
            try:
                status, _ = request(self.port, "GET", "/readyz", timeout=2)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready in {timeout_s}s; log {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body, headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


# ---------------------------------------------------------------------- load client

def _client_proc(port, bodies, content_type, threads, per_thread, seconds, start_at, out_queue, versions_seen):
    """One client process: ``threads`` keep-alive connections, each sending up to ``per_thread``
    requests or until ``seconds`` have passed."""
    lat, statuses, versions = [], [], {}
    lock = threading.Lock()

    def worker(t: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine_lat, mine_status = [], []
        end = start_at + seconds
        n = 0
        while n < per_thread and time.time() < end:
            body = bodies[(t * 7919 + n) % len(bodies)]
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/search", body, {"Content-Type": content_type})
                response = conn.getresponse()
                data = response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                status, data = 599, b""
            mine_lat.append(time.perf_counter() - t0)
            mine_status.append(status)
            if versions_seen and status == 200:
                v = json.loads(data)["index_version"]
                with lock:
                    versions[v] = versions.get(v, 0) + 1
            n += 1
        conn.close()
        with lock:
            lat.extend(mine_lat)
            statuses.extend(mine_status)

    while time.time() < start_at:
        time.sleep(0.001)
    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out_queue.put((lat, statuses, versions, time.time()))


def run_load(port: int, bodies: list[bytes], content_type: str, concurrency: int, max_requests: int, seconds: float,
             track_versions: bool = False, during=None) -> dict:
    """Bounded closed-loop load: ``concurrency`` connections, at most ``max_requests`` in all
    and at most ``seconds``. ``during(t0)`` runs in this process while the load runs."""
    ctx = mp.get_context("spawn")
    procs_n = min(4, concurrency)
    out = ctx.Queue()
    start_at = time.time() + 1.5  # client processes import and connect first
    per_thread = max(1, max_requests // concurrency)
    procs = []
    for p in range(procs_n):
        threads = concurrency // procs_n + (1 if p < concurrency % procs_n else 0)
        proc = ctx.Process(target=_client_proc, args=(port, bodies, content_type, threads, per_thread, seconds, start_at,
                                                      out, track_versions))
        proc.start()
        procs.append(proc)
    extra = during(start_at) if during else None
    lat, statuses, versions, ends = [], [], {}, []
    for _ in procs:
        a, b, c, end = out.get(timeout=seconds + 120)
        lat += a
        statuses += b
        ends.append(end)
        for v, n in c.items():
            versions[v] = versions.get(v, 0) + n
    for proc in procs:
        proc.join()
    wall = max(1e-9, max(ends) - start_at)  # until the last client thread finished
    lat_ms = np.asarray(lat) * 1e3
    return {"n": len(lat), "p50": float(np.percentile(lat_ms, 50)), "p99": float(np.percentile(lat_ms, 99)),
            "qps": len(lat) / wall, "non2xx": sum(1 for s in statuses if not 200 <= s < 300), "versions": versions,
            "extra": extra, "wall": wall}


# ---------------------------------------------------------------------- sections

def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    sys.stdout.flush()


def vector_bodies(queries: np.ndarray, n: int) -> list[bytes]:
    return [json.dumps({"vector": q.tolist(), "k": K}).encode() for q in queries[:n]]


def in_process_vs_http(data: dict, port: int, n: int) -> list:
    """p50 of the same query through SearchService.search in this process and over HTTP."""
    from serve.requests import SearchRequest
    from serve.service import SearchService

    service = SearchService(data["index_root"], data["store"], batch_window_ms=0)
    service.load_current()
    live = service.live()
    queries = data["queries"][:n]
    raw, full = [], []
    for q in queries[: min(50, n)]:  # warm both paths
        service.search(live, SearchRequest(K, None, vector=q))
    fetch = max(K * 4, K + 32)
    for q in queries:
        t0 = time.perf_counter()
        live.index.search(q[None, :], fetch)
        raw.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        service.search(live, SearchRequest(K, None, vector=q))
        full.append(time.perf_counter() - t0)
    bodies = vector_bodies(data["queries"], n)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    over = []
    for body in bodies[:50]:
        conn.request("POST", "/v1/search", body, {"Content-Type": "application/json"})
        conn.getresponse().read()
    for body in bodies:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/search", body, {"Content-Type": "application/json"})
        conn.getresponse().read()
        over.append(time.perf_counter() - t0)
    conn.close()
    p50 = lambda xs: float(np.percentile(np.asarray(xs) * 1e3, 50))  # noqa: E731
    p99 = lambda xs: float(np.percentile(np.asarray(xs) * 1e3, 99))  # noqa: E731
    rows = [[f"index.search (fetch {fetch})", f"{p50(raw):.2f}", f"{p99(raw):.2f}"],
            ["SearchService.search in-process (search + join + collapse)", f"{p50(full):.2f}", f"{p99(full):.2f}"],
            ["HTTP POST /v1/search, keep-alive, concurrency 1", f"{p50(over):.2f}", f"{p99(over):.2f}"],
            ["**HTTP overhead (p50 HTTP - p50 in-process)**", f"**{p50(over) - p50(full):.2f}**", ""]]
    table(f"In-process vs HTTP, 1M vectors, k={K}, {n} queries", ["path", "p50 ms", "p99 ms"], rows)
    service.store().close()
    return rows


def index_batch_costs(data: dict, seconds_each: float = 1.5) -> None:
    """ms per query of ``index.search`` by batch size and faiss OpenMP threads: why the server
    searches with 1 thread (serve.commands.FAISS_THREADS)."""
    import faiss

    from index import open_index

    idx = open_index(str(data["index_root"]))
    q = data["queries"][:512]
    fetch = max(K * 4, K + 32)
    rows = []
    for threads in (1, 2):
        faiss.omp_set_num_threads(threads)
        row = [threads]
        for bs in (1, 2, 8, 32, 64):
            idx.search(q[:bs], fetch)
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < seconds_each:
                for a in range(0, len(q), bs):
                    idx.search(q[a:a + bs], fetch)
                    n += len(q[a:a + bs])
            row.append(f"{(time.perf_counter() - t0) / n * 1e3:.3f}")
        rows.append(row)
    faiss.omp_set_num_threads(1)
    table(f"index.search ms per query by batch size (1M, fetch {fetch}, default nprobe/rerank)",
          ["faiss threads", "batch 1", "batch 2", "batch 8", "batch 32", "batch 64"], rows)


def _hammer(service, live, queries, concurrency: int, seconds: float):
    from serve.requests import SearchRequest

    counts = [0] * concurrency
    lat: list[float] = []
    end = time.perf_counter() + seconds

    def worker(t: int) -> None:
        n, mine = 0, []
        while time.perf_counter() < end:
            q = queries[(t * 7919 + n) % len(queries)]
            t0 = time.perf_counter()
            service.arrivals.enter()
            try:
                service.search(live, SearchRequest(K, None, vector=q))
            finally:
                service.arrivals.leave()
            mine.append(time.perf_counter() - t0)
            n += 1
        counts[t] = n
        lat.extend(mine)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts, lat, time.perf_counter() - t0


def in_process_batching(data: dict, concurrency: int, seconds: float) -> None:
    """SearchService.search from ``concurrency`` threads in this process, batched vs not: the
    batcher's effect without HTTP parsing in the way."""
    import faiss

    from index.store import CatalogStore
    from serve.service import SearchService

    faiss.omp_set_num_threads(1)  # as the server does (serve.commands.FAISS_THREADS)
    sys.setswitchinterval(0.001)
    store = CatalogStore.open_readonly(data["store"])
    queries = data["queries"]
    rows = []
    for label, window in (("batched (2 ms)", 2.0), ("no batching", 0.0)):
        service = SearchService(data["index_root"], data["store"], batch_window_ms=window, store=store)
        service.load_current()
        live = service.live()
        counts, lat, wall = _hammer(service, live, queries, concurrency, seconds)
        ms = np.asarray(lat) * 1e3
        rows.append([label, concurrency, sum(counts), f"{np.percentile(ms, 50):.1f}", f"{np.percentile(ms, 99):.1f}",
                     f"{sum(counts) / wall:.0f}"])
    store.close()
    table(f"In-process SearchService.search (search + join), {concurrency} threads, 1M vectors",
          ["mode", "threads", "queries", "p50 ms", "p99 ms", "queries/s"], rows)


def load_levels(name: str, port: int, bodies, content_type, levels, max_requests, seconds) -> dict:
    results = {}
    for c in levels:
        r = run_load(port, bodies, content_type, c, max_requests, seconds)
        results[c] = r
        print(f"  {name} c={c}: n={r['n']} p50={r['p50']:.1f}ms p99={r['p99']:.1f}ms {r['qps']:.0f}/s non2xx={r['non2xx']}",
              flush=True)
    return results


def batch_histogram(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out = []
    for kind in ("search", "embed"):
        count = [ln for ln in text.splitlines() if ln.startswith(f'imgsearch_batch_size_count{{kind="{kind}"}}')]
        total = [ln for ln in text.splitlines() if ln.startswith(f'imgsearch_batch_size_sum{{kind="{kind}"}}')]
        if count and total and float(count[0].split()[-1]):
            out.append(f"{kind}: mean batch {float(total[0].split()[-1]) / float(count[0].split()[-1]):.1f}")
    return ", ".join(out) or "-"


def section_load(kind: str, index_root, store, bodies, content_type, levels, max_requests, seconds, extra_args,
                 window_ms: str = "2") -> list:
    rows = []
    summary = {}
    batched = f"batched ({window_ms} ms)"
    for label, window in ((batched, window_ms), ("no batching", "0")):
        server = Server(index_root, store, "--threads", "64", "--batch-window-ms", window, *extra_args,
                        log_name=f"{kind}-{window}").wait_ready()
        try:
            results = load_levels(f"{kind} {label}", server.port, bodies, content_type, levels, max_requests, seconds)
            mean_batch = batch_histogram(server.port)
        finally:
            server.stop()
        summary[label] = results
        for c, r in results.items():
            rows.append([label, c, r["n"], f"{r['p50']:.1f}", f"{r['p99']:.1f}", f"{r['qps']:.0f}", r["non2xx"],
                         mean_batch if c == levels[-1] else ""])
    top = levels[-1]
    ratio = summary[batched][top]["qps"] / max(1e-9, summary["no batching"][top]["qps"])
    table(f"{kind} queries over HTTP (k={K})", ["mode", "concurrency", "requests", "p50 ms", "p99 ms", "req/s", "non-2xx",
                                                 "batches (whole run)"], rows)
    print(f"\nmicro-batching at concurrency {top}: {ratio:.2f}x the throughput of no batching")
    return rows


def section_swap(data: dict, seconds: float) -> None:
    from index.ann import versions

    root = str(data["index_root"])
    versions.set_current(root, "v1")
    server = Server(data["index_root"], data["store"], "--threads", "32", log_name="swap").wait_ready()
    bodies = vector_bodies(data["queries"], 500)

    def swap(start_at: float):
        time.sleep(max(0.0, start_at - time.time()) + seconds / 3)
        versions.set_current(root, "v2")
        t0 = time.perf_counter()
        status, body = request(server.port, "POST", "/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300)
        return status, body, time.perf_counter() - t0

    try:
        # Long enough for the reload (load + warm of the 1M version under load) to finish mid-run.
        r = run_load(server.port, bodies, "application/json", 8, 10**9, 3 * seconds, track_versions=True, during=swap)
        status, body, took = r["extra"]
        _, after = request(server.port, "POST", "/v1/search", bodies[0], {"Content-Type": "application/json"})
    finally:
        server.stop()
        versions.set_current(root, "v1")
    table("Swap under load (1M vectors, concurrency 8)", ["requests", "non-2xx", "p50 ms", "p99 ms", "reload status",
                                                           "reload took s", "answers by version", "version after"],
          [[r["n"], r["non2xx"], f"{r['p50']:.1f}", f"{r['p99']:.1f}", status, f"{took:.1f}", json.dumps(r["versions"]),
            after["index_version"]]])


def image_bodies(photos: list[Path], n: int) -> tuple[list[bytes], str]:
    boundary = "benchboundary"
    out = []
    for path in photos[:n]:
        data = path.read_bytes()
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{K}\r\n'
                   f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
                   f"Content-Type: image/jpeg\r\n\r\n".encode() + data + f"\r\n--{boundary}--\r\n".encode())
    return out, f"multipart/form-data; boundary={boundary}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per level (a smoke run)")
    parser.add_argument("--seconds", type=float, default=20.0, help="time bound per load level (default 20)")
    parser.add_argument("--skip-images", action="store_true")
    parser.add_argument("--window-ms", default="2", help="the batched server's --batch-window-ms (default 2)")
    parser.add_argument("--only", choices=["overhead", "inproc", "vector", "image", "swap"], default=None)
    args = parser.parse_args(argv)
    from serve_data import prepare_1m, prepare_images

    t0 = time.monotonic()
    data = None
    if args.only != "image":
        data = prepare_1m()
        manifest = json.loads((Path(data["index_root"]) / "v1" / "manifest.json").read_text())
        print(f"1M index: {manifest['factory']}, search defaults {manifest['search_defaults']}, "
              f"recall@10 {manifest['measured_recall']}; {os.cpu_count()} CPU cores (shared); prepared in {data['seconds']:.0f}s")
    max_requests = 400 if args.quick else 4000
    seconds = min(args.seconds, 8.0) if args.quick else args.seconds
    if args.only in (None, "overhead"):
        server = Server(data["index_root"], data["store"], "--threads", "8", log_name="overhead").wait_ready()
        try:
            in_process_vs_http(data, server.port, 200 if args.quick else 1000)
        finally:
            server.stop()
    if args.only in (None, "vector", "inproc"):
        index_batch_costs(data)
        in_process_batching(data, 32, min(seconds, 10.0))
    if args.only in (None, "vector"):
        section_load("vector", data["index_root"], data["store"], vector_bodies(data["queries"], 2000), "application/json",
                     (1, 8, 32), max_requests, seconds, [], args.window_ms)
    if args.only in (None, "image") and not args.skip_images:
        images = prepare_images()
        bodies, ctype = image_bodies(images["photos"], 200)
        print(f"image index: {len(images['photos'])} query photos, store {images['store']}")
        section_load("image", images["index_root"], images["store"], bodies, ctype, (1, 8, 32),
                     max(50, max_requests // 10), seconds, [], args.window_ms)
    if args.only in (None, "swap"):
        section_swap(data, seconds)
    print(f"\nbench_serve: done in {time.monotonic() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
