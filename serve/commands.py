"""Handlers of ``imgsearch serve`` and ``imgsearch demo``."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from serve.app import create_app
from serve.server import run_gunicorn
from serve.service import SearchService

log = logging.getLogger(__name__)


def _pipeline_loader(checkpoint: str | None):
    def load():
        from embed.pipeline import load_pipeline

        return load_pipeline(checkpoint)

    return load


def make_service(index_root, store, checkpoint: str | None = None, *, load_embedder: bool = True) -> SearchService:
    """A service with the live index loaded and, unless told not to, the embedder warm,
    so the first photo query pays no model-load cost."""
    service = SearchService(index_root, store, embedder_loader=_pipeline_loader(checkpoint))
    service.load_current()
    if load_embedder:
        service.warm_embedder()
    return service


def serve_command(args) -> int:
    def app_factory():
        # Each worker opens the index itself (memory-mapped, so the page cache is shared):
        # forking after torch or faiss ran their OpenMP pools can hang the child.
        return create_app(make_service(args.index_root, args.store, args.model))

    run_gunicorn(app_factory, args.host, args.port, workers=args.workers, preload=False)
    return 0


def run_demo_command(args) -> int:
    from serve.demo import prepare_demo

    demo = prepare_demo(Path(args.workdir))
    if args.no_serve:
        return 0
    print(f"imgsearch demo: open http://{args.host}:{args.port}/ and drop a photo from {demo.queries_dir}", flush=True)
    argv = [sys.executable, "-m", "imgsearch", "serve", "--index-root", str(demo.index_root), "--store", str(demo.store_path),
            "--host", args.host, "--port", str(args.port)]
    if demo.checkpoint is not None:
        argv += ["--model", str(demo.checkpoint)]
    # A fresh process image for the server: this one has run torch and faiss thread pools.
    os.execv(sys.executable, argv)
    return 0  # not reached
