"""CLI handlers for ``imgsearch rebuild`` and ``imgsearch dedup`` (wired in imgsearch/cli.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys

from imgsearch.errors import BadInput

log = logging.getLogger(__name__)


def parse_distributed(spec: str | None) -> str | None:
    """``ray`` or ``ray:ADDRESS`` -> the Ray address ("" for a local cluster); None when absent."""
    if spec is None:
        return None
    kind, _, address = spec.partition(":")
    if kind != "ray":
        raise BadInput(f"--distributed {spec!r}: expected ray or ray:ADDRESS")
    return address


def rebuild_command(args) -> int:
    from embed.pipeline import load_pipeline
    from index.jobs.rebuild import RebuildConfig, run_rebuild

    cfg = RebuildConfig(
        catalog=args.catalog, store=args.store, index_root=args.index_root, keep=args.keep,
        target_recall=args.target_recall, factory=args.factory, shards=args.shards, gpu=args.gpu,
        batch_size=args.batch_size, notify=[u for u in (args.notify or "").split(",") if u.strip()],
        force=args.force, distributed=args.distributed, model_spec=args.model)
    if not os.path.isfile(cfg.catalog):
        raise BadInput(f"catalog {cfg.catalog!r} does not exist or is not a file")
    parse_distributed(cfg.distributed)
    # Cheap check first: a second cron run must not pay for loading the model to learn it has nothing to do.
    from index.jobs.rebuild import LOCK_FILE
    from index.pidlock import AlreadyRunning, JobLock

    os.makedirs(cfg.index_root, exist_ok=True)
    probe = JobLock(os.path.join(cfg.index_root, LOCK_FILE))
    try:
        probe.acquire()
        probe.release()
    except AlreadyRunning as exc:
        print(f"imgsearch rebuild: another rebuild is running (pid {exc.pid}); this run does nothing")
        return 0
    pipeline = load_pipeline(args.model, batch_size=args.batch_size)
    result = run_rebuild(cfg, pipeline)
    print(f"imgsearch rebuild: {result.line()}")
    return 0


def dedup_command(args) -> int:
    from index.jobs import dedup
    from index.store import CatalogStore

    verify_threshold = getattr(args, "verify_threshold", None)
    verify_on = bool(getattr(args, "verify", False))
    if args.calibrate and args.threshold is not None:
        raise BadInput("give --threshold or --calibrate LABELS.jsonl, not both")
    if verify_threshold is not None and not verify_on:
        raise BadInput("--verify-threshold needs --verify")
    if args.calibrate and verify_threshold is not None:
        raise BadInput("give --verify-threshold or --calibrate LABELS.jsonl, not both")
    dedup.output_path_ok(args.output)
    address = parse_distributed(args.distributed)
    cfg = dedup.DedupConfig(k=args.k, block_size=args.block_size, rescore=not args.no_rescore, gpu=args.gpu,
                            nprobe=args.nprobe, image_root=getattr(args, "image_root", None))
    if verify_on:
        from index.jobs.verify import DEFAULT_CANDIDATE_THRESHOLD, VerifyConfig

        cfg.threshold = DEFAULT_CANDIDATE_THRESHOLD
        cfg.verify = VerifyConfig() if verify_threshold is None else VerifyConfig(max_disagreement=verify_threshold)
        cfg.verify.check()
    calibration = None
    store = CatalogStore.open_readonly(args.store)
    try:
        if args.calibrate:
            calibration = dedup.calibrate(store, args.calibrate, args.target_precision, verify=cfg.verify,
                                          image_root=cfg.image_root)
            print(json.dumps({"calibration": calibration}))
            if not calibration["reached"]:
                log.warning("target precision %.3f not reached on the labelled sample; using the best threshold %.4f",
                            args.target_precision, calibration["threshold"])
            cfg.threshold = calibration["threshold"]
            if cfg.verify is not None:
                cfg.verify = dataclasses.replace(cfg.verify, max_disagreement=calibration["verify_threshold"])
        elif args.threshold is not None:
            cfg.threshold = args.threshold
        if address is not None:
            store.close()
            store = None
            from index.jobs.distributed import distributed_dedup

            result = distributed_dedup(args.store, args.index_root, dataclasses.replace(cfg, verify=None), address)
            if cfg.verify is not None:  # the candidates came from the cluster; images are verified here
                store = CatalogStore.open_readonly(args.store)
                result = dedup.verify_result(result, store, cfg, progress=True)
        else:
            result = dedup.run_dedup(store, args.index_root, cfg, progress=True)
    finally:
        if store is not None:
            store.close()
    dedup.write_groups(result.groups, args.output)
    job = dedup.write_job_config(args.output, cfg, result, calibration, index_root=args.index_root, store=args.store)
    print(f"imgsearch dedup: {result.line()}; wrote {args.output} (settings: {job})")
    sys.stdout.flush()
    return 0


def embed_distributed(args) -> int:
    """``imgsearch embed --distributed ray[:ADDRESS]`` (called from embed.commands)."""
    from embed.pipeline import load_pipeline
    from index.jobs.distributed import distributed_ingest

    address = parse_distributed(args.distributed)
    pipeline = load_pipeline(args.model, batch_size=args.batch_size)
    summary = distributed_ingest(args.catalog, args.store, pipeline, address, batch_size=args.batch_size,
                                 model_spec=args.model)
    print(f"imgsearch embed: {summary.line()}")
    return 0
