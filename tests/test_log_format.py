"""One log format for every command: JSON lines when stderr is not a terminal (or with
``--log-format json``), text with ``--log-format text``; third-party INFO chatter (faiss's loader,
gunicorn's start-up) only with ``-v``. Commands run as real subprocesses (pipes: not a terminal)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.test_hostile_http import VECTOR, env, post_json  # noqa: F401 - env is a fixture
from tests.test_serve_shards import REPO, START_TIMEOUT_S, free_port, http

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


def imgsearch(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgsearch", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def json_lines(text: str) -> list[dict]:
    entries = []
    for line in text.splitlines():
        entry = json.loads(line)  # fails on any line in another format
        assert isinstance(entry, dict) and {"ts", "level", "logger", "message"} <= set(entry), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"]), line
        entries.append(entry)
    return entries


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("logfmt")
    np.save(tmp / "x.npy", np.random.default_rng(0).random((300, 8), dtype=np.float32))
    return tmp


def test_commands_log_json_lines_when_stderr_is_not_a_terminal(vectors):
    built = imgsearch("build", "--vectors", "x.npy", "--index-root", "auto-root", cwd=vectors)
    assert built.returncode == 0, built.stderr
    entries = json_lines(built.stderr)
    assert any(e["logger"] == "index.ann.build" and e["level"] == "INFO" and "built index version" in e["message"]
               for e in entries), built.stderr
    assert not [e for e in entries if e["logger"].startswith("faiss")], built.stderr  # no loader lines at INFO
    checked = imgsearch("--log-format", "json", "verify", "auto-root", cwd=vectors)
    assert checked.returncode == 0 and not [e for e in json_lines(checked.stderr) if e["logger"].startswith("faiss")]


def test_log_format_text_gives_text_lines_and_verbose_brings_back_the_loader(vectors):
    built = imgsearch("--log-format", "text", "build", "--vectors", "x.npy", "--index-root", "text-root", cwd=vectors)
    assert built.returncode == 0, built.stderr
    lines = built.stderr.splitlines()
    assert lines and all(TEXT_LINE.match(line) for line in lines), built.stderr
    assert not any(line.startswith("{") for line in lines) and "faiss" not in built.stderr
    verbose = imgsearch("-v", "verify", "text-root", cwd=vectors)
    assert verbose.returncode == 0
    assert any(e["logger"] == "faiss.loader" and e["level"] == "INFO" for e in json_lines(verbose.stderr))


def test_bad_log_format_is_a_usage_error(vectors):
    out = imgsearch("--log-format", "xml", "verify", "auto-root", cwd=vectors)
    assert out.returncode == 2 and "argument --log-format: invalid choice: 'xml'" in out.stderr and "Traceback" not in out.stderr


class _Server:
    def __init__(self, paths, *top: str):
        root, store_path, index_root = paths
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out_path, self.err_path = root / f"out-{self.port}.log", root / f"err-{self.port}.log"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "imgsearch", *top, "serve", "--index-root", str(index_root), "--store",
                 str(store_path), "--threads", "4", "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=out, stderr=err, cwd=REPO, env={**os.environ, "TORCHDYNAMO_DISABLE": "1"}, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.err_path.read_text()[-3000:]
            try:
                if http("GET", self.url + "/readyz", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(self.err_path.read_text()[-3000:])

    def stop(self) -> tuple[str, str]:
        os.killpg(self.proc.pid, signal.SIGTERM)  # a graceful stop: gunicorn logs its shutdown
        self.proc.wait(timeout=60)
        return self.out_path.read_text(), self.err_path.read_text()


def test_server_access_gunicorn_and_app_lines_share_the_json_format(env):  # noqa: F811 - the imported fixture
    server = _Server(env, "-v")
    try:
        assert post_json(server, "/v1/search", VECTOR)[0] == 200
        assert post_json(server, "/v1/search", b'{"vector": [1]}')[0] == 400
    finally:
        out, err = server.stop()
    access = json_lines(out)  # stdout holds the access lines only
    assert {(e["logger"], e["level"]) for e in access} == {("imgsearch.access", "INFO")}, out
    assert [(e["endpoint"], e["status"]) for e in access if e["endpoint"] != "/readyz"] == [
        ("/v1/search", 200), ("/v1/search", 400)], out
    assert access[-1]["method"] == "POST" and access[-1]["error"] == "bad_vector_length" and access[-1]["ms"] > 0
    assert "POST /v1/search 400" in access[-1]["message"]
    loggers = {e["logger"] for e in json_lines(err)}
    assert {"serve.server", "gunicorn.error"} <= loggers, err  # gunicorn's own lines too, in the same format


def test_server_without_verbose_keeps_gunicorn_and_faiss_start_up_chatter_out(env):  # noqa: F811
    server = _Server(env)
    _, err = server.stop()
    entries = json_lines(err)
    assert any(e["logger"] == "serve.server" and "serving on" in e["message"] for e in entries), err
    assert not [e for e in entries if e["logger"].startswith(("faiss", "gunicorn")) and e["level"] == "INFO"], err


def test_demo_passes_its_log_options_to_the_server_it_becomes(tmp_path):
    """`imgsearch -v --log-format json demo` execs `imgsearch serve` with the same global options."""
    from imgsearch.cli import build_parser
    from serve.commands import demo_serve_argv
    from serve.demo import Demo

    parser = build_parser()
    demo = Demo(tmp_path / "index", tmp_path / "store", tmp_path / "queries", None, "0" * 64)
    for given, verbose, fmt in ((["-v", "--log-format", "json"], True, "json"), ([], False, "auto"),
                                (["--log-format", "text"], False, "text")):
        argv = demo_serve_argv(parser.parse_args([*given, "demo", "--port", "8181"]), demo)
        assert argv[1:3] == ["-m", "imgsearch"]
        served = parser.parse_args(argv[3:])
        assert (served.command, served.verbose, served.log_format) == ("serve", verbose, fmt)
        assert (served.index_root, served.store, served.port) == (str(demo.index_root), str(demo.store_path), 8181)
