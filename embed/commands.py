"""``imgsearch embed CATALOG --store STORE``: catalog rows -> detect -> crop -> vectors -> the store."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)


def embed_command(args) -> int:
    if args.distributed:
        from index.jobs.commands import embed_distributed

        return embed_distributed(args)
    from embed.pipeline import load_pipeline
    from index.catalog import ingest_catalog
    from index.store import CatalogStore

    pipeline = load_pipeline(args.model, batch_size=args.batch_size)
    log.info("embedding with model %s (runtime %s, detector %s)", pipeline.model_hash[:16], pipeline.embedder.runtime,
             pipeline.detector.config.arch if pipeline.detector is not None else "none: whole images")
    with CatalogStore.create_or_open(args.store, dim=pipeline.embedder.dim) as store:
        summary = ingest_catalog(args.catalog, store, pipeline.embed_catalog, args.batch_size, progress=sys.stderr.isatty(),
                                 model=pipeline.model_hash)
    print(f"imgsearch embed: {summary.line()}")
    return 0
