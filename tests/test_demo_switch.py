"""The demo's switch-over from the pretrained model to another one, on a real ``imgsearch serve``
(no ``--model``: it follows the live version's model) over the real sample catalog: queries from
several threads throughout, none failing; a version whose checkpoint is not its recorded model is
refused; and the background training job end to end on a tiny budget."""

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.test_serve_shards import REPO, ServerProcess, http

TOKEN = "switch-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _checkpoint(path: Path, seed: int) -> Path:
    """A real checkpoint of another model: the pretrained trunk with another fixed projection."""
    from embed.model import EmbedderConfig, EmbeddingNet
    from embed.pipeline import make_checkpoint

    return make_checkpoint(EmbeddingNet.pretrained(EmbedderConfig(projection_seed=seed))).save(path)


def _photo(demo, n=0) -> str:
    root = Path(demo.queries_dir).parent
    q = [json.loads(line) for line in (root / "queries.jsonl").read_text().splitlines()][n]
    return base64.b64encode((root / q["image"]).read_bytes()).decode()


def _wait_model(server, model: str, timeout_s: float = 90) -> dict:
    deadline = time.monotonic() + timeout_s
    body: dict = {}
    while time.monotonic() < deadline:
        status, body = http("GET", server.url + "/v1/model")
        if status == 200 and body["model"] == model:
            return body
        time.sleep(0.3)
    raise AssertionError(f"server never reported model {model[:16]}: last {body}; log {server.log_path.read_text()[-3000:]}")


def _server(demo, tmp_path, env=None) -> ServerProcess:
    return ServerProcess(["--index-root", str(demo.index_root), "--store", str(demo.store_path), "--threads", "4",
                          "--watch-current", "0.5"], tmp_path / "server.log",
                         env={"IMGSEARCH_ADMIN_TOKEN": TOKEN, **(env or {})}).wait_ready()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from serve.demo import prepare_demo

    return prepare_demo(tmp_path_factory.mktemp("switch") / "demo", limit_products=12)


def test_switch_to_another_model_fails_no_request_and_a_mismatched_checkpoint_is_refused(demo, tmp_path):
    from serve.demo import embed_and_index

    server = _server(demo, tmp_path)
    try:
        first = _wait_model(server, demo.model_hash, 10)
        assert first["kind"] == "pretrained" and first["training"] is None
        old_version = first["index_version"]
        photos = [_photo(demo, n) for n in range(3)]
        answers: list[tuple[int, int, str | None, tuple]] = []
        stop = threading.Event()

        def hammer(n: int) -> None:
            while not stop.is_set():
                status, body = http("POST", server.url + "/v1/search", {"image_base64": photos[n], "k": 3}, timeout=60)
                got = tuple((r["product_id"], round(r["score"], 4)) for r in body.get("results", []))
                answers.append((status, n, body.get("index_version"), got))

        threads = [threading.Thread(target=hammer, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            checkpoint_b = _checkpoint(tmp_path / "model-b.ckpt", seed=7)
            model_b = embed_and_index(Path(demo.index_root).parent, checkpoint_b)  # its own store, a new version
            switched = _wait_model(server, model_b)
            time.sleep(2.0)  # queries keep coming on model B
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=120)
        assert switched["kind"] == "trained" and switched["index_model"] == model_b
        new_version = switched["index_version"]
        assert new_version != old_version
        failed = [a for a in answers if a[0] != 200]
        assert not failed, f"{len(failed)} of {len(answers)} requests failed, e.g. {failed[:3]}"
        versions = [a[2] for a in answers]
        assert old_version in versions and new_version in versions and versions[-1] == new_version
        # One photo on one version always gets the same answer: no request mixed two models.
        for n in range(3):
            for version in (old_version, new_version):
                seen = {a[3] for a in answers if a[1] == n and a[2] == version}
                assert len(seen) <= 1, f"photo {n} on {version}: {len(seen)} different answers"

        # A version whose checkpoint file is not the model its vectors came from: refused, B stays live.
        from embed.pipeline import load_pipeline
        from index.ann import versions as versions_mod
        from index.ann.build import build_version
        from index.ann.sources import store_source
        from index.store import CatalogStore
        from index.store.ingest import ingest_catalog

        checkpoint_c = _checkpoint(tmp_path / "model-c.ckpt", seed=11)
        pipeline_c = load_pipeline(str(checkpoint_c))
        with CatalogStore.create_or_open(tmp_path / "store-c", dim=pipeline_c.dim) as store:
            ingest_catalog(Path(demo.index_root).parent / "sample" / "catalog.csv", store, pipeline_c.embed_catalog,
                           32, progress=False, model=pipeline_c.model_hash, model_checkpoint=checkpoint_c)
            _checkpoint(checkpoint_c, seed=13)  # the file now holds other weights
            with versions_mod.index_root_lock(str(demo.index_root)):
                refused = build_version(store_source(store), str(demo.index_root), build_notes={"job": "build"}).version
        manifest = versions_mod.read_manifest(versions_mod.version_dir(str(demo.index_root), refused))
        assert manifest["model_checkpoint"] == str(checkpoint_c) and manifest["model"] == pipeline_c.model_hash
        assert manifest["store"]["path"] == str(tmp_path / "store-c")
        time.sleep(3.0)  # several CURRENT polls
        status, body = http("POST", server.url + "/v1/admin/reload", headers=AUTH)
        assert status == 500 and body["error"]["code"] == "reload_failed", body
        assert "weights hash" in body["error"]["message"] and str(tmp_path) not in body["error"]["message"]
        status, body = http("POST", server.url + "/v1/search", {"image_base64": photos[0], "k": 3})
        assert status == 200 and body["index_version"] == new_version
        assert http("GET", server.url + "/v1/model")[1]["model"] == model_b
        assert "weights hash" in server.log_path.read_text()
    finally:
        server.kill()


def _job(workdir: Path, status: Path, *args: str, timeout: int = 170) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve.demo_train", "--workdir", str(workdir), "--status", str(status),
                           *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_WAIT_POLICY": "PASSIVE"})


TINY = ["--epochs", "1", "--views", "2", "--scenes", "16", "--no-eval", "--progress", "off"]


def test_background_job_trains_embeds_builds_and_the_server_goes_live_on_it(tmp_path):
    from serve.demo import prepare_demo

    demo = prepare_demo(tmp_path / "demo", limit_products=8)
    status_path = tmp_path / "demo" / "train-status.json"
    server = _server(demo, tmp_path, env={"IMGSEARCH_DEMO_STATUS": str(status_path)})
    try:
        done = _job(tmp_path / "demo", status_path, "--url", server.url, *TINY)
        assert done.returncode == 0, done.stderr[-3000:]
        status = json.loads(status_path.read_text())
        assert status["state"] == "live" and status["epoch"] == status["epochs"] == 1 and status["error"] is None
        assert (tmp_path / "demo" / "train" / "model.ckpt").is_file()
        assert not (tmp_path / "demo" / "train" / "model.partial.ckpt").exists()
        body = _wait_model(server, status["model"], 5)
        assert body["kind"] == "trained" and body["training"]["state"] == "live" and body["model"] != demo.model_hash
        status_code, answer = http("POST", server.url + "/v1/search", {"image_base64": _photo(demo), "k": 3})
        assert status_code == 200 and answer["index_version"] == body["index_version"]
    finally:
        server.kill()
    # A second demo reuses the trained model: nothing to train, its own store and version.
    again = prepare_demo(tmp_path / "demo", limit_products=8)
    assert again.checkpoint is not None and again.model_hash == status["model"]


def test_a_failed_training_says_why_in_the_status(tmp_path):
    (tmp_path / "demo").mkdir()  # no sample catalog there
    done = _job(tmp_path / "demo", tmp_path / "status.json", *TINY, timeout=120)
    assert done.returncode == 1
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and "catalog" in status["error"] and str(tmp_path) not in status["error"]


def test_the_trainer_stops_with_the_demo_that_started_it(tmp_path):
    from imgsearch.sample_data import build_sample_set

    build_sample_set(tmp_path / "demo" / "sample", seed=0, limit_products=6)  # a real run: long enough to outlive
    parent = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from pathlib import Path; from serve.demo import start_trainer; "
                               "p = start_trainer(Path(sys.argv[1]), 'http://127.0.0.1:9'); print(p.pid, flush=True); "
                               "time.sleep(120)", str(tmp_path / "demo")],
                              cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        job = int(parent.stdout.readline())
        time.sleep(1.0)
        assert _running(job)
        os.kill(parent.pid, signal.SIGKILL)  # no chance to clean up: the job must notice by itself
        parent.wait(timeout=10)
        deadline = time.monotonic() + 15
        while _running(job) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _running(job), "the trainer outlived the demo"
    finally:
        if parent.poll() is None:
            parent.kill()


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_with_a_fixed_model_a_version_of_another_model_is_refused_at_reload(tmp_path):
    from embed.pipeline import load_pipeline
    from serve.demo import embed_and_index, prepare_demo
    from serve.errors import ApiError
    from serve.service import SearchService

    demo = prepare_demo(tmp_path / "demo", limit_products=6)
    service = SearchService(demo.index_root, demo.store_path, embedder_loader=lambda: load_pipeline(None), models="fixed")
    first = service.load_current()
    service.warm_embedder()
    embed_and_index(tmp_path / "demo", _checkpoint(tmp_path / "other.ckpt", seed=5))
    with pytest.raises(ApiError) as refused:
        service.reload()
    assert refused.value.code == "reload_failed" and "--model" in refused.value.message
    assert service.live() is first and service.model_info()["kind"] == "pretrained"
