"""The deployment files: the cron line runs as written, systemd runs the same command, the Dockerfile.

The cron test runs the real ``imgsearch`` console command (the pretrained model on a small
catalog: about 10 s) through ``sh -c``, with the file's paths replaced by temporary ones.
"""

from __future__ import annotations

import http.server
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index.ann import versions

REPO = Path(__file__).resolve().parents[1]
CRON = REPO / "deploy" / "cron" / "imgsearch-rebuild.cron"
SERVICE = REPO / "deploy" / "systemd" / "imgsearch-rebuild.service"
TIMER = REPO / "deploy" / "systemd" / "imgsearch-rebuild.timer"
DOCKERFILE = REPO / "Dockerfile"

ENV_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")
REDIRECT = re.compile(r"^(?P<command>.+?) >> (?P<log>\S+) 2>&1$")


def parse_crontab(text: str) -> tuple[dict, list[str], str, str]:
    """(environment lines, the 5 schedule fields, the command, the log file it appends to)."""
    env, jobs = {}, []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = ENV_LINE.match(line)
        if m:
            env[m.group(1)] = m.group(2)
        else:
            jobs.append(line)
    assert len(jobs) == 1, jobs
    fields = jobs[0].split(None, 5)
    assert len(fields) == 6, jobs[0]
    m = REDIRECT.match(fields[5])
    assert m, f"the cron command should end with '>> LOG 2>&1': {fields[5]!r}"
    return env, fields[:5], m.group("command"), m.group("log")


def unit_settings(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def write_catalog(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(7)
    (folder / "img").mkdir(parents=True)
    lines = ["product_id,image,category"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "img" / f"p{i}.png")
        lines.append(f"prod-{i},img/p{i}.png,cat{i % 2}")
    (folder / "catalog.csv").write_text("\n".join(lines) + "\n")
    return folder / "catalog.csv"


class _ReloadRecorder(http.server.BaseHTTPRequestHandler):
    """Stands for the server that ``--notify`` reaches: records the call, answers the live version."""

    seen: list = []
    index_root = ""

    def do_POST(self):  # noqa: N802
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        body = json.dumps({"index_version": versions.read_current(type(self).index_root)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _substituted(tmp_path: Path, notify_url: str) -> tuple[dict, str, Path]:
    """The cron file's environment and command with its paths replaced by temporary ones."""
    from imgsearch import assets

    env, _, command, log = parse_crontab(CRON.read_text())
    catalog = write_catalog(tmp_path / "catalog", 24)
    imgsearch = Path(sys.executable).parent / "imgsearch"
    assert imgsearch.is_file(), f"{imgsearch}: the console script of this venv"
    paths = {"/opt/imgsearch/venv/bin/imgsearch": str(imgsearch), "/srv/imgsearch/catalog/catalog.csv": str(catalog),
             "/srv/imgsearch/store": str(tmp_path / "store"), "/srv/imgsearch/index": str(tmp_path / "index"),
             "/srv/imgsearch/cache": str(assets.cache_dir()), "http://127.0.0.1:8080": notify_url,
             "/srv/imgsearch/log/rebuild.log": str(tmp_path / "rebuild.log")}
    original = shlex.split(command)
    unknown = [t for t in original + list(env.values()) if t.startswith(("/srv/", "/opt/", "http:")) and t not in paths]
    assert not unknown, f"paths in the cron file this test does not know how to replace: {unknown}"
    env = {k: paths.get(v, v) for k, v in env.items()}
    line = f"{shlex.join(paths.get(t, t) for t in original)} >> {shlex.quote(paths[log])} 2>&1"
    return env, line, tmp_path / "rebuild.log"


def test_cron_line_runs_the_real_rebuild_and_publishes(tmp_path):
    import os

    from imgsearch import assets
    from imgsearch.errors import MissingAsset
    from index.store.pidlock import JobLock

    try:
        assets.mobilenet_v2_weights()
    except MissingAsset as exc:
        pytest.skip(f"the default model's weights are not here (make data): {exc}")
    _ReloadRecorder.seen, _ReloadRecorder.index_root = [], str(tmp_path / "index")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ReloadRecorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env, line, log = _substituted(tmp_path, f"http://127.0.0.1:{server.server_port}")
        run_env = {**os.environ, **env, "IMGSEARCH_THREADS": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(["sh", "-c", line], env=run_env, capture_output=True, text=True, timeout=240)
        text = log.read_text()
        assert proc.returncode == 0, text[-3000:]
        live = versions.read_current(str(tmp_path / "index"))
        assert live is not None, text[-3000:]
        manifest = versions.read_manifest(versions.version_dir(str(tmp_path / "index")))
        assert manifest["ntotal"] == 24 and manifest["build_config"]["job"] == "rebuild"
        assert f"imgsearch rebuild: published {live}" in text
        # --notify reached the server with the crontab's token.
        assert _ReloadRecorder.seen == [("/v1/admin/reload", f"Bearer {env['IMGSEARCH_ADMIN_TOKEN']}")]

        # The lock is rebuild's own (no flock in the line): a run while another writer holds it exits 0.
        with JobLock(tmp_path / "index" / versions.LOCK_FILE):
            again = subprocess.run(["sh", "-c", line], env=run_env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, log.read_text()[-2000:]
        assert f"another writer of INDEX_ROOT is running (pid {os.getpid()})" in log.read_text()
        assert versions.read_current(str(tmp_path / "index")) == live
    finally:
        server.shutdown()


def test_systemd_service_runs_the_cron_command_on_the_same_schedule():
    from imgsearch.cli import build_parser

    env, schedule, command, _ = parse_crontab(CRON.read_text())
    service, timer = unit_settings(SERVICE), unit_settings(TIMER)
    assert service["ExecStart"] == [command], "the service's ExecStart and the cron line's command differ"
    argv = shlex.split(command)
    args = build_parser().parse_args(argv[1:])  # real flags of the real command
    assert args.catalog and args.store and args.index_root and args.notify
    assert service["Type"] == ["oneshot"] and service["User"] == ["imgsearch"]
    # The environment the cron file sets, except the secret, which the service reads from its EnvironmentFile.
    assert sorted(service["Environment"]) == sorted(f"{k}={v}" for k, v in env.items()
                                                    if k not in ("SHELL", "IMGSEARCH_ADMIN_TOKEN"))
    assert service["EnvironmentFile"] and "IMGSEARCH_ADMIN_TOKEN" in env
    # */30 * * * * == OnCalendar=*:0/30
    assert schedule == ["*/30", "*", "*", "*", "*"] and timer["OnCalendar"] == ["*:0/30"]
    assert timer["Unit"] == [SERVICE.name]
    if shutil.which("systemd-analyze"):
        out = subprocess.run(["systemd-analyze", "calendar", timer["OnCalendar"][0]], capture_output=True, text=True)
        assert out.returncode == 0 and "*-*-* *:00/30:00" in out.stdout, out.stdout + out.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_serves_the_volumes_with_the_real_cli_as_a_non_root_user():
    from imgsearch.cli import build_parser

    final = []  # the runtime stage: after the last FROM
    for word, rest in dockerfile_instructions():
        final = [] if word == "FROM" else final
        final.append((word, rest))
    got = {w: r for w, r in final}
    first_from = next(r for w, r in dockerfile_instructions() if w == "FROM")
    assert first_from.startswith("python:3.11-slim") and got["USER"] == "imgsearch"
    assert json.loads(got["VOLUME"]) == ["/data/index", "/data/store"] and got["EXPOSE"] == "8080"
    assert json.loads(got["ENTRYPOINT"]) == ["imgsearch"]
    cmd = json.loads(got["CMD"])
    assert cmd == ["serve", "--index-root", "/data/index", "--store", "/data/store", "--host", "0.0.0.0", "--port", "8080"]
    args = build_parser().parse_args(cmd)
    assert (args.index_root, args.store, args.host, args.port) == ("/data/index", "/data/store", "0.0.0.0", 8080)
    assert "/readyz" in got["HEALTHCHECK"]
    # Every package setup.cfg installs is copied in, and .dockerignore leaves each of them in the context.
    copied = {rest.split()[0] for w, rest in dockerfile_instructions() if w == "COPY" and "--from" not in rest}
    include = re.search(r"include =\n((?:\s+\S+\n)+)", (REPO / "setup.cfg").read_text()).group(1).split()
    packages = {p for p in include if "." not in p}
    assert packages <= copied, f"packages not copied into the image: {packages - copied}"
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert not packages & ignored and "setup.cfg" not in ignored and "README.md" not in ignored
    assert ".venv" in ignored and ".git" in ignored


def _docker_unavailable() -> str | None:
    if shutil.which("docker") is None:
        return "no docker command on PATH"
    try:
        info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                              timeout=30)
    except subprocess.TimeoutExpired:
        return "the docker daemon did not answer `docker info` within 30 s"
    if info.returncode != 0:
        return f"the docker daemon does not respond: {(info.stderr or info.stdout).strip().splitlines()[-1:]}"
    return None


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_docker_build():
    reason = _docker_unavailable()
    if reason:
        pytest.skip(reason)
    proc = subprocess.run(["docker", "build", "-q", "-t", "imgsearch:test-deploy", str(REPO)], capture_output=True,
                          text=True, timeout=3500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    out = subprocess.run(["docker", "run", "--rm", "imgsearch:test-deploy", "rebuild", "--help"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "--index-root" in out.stdout, out.stdout + out.stderr
