"""`imgsearch demo` on a fresh copy: time to the page answering, time to the trained model live,
and R@1 / R@10 on the held-out query photos through HTTP, for the pretrained model at start and the
trained one once live; then Ctrl-C (no trainer left) and a second run (reuses the trained model).

    .venv/bin/python bench/bench_demo.py [--fresh /tmp/fresh-demo] [--port 8093]

The copy is the working tree without demo-data and .venv, run with this venv's
``imgsearch``; it writes bench/results/bench_demo.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def post(url: str, body: dict, timeout: float = 60.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def model(base: str) -> dict | None:
    try:
        return json.loads(get(base + "/v1/model")[1])
    except (OSError, ValueError):
        return None


def recall(base: str, sample: Path) -> dict:
    """R@1 / R@10 (distinct products) of every held-out query photo, one HTTP request each."""
    queries = [json.loads(line) for line in (sample / "queries.jsonl").read_text().splitlines()]
    hits1 = hits10 = 0
    versions = set()
    started = time.perf_counter()
    for q in queries:
        body = post(base + "/v1/search", {"image_base64": base64.b64encode((sample / q["image"]).read_bytes()).decode(),
                                          "k": 10})
        ids = [r["product_id"] for r in body["results"]]
        versions.add(body["index_version"])
        hits1 += bool(ids[:1] == [q["product_id"]])
        hits10 += q["product_id"] in ids[:10]
    n = len(queries)
    return {"queries": n, "r_at_1": round(hits1 / n, 4), "r_at_10": round(hits10 / n, 4),
            "index_versions": sorted(versions), "seconds": round(time.perf_counter() - started, 1)}


def start(fresh: Path, port: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(REPO / ".venv" / "bin" / "imgsearch"), "--log-format", "text", "demo", "--port", str(port)],
                            cwd=fresh, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_page(base: str, proc: subprocess.Popen, t0: float, timeout_s: float) -> float:
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"demo exited {proc.returncode}")
        try:
            if get(base + "/")[0] == 200 and get(base + "/readyz")[0] == 200:
                return time.monotonic() - t0
        except (OSError, urllib.error.HTTPError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"page not answering within {timeout_s} s")


def stop(proc: subprocess.Popen) -> float:
    """Ctrl-C the demo's process group; returns the seconds until every process of it is gone."""
    t = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return time.monotonic() - t


def trainer_pids(fresh: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"serve.demo_train --workdir {fresh}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", default="/tmp/fresh-demo")
    parser.add_argument("--port", type=int, default=8093)
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--first-phase-only", action="store_true",
                        help="stop after the first model's recall (no waiting for the background training)")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "bench_demo.json"))
    args = parser.parse_args()
    fresh = Path(args.fresh)
    subprocess.run(["rm", "-rf", str(fresh)], check=True)
    # As `rsync -a --exclude demo-data --exclude .venv` (no rsync needed): the tree without its demo data.
    shutil.copytree(REPO, fresh, symlinks=True,
                    ignore=lambda d, names: [n for n in names if Path(d) == REPO and n in ("demo-data", ".venv")])
    base = f"http://127.0.0.1:{args.port}"
    log = fresh / "demo.log"
    result: dict = {"command": " ".join(sys.argv), "host": platform.node(), "cpus": os.cpu_count(),
                    "date": time.strftime("%Y-%m-%d"), "load_at_start": os.getloadavg()[0]}

    t0 = time.monotonic()
    proc = start(fresh, args.port, log)
    result["page_s"] = round(wait_page(base, proc, t0, 900), 1)
    first = model(base)
    result["pretrained"] = {"model": first and first["model"], "kind": first and first["kind"],
                            **recall(base, fresh / "demo-data" / "sample")}
    if args.first_phase_only:
        result["stop_s"] = round(stop(proc), 1)
        result["trainers_left_after_stop"] = len(trainer_pids(fresh))
        return finish(result, Path(args.output))
    timeline = []
    while time.monotonic() - t0 < args.timeout_s:
        body = model(base) or {}
        training = body.get("training") or {}
        if not timeline or timeline[-1]["state"] != training.get("state") or timeline[-1]["epoch"] != training.get("epoch"):
            timeline.append({"t_s": round(time.monotonic() - t0, 1), "state": training.get("state"),
                             "epoch": training.get("epoch"), "eta_s": training.get("eta_s"), "model_kind": body.get("kind")})
            print(timeline[-1], flush=True)
        if training.get("state") == "failed":
            raise SystemExit(f"training failed: {training.get('error')}")
        if training.get("state") == "live" and body.get("kind") == "trained":
            break
        time.sleep(2.0)
    result["trained_live_s"] = round(time.monotonic() - t0, 1)
    result["timeline"] = timeline
    live = model(base)
    result["trained"] = {"model": live["model"], "kind": live["kind"], **recall(base, fresh / "demo-data" / "sample")}
    result["stop_s"] = round(stop(proc), 1)
    result["trainers_left_after_stop"] = len(trainer_pids(fresh))

    t1 = time.monotonic()
    proc = start(fresh, args.port, log)
    try:
        result["second_run_page_s"] = round(wait_page(base, proc, t1, 900), 1)
        again = model(base)
        result["second_run"] = {"model": again["model"], "kind": again["kind"], "training": again["training"],
                                "trainers": len(trainer_pids(fresh))}
    finally:
        stop(proc)
    return finish(result, Path(args.output))


def finish(result: dict, out: Path) -> int:
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "timeline"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
