"""``imgsearch serve`` and ``imgsearch demo`` on a port another process listens on: one line
naming host:port and exit 1, before any preparing or gunicorn retries."""

import subprocess
import sys
import time

import pytest

HOLDER = """
import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
print(s.getsockname()[1], flush=True)
time.sleep(120)
"""


@pytest.fixture()
def busy_port():
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        yield int(holder.stdout.readline())
    finally:
        holder.kill()
        holder.wait()


def _error_line(stderr: str, command: str, where: str) -> str:
    """The one line about the port; the rest of stderr may only be faiss's import-time log lines."""
    lines = stderr.strip().splitlines()
    about = [line for line in lines if where in line]
    assert len(about) == 1 and about == lines[-1:], stderr
    assert not any("Retrying" in line or "Connection in use" in line for line in lines)  # gunicorn's own tries
    assert lines[-1].startswith(f"imgsearch {command}: error: cannot listen on {where}")
    return lines[-1]


def _run(args, cwd):
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "imgsearch", *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    return out, time.monotonic() - t0


def test_serve_on_a_busy_port_says_so_in_one_line(busy_port, tmp_path):
    out, _ = _run(["serve", "--index-root", str(tmp_path / "index"), "--store", str(tmp_path / "store"),
                   "--host", "127.0.0.1", "--port", str(busy_port)], tmp_path)
    assert out.returncode == 1
    assert "in use" in _error_line(out.stderr, "serve", f"127.0.0.1:{busy_port}")


def test_demo_on_a_busy_port_fails_before_preparing(busy_port, tmp_path):
    out, seconds = _run(["demo", "--port", str(busy_port), "--workdir", str(tmp_path / "demo")], tmp_path)
    assert out.returncode == 1
    assert "in use" in _error_line(out.stderr, "demo", f"127.0.0.1:{busy_port}")
    assert not (tmp_path / "demo").exists()  # nothing prepared for a server that cannot start
    assert seconds < 60


def test_serve_with_an_unknown_host_exits_2(tmp_path):
    out, _ = _run(["serve", "--index-root", "i", "--store", "s", "--host", "no-such-host.invalid", "--port", "0"], tmp_path)
    assert out.returncode == 2
    assert "unknown host" in _error_line(out.stderr, "serve", "no-such-host.invalid:0")
