"""Scale-out with real processes on loopback: two shard servers and a front server.

The merged results of the front equal the single-process results (Flat index: exact), and
killing one shard server gives partial results, not errors.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from index.ann.build import build_version
from index.ann.sources import store_source
from index.store import CatalogStore
from index.store.ingest import ingest_catalog
from serve.service import SearchService
from serve.shards import merge_top_k, parse_shard_of
from tests.test_serve import DIM, colour_embed

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180
SHARD_TOKEN = "cluster-shard-token"  # the front sends it; the shard servers require it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body=None, headers=None, timeout=30):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class ServerProcess:
    """``python -m imgsearch serve ...`` on a free loopback port, logs in a file."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imgsearch", "serve", *args, "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "TORCHDYNAMO_DISABLE": "1", **(env or {})},
            start_new_session=True,
        )

    def wait_ready(self) -> "ServerProcess":
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            try:
                if http("GET", self.url + "/readyz", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"server not ready in {START_TIMEOUT_S}s: {self.log_path.read_text()[-3000:]}")

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)  # gunicorn master and its workers: our own session only
            self.proc.wait(timeout=30)
        self._log.close()


@pytest.fixture(scope="module")
def sharded_env(tmp_path_factory):
    from PIL import Image

    from tests.test_serve import COLOURS

    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(3)
    lines = ["product_id,image,category,title"]
    for p in range(40):
        category = ("red", "blue")[p % 2]
        pixels = np.clip(np.array(COLOURS[category]) + rng.normal(0, 10 + p, size=(30 + p, 45, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"s{p:02d}.png")
        lines.append(f"sku-{p:02d},s{p:02d}.png,{category},Thing {p}")
    (root / "catalog.csv").write_text("\n".join(lines) + "\n")
    store_path, index_root = root / "store", root / "index"
    with CatalogStore.create_or_open(store_path, dim=DIM, vector_dtype="float32") as store:
        ingest_catalog(root / "catalog.csv", store, colour_embed, progress=False)
        build_version(store_source(store), str(index_root), factory="auto", shards=4, version="s4")
    return root, store_path, index_root


@pytest.fixture(scope="module")
def cluster(sharded_env):
    root, store_path, index_root = sharded_env
    common = ["--index-root", str(index_root), "--store", str(store_path), "--threads", "4"]
    env = {"IMGSEARCH_SHARD_TOKEN": SHARD_TOKEN}
    shards = [ServerProcess([*common, "--shard-of", f"{index_root}:{i}/2"], root / f"shard{i}.log", env=env) for i in range(2)]
    try:
        for s in shards:
            s.wait_ready()
        front = ServerProcess([*common, "--shards", ",".join(s.url for s in shards), "--shard-timeout-ms", "2000",
                               "--batch-window-ms", "2"],
                              root / "front.log", env=env).wait_ready()
    except BaseException:
        for s in shards:
            s.kill()
        raise
    yield shards, front
    front.kill()
    for s in shards:
        s.kill()


@pytest.fixture(scope="module")
def single(sharded_env):
    _, store_path, index_root = sharded_env
    service = SearchService(index_root, store_path, batch_window_ms=0)
    assert service.load_current() is not None
    return service


def _queries(single) -> list[list[float]]:
    store = single.store()
    ids = [r.id for r in store.iter_records()][:10]
    rng = np.random.default_rng(0)
    q = store.vectors_for(ids) + rng.normal(0, 0.05, size=(len(ids), DIM)).astype(np.float32)
    return q.tolist()


def _metric(server, name: str) -> float:
    text = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
    return float(next((line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")), "0"))


def test_shard_of_is_parsed():
    assert parse_shard_of("/x/idx:1/3") == ("/x/idx", 1, 3)
    assert parse_shard_of("0/2") == (None, 0, 2)
    for bad in ("/x:2/2", "/x:a/b", "/x:1"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard_of(bad)


def test_merge_is_exact_with_ties_broken_by_id():
    s, i = merge_top_k([np.array([[0.9, 0.5]], np.float32), np.array([[0.9, 0.7]], np.float32)],
                       [np.array([[8, 3]]), np.array([[2, -1]])], 3, higher_is_better=True)
    assert i.tolist() == [[2, 8, 3]] and s.tolist()[0][:2] == pytest.approx([0.9, 0.9])


def test_each_shard_serves_half_and_the_front_sums_them(cluster):
    shards, front = cluster
    sizes = [http("GET", s.url + "/readyz")[1]["ntotal"] for s in shards]
    assert sum(sizes) == 40 and all(sizes)
    ready = http("GET", front.url + "/readyz")[1]
    assert ready["ntotal"] == 40 and ready["index_version"] == "s4"


def test_front_results_equal_single_process_results(cluster, single):
    _, front = cluster
    from serve.requests import SearchRequest

    for k, category in ((5, None), (12, "blue"), (40, None)):
        for vector in _queries(single):
            status, body = http("POST", front.url + "/v1/search", {"vector": vector, "k": k, **({"category": category} if category else {})})
            assert status == 200, body
            assert body["partial"] is False and body["index_version"] == "s4"
            expected = single.search(single.live(), SearchRequest(k, category, vector=np.asarray(vector, np.float32)))
            assert [r["product_id"] for r in body["results"]] == [r["product_id"] for r in expected["results"]]
            assert [r["score"] for r in body["results"]] == pytest.approx([r["score"] for r in expected["results"]], abs=1e-5)


def test_a_slow_shard_is_cut_off_at_its_timeout(cluster, single):
    shards, front = cluster
    vector = _queries(single)[1]
    os.killpg(shards[0].proc.pid, signal.SIGSTOP)  # frozen: accepts connections, never answers
    try:
        t0 = time.monotonic()
        status, body = http("POST", front.url + "/v1/search", {"vector": vector, "k": 40})
        took = time.monotonic() - t0
    finally:
        os.killpg(shards[0].proc.pid, signal.SIGCONT)
    assert status == 200 and body["partial"] is True and 0 < len(body["results"]) < 40
    assert 1.9 < took < 10, took  # --shard-timeout-ms 2000
    status, body = http("POST", front.url + "/v1/search", {"vector": vector, "k": 40})
    assert status == 200 and body["partial"] is False and len(body["results"]) == 40


def test_killing_a_shard_gives_partial_results_not_errors(cluster, single):
    shards, front = cluster
    shard_ids = []
    for s in shards:  # which products each shard holds
        status, body = http("POST", s.url + "/v1/shard/search", {"vectors": [_queries(single)[0]], "k": 40},
                            {"Authorization": f"Bearer {SHARD_TOKEN}"})
        assert status == 200
        shard_ids.append({i for i in body["ids"][0] if i >= 0})
    partial_before = _metric(front, "imgsearch_partial_responses_total")
    shards[1].kill()
    vector = _queries(single)[0]
    for _ in range(3):
        status, body = http("POST", front.url + "/v1/search", {"vector": vector, "k": 40})
        assert status == 200, body
        assert body["partial"] is True
        got = {r["product_id"] for r in body["results"]}
        store = single.store()
        assert got == {store.get(i).product_id for i in shard_ids[0]}
    metrics = urllib.request.urlopen(front.url + "/metrics", timeout=10).read().decode()
    assert _metric(front, "imgsearch_partial_responses_total") == partial_before + 3
    assert f'imgsearch_shard_errors_total{{reason="error",shard="{shards[1].url}"}}' in metrics
    shards[0].kill()
    status, body = http("POST", front.url + "/v1/search", {"vector": vector})
    assert status == 503 and body["error"]["code"] == "shards_unavailable"
    assert http("GET", front.url + "/healthz")[0] == 200


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--shard-of", "idx:0/2", "--shards", "http://127.0.0.1:1"], "exclude each other"),
        (["--shard-of", "other:0/2"], "'other'"),
        (["--shard-of", "idx:2/2"], "0 <= i < n"),
        (["--shards", " , "], "at least one URL"),
    ],
)
def test_serve_role_options_are_checked_before_serving(extra, fragment, capsys, monkeypatch):
    from imgsearch.cli import main

    monkeypatch.setenv("IMGSEARCH_SHARD_TOKEN", SHARD_TOKEN)
    assert main(["serve", "--index-root", "idx", "--store", "st", *extra]) == 2
    assert fragment in capsys.readouterr().err
