"""Query photos -> vectors for the server, split so that only the network run is batched.

Per request (in the request's own thread, in parallel with other requests): detect, crop,
letterbox and normalise into a tensor (:func:`prepare`). Per micro-batch (one batcher
thread): one network call over the tensors of every request in the batch (:func:`embed_prepared`).
Doing the per-image Python/PIL work in the batcher thread would serialise it and make
batching slower than no batching on a CPU.

Embedders that are not an ``embed.pipeline.QueryPipeline`` (tests' stand-ins) are embedded
whole, per batch, through their ``embed_queries``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any


@dataclass
class PreparedQuery:
    image: Any  # the decoded PIL image
    regions: list | None = None  # embed.pipeline.Region list, None: embed the image whole
    tensor: Any = None  # (len(regions), 3, S, S) torch tensor
    detections: list | None = None  # with a user's box: the detector's boxes (response dicts), not embedded
    # The pipeline that detected and cropped it: the one that must embed it. During a model switch
    # one micro-batch can hold queries pinned to the old version and to the new one.
    pipeline: Any = None


def splittable(pipeline) -> bool:
    return hasattr(pipeline, "regions") and hasattr(getattr(pipeline, "embedder", None), "embed_tensor")


def prepare(pipeline, image, stage=lambda name: nullcontext(), box=None) -> PreparedQuery:
    """``box`` (pixels of ``image``, inside it): embed that region alone; the detector still runs,
    so that the answer lists its boxes."""
    if not splittable(pipeline):
        return PreparedQuery(image if box is None else image.crop(tuple(int(round(v)) for v in box)),
                             detections=None if box is None else [], pipeline=pipeline)
    with stage("detect"):
        (regions,) = pipeline.regions([image])
    detections = None
    if box is not None:
        import numpy as np

        from embed.pipeline import QueryEmbedding, user_region

        detections = QueryEmbedding(image.size, regions, np.empty((len(regions), 0))).detections()
        regions = [user_region(box, image.size)]
    return PreparedQuery(image, regions, pipeline.embedder.preprocess(pipeline.crops(image, regions)), detections,
                         pipeline)


def embed_prepared(pipeline, queries: list[PreparedQuery], stage=lambda name: nullcontext()) -> list:
    """QueryEmbedding per prepared query, with one network call for all of them."""
    if any(q.regions is None for q in queries):
        return pipeline.embed_queries([q.image for q in queries], stage=stage)
    import torch

    from embed.pipeline import query_embeddings

    batch = torch.cat([q.tensor for q in queries])
    step = getattr(pipeline.embedder, "batch_size", 32)  # bounds the network's activation memory
    with stage("embed"):
        vectors = torch.cat([torch.from_numpy(pipeline.embedder.embed_tensor(batch[a:a + step]))
                             for a in range(0, len(batch), step)]).numpy()
    return query_embeddings([q.image for q in queries], [q.regions for q in queries], vectors)
