"""The held-out evaluation of a checkpoint against the untrained baseline, as rows of one table."""

from __future__ import annotations

import time

from train.evaluate import RetrievalSet, evaluate_pipeline


def evaluate_checkpoint(checkpoint, data: RetrievalSet, baseline: bool = True, catalog_modes=("whole", "detect"),
                        progress: bool | None = None) -> list[dict]:
    """Rows: the pretrained baseline (whole images), then the checkpoint with its detector per catalog mode.

    ``detect`` embeds the catalog as ``imgsearch embed`` ingests it (through the detector): the
    product's own path. ``whole`` embeds the clean catalog shots as they are. Without a trained
    detector the two are the same, so only ``whole`` is measured.
    """
    from embed.pipeline import QueryPipeline, load_embedder, load_pipeline

    rows = []
    if baseline:
        started = time.perf_counter()
        pipeline = QueryPipeline(load_embedder(None, device="cpu"), None)
        rows.append({"model": "pretrained, no training", "detection": False, "catalog": "whole",
                     **evaluate_pipeline(pipeline, data, "whole", progress=progress), "seconds": round(time.perf_counter() - started, 1)})
    pipeline = load_pipeline(checkpoint, device="cpu")
    for mode in catalog_modes if pipeline.detector is not None else ("whole",):
        started = time.perf_counter()
        row = {"model": "trained", "detection": pipeline.detector is not None, "catalog": mode,
               **evaluate_pipeline(pipeline, data, mode, progress=progress)}
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    header = f"{'model':<28} {'detect':>6} {'catalog':>7} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'AP@0.5':>7} {'queries':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        ap = f"{r['ap@0.5']:.3f}" if "ap@0.5" in r else "-"
        lines.append(f"{r['model']:<28} {('yes' if r['detection'] else 'no'):>6} {r['catalog']:>7} {r['recall@1']:>6.3f} "
                     f"{r['recall@5']:>6.3f} {r['recall@10']:>6.3f} {ap:>7} {r['n_queries']:>7}")
    return "\n".join(lines)
