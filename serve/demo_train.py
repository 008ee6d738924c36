"""The demo's background job: train a model, embed the catalog with it, publish its index version.

``imgsearch demo`` on a machine without a trained checkpoint serves the pretrained model at once
and starts this job (``python -m serve.demo_train``, nice'd, 2 torch threads). It writes its
progress to a status JSON (atomically; ``GET /v1/model`` shows it):

    {"state": "training"|"embedding"|"building"|"live"|"failed", "epoch": int, "epochs": int,
     "eta_s": float|null, "error": str|null, "model": hash|null, "started_at": float, "updated_at": float}

Training writes ``train/model.partial.ckpt`` and only a finished run becomes ``train/model.ckpt``,
so a killed run is never taken for a trained model. The trained model's vectors go to a store of
their own (``store-<hash>``), its version into the demo's INDEX_ROOT under the writer lock, and the
server (watching CURRENT) switches to it with its model (:mod:`serve.models`). The job exits when
the process that started it is gone, so a stopped demo leaves no trainer behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import urllib.request
from pathlib import Path

log = logging.getLogger("imgsearch.demo_train")

# About 10 minutes of 2 cores (the full `make train-demo` run: ~16): 3 epochs instead of 4 (R@1
# peaks by epoch 3-4), 2000 detector scenes instead of 2800 (the detector's epochs are most of the
# time), no evaluation pass (bench/bench_demo.py measures R@K through the server).
BUDGET_ARGS = ["--epochs", "3", "--scenes", "2000", "--no-eval", "--progress", "off"]
ESTIMATE_S = 600.0  # the whole job's expected time before the first epoch has been timed
AFTER_TRAINING_S = 60.0  # embedding the catalog and building the version, 2 shared cores
LIVE_WAIT_S = 120.0


class Status:
    """The status JSON, replaced whole on every change."""

    def __init__(self, path: Path, epochs: int):
        self.path = path
        self.started = time.time()
        self.body = {"state": "training", "epoch": 0, "epochs": epochs, "eta_s": ESTIMATE_S, "error": None,
                     "model": None, "started_at": self.started}
        self.write()

    def update(self, **fields) -> None:
        self.body.update(fields)
        self.write()

    def write(self) -> None:
        from imgsearch.atomic import atomic_file

        self.body["updated_at"] = time.time()
        with atomic_file(self.path) as f:
            f.write(json.dumps(self.body).encode())

    def epoch_done(self, epoch: int, epochs: int) -> None:
        per_epoch = (time.time() - self.started) / max(epoch, 1)  # preparation spread over the epochs
        self.update(epoch=epoch, epochs=epochs, eta_s=round(per_epoch * (epochs - epoch) + AFTER_TRAINING_S, 1))


class _EpochLog(logging.Handler):
    """The trainer logs ``epoch %d/%d: ...`` after each epoch (train.engine): that is the progress."""

    def __init__(self, status: Status):
        super().__init__(logging.INFO)
        self.status = status

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        if str(record.msg).startswith("epoch %d/%d") and len(args) >= 2:
            self.status.epoch_done(int(args[0]), int(args[1]))


def _exit_with_parent(parent: int) -> None:
    """Stop when the demo that started this job is gone (Ctrl-C, kill): no orphaned trainer."""
    try:  # Linux: the kernel signals this process when its parent exits
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - the poll below still catches it
        pass

    def poll() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(143)

    threading.Thread(target=poll, name="parent-watch", daemon=True).start()


def _wait_live(url: str, model: str) -> bool:
    deadline = time.monotonic() + LIVE_WAIT_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/v1/model", timeout=10) as r:
                if json.loads(r.read()).get("model") == model:
                    return True
        except Exception:  # noqa: BLE001 - the server may be busy or restarting: ask again
            pass
        time.sleep(1.0)
    return False


def run_job(workdir: Path, status: Status, train_args: list[str], url: str | None) -> str:
    """Train, embed, build; returns the new model's hash."""
    from serve.demo import DEMO_CHECKPOINT, embed_and_index
    from train.commands import main as train_main

    catalog = workdir / "sample" / "catalog.csv"
    final = workdir / DEMO_CHECKPOINT
    partial = final.with_name("model.partial.ckpt")
    final.parent.mkdir(parents=True, exist_ok=True)
    handler = _EpochLog(status)
    logging.getLogger("train.engine").addHandler(handler)
    try:
        train_main([str(catalog), "--output", str(partial), *train_args])
    finally:
        logging.getLogger("train.engine").removeHandler(handler)
    os.replace(partial, final)
    status.update(state="embedding", eta_s=AFTER_TRAINING_S)
    model = embed_and_index(workdir, final, on_build=lambda: status.update(state="building", eta_s=AFTER_TRAINING_S / 3))
    status.update(model=model)
    if url is not None and not _wait_live(url, model):
        raise RuntimeError(f"the server at {url} did not switch to model {model[:16]} within {LIVE_WAIT_S:.0f} s")
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve.demo_train", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--status", required=True, help="the status JSON to write")
    parser.add_argument("--url", default=None, help="the demo server: 'live' once it serves the new model")
    parser.add_argument("--threads", type=int, default=2)
    args, train_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    _exit_with_parent(os.getppid())
    os.nice(10)  # queries on the same cores come first
    import torch

    from serve.errors import without_paths

    torch.set_num_threads(args.threads)
    train_args = train_args or BUDGET_ARGS
    epochs = int(train_args[train_args.index("--epochs") + 1]) if "--epochs" in train_args else 4
    status = Status(Path(args.status), epochs)
    try:
        model = run_job(Path(args.workdir), status, train_args, args.url)
    except BaseException as exc:  # noqa: BLE001 - the pretrained model keeps serving; the status says why
        log.exception("demo training failed")
        error = "interrupted: the demo was stopped" if isinstance(exc, KeyboardInterrupt) else \
            without_paths(f"{type(exc).__name__}: {exc}", {os.path.abspath(args.workdir): "WORKDIR"})
        status.update(state="failed", eta_s=None, error=error[:500])
        return 1
    status.update(state="live", eta_s=0.0, error=None)
    log.info("demo: trained model %s is live", model[:16])
    return 0


if __name__ == "__main__":
    sys.exit(main())
