"""Hostile clients against a real ``imgsearch serve``: what normal queries see meanwhile.

One server over the demo's real sample catalog (pretrained model, default flags except
``--workers``), plus a shard server (``--shard-of``) over the same index. For each scenario, a
closed-loop client sends normal image queries (multipart uploads of real sample query photos)
while the hostile load runs, bounded in time:

1. ``baseline``: normal queries alone;
2. ``decode bombs``: 16 concurrent searches, each a small WebP that decodes to 6000 x 6000;
3. ``slow clients``: 40 sockets, half dripping a request head, half a body, one byte per 1.5 s;
4. ``shard calls``: on the shard server, the largest call its limits admit (256 rows x k = 1024)
   from 4 threads, against normal vector queries there (the stored vectors of real photos);
   and, once each, 1,024 rows x k = 10,000 without a token (full server and shard server) and
   with one (shard server): refused, with the answer's status, bytes and time.

Peak RSS is sampled every 50 ms from every gunicorn worker (``/proc``); "held" is the RSS at
the scenario's end. Results go to ``bench/results/bench_hostile.json``.

    .venv/bin/python bench/bench_hostile.py [--seconds 15] [--workers 2]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import select
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import K, Server, image_bodies, table  # noqa: E402
from serve_data import prepare_images  # noqa: E402

SHARD_TOKEN = "bench-shard-token"
RESULTS = Path(__file__).resolve().parent / "results" / "bench_hostile.json"


# ---------------------------------------------------------------------- measurement

def worker_pids(master: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split()]
    except OSError:
        return []


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RssSampler:
    """Peak and final RSS of the workers of each watched gunicorn master, sampled every 50 ms."""

    def __init__(self, masters: list[int]):
        self.masters, self.peak, self.last = masters, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> float:
        return max((rss_mb(p) for m in self.masters for p in worker_pids(m)), default=0.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.last = self._sample()


def post(port: int, path: str, body: bytes, ctype: str, headers: dict | None = None, timeout: float = 60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body, {"Content-Type": ctype, **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return 599, b""
    finally:
        conn.close()


def normal_load(port: int, bodies: list[bytes], ctype: str, stop_at: float) -> dict:
    """Normal queries one after another until ``stop_at``: latency and failures."""
    lat, failed = [], 0
    n = 0
    while time.monotonic() < stop_at:
        t0 = time.perf_counter()
        status, _ = post(port, "/v1/search", bodies[n % len(bodies)], ctype, timeout=30)
        lat.append(time.perf_counter() - t0)
        failed += status != 200
        n += 1
    ms = np.asarray(lat) * 1e3
    return {"n": len(lat), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max()), "failed": failed}


# ---------------------------------------------------------------------- hostile loads

def bomb_bytes() -> bytes:
    buffer = io.BytesIO()
    gradient = np.linspace(0, 255, 6000, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(gradient, (6000, 1))] * 3, axis=-1)).save(buffer, "WEBP", quality=5)
    return buffer.getvalue()


def decode_bombs(port: int, stop_at: float, threads: int = 16) -> tuple[list[threading.Thread], dict]:
    data = bomb_bytes()
    body, ctype = image_bodies_of(data)
    statuses: dict = {"bomb_bytes": len(data)}
    lock = threading.Lock()

    def loop():
        while time.monotonic() < stop_at:
            status, _ = post(port, "/v1/search", body, ctype, timeout=120)
            with lock:
                statuses[str(status)] = statuses.get(str(status), 0) + 1

    return [threading.Thread(target=loop, daemon=True) for _ in range(threads)], statuses


def image_bodies_of(data: bytes) -> tuple[bytes, str]:
    boundary = "benchboundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="bomb.webp"\r\n'
            f"Content-Type: image/webp\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def slow_clients(port: int, stop_at: float, sockets: int = 40) -> tuple[list[threading.Thread], dict]:
    outcome: dict = {}
    lock = threading.Lock()

    def drip(kind: str):
        head = b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4096\r\n\r\n"
        end = "dropped"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                if kind == "body":
                    sock.sendall(head)
                for byte in (head if kind == "head" else b"{" * 4096):
                    if time.monotonic() >= stop_at:
                        end = "held to the end"
                        break
                    sock.send(bytes([byte]))
                    if select.select([sock], [], [], 1.5)[0]:  # the server answered (408) meanwhile
                        answer = sock.recv(200)
                        end = f"answered {answer.split()[1].decode()}" if answer.startswith(b"HTTP/") else "closed by the server"
                        break
        except OSError:
            end = "closed by the server"
        with lock:
            outcome[end] = outcome.get(end, 0) + 1

    return [threading.Thread(target=drip, args=(kind,), daemon=True) for kind in ("head", "body") * (sockets // 2)], outcome


def shard_body(queries: np.ndarray, rows: int, k: int) -> bytes:
    picked = queries[np.arange(rows) % len(queries)]
    return json.dumps({"vectors": np.round(picked, 5).tolist(), "k": k}).encode()


def shard_flood(port: int, body: bytes, stop_at: float, threads: int = 4) -> tuple[list[threading.Thread], dict]:
    stats: dict = {"calls": 0, "bytes_out": 0, "statuses": {}}
    lock = threading.Lock()
    auth = {"Authorization": f"Bearer {SHARD_TOKEN}"}

    def loop():
        while time.monotonic() < stop_at:
            status, data = post(port, "/v1/shard/search", body, "application/json", auth, timeout=60)
            with lock:
                stats["calls"] += 1
                stats["bytes_out"] += len(data)
                stats["statuses"][str(status)] = stats["statuses"].get(str(status), 0) + 1

    return [threading.Thread(target=loop, daemon=True) for _ in range(threads)], stats


def one_call(port: int, body: bytes, token: str | None) -> dict:
    t0 = time.perf_counter()
    status, data = post(port, "/v1/shard/search", body, "application/json",
                        {"Authorization": f"Bearer {token}"} if token else {})
    code = json.loads(data)["error"]["code"] if data.startswith(b'{"error"') else ""
    return {"status": status, "code": code, "bytes": len(data), "ms": (time.perf_counter() - t0) * 1e3}


def run_scenario(name, masters, normal_port, bodies, ctype, seconds, hostile=None) -> dict:
    threads, extra = hostile if hostile else ([], {})
    stop_at = time.monotonic() + seconds
    with RssSampler(masters) as rss:
        for thread in threads:
            thread.start()
        time.sleep(min(1.0, seconds / 4))  # the hostile load is established first
        result = normal_load(normal_port, bodies, ctype, stop_at)
        for thread in threads:
            thread.join(timeout=150)
    return {"scenario": name, **result, "peak_rss_mb": rss.peak, "held_rss_mb": rss.last, "hostile": extra}


# ---------------------------------------------------------------------- main

def stored_vectors(store_path, n: int = 64) -> np.ndarray:
    from index.store import CatalogStore

    with CatalogStore.open_readonly(store_path) as store:
        for _, vectors in store.iter_blocks(n):
            return np.asarray(vectors, dtype=np.float32)
    raise RuntimeError(f"store {store_path} holds no vectors")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each scenario (default 15)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers of the full server (default 2)")
    args = parser.parse_args(argv)
    images = prepare_images()
    bodies, ctype = image_bodies(images["photos"], 200)
    queries = stored_vectors(images["store"])
    os.environ["IMGSEARCH_SHARD_TOKEN"] = SHARD_TOKEN  # the shard server's token (inherited)
    full = Server(images["index_root"], images["store"], "--workers", str(args.workers), log_name="hostile").wait_ready()
    shard = Server(images["index_root"], images["store"], "--shard-of", f"{images['index_root']}:0/1",
                   log_name="hostile-shard").wait_ready()
    rows = []
    try:
        masters = [full.proc.pid]
        rows.append(run_scenario("baseline", masters, full.port, bodies, ctype, args.seconds))
        rows.append(run_scenario("decode bombs (16 concurrent, 6000x6000 WebP)", masters, full.port, bodies, ctype,
                                 args.seconds, decode_bombs(full.port, time.monotonic() + args.seconds)))
        rows.append(run_scenario("slow clients (40 sockets, 1 byte / 1.5 s)", masters, full.port, bodies, ctype,
                                 args.seconds, slow_clients(full.port, time.monotonic() + args.seconds)))
        vector_bodies = [json.dumps({"vector": q.tolist(), "k": K}).encode() for q in queries]
        huge = shard_body(queries, 1024, 10_000)
        refused = {"full server, no token": one_call(full.port, huge, None),
                   "shard server, no token": one_call(shard.port, huge, None),
                   "shard server, token": one_call(shard.port, huge, SHARD_TOKEN)}
        rows.append(run_scenario("shard server: vector queries alone", [shard.proc.pid], shard.port, vector_bodies,
                                 "application/json", args.seconds))
        flood = shard_flood(shard.port, shard_body(queries, 256, 1024), time.monotonic() + args.seconds)
        rows.append(run_scenario("shard calls at the limit (4 x 256 rows x k=1024)", [shard.proc.pid], shard.port,
                                 vector_bodies, "application/json", args.seconds, flood))
    finally:
        full.stop()
        shard.stop()
    table(f"Normal queries during hostile load ({os.cpu_count()} cores, {args.workers} workers x 16 threads, "
          f"{args.seconds:g} s each)",
          ["scenario", "normal queries", "p50 ms", "p99 ms", "failed", "peak worker RSS MB", "held RSS MB", "hostile"],
          [[r["scenario"], r["n"], f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}", r["failed"], f"{r['peak_rss_mb']:.0f}",
            f"{r['held_rss_mb']:.0f}", json.dumps(r["hostile"])] for r in rows])
    table(f"A 1,024 rows x k=10,000 shard call ({len(huge) / 1e6:.1f} MB request)",
          ["target", "status", "code", "response bytes", "ms"],
          [[name, c["status"], c["code"], c["bytes"], f"{c['ms']:.0f}"] for name, c in refused.items()])
    RESULTS.write_text(json.dumps({"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   "cpus": os.cpu_count(), "args": vars(args), "scenarios": rows,
                                   "oversized_shard_call": refused}, indent=1) + "\n")
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
