"""imgsearch rebuild: lock, validation, publish, GC, model change, and SIGKILL at each stage.

The kill tests run this file as a script (real processes): ``python tests/test_jobs_rebuild.py
rebuild ARGS`` parses the real ``imgsearch rebuild`` arguments and runs the real job with the
torch-free :class:`helpers.pixel_embedder.PixelEmbedder` (a model load would cost ~10 s per run).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))

from helpers.pixel_embedder import PixelEmbedder  # noqa: E402

from index.ann import versions  # noqa: E402
from index.jobs import rebuild as rb  # noqa: E402

DIM = 16


def write_catalog(folder: Path, n: int, seed: int = 0, *, changed: int = 0, drop: int = 0, name: str = "catalog.csv") -> Path:
    """n random 16x16 PNGs (each a product); ``changed`` of them redrawn, the last ``drop`` left out."""
    rng = np.random.default_rng(seed)
    img_dir = folder / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    lines = ["product_id,image,category"]
    for i in range(n - drop):
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        if i < changed:
            pixels = 255 - pixels
        path = img_dir / f"p{i:04d}.png"
        data = Image.fromarray(pixels)
        if not path.exists() or i < changed:
            data.save(path)
        lines.append(f"prod-{i:04d},img/p{i:04d}.png,cat{i % 3}")
    catalog = folder / name
    catalog.write_text("\n".join(lines) + "\n")
    return catalog


def config(tmp: Path, catalog: Path, **kw) -> rb.RebuildConfig:
    return rb.RebuildConfig(catalog=str(catalog), store=str(tmp / "store"), index_root=str(tmp / "index"),
                            gpu="off", batch_size=16, **kw)


def test_rebuild_publishes_validates_and_summarises(tmp_path):
    catalog = write_catalog(tmp_path, 120)
    res = rb.run_rebuild(config(tmp_path, catalog), PixelEmbedder(DIM))
    assert res.status == "published" and res.previous is None
    assert versions.read_current(str(tmp_path / "index")) == res.version
    manifest = versions.read_manifest(versions.version_dir(str(tmp_path / "index")))
    assert manifest["model"] == PixelEmbedder(DIM).model_hash and manifest["ntotal"] == 120
    assert res.validation["recall"] >= 0.95 and res.validation["smoke_found"] == res.validation["smoke_items"]
    line = res.line()
    for word in ("added 120", "changed 0", "deleted 0", "rejected 0", "build"):
        assert word in line
    # Unchanged catalog: nothing new is published.
    again = rb.run_rebuild(config(tmp_path, catalog), PixelEmbedder(DIM))
    assert again.status == "unchanged" and again.version == res.version
    # 5 changed, 10 dropped, one bad row: counted, rebuilt, published.
    catalog = write_catalog(tmp_path, 120, changed=5, drop=10)
    with catalog.open("a") as f:
        f.write("prod-bad,img/missing.png,x\n")
    third = rb.run_rebuild(config(tmp_path, catalog), PixelEmbedder(DIM))
    assert third.status == "published" and third.previous == res.version
    assert (third.ingest.changed, third.ingest.deleted, third.ingest.rejected) == (5, 10, 1)
    assert third.validation["ntotal"] == 110


def test_rebuild_honours_the_ram_budget(tmp_path):
    """--ram-budget reaches rebuild's build: below what the version needs, nothing is published."""
    from imgsearch.errors import BadInput

    catalog = write_catalog(tmp_path, 60)
    with pytest.raises(BadInput, match=r"--ram-budget 1.00 KiB is below the .* needs in RAM for 60 vectors"):
        rb.run_rebuild(config(tmp_path, catalog, memory_budget=1024), PixelEmbedder(DIM))
    assert not (tmp_path / "index" / versions.CURRENT).exists()
    assert rb.run_rebuild(config(tmp_path, catalog, memory_budget=1 << 20), PixelEmbedder(DIM)).status == "published"


def test_second_run_exits_0_while_locked(tmp_path, capsys):
    from imgsearch.cli import main
    from index.store.pidlock import JobLock

    catalog = write_catalog(tmp_path, 10)
    with JobLock(tmp_path / "index" / rb.LOCK_FILE):
        code = main(["rebuild", str(catalog), "--store", str(tmp_path / "store"), "--index-root", str(tmp_path / "index")])
        assert rb.run_rebuild(config(tmp_path, catalog), PixelEmbedder(DIM)).status == "skipped"
    out = capsys.readouterr().out
    assert code == 0 and f"another writer of INDEX_ROOT is running (pid {os.getpid()})" in out
    assert not (tmp_path / "store").exists() and versions.list_versions(str(tmp_path / "index")) == []


def test_validation_failure_publishes_nothing(tmp_path, capsys):
    catalog = write_catalog(tmp_path, 1000)
    first = rb.run_rebuild(config(tmp_path, catalog), PixelEmbedder(DIM))
    catalog = write_catalog(tmp_path, 1000, changed=30)
    # One sub-quantizer of 1 bit: 2 codes for 1000 vectors; no nprobe or re-rank (the largest
    # re-ranks 10 x 64 = 640 candidates, fewer than the 1000 vectors) can reach 0.99.
    with pytest.raises(rb.ValidationFailed) as err:
        rb.run_rebuild(config(tmp_path, catalog, factory="IVF1,PQ1x1", target_recall=0.99), PixelEmbedder(DIM))
    msg = str(err.value)
    assert "recall@10 0." in msg and "< target 0.9900" in msg and "nothing published" in msg and "ntotal 1000" in msg
    assert versions.read_current(str(tmp_path / "index")) == first.version
    assert versions.list_versions(str(tmp_path / "index")) == [first.version]
    # CLI: exit 1 with the numbers on stderr.
    proc = _run_script(tmp_path, catalog, "--factory", "IVF1,PQ1x1", "--target-recall", "0.99", "--force")
    assert proc.returncode == 1, proc.stderr
    assert "validation of" in proc.stderr and "recall@10" in proc.stderr
    assert versions.read_current(str(tmp_path / "index")) == first.version


def test_stages_are_reported_through_the_callback_in_order(tmp_path):
    catalog = write_catalog(tmp_path, 60)
    seen = []
    res = rb.run_rebuild(config(tmp_path, catalog), PixelEmbedder(DIM), on_stage=seen.append)
    assert res.status == "published"
    assert seen == ["lock", "ingest", "train", "add", "tune", "validate", "publish", "gc"]
    assert set(seen) <= set(rb.STAGES)
    seen.clear()
    assert rb.run_rebuild(config(tmp_path, catalog), PixelEmbedder(DIM), on_stage=seen.append).status == "unchanged"
    assert seen == ["lock", "ingest"]  # nothing changed: no build stage runs


def test_gc_keeps_newest_and_live(tmp_path):
    catalog = write_catalog(tmp_path, 40)
    names = []
    for _ in range(4):
        names.append(rb.run_rebuild(config(tmp_path, catalog, keep=2, force=True), PixelEmbedder(DIM)).version)
    root = str(tmp_path / "index")
    assert set(versions.list_versions(root)) == set(names[-2:])
    # Roll back to the older kept one, then build twice more: the live (old) one survives GC.
    versions.set_current(root, names[-2])
    for _ in range(2):
        names.append(rb.run_rebuild(config(tmp_path, catalog, keep=1, force=True), PixelEmbedder(DIM)).version)
    assert versions.list_versions(root) == [names[-1]]
    assert versions.read_current(root) == names[-1]
    assert rb.gc_versions(root, 1) == []
    assert not [n for n in os.listdir(root) if n.startswith(versions.STAGING_PREFIX)]


def test_model_change_reembeds_everything(tmp_path):
    from index.store import CatalogStore

    catalog = write_catalog(tmp_path, 60)
    first = rb.run_rebuild(config(tmp_path, catalog), PixelEmbedder(DIM, seed=0))
    new_model = PixelEmbedder(DIM, seed=1)
    second = rb.run_rebuild(config(tmp_path, catalog), new_model)
    assert second.status == "published" and second.ingest.changed == 60 and second.ingest.unchanged == 0
    manifest = versions.read_manifest(versions.version_dir(str(tmp_path / "index")))
    assert manifest["model"] == new_model.model_hash != first.validation["model"]
    with CatalogStore.open_readonly(tmp_path / "store") as store:
        assert store.model == new_model.model_hash
        ids, x = next(store.iter_blocks(1000))
        recs = store.get_many(ids.tolist())
        assert {r.model for r in recs} == {new_model.model_hash}
        from PIL import Image as PILImage

        want = new_model.embed_catalog([PILImage.open(r.path).convert("RGB") for r in recs])
        np.testing.assert_allclose(x, want, atol=2e-3)  # float16 storage


def test_notify_failures_are_logged_not_fatal(tmp_path, caplog):
    catalog = write_catalog(tmp_path, 20)
    res = rb.run_rebuild(config(tmp_path, catalog, notify=["http://127.0.0.1:9"]), PixelEmbedder(DIM))
    assert res.status == "published" and res.notified["http://127.0.0.1:9"] != "ok"


def test_notify_posts_reload_with_token(tmp_path, monkeypatch):
    import http.server
    import threading

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"index_version": "v1"}')

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("IMGSEARCH_ADMIN_TOKEN", "s3cret")
    try:
        out = rb.notify_servers([f"http://127.0.0.1:{server.server_port}"], "v1")
    finally:
        server.shutdown()
    assert out == {f"http://127.0.0.1:{server.server_port}": "ok"}
    assert seen == [("/v1/admin/reload", "Bearer s3cret")]


# ---------------------------------------------------------------- real processes, SIGKILL


def _script_args(tmp: Path, catalog: Path, *extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "rebuild", str(catalog), "--store", str(tmp / "store"),
            "--index-root", str(tmp / "index"), "--gpu", "off", "--batch-size", "16", *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "IMGSEARCH_THREADS": "1", "OMP_NUM_THREADS": "1"}


def _run_script(tmp: Path, catalog: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_script_args(tmp, catalog, *extra), env=_env(), capture_output=True, text=True, timeout=180)


def _start_and_kill_at(tmp: Path, catalog: Path, stage: str) -> None:
    proc = subprocess.Popen(_script_args(tmp, catalog)[:2] + ["--pause-at", stage] + _script_args(tmp, catalog)[2:],
                            env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            if line.strip() == f"rebuild: paused at {stage}":
                break
            assert time.monotonic() < deadline
        else:
            pytest.fail(f"the run ended without pausing at {stage} (rc {proc.wait()})")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("stage", ["ingest", "train", "add", "validate", "publish"])
def test_sigkill_at_stage_keeps_previous_version_and_next_run_completes(tmp_path, stage):
    from index.ann.search import open_index

    catalog = write_catalog(tmp_path, 60)
    first = _run_script(tmp_path, catalog)
    assert first.returncode == 0, first.stderr
    root = str(tmp_path / "index")
    live = versions.read_current(root)
    before = open_index(root).search(np.ones((1, DIM), np.float32) / 4, 5)

    catalog = write_catalog(tmp_path, 60, changed=40, drop=5)  # 40 changed: several ingest batches
    _start_and_kill_at(tmp_path, catalog, stage)
    assert versions.read_current(root) == live  # CURRENT untouched ...
    idx = open_index(root)  # ... and the previous version still answers, with the same results
    after = idx.search(np.ones((1, DIM), np.float32) / 4, 5)
    assert idx.version == live and (after[1] == before[1]).all()

    done = _run_script(tmp_path, catalog)
    assert done.returncode == 0, done.stderr
    assert "published" in done.stdout
    new = versions.read_current(root)
    assert new != live
    manifest = versions.read_manifest(versions.version_dir(root))
    assert manifest["ntotal"] == 55
    assert not [n for n in os.listdir(root) if n.startswith(versions.STAGING_PREFIX)]


def _pause(stage: str) -> None:
    print(f"rebuild: paused at {stage}", flush=True)
    time.sleep(3600)  # until the test's SIGKILL


class _PausingEmbedder(PixelEmbedder):
    """Pauses at its second batch: some batches are stored, so the kill lands mid-ingest."""

    calls = 0

    def embed_catalog(self, images):
        self.calls += 1
        if self.calls == 2:
            _pause("ingest")
        return super().embed_catalog(images)


def _main(argv: list[str]) -> int:
    """``python tests/test_jobs_rebuild.py [--pause-at STAGE] rebuild ...``: the real CLI arguments and job,
    stand-in embedder; with --pause-at the job's stage callback pauses there (``ingest``: mid-ingest)."""
    import logging

    from imgsearch.cli import build_parser
    from imgsearch.errors import ImgsearchError

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    pause_at = None
    if argv[:1] == ["--pause-at"]:
        pause_at, argv = argv[1], argv[2:]
    args = build_parser().parse_args(argv)
    cfg = rb.RebuildConfig(catalog=args.catalog, store=args.store, index_root=args.index_root, keep=args.keep,
                           target_recall=args.target_recall, factory=args.factory, shards=args.shards, gpu=args.gpu,
                           batch_size=args.batch_size, force=args.force)
    try:
        embedder = _PausingEmbedder(DIM) if pause_at == "ingest" else PixelEmbedder(DIM)
        result = rb.run_rebuild(cfg, embedder, on_stage=lambda name: name == pause_at and _pause(name))
    except ImgsearchError as exc:
        print(f"imgsearch rebuild: error: {exc}", file=sys.stderr)
        return exc.exit_status
    print(f"imgsearch rebuild: {result.line()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
