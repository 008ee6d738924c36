"""Images -> vectors: ``load_embedder`` (crop -> vector) and ``QueryPipeline`` (photo -> detect -> crops -> vectors).

Query photos and catalog images take the same path (decode -> detect -> crop
with a margin -> embed), so both sides of a match are framed alike. When the
detector finds nothing above its threshold, or there is no trained detector,
the whole image is the region.

A query photo also embeds candidate regions: the detector's best boxes down to
``CANDIDATE_THRESHOLD``, the union of its two best (a product the detector split
in parts, such as a parachute and its jumper, is whole there) and the whole photo.
The search then answers with the region that matches the catalog best
(:meth:`QueryEmbedding.choose`): a shopper photo always shows a catalog product,
so a region whose nearest catalog item is close is likely the product, and a box
the detector was unsure of still counts. A catalog image has no catalog to ask,
so it keeps the detector's choice.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from embed.checkpoint import Checkpoint, prefixed, state_dict_sha256
from embed.detector import DetectorConfig, ProductDetector
from embed.image_io import ImageSource, load_rgb
from embed.model import BadCheckpoint, EmbedderConfig, EmbeddingNet
from embed.preprocess import Preprocessor
from embed.runtime import make_runner, resolve_device
from imgsearch.errors import BadInput

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32
# Detector boxes scoring at least this are query candidates (the AP measurement's floor).
CANDIDATE_THRESHOLD = 0.05
# A candidate's merit: its best search score plus this much of its detector score (the whole photo's is 0).
# Chosen on dev photos (bench_region_policy.py --dev 6), never on the eval queries: it lifted R@1 by
# 0.017-0.023 and R@10 by 0.010-0.021 over the detector's choice on three trained models.
MATCH_SCORE_WEIGHT = 0.5


def _image_name(source: ImageSource, index: int) -> str | None:
    return None if isinstance(source, (str, os.PathLike)) else f"image #{index}"


class Embedder:
    """Crops (PIL images, encoded bytes or paths) -> (n, dim) float32 L2-normalised vectors, batched.

    ``model_hash`` identifies the weights (the checkpoint's ``weights_sha256``);
    an index manifest records it so vectors of different models never mix.
    """

    def __init__(self, net: EmbeddingNet, model_hash: str, device: str | torch.device = "auto",
                 runtime: str = "auto", batch_size: int = DEFAULT_BATCH_SIZE, calibration: list[ImageSource] | None = None):
        if batch_size < 1:
            raise BadInput(f"batch_size must be >= 1, got {batch_size!r}")
        self.net = net.eval()
        self.config = net.config
        self.model_hash = model_hash
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.preprocess = Preprocessor(self.config.image_size)
        calibration_batch = self.preprocess([load_rgb(im) for im in calibration]) if calibration else None
        self.runner = make_runner(net, runtime, self.device, calibration_batch)

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def runtime(self) -> str:
        return self.runner.name

    def embed(self, images: list[ImageSource], batch_size: int | None = None) -> np.ndarray:
        """Decode, letterbox, normalise and embed, ``batch_size`` images at a time (decoding too, to bound memory).

        Raises :class:`embed.image_io.BadImage` / ``ImageTooLarge`` naming the first bad image.
        """
        batch_size = batch_size or self.batch_size
        if batch_size < 1:
            raise BadInput(f"batch_size must be >= 1, got {batch_size!r}")
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            decoded = [load_rgb(src, _image_name(src, start + i)) for i, src in enumerate(chunk)]
            out[start : start + len(chunk)] = self.embed_tensor(self.preprocess(decoded))
        return out

    def embed_tensor(self, batch: torch.Tensor) -> np.ndarray:
        """Already-preprocessed (n, 3, S, S) ImageNet-normalised batch -> (n, dim) float32."""
        return self.runner(batch).numpy().astype(np.float32, copy=False)


def net_from_checkpoint(checkpoint: Checkpoint, path) -> EmbeddingNet:
    try:
        config = EmbedderConfig.from_dict(checkpoint.config["embedder"])
    except (KeyError, TypeError, BadInput) as exc:
        raise BadCheckpoint(f"{path} has no valid embedder config: {exc}") from None
    net = EmbeddingNet.skeleton(config)
    try:
        net.load_state_dict(checkpoint.part("embedder"), strict=True)
    except RuntimeError as exc:
        raise BadCheckpoint(f"{path}: embedder weights do not fit its config {config}: {str(exc)[:300]}") from None
    return net.eval()


def load_embedder(checkpoint: str | os.PathLike | None = None, device: str | torch.device = "auto", *,
                  runtime: str = "auto", batch_size: int = DEFAULT_BATCH_SIZE, weights: str | os.PathLike | None = None,
                  calibration: list[ImageSource] | None = None) -> Embedder:
    """The embedder of ``checkpoint``, or with ``None`` the pretrained trunk + fixed seeded projection.

    ``weights`` (only without a checkpoint) overrides the ImageNet MobileNetV2
    weights path; a missing file raises MissingAsset naming it. ``runtime``:
    see :mod:`embed.runtime` (``int8`` needs ``calibration`` images).
    """
    if checkpoint is None:
        net = EmbeddingNet.pretrained(EmbedderConfig(), weights)
        model_hash = state_dict_sha256(prefixed("embedder", net.state_dict()))
    else:
        loaded = Checkpoint.load(checkpoint)
        net = net_from_checkpoint(loaded, checkpoint)
        model_hash = loaded.weights_sha256
    return Embedder(net, model_hash, device=device, runtime=runtime, batch_size=batch_size, calibration=calibration)


def make_checkpoint(net: EmbeddingNet, detector: ProductDetector | None = None, extra: dict | None = None) -> Checkpoint:
    """Bundle an embedder (and optionally a detector) with their resolved configs; ``.save(path)`` writes it."""
    state = prefixed("embedder", net.state_dict())
    config = {"embedder": net.config.to_dict(), "detector": None}
    if detector is not None:
        state.update(prefixed("detector", detector.state_dict()))
        config["detector"] = detector.config.to_dict()
    return Checkpoint(config=config, state_dict=state, extra=dict(extra or {}))


def load_detector(checkpoint: str | os.PathLike | Checkpoint) -> ProductDetector | None:
    """The checkpoint's trained detector (eval mode), or None when it carries none.

    ``detect`` runs the torch modules (``eager``, which follows further training);
    :meth:`ProductDetector.use_runtime` switches, as :func:`load_pipeline` does.
    """
    loaded = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.load(checkpoint)
    config = loaded.config.get("detector")
    if not config:
        return None
    try:
        detector = ProductDetector.skeleton(DetectorConfig.from_dict(config))
        detector.load_state_dict(loaded.part("detector"), strict=True)
    except (BadInput, RuntimeError, TypeError) as exc:
        raise BadCheckpoint(f"checkpoint detector does not load: {str(exc)[:300]}") from None
    return detector.eval()


DETECTOR, MERGED, WHOLE_IMAGE = "detector", "merged", "whole_image"  # where a region comes from
USER = "user"  # a box the request gave (the server's ``box``): searched instead of the detector's choice


@dataclass
class Region:
    """A region that was embedded: ``box`` x1, y1, x2, y2 in original-image pixels.

    ``source``: ``DETECTOR`` (a detector box and its score), ``MERGED`` (the union of the detector's
    two best boxes, scored their mean) or ``WHOLE_IMAGE`` (the whole image, score 0.0).
    """

    box: tuple[float, float, float, float]
    score: float
    source: str = DETECTOR

    def __post_init__(self):
        if self.source not in (DETECTOR, MERGED, WHOLE_IMAGE, USER):
            raise BadInput(f"region source must be {DETECTOR!r}, {MERGED!r}, {WHOLE_IMAGE!r} or {USER!r}, got {self.source!r}")

    @property
    def whole_image(self) -> bool:
        return self.source == WHOLE_IMAGE


@dataclass
class QueryEmbedding:
    """One photo's regions and their vectors (``vectors[i]`` belongs to ``regions[i]``).

    ``regions[0]`` is the detector's choice: its best box at or above the threshold, else the
    whole image. Query photos carry further candidates after it (lower boxes, the two best merged,
    the whole image).
    """

    image_size: tuple[int, int]
    regions: list[Region]
    vectors: np.ndarray = field(repr=False)

    @property
    def fallback(self) -> bool:
        return self.regions[0].whole_image

    @property
    def best(self) -> np.ndarray:
        """The detector's choice's vector (what a catalog image is stored as)."""
        return self.vectors[0]

    def choose(self, top_scores) -> int:
        """The region to answer with: the highest best-search-score plus ``MATCH_SCORE_WEIGHT`` x detector score.

        ``top_scores[i]``: the best search score of ``vectors[i]`` as a cosine (:func:`best_cosines`;
        ``-inf`` or NaN when its search found nothing). Ties go to the earlier region, so with one region, or none found, it is 0.
        """
        top = np.asarray(top_scores, dtype=np.float64).reshape(-1)
        if len(top) != len(self.regions):
            raise BadInput(f"{len(top)} search scores for {len(self.regions)} regions")
        merit = np.where(np.isfinite(top), top, -np.inf) + MATCH_SCORE_WEIGHT * np.array([r.score for r in self.regions])
        return int(np.argmax(merit)) if np.isfinite(merit).any() else 0

    def detections(self) -> list[dict]:
        """The HTTP response's ``detections`` list: the detector's boxes that were embedded, best first."""
        boxes = sorted((r for r in self.regions if r.source == DETECTOR), key=lambda r: -r.score)
        return [region_dict(r) for r in boxes]

    def region(self, index: int) -> dict:
        """The HTTP response's ``region``: the region whose results are returned."""
        return {**region_dict(self.regions[index]), "source": self.regions[index].source}


def best_cosines(scores: np.ndarray, ids: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Per row of a search answer (scores, ids: (m, k), best first, -1 padded), its best hit's score
    as a cosine, ``-inf`` when the row found nothing: :meth:`QueryEmbedding.choose`'s input.

    An ``ip`` index's score is the cosine of unit vectors; an ``l2`` index's squared distance d
    becomes 1 - d / 2 (|a - b|^2 = 2 - 2 cos for unit a, b), so both metrics weigh alike.
    """
    top = np.asarray(scores, dtype=np.float64)[:, 0]
    return np.where(np.asarray(ids)[:, 0] >= 0, top if higher_is_better else 1.0 - top / 2.0, -np.inf)


def merged_region(a: Region, b: Region) -> Region:
    """The smallest box holding both, scored their mean (the merit's detector term: neither box's
    confidence alone vouches for the pair)."""
    box = (min(a.box[0], b.box[0]), min(a.box[1], b.box[1]), max(a.box[2], b.box[2]), max(a.box[3], b.box[3]))
    return Region(box, (a.score + b.score) / 2.0, MERGED)


def user_region(box, image_size: tuple[int, int]) -> Region:
    """The region of a box the user picked (pixels of the photo, within it), score 0.0. It is
    cropped as a detector box is (:meth:`QueryPipeline.crops`, with the pipeline's margin), so
    picking a detected box searches what the detector's choice of it would."""
    x1, y1, x2, y2 = (float(v) for v in box)
    width, height = image_size
    if not (0.0 <= x1 < x2 <= width and 0.0 <= y1 < y2 <= height):
        raise BadInput(f"box {list(box)} is not inside the {width}x{height} image")
    return Region((x1, y1, x2, y2), 0.0, USER)


def region_dict(region: Region) -> dict:
    """The box in integer pixels: the smallest pixel box holding the float one (x1, y1 floored,
    x2, y2 ceiled), so it can be sent back as a request's ``box`` and crops at least that region."""
    x1, y1, x2, y2 = (float(v) for v in region.box)
    box = [int(np.floor(x1)), int(np.floor(y1)), int(np.ceil(x2)), int(np.ceil(y2))]
    return {"box": box, "score": round(float(region.score), 4)}


def crop_with_margin(image: Image.Image, box, margin: float) -> Image.Image:
    """The box grown by ``margin`` of its width/height on each side (context helps), clipped to the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    dx, dy = margin * (x2 - x1), margin * (y2 - y1)
    left, top = max(0, int(np.floor(x1 - dx))), max(0, int(np.floor(y1 - dy)))
    right, bottom = min(image.width, int(np.ceil(x2 + dx))), min(image.height, int(np.ceil(y2 + dy)))
    if right - left < 1 or bottom - top < 1:
        raise BadInput(f"box {box} is empty inside a {image.width}x{image.height} image")
    return image.crop((left, top, right, bottom))


@contextmanager
def _untimed(_name: str):
    yield


class QueryPipeline:
    """decode -> detect -> crop (+margin) -> embed, for query photos and catalog images alike.

    ``detector=None`` (no trained detector) embeds whole images. ``max_regions``
    caps the detector boxes per query photo; ``score_threshold`` (default: the
    detector's) is the detector's own choice's floor, ``candidate_threshold`` the
    floor of the further candidate boxes. ``merge_boxes`` adds the union of the
    two best candidate boxes as one more query candidate.
    """

    def __init__(self, embedder: Embedder, detector: ProductDetector | None = None, *, margin: float = 0.10,
                 max_regions: int = 3, score_threshold: float | None = None, candidate_threshold: float = CANDIDATE_THRESHOLD,
                 merge_boxes: bool = True):
        if not 0.0 <= margin <= 1.0:
            raise BadInput(f"margin must be in [0, 1], got {margin!r}")
        if max_regions < 1:
            raise BadInput(f"max_regions must be >= 1, got {max_regions!r}")
        if not 0.0 <= candidate_threshold <= 1.0:
            raise BadInput(f"candidate_threshold must be in [0, 1], got {candidate_threshold!r}")
        self.embedder = embedder
        self.detector = detector.eval() if detector is not None else None
        self.margin = margin
        self.max_regions = max_regions
        self.score_threshold = score_threshold
        self.candidate_threshold = candidate_threshold
        self.merge_boxes = merge_boxes

    @property
    def model_hash(self) -> str:
        return self.embedder.model_hash

    @property
    def dim(self) -> int:
        return self.embedder.dim

    @property
    def keep_threshold(self) -> float | None:
        """The floor of the detector's own choice (None without a detector)."""
        if self.detector is None:
            return None
        return self.score_threshold if self.score_threshold is not None else self.detector.config.score_threshold

    def regions(self, images: list[Image.Image], candidates: bool = True) -> list[list[Region]]:
        """Per image, the regions to embed: the detector's choice first, then (``candidates``) the rest.

        With ``candidates=False`` (catalog images) only the detector's choice.
        """
        found = self.detector.detect(images, self._floor(candidates)) if self.detector is not None else [None] * len(images)
        return [self.regions_of(image, dets, candidates) for image, dets in zip(images, found)]

    def _floor(self, candidates: bool) -> float:
        keep = self.keep_threshold
        return min(keep, self.candidate_threshold) if candidates else keep

    def regions_of(self, image: Image.Image, dets, candidates: bool = True) -> list[Region]:
        """:meth:`regions` for one image from its detections (best first, any floor: lower ones are dropped)."""
        whole = Region((0.0, 0.0, float(image.width), float(image.height)), 0.0, WHOLE_IMAGE)
        if dets is None:
            return [whole]
        keep, floor = self.keep_threshold, self._floor(candidates)
        boxes = [Region(tuple(float(v) for v in box), float(score), DETECTOR)
                 for box, score in zip(dets.boxes[: self.max_regions], dets.scores[: self.max_regions]) if score >= floor]
        chosen = boxes[0] if boxes and boxes[0].score >= keep else whole
        if not candidates:
            return [chosen]
        merged = []
        if self.merge_boxes and len(boxes) >= 2:
            union = merged_region(boxes[0], boxes[1])
            if union.box != boxes[0].box:  # else it is the best box's crop at a lower score: never chosen
                merged.append(union)
        return [chosen] + [r for r in boxes + merged + [whole] if r is not chosen]

    def crops(self, image: Image.Image, regions: list[Region]) -> list[Image.Image]:
        return [image if r.whole_image else crop_with_margin(image, r.box, self.margin) for r in regions]

    def embed_queries(self, images: list[ImageSource], stage=_untimed, candidates: bool = True) -> list[QueryEmbedding]:
        """``stage(name)`` is a context manager timing each step (the server's Prometheus timers)."""
        decoded = [load_rgb(src, _image_name(src, i)) for i, src in enumerate(images)]
        with stage("detect"):
            all_regions = self.regions(decoded, candidates)
        return self.embed_regions(decoded, all_regions, stage)

    def embed_regions(self, images: list[Image.Image], all_regions: list[list[Region]], stage=_untimed) -> list[QueryEmbedding]:
        """Crop every image's regions and embed them in one batched pass."""
        crops = [crop for image, regions in zip(images, all_regions) for crop in self.crops(image, regions)]
        with stage("embed"):
            vectors = self.embedder.embed(crops)
        return query_embeddings(images, all_regions, vectors)

    def embed_catalog(self, images: list[ImageSource]) -> np.ndarray:
        """One vector per catalog image: its best region's. Usable as ``ingest_catalog``'s ``embed_fn``."""
        out = np.empty((len(images), self.embedder.dim), dtype=np.float32)
        step = self.embedder.batch_size
        for start in range(0, len(images), step):
            for i, query in enumerate(self.embed_queries(images[start : start + step], candidates=False)):
                out[start + i] = query.best
        return out


def query_embeddings(images: list[Image.Image], all_regions: list[list[Region]], vectors: np.ndarray) -> list[QueryEmbedding]:
    """Vectors embedded for every image's regions in order, dealt back to their images."""
    results, start = [], 0
    for image, regions in zip(images, all_regions):
        results.append(QueryEmbedding(image.size, regions, vectors[start : start + len(regions)]))
        start += len(regions)
    return results


def detector_runtime_for(embedder_runtime: str) -> str:
    """The detector runtime that goes with an embedder runtime: ONNX Runtime for auto/onnxruntime, else eager."""
    return embedder_runtime if embedder_runtime in ("auto", "onnxruntime") else "eager"


def load_pipeline(checkpoint: str | os.PathLike | None = None, device: str | torch.device = "auto", **embedder_options) -> QueryPipeline:
    """The embedder and, when the checkpoint has a trained one, the detector; without one, whole images.

    The detector runs on the runtime matching the embedder's (:func:`detector_runtime_for`).
    """
    embedder = load_embedder(checkpoint, device, **embedder_options)
    detector = load_detector(checkpoint) if checkpoint is not None else None
    if detector is None:
        log.info("no trained detector in %s; embedding whole images", checkpoint or "the default model")
    else:
        detector.to(embedder.device)
        runtime = detector.use_runtime(detector_runtime_for(embedder_options.get("runtime", "auto")))
        log.info("detector runtime: %s", runtime)
    return QueryPipeline(embedder, detector)
