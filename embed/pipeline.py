"""Images -> vectors: ``load_embedder`` (crop -> vector) and ``QueryPipeline`` (photo -> detect -> crops -> vectors).

Query photos and catalog images take the same path (decode -> detect -> crop
with a margin -> embed), so both sides of a match are framed alike. When the
detector finds nothing above its threshold, or there is no trained detector,
the whole image is the region.
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


def _net_from_checkpoint(checkpoint: Checkpoint, path) -> EmbeddingNet:
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
        net = _net_from_checkpoint(loaded, checkpoint)
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


@dataclass
class Region:
    """A region that was embedded: ``box`` x1, y1, x2, y2 in original-image pixels."""

    box: tuple[float, float, float, float]
    score: float
    from_detector: bool  # False: the whole-image fallback (its score is 0.0)


@dataclass
class QueryEmbedding:
    """One photo's regions and their vectors, best-scoring first (``vectors[i]`` belongs to ``regions[i]``)."""

    image_size: tuple[int, int]
    regions: list[Region]
    vectors: np.ndarray = field(repr=False)

    @property
    def fallback(self) -> bool:
        return not self.regions[0].from_detector

    @property
    def best(self) -> np.ndarray:
        return self.vectors[0]

    def detections(self) -> list[dict]:
        """The HTTP response's ``detections`` list."""
        return [{"box": [round(v, 1) for v in r.box], "score": round(r.score, 4)} for r in self.regions]


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
    caps the vectors per photo.
    """

    def __init__(self, embedder: Embedder, detector: ProductDetector | None = None, *, margin: float = 0.10,
                 max_regions: int = 3, score_threshold: float | None = None):
        if not 0.0 <= margin <= 1.0:
            raise BadInput(f"margin must be in [0, 1], got {margin!r}")
        if max_regions < 1:
            raise BadInput(f"max_regions must be >= 1, got {max_regions!r}")
        self.embedder = embedder
        self.detector = detector.eval() if detector is not None else None
        self.margin = margin
        self.max_regions = max_regions
        self.score_threshold = score_threshold

    @property
    def model_hash(self) -> str:
        return self.embedder.model_hash

    @property
    def dim(self) -> int:
        return self.embedder.dim

    def regions(self, images: list[Image.Image]) -> list[list[Region]]:
        found = self.detector.detect(images, self.score_threshold) if self.detector is not None else [None] * len(images)
        result = []
        for image, dets in zip(images, found):
            regions = [] if dets is None else [
                Region(tuple(float(v) for v in box), float(score), True)
                for box, score in zip(dets.boxes[: self.max_regions], dets.scores[: self.max_regions])
            ]
            result.append(regions or [Region((0.0, 0.0, float(image.width), float(image.height)), 0.0, False)])
        return result

    def embed_queries(self, images: list[ImageSource], stage=_untimed) -> list[QueryEmbedding]:
        """``stage(name)`` is a context manager timing each step (the server's Prometheus timers)."""
        decoded = [load_rgb(src, _image_name(src, i)) for i, src in enumerate(images)]
        with stage("detect"):
            all_regions = self.regions(decoded)
        crops = [
            image if not region.from_detector else crop_with_margin(image, region.box, self.margin)
            for image, regions in zip(decoded, all_regions) for region in regions
        ]
        with stage("embed"):
            vectors = self.embedder.embed(crops)
        results, start = [], 0
        for image, regions in zip(decoded, all_regions):
            results.append(QueryEmbedding(image.size, regions, vectors[start : start + len(regions)]))
            start += len(regions)
        return results

    def embed_catalog(self, images: list[ImageSource]) -> np.ndarray:
        """One vector per catalog image: its best region's. Usable as ``ingest_catalog``'s ``embed_fn``."""
        out = np.empty((len(images), self.embedder.dim), dtype=np.float32)
        step = self.embedder.batch_size
        for start in range(0, len(images), step):
            for i, query in enumerate(self.embed_queries(images[start : start + step])):
                out[start + i] = query.best
        return out


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
