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
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from functools import partial

import numpy as np
import torch
from PIL import Image
from torch import nn

from embed.model import build_trunk
from embed.preprocess import IMAGENET_MEAN, IMAGENET_STD
from embed.torchvision_compat import torchvision
from imgsearch.errors import BadInput

ARCHITECTURES = ("ssdlite", "fasterrcnn")
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


class ProductDetector(nn.Module):
    """A torchvision detection model on the MobileNetV2 trunk, plus a PIL-in, numpy-out ``detect``."""

    def __init__(self, config: DetectorConfig, trunk: nn.Sequential):
        super().__init__()
        self.config = config
        build = _build_ssdlite if config.arch == "ssdlite" else _build_fasterrcnn
        self.model = build(config, trunk)

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
        device = next(self.parameters()).device
        tensors = [torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).to(device).float().div_(255.0) for im in images]
        self._set_score_threshold(threshold)
        try:
            with torch.inference_mode():
                outputs = self.model(tensors)
        finally:
            self._set_score_threshold(self.config.score_threshold)
        results = []
        for image, out in zip(images, outputs):
            out = {k: v.cpu() for k, v in out.items()}
            order = torch.argsort(out["scores"], descending=True, stable=True)
            boxes = out["boxes"][order].float()
            # torchvision clips already; clip again so a rounding slip never leaves the image.
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image.width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image.height)
            keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
            results.append(Detections(
                boxes=boxes[keep].numpy().astype(np.float32),
                scores=out["scores"][order][keep].clamp(0, 1).numpy().astype(np.float32),
                labels=out["labels"][order][keep].numpy().astype(np.int64),
            ))
        return results
