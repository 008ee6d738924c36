"""Product detector: finds product regions in a shopper's photo, boxes with scores.

Built from torchvision's detection API on the ImageNet MobileNetV2 trunk.
Two architectures are available, ``ssdlite`` (default) and ``fasterrcnn``;
``bench/bench_embed.py`` measures both on the CPU and SSDlite won clearly
(one dense pass, no RoI stage, no Python roi_align fallback): 38.7 ms per
photo for SSDlite-320 vs 2.7 s for Faster R-CNN at 320 px (2 threads).

The module follows torchvision's convention, so part 2 (training) can use it
as is: in ``train()`` mode ``forward(images, targets)`` takes a list of
(3, H, W) float tensors in [0, 1] and a list of ``{"boxes": (k, 4) float
x1y1x2y2 pixels, "labels": (k,) int64}`` and returns a dict of losses; in
``eval()`` mode ``forward(images)`` returns ``[{"boxes", "scores", "labels"}]``
in input-image pixels. :meth:`ProductDetector.detect` is the inference
convenience over PIL images.

Untrained classification heads start at a prior of ``prior`` (1 %) product
probability (RetinaNet's initialisation): an untrained detector then finds
nothing above the score threshold, and the pipeline falls back to the whole
image instead of embedding random crops.

Inference (``detect``) for SSDlite does not go through torchvision's forward:
the photo is resized and normalised in numpy (the same bilinear, no-antialias
resize as torchvision's transform), the network alone (:class:`SSDNet`, trunk
+ heads up to raw class logits and box regressions) runs on a runtime, and
the rest is vectorised torch over the few anchors that matter: softmax, the
score threshold *before* decoding, top-k, decoding of those candidates only
(anchors are computed once), NMS (:func:`embed.torchvision_ops.nms_kernel`),
the box rescale. Runtimes (:meth:`ProductDetector.use_runtime`):
``onnxruntime`` (the network exported to ONNX, cached on disk by weights hash,
see :mod:`embed.runtime`), ``eager`` (the torch modules themselves: follows
training, the default) and ``torchvision`` (torchvision's own SSD forward,
the reference the others are tested against; Faster R-CNN always uses it).
Why: on an idle machine torchvision's forward takes ~35 ms per photo, nearly
all of it the network (postprocessing is ~1 ms at the 0.3 threshold, where
few anchors pass). But the 2 cores are shared, and torch's OpenMP pool
(libgomp, spin-waiting at each of the network's parallel regions) collapses
when other processes hold the cores: in ``bench/bench_query.py`` the trunk
alone took 385 ms of a 407 ms forward, and the forward 0.4-6.7 s per photo
(p50 853 ms) while other jobs ran, against 60 ms (p99 97 ms) for ONNX Runtime
(conv+BN+ReLU6 fused, a non-spinning pool) in the same interleaved run.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from embed.model import build_trunk
from embed.preprocess import IMAGENET_MEAN, IMAGENET_STD
from embed.runtime import OnnxModel, onnxruntime_available
from embed.torchvision_compat import torchvision
from imgsearch.errors import BadInput

log = logging.getLogger(__name__)

ARCHITECTURES = ("ssdlite", "fasterrcnn")
DETECTOR_RUNTIMES = ("auto", "eager", "onnxruntime", "torchvision")
# MobileNetV2's features[:14] ends with the 96-channel block at stride 16; features[14:] reaches 1280 at stride 32.
MOBILENET_V2_STRIDE16_SPLIT = 14
MOBILENET_V2_STRIDE16_CHANNELS = 96
MOBILENET_V2_STRIDE32_CHANNELS = 1280


@dataclass(frozen=True)
class DetectorConfig:
    arch: str = "ssdlite"
    image_size: int = 320  # the detector's input side; boxes come back in original-image pixels
    num_classes: int = 2  # background + "product"; part 2 may add categories
    score_threshold: float = 0.3  # detections below are dropped; none left means "use the whole image"
    nms_iou: float = 0.5
    max_detections: int = 5
    prior: float = 0.01  # initial product probability of an untrained head

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise BadInput(f"unknown detector arch {self.arch!r}; expected one of {list(ARCHITECTURES)}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise BadInput(f"score_threshold must be in [0, 1], got {self.score_threshold!r}")
        if not 0.0 < self.prior < 1.0:
            raise BadInput(f"prior must be in (0, 1), got {self.prior!r}")
        if not (isinstance(self.image_size, int) and 64 <= self.image_size <= 1333):
            raise BadInput(f"detector image_size must be an int in 64..1333, got {self.image_size!r}")
        if not (isinstance(self.num_classes, int) and self.num_classes >= 2):
            raise BadInput(f"num_classes counts the background and must be >= 2, got {self.num_classes!r}")
        if not (isinstance(self.max_detections, int) and self.max_detections >= 1):
            raise BadInput(f"max_detections must be a positive int, got {self.max_detections!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def network_dict(self) -> dict:
        """The fields that shape the network (the ONNX cache key): not the thresholds applied after it."""
        return {"arch": self.arch, "image_size": self.image_size, "num_classes": self.num_classes}

    @classmethod
    def from_dict(cls, data: dict) -> DetectorConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadInput(f"unknown detector config keys {unknown}; known: {sorted(known)}")
        return cls(**data)


@dataclass
class Detections:
    """One image's detections, best first. ``boxes``: (k, 4) float32 x1, y1, x2, y2 in image pixels."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


class MobileNetV2SSDLiteFeatures(nn.Module):
    """MobileNetV2 trunk -> six SSDlite feature maps (strides 16, 32, 64, 128, 256, 512 for 320 px)."""

    def __init__(self, trunk: nn.Sequential, norm_layer):
        super().__init__()
        self.to_stride16 = trunk[:MOBILENET_V2_STRIDE16_SPLIT]
        self.to_stride32 = trunk[MOBILENET_V2_STRIDE16_SPLIT:]
        extra = torchvision.models.detection.ssdlite._extra_block
        self.extra = nn.ModuleList(
            [extra(MOBILENET_V2_STRIDE32_CHANNELS, 512, norm_layer), extra(512, 256, norm_layer),
             extra(256, 256, norm_layer), extra(256, 128, norm_layer)]
        )
        self.out_channels = [MOBILENET_V2_STRIDE16_CHANNELS, MOBILENET_V2_STRIDE32_CHANNELS, 512, 256, 256, 128]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = [self.to_stride16(x)]
        maps.append(self.to_stride32(maps[-1]))
        for block in self.extra:
            maps.append(block(maps[-1]))
        return OrderedDict((str(i), fmap) for i, fmap in enumerate(maps))


def _build_ssdlite(config: DetectorConfig, trunk: nn.Sequential) -> nn.Module:
    det = torchvision.models.detection
    norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)  # torchvision's SSDlite setting
    features = MobileNetV2SSDLiteFeatures(trunk, norm_layer)
    anchors = det.anchor_utils.DefaultBoxGenerator([[2, 3] for _ in features.out_channels], min_ratio=0.2, max_ratio=0.95)
    head = det.ssdlite.SSDLiteHead(features.out_channels, anchors.num_anchors_per_location(), config.num_classes, norm_layer)
    background_bias = math.log((1 - config.prior) / config.prior)
    for branch in head.classification_head.module_list:
        last = branch[-1]
        with torch.no_grad():
            # bias layout: for each anchor, num_classes logits; the background logit is index 0.
            bias = last.bias.view(-1, config.num_classes)
            bias.zero_()
            bias[:, 0] = background_bias + math.log(config.num_classes - 1)
    return det.ssd.SSD(
        features, anchors, (config.image_size, config.image_size), config.num_classes,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), head=head,
        score_thresh=config.score_threshold, nms_thresh=config.nms_iou,
        detections_per_img=config.max_detections, topk_candidates=100,
    )


def _build_fasterrcnn(config: DetectorConfig, trunk: nn.Sequential) -> nn.Module:
    det = torchvision.models.detection
    trunk.out_channels = MOBILENET_V2_STRIDE32_CHANNELS
    anchors = det.anchor_utils.AnchorGenerator(sizes=((32, 64, 128, 256),), aspect_ratios=((0.5, 1.0, 2.0),))
    roi_pool = torchvision.ops.MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
    model = det.FasterRCNN(
        trunk, num_classes=config.num_classes, rpn_anchor_generator=anchors, box_roi_pool=roi_pool,
        min_size=config.image_size, max_size=config.image_size,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        box_score_thresh=config.score_threshold, box_nms_thresh=config.nms_iou,
        box_detections_per_img=config.max_detections, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
    )
    cls_score = model.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        cls_score.bias.zero_()
        cls_score.bias[0] = math.log((1 - config.prior) / config.prior) + math.log(config.num_classes - 1)
    return model


class SSDNet(nn.Module):
    """The SSD network alone: ImageNet-normalised (n, 3, S, S) -> class logits (n, A, C), box regressions (n, A, 4).

    It shares its modules with the detector's torchvision SSD (no copy): what
    training changes, it computes with.
    """

    def __init__(self, ssd: nn.Module):
        super().__init__()
        self.backbone = ssd.backbone
        self.head = ssd.head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(list(self.backbone(x).values()))
        return out["cls_logits"], out["bbox_regression"]


def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source rows and weights of ``F.interpolate(mode="bilinear", align_corners=False)`` along one axis."""
    scale = np.float32(in_size / out_size)
    src = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
    lo = np.minimum(src.astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    w_hi = src - lo.astype(np.float32)
    return lo, hi, np.float32(1) - w_hi, w_hi


_NORM_SCALE = (1.0 / (255.0 * np.asarray(IMAGENET_STD, dtype=np.float64))).astype(np.float32)
_NORM_SHIFT = (np.asarray(IMAGENET_MEAN, dtype=np.float64) / np.asarray(IMAGENET_STD, dtype=np.float64)).astype(np.float32)


def detector_input(image: Image.Image, size: int) -> np.ndarray:
    """A photo -> (3, size, size) float32, ImageNet-normalised: torchvision's SSD transform, in numpy.

    The same bilinear resize without antialiasing to a fixed square, applied
    before normalising instead of after (bilinear is linear: equal up to float
    rounding, ~1e-6), on the small image; numpy, so no OpenMP pool is involved.
    """
    pixels = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    r_lo, r_hi, r_wlo, r_whi = _bilinear_taps(pixels.shape[0], size)
    c_lo, c_hi, c_wlo, c_whi = _bilinear_taps(pixels.shape[1], size)
    rows = np.take(pixels, r_lo, axis=0).astype(np.float32)
    rows *= r_wlo[:, None, None]
    part = np.take(pixels, r_hi, axis=0).astype(np.float32)
    part *= r_whi[:, None, None]
    rows += part
    out = np.take(rows, c_lo, axis=1)
    out *= c_wlo[None, :, None]
    part = np.take(rows, c_hi, axis=1)
    part *= c_whi[None, :, None]
    out += part
    out *= _NORM_SCALE
    out -= _NORM_SHIFT
    return np.ascontiguousarray(out.transpose(2, 0, 1))


class _TorchvisionForward:
    """Marker runner: ``detect`` calls torchvision's whole SSD / Faster R-CNN forward."""

    name = "torchvision"


class _EagerNet:
    """The :class:`SSDNet` modules themselves (live weights), under inference_mode."""

    name = "eager"

    def __init__(self, net: SSDNet):
        self.net = net

    def __call__(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.net.parameters()).device
        with torch.inference_mode():
            logits, regression = self.net(torch.from_numpy(batch).to(device))
        return logits.float().cpu(), regression.float().cpu()


class _OnnxNet:
    """:class:`SSDNet` exported to ONNX (a snapshot of the weights: cached on disk by their hash), on ONNX Runtime."""

    name = "onnxruntime"

    def __init__(self, detector: ProductDetector, threads: int | None = None):
        size = detector.config.image_size
        self.model = OnnxModel("detector", SSDNet(detector.model), torch.zeros(2, 3, size, size),
                               ["cls_logits", "bbox_regression"], detector.config.network_dict(), threads)

    def __call__(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        logits, regression = self.model(batch)
        return torch.from_numpy(logits), torch.from_numpy(regression)


class ProductDetector(nn.Module):
    """A torchvision detection model on the MobileNetV2 trunk, plus a PIL-in, numpy-out ``detect``."""

    def __init__(self, config: DetectorConfig, trunk: nn.Sequential):
        super().__init__()
        self.config = config
        build = _build_ssdlite if config.arch == "ssdlite" else _build_fasterrcnn
        self.model = build(config, trunk)
        self._runner = None  # detect()'s network runner; None: eager, built on first use (see use_runtime)
        self._default_boxes = None  # SSD anchors of the fixed input size, (A, 4) pixels; computed once

    @classmethod
    def pretrained(cls, config: DetectorConfig | None = None, weights: str | os.PathLike | None = None) -> ProductDetector:
        """ImageNet trunk, untrained (prior-initialised) heads."""
        return cls(config or DetectorConfig(), build_trunk("mobilenet_v2", weights)).eval()

    @classmethod
    def skeleton(cls, config: DetectorConfig) -> ProductDetector:
        return cls(config, build_trunk("mobilenet_v2", weights=False))

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None):
        """torchvision's contract: losses in train mode (targets required), detections in eval mode."""
        return self.model(images, targets)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_runner"] = None  # an ONNX Runtime session neither pickles nor deep-copies; a copy starts eager
        return state

    @property
    def runtime(self) -> str:
        """Which runner ``detect`` uses: ``onnxruntime``, ``eager`` or ``torchvision``."""
        return self._net_runner().name

    def use_runtime(self, runtime: str = "auto", threads: int | None = None) -> str:
        """Pick how ``detect`` runs the network; returns the runtime actually in use.

        ``auto``: ONNX Runtime on a CPU when installed, else eager. An ONNX
        Runtime that cannot be built falls back to eager with a logged reason.
        ONNX Runtime runs a snapshot of the weights: ``train()`` or
        ``load_state_dict`` put the detector back on eager.
        """
        if runtime not in DETECTOR_RUNTIMES:
            raise BadInput(f"unknown detector runtime {runtime!r}; expected one of {list(DETECTOR_RUNTIMES)}")
        if runtime == "torchvision" or self.config.arch != "ssdlite":
            if runtime not in ("torchvision", "eager", "auto"):
                log.info("detector %s runs in torchvision's forward, not %s", self.config.arch, runtime)
            self._runner = _TorchvisionForward()
            return self._runner.name
        on_cpu = next(self.parameters()).device.type == "cpu"
        if runtime == "auto":
            runtime = "onnxruntime" if on_cpu and onnxruntime_available() else "eager"
        self._runner = None
        if runtime == "onnxruntime":
            if not on_cpu:
                log.warning("detector runtime onnxruntime is CPU-only here; the detector is on %s: using eager",
                            next(self.parameters()).device)
            else:
                try:
                    self._runner = _OnnxNet(self, threads)
                except Exception as exc:  # ImportError without onnxruntime; export or session errors on odd builds
                    log.warning("detector runtime onnxruntime unavailable (%s: %s); falling back to eager",
                                type(exc).__name__, str(exc)[:300])
        runner = self._net_runner()
        self.default_boxes()  # now, not on a user's first query
        return runner.name

    def _net_runner(self):
        if self._runner is None:
            self._runner = _EagerNet(SSDNet(self.model)) if self.config.arch == "ssdlite" else _TorchvisionForward()
        return self._runner

    def _drop_snapshot(self, why: str) -> None:
        if isinstance(self._runner, _OnnxNet):
            log.info("detector: %s; ONNX Runtime ran the old weights, back to eager", why)
            self._runner = None

    def train(self, mode: bool = True) -> ProductDetector:
        if mode:
            self._drop_snapshot("train mode")
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._drop_snapshot("new weights loaded")
        return result

    def default_boxes(self) -> torch.Tensor:
        """SSD's anchors for the fixed input size, (A, 4) x1y1x2y2 in input pixels (weights do not change them)."""
        if self._default_boxes is None:
            size = self.config.image_size
            device = next(self.parameters()).device
            ImageList = torchvision.models.detection.image_list.ImageList
            backbone, was_training = self.model.backbone, self.model.backbone.training
            try:
                backbone.eval()  # a pass in train mode would move BatchNorm's running statistics
                with torch.inference_mode():
                    x = torch.zeros(1, 3, size, size, device=device)
                    maps = list(backbone(x).values())  # their shapes decide the anchor grid
                    self._default_boxes = self.model.anchor_generator(ImageList(x, [(size, size)]), maps)[0].cpu()
            finally:
                backbone.train(was_training)
        return self._default_boxes

    def _set_score_threshold(self, threshold: float) -> None:
        if isinstance(self.model, torchvision.models.detection.ssd.SSD):
            self.model.score_thresh = threshold
        else:
            self.model.roi_heads.score_thresh = threshold

    def detect(self, images: list[Image.Image], score_threshold: float | None = None) -> list[Detections]:
        """Boxes (clipped to each image, pixels) with scores in [0, 1], best first, above the threshold."""
        if self.training:
            raise RuntimeError("ProductDetector.detect needs eval mode; call .eval() after training")
        threshold = self.config.score_threshold if score_threshold is None else float(score_threshold)
        if not 0.0 <= threshold <= 1.0:
            raise BadInput(f"score_threshold must be in [0, 1], got {threshold!r}")
        if not images:
            return []
        runner = self._net_runner()
        if isinstance(runner, _TorchvisionForward):
            return self._detect_torchvision(images, threshold)
        logits, regression = runner(np.stack([detector_input(im, self.config.image_size) for im in images]))
        with torch.inference_mode():
            return [self._select(logits[i], regression[i], image, threshold) for i, image in enumerate(images)]

    def _select(self, logits: torch.Tensor, regression: torch.Tensor, image: Image.Image, threshold: float) -> Detections:
        """torchvision's ``SSD.postprocess_detections`` + box rescale for one image, decoding only the candidates.

        Per foreground class: scores above ``threshold``, their top
        ``topk_candidates``, decoded and clipped; then class-aware NMS and the
        best ``detections_per_img``. Decoding is per anchor, so decoding the
        selected rows gives the same boxes as decoding all ~3k and selecting.
        """
        ssd, size = self.model, self.config.image_size
        anchors = self.default_boxes()
        scores = F.softmax(logits, dim=-1)
        boxes, kept_scores, labels = [], [], []
        for label in range(1, scores.size(-1)):
            score = scores[:, label]
            idx = torch.nonzero(score > threshold).squeeze(1)
            top, order = score[idx].topk(min(ssd.topk_candidates, idx.numel()))
            idx = idx[order]
            boxes.append(ssd.box_coder.decode_single(regression[idx], anchors[idx]))
            kept_scores.append(top)
            labels.append(torch.full_like(top, label, dtype=torch.int64))
        box_ops = torchvision.ops.boxes
        boxes = box_ops.clip_boxes_to_image(torch.cat(boxes), (size, size))
        kept_scores, labels = torch.cat(kept_scores), torch.cat(labels)
        keep = box_ops.batched_nms(boxes, kept_scores, labels, ssd.nms_thresh)[: ssd.detections_per_img]
        # transform.postprocess's resize_boxes: float32 ratios, original / input size.
        ratio_h = torch.tensor(image.height, dtype=torch.float32) / torch.tensor(size, dtype=torch.float32)
        ratio_w = torch.tensor(image.width, dtype=torch.float32) / torch.tensor(size, dtype=torch.float32)
        scaled = boxes[keep] * torch.stack((ratio_w, ratio_h, ratio_w, ratio_h))
        return _as_detections(scaled, kept_scores[keep], labels[keep], image)

    def _detect_torchvision(self, images: list[Image.Image], threshold: float) -> list[Detections]:
        """torchvision's own forward (its transform, postprocess and NMS): the reference, and Faster R-CNN's path."""
        device = next(self.parameters()).device
        tensors = [torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).to(device).float().div_(255.0) for im in images]
        self._set_score_threshold(threshold)
        try:
            with torch.inference_mode():
                outputs = self.model(tensors)
        finally:
            self._set_score_threshold(self.config.score_threshold)
        return [_as_detections(out["boxes"].cpu(), out["scores"].cpu(), out["labels"].cpu(), image)
                for image, out in zip(images, outputs)]


def _as_detections(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, image: Image.Image) -> Detections:
    """Best first, clipped to the image (again: a rounding slip must never leave it), boxes under 1 px dropped."""
    order = torch.argsort(scores, descending=True, stable=True)
    boxes = boxes[order].float().clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image.width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image.height)
    keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
    return Detections(
        boxes=boxes[keep].numpy().astype(np.float32),
        scores=scores[order][keep].clamp(0, 1).numpy().astype(np.float32),
        labels=labels[order][keep].numpy().astype(np.int64),
    )
