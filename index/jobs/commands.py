"""CLI handlers for ``imgsearch embed``, ``imgsearch rebuild`` and ``imgsearch dedup`` (wired in imgsearch/cli.py).

embed.pipeline (torch) and the Ray path are imported by the handlers that need them, so ``imgsearch dedup`` never
loads a network."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys

from embed.verify import DEFAULT_CANDIDATE_THRESHOLD, VerifyConfig
from imgsearch.atomic import check_dir_creatable
from imgsearch.errors import BadInput
from index.ann import versions
from index.ann.factory import parse_bytes
from index.jobs import dedup, dedup_calibration
from index.jobs.distributed import distributed_dedup, distributed_ingest, parse_distributed
from index.jobs.embed_model import resolve_embed_checkpoint
from index.jobs.rebuild import RebuildConfig, run_rebuild
from index.store import CatalogStore
from index.store.ingest import ingest_catalog

log = logging.getLogger(__name__)


def rebuild_command(args) -> int:
    from embed.pipeline import load_pipeline

    cfg = RebuildConfig(
        catalog=args.catalog, store=args.store, index_root=args.index_root, keep=args.keep,
        target_recall=args.target_recall, factory=args.factory, shards=args.shards, gpu=args.gpu,
        batch_size=args.batch_size, notify=[u for u in (args.notify or "").split(",") if u.strip()],
        force=args.force, distributed=args.distributed, model_spec=args.model,
        allow_mass_delete=getattr(args, "allow_mass_delete", False),
        memory_budget=parse_bytes(getattr(args, "memory_budget", None)))
    if not os.path.isfile(cfg.catalog):
        raise BadInput(f"catalog {cfg.catalog!r} does not exist or is not a file")
    parse_distributed(cfg.distributed)
    for folder in (cfg.index_root, cfg.store):  # before anything is created or the model loaded
        check_dir_creatable(folder)
    # Cheap check first: a second cron run must not pay for loading the model to learn it has nothing to do.
    try:
        with versions.index_root_lock(cfg.index_root):
            pass
    except versions.IndexRootLocked as exc:
        print(f"imgsearch rebuild: another writer of INDEX_ROOT is running (pid {exc.pid}); this run does nothing")
        return 0
    # No --model: the store's own model, or for a new store the catalog projection, as `imgsearch embed`.
    cfg.model_spec = resolve_embed_checkpoint(cfg.catalog, cfg.store, args.model, None, args.batch_size, "rebuild")
    pipeline = load_pipeline(cfg.model_spec, batch_size=args.batch_size)
    result = run_rebuild(cfg, pipeline)
    print(f"imgsearch rebuild: {result.line()}")
    return 0


def dedup_command(args) -> int:
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
        else:
            calibration = _calibrate_on_planted_copies(store, args, cfg)
            cfg.threshold = calibration["candidate_threshold" if cfg.verify is not None else "threshold"]
        if address is not None:
            store.close()
            store = None

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
    how = f"{dedup_calibration.describe(calibration)}; " if calibration and "method" in calibration else ""
    print(f"imgsearch dedup: {how}{result.line()}; wrote {args.output} (settings: {job})")
    sys.stdout.flush()
    return 0


def _calibrate_on_planted_copies(store, args, cfg) -> dict:
    """No --threshold: measure one on planted copies of the store's images, embedded with the store's model."""
    dc = dedup_calibration
    if not dc.reachable_sample(store, 1, 0, cfg.image_root):
        calibration = dc.fallback("no image file of the store's records is reachable")
    else:
        from embed.pipeline import load_pipeline

        # No --model: the checkpoint the store records (None: the built-in model).
        model = getattr(args, "model", None)
        pipeline = load_pipeline(store.model_checkpoint if model is None else model)
        if store.model is not None and store.model != pipeline.model_hash:
            calibration = dc.fallback(f"the store was embedded with model {store.model[:16]}, not "
                                      f"{pipeline.model_hash[:16]}; give --model CKPT or --threshold")
        else:
            calibration = dc.calibrate_planted(store, pipeline.embed_catalog, args.target_precision,
                                               image_root=cfg.image_root)
    if cfg.verify is not None:  # the similarity cut only picks candidates; pixel verification decides
        calibration["for"] = "verify"
        if calibration["method"] != dc.METHOD:
            calibration.update(threshold=cfg.threshold, candidate_threshold=cfg.threshold)
            print(f"imgsearch dedup: {dc.describe(calibration)}", file=sys.stderr)
        return calibration
    if calibration["method"] != dc.METHOD:
        print(f"imgsearch dedup: {dc.describe(calibration)}", file=sys.stderr)
    elif not calibration["reached"]:
        log.warning("target precision %.3f not reached on planted copies; using the best threshold %.4f",
                    args.target_precision, calibration["threshold"])
    return calibration


def embed_command(args) -> int:
    """``imgsearch embed CATALOG --store STORE [--distributed ray[:ADDRESS]]``: catalog rows -> detect ->
    crop -> vectors -> the store."""
    from embed.pipeline import load_pipeline

    address = parse_distributed(args.distributed) if args.distributed else None
    check_dir_creatable(args.store)  # before the model loads or a projection is fitted
    checkpoint = resolve_embed_checkpoint(args.catalog, args.store, args.model, getattr(args, "projection", None),
                                          args.batch_size)
    pipeline = load_pipeline(checkpoint, batch_size=args.batch_size)
    allow_mass_delete = getattr(args, "allow_mass_delete", False)
    if address is not None:
        summary = distributed_ingest(args.catalog, args.store, pipeline, address, batch_size=args.batch_size,
                                     model_spec=checkpoint, allow_mass_delete=allow_mass_delete)
        print(f"imgsearch embed: {summary.line()}")
        return 0
    log.info("embedding with model %s (runtime %s, detector %s)", pipeline.model_hash[:16], pipeline.embedder.runtime,
             pipeline.detector.config.arch if pipeline.detector is not None else "none: whole images")
    with CatalogStore.create_or_open(args.store, dim=pipeline.embedder.dim) as store:
        summary = ingest_catalog(args.catalog, store, pipeline.embed_catalog, args.batch_size, progress=True,
                                 model=pipeline.model_hash, allow_mass_delete=allow_mass_delete,
                                 model_checkpoint=checkpoint)
    print(f"imgsearch embed: {summary.line()}")
    return 0
