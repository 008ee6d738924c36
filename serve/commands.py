"""Handlers of ``imgsearch serve`` and ``imgsearch demo``.

``imgsearch serve`` runs one of three roles:
- a full server (default): the live version of INDEX_ROOT;
- a shard server (``--shard-of INDEX_ROOT:i/n``): shard i of n, vector queries only (no
  embedder is loaded), answering ``/v1/shard/search`` for a front (the only role with that
  route; it needs the shard token, ``$IMGSEARCH_SHARD_TOKEN`` or ``--shard-token-env``);
- a front (``--shards URL,...``): no index of its own; fans every query out to the shard
  servers (sending them the shard token) and joins their merged candidates with STORE.

A worker starts on CURRENT's version, else on the newest older one that loads; a worker with
none takes no requests while a sibling serves (:mod:`serve.readiness`).

Workers and live updates: admin writes go through a short-lived writer child
(:mod:`serve.store_writer`) that takes the store's write lock only for the write, and every
worker applies the store's updates log before each query (:mod:`serve.updates`), so any
``--workers`` count is correct. ``POST /v1/admin/reload`` reloads the worker it reaches; with
``--workers > 1`` every worker also watches CURRENT (every 2 s unless ``--watch-current``),
so the others follow within the interval.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from pathlib import Path

import faiss

from imgsearch.errors import BadInput
from serve.accesslog import configure_access_log
from serve.app import create_app
from serve.decode_budget import DEFAULT_DECODE_PIXEL_BUDGET, DecodeBudget
from serve.demo import STATUS_FILE, prepare_demo, start_trainer
from serve.metrics import enable_multiprocess, remove_multiprocess_dir, worker_exited
from serve.models import STATUS_ENV
from serve.readiness import ReadyBoard, worker_hooks
from serve.server import check_bindable, run_gunicorn
from serve.service import SearchService
from serve.shards import fanout_opener, parse_shard_of, shard_opener
from serve.worker import DEFAULT_BODY_TIMEOUT_S, DEFAULT_HEADER_TIMEOUT_S

log = logging.getLogger(__name__)

MULTI_WORKER_WATCH_S = 2.0
# faiss runs a batch of queries as an OpenMP region; on a busy, shared CPU the region's barrier
# costs more than the search (1M IVF4096,PQ64x4fs, 2 shared cores: 2 queries = 8 ms with 2 OMP
# threads, 1.1 ms with 1; 32 queries = 0.36 ms/query with 1 thread vs 0.59 ms for one query
# alone). A server's parallelism comes from its request threads and workers, so each worker
# searches single-threaded.
FAISS_THREADS = 1
# Hand the GIL over faster than the default 5 ms: a request thread waiting on a batch (or the
# batcher waiting for the GIL) otherwise waits up to one interval per hand-over.
SWITCH_INTERVAL_S = 0.001


def _tune_process() -> None:
    faiss.omp_set_num_threads(FAISS_THREADS)
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def _pipeline_loader(checkpoint: str | None):
    def load():
        from embed.pipeline import load_pipeline

        return load_pipeline(checkpoint)

    return load


def make_service(index_root, store, checkpoint: str | None = None, *, load_embedder: bool = True, **options) -> SearchService:
    """A service with the live index loaded and, unless told not to, the embedder warm,
    so the first photo query pays no model-load cost."""
    service = SearchService(index_root, store, embedder_loader=_pipeline_loader(checkpoint), **options)
    service.load_current()
    if load_embedder:
        service.warm_embedder()
    return service


def _role(args) -> tuple[dict, dict, bool]:
    """(SearchService options, create_app options, load the embedder?) of the serve role."""
    if args.shard_of and args.shards:
        raise BadInput("--shard-of and --shards exclude each other: a server is a shard or a front")
    if args.shard_of:
        try:
            root, i, n = parse_shard_of(args.shard_of)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        if root is not None and os.path.abspath(root) != os.path.abspath(args.index_root):
            raise BadInput(f"--shard-of names INDEX_ROOT {root!r} but --index-root is {args.index_root!r}")
        _shard_token(args, "--shard-of")
        return {"opener": shard_opener(i, n)}, {"shard_token_env": args.shard_token_env}, False
    if args.shards:
        urls = [u.strip() for u in args.shards.split(",") if u.strip()]
        if not urls:
            raise BadInput(f"--shards needs at least one URL, got {args.shards!r}")
        holder: dict = {}
        opener = fanout_opener(urls, args.shard_timeout_ms / 1e3, lambda: holder.get("metrics"),
                               token=_shard_token(args, "--shards"))

        def reload_hook(authorization: str):
            fanout = holder["service"].live().index if holder["service"].live() else None
            if fanout is None:
                return None
            return fanout.forward("POST", "/v1/admin/reload", {"Authorization": authorization} if authorization else {})

        return {"opener": opener, "live_updates": False, "_holder": holder}, {"reload_hook": reload_hook}, True
    return {}, {}, True


def _shard_token(args, option: str) -> str:
    token = os.environ.get(args.shard_token_env, "")
    if not token:
        raise BadInput(f"{option} needs the shard token: set ${args.shard_token_env} to the same secret on the front and "
                       "its shard servers (--shard-token-env names another variable)")
    return token


def _with_summed_metrics(hooks: dict) -> dict:
    """Metrics summed over the workers (:func:`serve.metrics.enable_multiprocess`): the directory
    is made now, before the fork, and removed when the master exits if it was made here."""
    directory, made = enable_multiprocess()
    if made:
        master = os.getpid()  # forked workers inherit atexit handlers: only the master removes it
        atexit.register(lambda: os.getpid() == master and remove_multiprocess_dir(directory))
    readiness_child_exit = hooks["child_exit"]

    def child_exit(server, worker) -> None:
        readiness_child_exit(server, worker)
        worker_exited(worker.pid)

    return {**hooks, "child_exit": child_exit}


def serve_command(args) -> int:
    service_options, app_options, load_embedder = _role(args)
    holder = service_options.pop("_holder", None)
    watch = args.watch_current or (MULTI_WORKER_WATCH_S if args.workers > 1 and not args.shards else 0.0)
    configure_access_log()
    worker: dict = {}  # this worker's service (app_factory runs in each worker, after the fork)
    hooks = None
    if args.workers > 1:
        hooks = worker_hooks(ReadyBoard(args.workers), lambda: worker["service"].live() is not None,
                             lambda: worker["service"].load_current())
        hooks = _with_summed_metrics(hooks)

    decode_pixels = getattr(args, "decode_pixel_budget", None) or DEFAULT_DECODE_PIXEL_BUDGET

    # A full server without --model embeds with each live version's own model (serve.models).
    models = None if service_options else ("fixed" if args.model else "follow")

    def app_factory():
        _tune_process()
        # Each worker opens the index itself (memory-mapped, so the page cache is shared):
        # forking after torch or faiss ran their OpenMP pools can hang the child.
        service = SearchService(args.index_root, args.store, embedder_loader=_pipeline_loader(args.model),
                                batch_window_ms=args.batch_window_ms, max_batch=args.max_batch,
                                decode_budget=DecodeBudget(decode_pixels), models=models, **service_options)
        app = create_app(service, admin_token_env=args.admin_token_env, **app_options)
        worker["service"] = service
        if holder is not None:
            holder["service"], holder["metrics"] = service, service.metrics
        service.load_current()
        if load_embedder:
            service.warm_embedder()
        service.watch_current(watch)
        return app

    run_gunicorn(app_factory, args.host, args.port, workers=args.workers, threads=args.threads, preload=False, hooks=hooks,
                 header_timeout=getattr(args, "header_timeout", None) or DEFAULT_HEADER_TIMEOUT_S,
                 body_timeout=getattr(args, "body_timeout", None) or DEFAULT_BODY_TIMEOUT_S)
    return 0


def run_demo_command(args) -> int:
    if not args.no_serve:
        check_bindable(args.host, args.port)  # before minutes of preparing, not after
    demo = prepare_demo(Path(args.workdir))
    if args.no_serve:
        return 0
    print(f"imgsearch demo: open http://{args.host}:{args.port}/ and drop a photo from {demo.queries_dir}", flush=True)
    argv = demo_serve_argv(args, demo)
    if demo.checkpoint is None:
        # Serve the pretrained model now; the job (a child of the server this process becomes, so it
        # ends with it) trains one and publishes its version, which the server follows.
        workdir = Path(args.workdir)
        host = "127.0.0.1" if args.host in ("", "0.0.0.0", "::") else args.host
        trainer = start_trainer(workdir, f"http://{host}:{args.port}")
        print(f"imgsearch demo: training a model in the background (pid {trainer.pid}, progress in "
              f"{workdir / STATUS_FILE} and on the page); the page switches to it when it is ready", flush=True)
        os.environ[STATUS_ENV] = str((workdir / STATUS_FILE).resolve())
        argv += ["--watch-current", "1"]
    # A fresh process image for the server: this one has run torch and faiss thread pools.
    os.execv(sys.executable, argv)
    return 0  # not reached


def demo_serve_argv(args, demo) -> list[str]:
    """The ``imgsearch serve`` command line the demo becomes, with the demo's own global options."""
    argv = [sys.executable, "-m", "imgsearch", *(["-v"] if getattr(args, "verbose", False) else []),
            "--log-format", getattr(args, "log_format", "auto"),
            "serve", "--index-root", str(demo.index_root), "--store", str(demo.store_path),
            "--host", args.host, "--port", str(args.port)]
    if demo.checkpoint is not None:
        argv += ["--model", str(demo.checkpoint)]
    return argv
