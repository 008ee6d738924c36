"""The training loop: embedder (metric learning on PK batches) and detector (SSDlite on composite scenes).

Both networks train on cached frozen-trunk features (:mod:`train.frozen`):
only the trunk's upper blocks and the heads learn. One epoch = one pass of
PK batches over the embedder's view cache, then one pass over the detector's
scene cache. After every epoch a checkpoint is written (atomically) holding
weights, both optimisers, the epoch, the resolved config and the metrics;
``TrainingRun.resume`` continues from it exactly: batches are drawn from
``(seed, epoch)``-seeded generators and learning rates are a pure function
of the epoch, so the resumed epoch computes the same losses as an
uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch

from embed.checkpoint import Checkpoint
from embed.detector import MOBILENET_V2_STRIDE16_SPLIT, DetectorConfig, ProductDetector
from embed.model import EmbedderConfig, EmbeddingNet
from embed.pipeline import make_checkpoint
from embed.preprocess import Preprocessor
from embed.torchvision_compat import torchvision
from imgsearch.errors import BadInput
from imgsearch.progress import Progress
from train.evaluate import cosine_recall
from train.frozen import FrozenPrefix, freeze, prefetched
from train.losses import LOSSES, make_loss
from train.sampler import PKSampler
from train.transfer import HEAD_INITS, TransferTeacher, similarity_preserving_loss

log = logging.getLogger(__name__)

MOBILENET_V2_BLOCKS = 19  # len(mobilenet_v2().features)


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a run; stored resolved in the checkpoint (``extra.train_config``)."""

    epochs: int = 4  # triplet's held-out R@1 peaks by epoch 3-4 on the sample set (bench_recall.py)
    seed: int = 0
    loss: str = "triplet"  # beat multi-similarity on measured held-out R@1 (BENCHMARKS.md)
    products_per_batch: int = 32  # P
    views_per_batch: int = 6  # K; 4 -> 6 lifted held-out true-box R@1 0.923 -> 0.943, R@10 0.989 -> 0.992
    # Held-out true-box R@1 of the embedder alone (4 epochs, bench_train_sweep.py embedder; BENCHMARKS.md): blocks
    # [17:] learn, 7 views 0.843; [14:] 0.912; [17:] with 24 views 0.900; [14:] with 24 views 0.923
    # (R@10 0.989); [11:] with 24 views 0.920 at 3x the cost. Views are the cheapest accuracy there is.
    shopper_views: int = 24  # per train product, plus its catalog shot(s)
    embed_trainable_from: int = 14  # trunk blocks [this:] and the head learn; [:this] are frozen and cached
    embed_lr: float = 1e-3
    embed_trunk_lr: float = 2e-4
    weight_decay: float = 1e-4
    image_size: int = 224
    detector: bool = True
    # Held-out AP@0.5 (4 epochs, bench_train_sweep.py detector; BENCHMARKS.md): blocks [17:] learn,
    # 1200 scenes x 4 passes 0.821; [14:] 0.893; [14:] 2400 x 2 passes 0.906; [14:] 4800 x 1 pass
    # 0.906; [14:] 3600 x 1 0.909 and 0.915 (seeds 0, 1); [11:] 3600 x 1 0.950, with the top box
    # at IoU >= 0.5 on 94 % of photos instead of 91-92 %. In make train-demo, [11:] with 3600 scenes
    # took 1,115 s (too near the 20-minute budget); with 2800 scenes 900 s, less than [14:] with
    # 3600 (943 s), at AP 0.955 vs 0.927 and dev-photo R@10 0.964 vs 0.952 (bench_region_policy.py
    # --dev 6). A new scene costs ~50 ms (render + frozen trunk), a step over 16 of them ~0.45 s
    # from [14:] and ~0.7 s from [11:], so fresh scenes beat repeated passes.
    scenes: int = 2800
    # A detector that never saw a product fill the frame boxes a part of it on catalog shots, and a
    # catalog embedded through such boxes (as `imgsearch embed` does) cost held-out R@1 0.927 -> 0.831
    # (bench_recall.py: catalog whole vs detect). With 15 % of the 2800 scenes being catalog shots,
    # catalog-detect R@1 / R@10 is 0.921 / 0.979 on the dev photos (was 0.822 / 0.956); 3300 scenes
    # (the shopper scenes' number kept) gave 0.908 / 0.979 in 1,040 s instead of 914 s.
    studio_scenes: float = 0.15  # share of the scenes that are a train product's own catalog shot
    scene_batch: int = 16
    detector_passes: int = 1  # passes over the scene cache per epoch
    detector_trainable_from: int = 11  # MobileNetV2 blocks [this:] of the detector's trunk learn; below 14 the stride-16 map too
    detector_lr: float = 1e-3
    detector_image_size: int = 320
    heldout_fraction: float = 0.25  # used only when the catalog has no split.json
    max_products: int | None = None  # train on at most this many train products (smoke tests)
    # Category transfer (train/transfer.py; bench_train_sweep.py, held-out R@1 / Fashion-MNIST P@1): fixed head
    # 0.939 / 0.739, whitened 0.939 / 0.772, + weight 1 0.939 / 0.792, + weight 4 0.946 / 0.800 (pretrained 0.785).
    head_init: str = "whitened"
    transfer_weight: float = 4.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise BadInput(f"unknown loss {self.loss!r}; expected one of {sorted(LOSSES)}")
        if not 1 <= self.embed_trainable_from <= MOBILENET_V2_BLOCKS:
            raise BadInput(f"embed_trainable_from must be in 1..{MOBILENET_V2_BLOCKS}, got {self.embed_trainable_from!r}")
        if not 1 <= self.detector_trainable_from <= MOBILENET_V2_BLOCKS:
            raise BadInput(f"detector_trainable_from must be in 1..{MOBILENET_V2_BLOCKS}, got {self.detector_trainable_from!r}")
        if not 0.0 <= self.studio_scenes <= 1.0:
            raise BadInput(f"studio_scenes must be in [0, 1], got {self.studio_scenes!r}")
        if self.head_init not in HEAD_INITS:
            raise BadInput(f"head_init must be one of {list(HEAD_INITS)}, got {self.head_init!r}")
        if not (math.isfinite(self.transfer_weight) and self.transfer_weight >= 0.0):
            raise BadInput(f"transfer_weight must be a finite number >= 0, got {self.transfer_weight!r}")
        for name in ("epochs", "shopper_views", "scene_batch", "detector_passes"):
            if getattr(self, name) < 1:
                raise BadInput(f"{name} must be >= 1, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        # A config saved before a knob existed was trained without what the knob adds: resuming it
        # must not add it (a resumed run renders its scenes again).
        saved_before = {"studio_scenes": 0.0, "head_init": "fixed", "transfer_weight": 0.0}
        return cls(**{**saved_before, **{k: v for k, v in data.items() if k in known}})


def cosine_lr(base: float, epoch: int, total: int) -> float:
    """Cosine decay over the run, by epoch (0-based), ending at 5 % of the base rate."""
    progress = epoch / max(1, total)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _progress(total: int | None, desc: str, unit: str, enabled: bool | None) -> Progress:
    # None is "auto": a bar on a terminal and timed plain lines otherwise, like True; only False is silent.
    return Progress(total, desc, unit, enabled=enabled is not False)


def _nhwc(cached: torch.Tensor) -> torch.Tensor:
    """A cached float16 map as the float32 channels_last tensor the learning blocks run fastest on: oneDNN's
    convolutions are ~1.2x faster per training step in channels_last than in NCHW (2-core CPU, detector batch 16)."""
    return cached.to(torch.float32, memory_format=torch.channels_last)


# ---------------------------------------------------------------- embedder


class ViewCache:
    """Frozen-trunk feature maps (float16) of augmented views, with their integer product labels
    (and, once a stage with a transfer teacher has seen them, the teacher's vectors)."""

    def __init__(self, features: torch.Tensor, labels: np.ndarray):
        if len(features) != len(labels):
            raise BadInput(f"{len(features)} cached maps but {len(labels)} labels")
        self.features, self.labels, self.teacher = features, np.asarray(labels, dtype=np.int64), None

    def __len__(self) -> int:
        return len(self.labels)


class EmbedderStage:
    """Metric learning of the embedder's upper trunk blocks and head on cached lower-trunk maps."""

    def __init__(self, net: EmbeddingNet, config: TrainConfig):
        self.net, self.config = net, config
        split = config.embed_trainable_from
        self.lower, self.upper = net.trunk[:split], net.trunk[split:]
        freeze(self.lower)
        self.upper.to(memory_format=torch.channels_last)
        self.loss = make_loss(config.loss)
        self.preprocess = Preprocessor(net.config.image_size)
        size = net.config.image_size
        self._prefix = FrozenPrefix(self.lower, torch.zeros(2, 3, size, size).contiguous(memory_format=torch.channels_last),
                                    kind="frozen-embedder-prefix")
        self.optimizer = torch.optim.AdamW(
            [{"params": list(self.upper.parameters()), "lr": config.embed_trunk_lr, "base_lr": config.embed_trunk_lr},
             {"params": list(net.head.parameters()), "lr": config.embed_lr, "base_lr": config.embed_lr}],
            weight_decay=config.weight_decay,
        )
        self.teacher = (TransferTeacher(net.config.backbone, split, net.config.dim, net.config.gem_p)
                        if config.transfer_weight > 0 or config.head_init == "whitened" else None)

    def start(self, cache: ViewCache) -> None:
        """Before the first epoch: the teacher's vectors of ``cache`` and, with ``head_init='whitened'``, the head's start."""
        if self.teacher is None:
            return
        cache.teacher = self.teacher.vectors(cache.features)  # this stage's own fit, whoever saw the cache before
        if self.config.head_init == "whitened":
            self.teacher.init_projection(self.net.head.projection)

    def teacher_vectors(self, cache: ViewCache) -> torch.Tensor:
        cache.teacher = cache.teacher if cache.teacher is not None else self.teacher.vectors(cache.features)
        return cache.teacher

    def cache(self, labelled_images, total: int | None = None, progress: bool | None = None, batch: int = 32) -> ViewCache:
        """(label, PIL image) pairs -> a :class:`ViewCache`; images are dropped once their maps are made."""
        maps, labels, pending = [], [], []
        bar = _progress(total, "cache views", "images", progress)

        def flush():
            maps.append(self._prefix(self.preprocess([im for _, im in pending])))
            labels.extend(label for label, _ in pending)
            bar.update(len(pending))
            pending.clear()

        for item in prefetched(labelled_images):
            pending.append(item)
            if len(pending) == batch:
                flush()
        if pending:
            flush()
        bar.close()
        if not maps:
            raise BadInput("no views to cache")
        return ViewCache(torch.cat(maps), np.array(labels))

    def train_mode(self) -> None:
        self.net.train()
        self.lower.eval()  # frozen BatchNorm keeps its ImageNet statistics

    def embed_maps(self, maps: torch.Tensor) -> torch.Tensor:
        return self.net.head(self.upper(_nhwc(maps)))

    def sampler(self, cache: ViewCache) -> PKSampler:
        """P x K batches; P and K shrink to what the cache holds (few products, or fewer views than K: ``--views``)."""
        _, per_product = np.unique(cache.labels, return_counts=True)
        p = min(self.config.products_per_batch, len(per_product))
        k = min(self.config.views_per_batch, int(per_product.min()))
        return PKSampler(cache.labels, p, k, self.config.seed)

    def train_epoch(self, cache: ViewCache, epoch: int, bar=None) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_lr(group["base_lr"], epoch, self.config.epochs)
        sampler = self.sampler(cache)
        sampler.set_epoch(epoch)
        self.train_mode()
        losses = []
        for indices in sampler:
            index = torch.from_numpy(indices)
            embeddings = self.embed_maps(cache.features[index])
            loss = self.loss(embeddings, torch.from_numpy(cache.labels[indices]))
            if self.config.transfer_weight > 0:
                loss = loss + self.config.transfer_weight * similarity_preserving_loss(embeddings, self.teacher_vectors(cache)[index])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(embed_loss=f"{np.mean(losses):.4f}")
        self.net.eval()
        return float(np.mean(losses)) if losses else float("nan")

    def vectors(self, cache: ViewCache, batch: int = 256) -> np.ndarray:
        self.net.eval()
        with torch.inference_mode():
            return torch.cat([self.embed_maps(cache.features[i : i + batch]) for i in range(0, len(cache), batch)]).numpy()


@dataclass
class ValidationCache:
    """Held-out queries (true-box crops) and catalog shots, cached through the frozen trunk: a cheap per-epoch R@K."""

    queries: ViewCache
    catalog: ViewCache
    products: list[str]  # label -> product id

    def recall(self, stage: EmbedderStage) -> dict[str, float]:
        q, c = stage.vectors(self.queries), stage.vectors(self.catalog)
        recall = cosine_recall(q, [self.products[i] for i in self.queries.labels], c, [self.products[i] for i in self.catalog.labels])
        return {f"val_recall@{k}": v for k, v in recall.items()}


# ---------------------------------------------------------------- detector


class _DetectorLowerTrunk(torch.nn.Module):
    """The detector's frozen part: the trunk up to the first learning block, and, when the learning
    blocks start above the stride-16 map, the frozen blocks between them as a second output."""

    def __init__(self, stem: torch.nn.Module, frozen32: torch.nn.Module | None):
        super().__init__()
        self.stem, self.frozen32 = stem, frozen32

    def forward(self, x: torch.Tensor):
        start = self.stem(x)
        return start if self.frozen32 is None else (start, self.frozen32(start))


class SceneCache:
    """Cached frozen-trunk maps of the scenes, and their targets.

    ``inputs``: the trunk's output where the learning blocks begin (for ``detector_trainable_from``
    >= 14, the stride-16 map the first head reads). ``frozen32``: only when frozen blocks sit above
    the stride-16 map, their output, which the learning stride-32 blocks read.
    """

    def __init__(self, inputs: torch.Tensor, frozen32: torch.Tensor | None, targets: list[dict[str, torch.Tensor]]):
        self.inputs, self.frozen32, self.targets = inputs, frozen32, targets

    def __len__(self) -> int:
        return len(self.targets)

    def first(self, n: int) -> SceneCache:
        """The first ``n`` scenes, sharing this cache's tensors: a shorter run on the same rendered data."""
        return SceneCache(self.inputs[:n], None if self.frozen32 is None else self.frozen32[:n], self.targets[:n])

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.inputs[index], None if self.frozen32 is None else self.frozen32[index]


class DetectorStage:
    """SSDlite training on cached scenes: the detector's trunk blocks from ``detector_trainable_from`` up, extra layers and heads learn.

    Blocks below 14 sit under the stride-16 map, so when they learn, the map the first head reads
    learns too; the cache then holds the map the first learning block reads (from block 11: block
    10's 64-channel stride-16 output, smaller than the 96-channel stride-16 map itself).
    """

    def __init__(self, detector: ProductDetector, config: TrainConfig):
        self.detector, self.config = detector, config
        self.ssd = detector.model
        if not isinstance(self.ssd, torchvision.models.detection.ssd.SSD):
            raise BadInput(f"detector training supports the ssdlite arch, got {detector.config.arch!r}")
        features = self.ssd.backbone
        start = config.detector_trainable_from
        above16 = max(0, start - MOBILENET_V2_STRIDE16_SPLIT)  # frozen blocks above the stride-16 map
        # From block 14 up, [start:] of the stride-16 part is an empty Sequential, which passes its
        # input through: the cached map IS the stride-16 map.
        stem, self.upper16 = features.to_stride16[:start], features.to_stride16[start:]
        self.lower = _DetectorLowerTrunk(stem, features.to_stride32[:above16] if above16 else None)
        self.upper32 = features.to_stride32[above16:]
        self.extra = features.extra
        freeze(self.lower)
        self.ssd.to(memory_format=torch.channels_last)
        size = detector.config.image_size
        self._prefix = FrozenPrefix(self.lower, torch.zeros(2, 3, size, size).contiguous(memory_format=torch.channels_last),
                                    kind="frozen-detector-prefix")
        trainable = [p for p in self.ssd.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW([{"params": trainable, "lr": config.detector_lr, "base_lr": config.detector_lr}],
                                           weight_decay=config.weight_decay)

    def cache(self, scenes, total: int | None = None, progress: bool | None = None, batch: int = 16) -> SceneCache:
        """(PIL scene, boxes) pairs -> frozen maps of the SSD-transformed (resized, normalised) scenes + targets."""
        inputs, frozen32, targets, pending = [], [], [], []
        bar = _progress(total, "cache scenes", "images", progress)
        self.ssd.eval()

        def flush():
            images = [torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0) for im, _ in pending]
            raw_targets = [{"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                            "labels": torch.ones(len(boxes), dtype=torch.int64)} for _, boxes in pending]
            with torch.inference_mode():
                image_list, resized = self.ssd.transform(images, raw_targets)  # what SSD.forward does first
            maps = self._prefix(image_list.tensors)
            if isinstance(maps, tuple):
                inputs.append(maps[0])
                frozen32.append(maps[1])
            else:
                inputs.append(maps)
            targets.extend({"boxes": t["boxes"].clone(), "labels": t["labels"].clone()} for t in resized)
            bar.update(len(pending))
            pending.clear()

        for item in prefetched(scenes):
            pending.append(item)
            if len(pending) == batch:
                flush()
        if pending:
            flush()
        bar.close()
        return SceneCache(torch.cat(inputs), torch.cat(frozen32) if frozen32 else None, targets)

    def train_mode(self) -> None:
        self.detector.train()
        self.lower.eval()

    def losses(self, inputs: torch.Tensor, frozen32: torch.Tensor | None, targets) -> dict[str, torch.Tensor]:
        """SSD.forward's training branch from the cached maps on (see torchvision.models.detection.ssd)."""
        map16 = self.upper16(_nhwc(inputs))
        maps = [map16, self.upper32(map16 if frozen32 is None else _nhwc(frozen32))]
        for block in self.extra:
            maps.append(block(maps[-1]))
        head_outputs = self.ssd.head(maps)
        size = self.detector.config.image_size
        image_list = torchvision.models.detection.image_list.ImageList(
            torch.zeros(1, 1, 1, 1).expand(len(targets), 3, size, size), [(size, size)] * len(targets))
        anchors = self.ssd.anchor_generator(image_list, maps)
        matched = [self.ssd.proposal_matcher(torchvision.ops.box_iou(t["boxes"], a)) for t, a in zip(targets, anchors)]
        return self.ssd.compute_loss(targets, head_outputs, anchors, matched)

    def train_epoch(self, cache: SceneCache, epoch: int, bar=None) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_lr(group["base_lr"], epoch, self.config.epochs)
        # Pass 0 draws the same order as runs from before detector_passes existed.
        orders = [np.random.default_rng([self.config.seed, 0xDE7, epoch] + ([p] if p else [])).permutation(len(cache))
                  for p in range(self.config.detector_passes)]
        self.train_mode()
        losses = []
        step = self.config.scene_batch
        batches = [order[start : start + step] for order in orders for start in range(0, len(order), step)]
        for idx in batches:
            index = torch.from_numpy(idx)
            parts = self.losses(*cache.batch(index), [cache.targets[i] for i in idx])
            loss = sum(parts.values())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(detector_loss=f"{np.mean(losses):.4f}")
        self.detector.eval()
        return float(np.mean(losses)) if losses else float("nan")

    def steps_per_epoch(self, cache: SceneCache) -> int:
        return self.config.detector_passes * math.ceil(len(cache) / self.config.scene_batch)


# ---------------------------------------------------------------- the run


@dataclass
class TrainingRun:
    """Networks, their stages and optimisers, and where the run has got to."""

    config: TrainConfig
    net: EmbeddingNet
    detector: ProductDetector | None
    epoch: int = 0  # epochs completed
    history: list[dict] | None = None
    run_info: dict | None = None  # split, catalog, products: what the run trained on

    def __post_init__(self) -> None:
        self.history = self.history or []
        self.run_info = self.run_info or {}
        self.embedder_stage = EmbedderStage(self.net, self.config)
        self.detector_stage = DetectorStage(self.detector, self.config) if self.detector is not None else None

    @classmethod
    def fresh(cls, config: TrainConfig, weights=None) -> TrainingRun:
        """ImageNet trunks; the fixed projection, which ``EmbedderStage.start`` may whiten (``head_init``)."""
        torch.manual_seed(config.seed)
        net = EmbeddingNet.pretrained(EmbedderConfig(image_size=config.image_size, projection_bn=False), weights)
        detector = ProductDetector.pretrained(DetectorConfig(image_size=config.detector_image_size), weights) if config.detector else None
        return cls(config, net, detector)

    @classmethod
    def resume(cls, path, epochs: int | None = None) -> TrainingRun:
        """Networks, optimisers and progress from a training checkpoint; ``epochs`` may extend the run."""
        from embed.pipeline import load_detector, net_from_checkpoint

        loaded = Checkpoint.load(path)
        extra = loaded.extra
        if "train_config" not in extra or "optimizers" not in extra:
            raise BadInput(f"{path} is not a training checkpoint (no train_config/optimizers); it cannot be resumed")
        config = TrainConfig.from_dict(extra["train_config"])
        if epochs is not None:
            config = replace(config, epochs=epochs)
        run = cls(config, net_from_checkpoint(loaded, path), load_detector(loaded), int(extra["epoch"]),
                  list(extra.get("history", [])), dict(extra.get("run_info", {})))
        run.embedder_stage.optimizer.load_state_dict(extra["optimizers"]["embedder"])
        if run.detector_stage is not None:
            run.detector_stage.optimizer.load_state_dict(extra["optimizers"]["detector"])
        torch.set_rng_state(extra["torch_rng"])
        return run

    def checkpoint(self) -> Checkpoint:
        optimizers = {"embedder": self.embedder_stage.optimizer.state_dict()}
        if self.detector_stage is not None:
            optimizers["detector"] = self.detector_stage.optimizer.state_dict()
        extra = {
            "epoch": self.epoch,
            "train_config": self.config.to_dict(),
            "metrics": self.history[-1] if self.history else {},
            "history": self.history,
            "run_info": self.run_info,
            "optimizers": optimizers,
            "torch_rng": torch.get_rng_state(),
        }
        return make_checkpoint(self.net, self.detector, extra)

    def save(self, path) -> None:
        self.checkpoint().save(path)

    def fit(self, views: ViewCache, scenes: SceneCache | None, output, validation: ValidationCache | None = None,
            progress: bool | None = None) -> list[dict]:
        """Train the remaining epochs, checkpointing after each; returns the per-epoch metrics."""
        if self.epoch == 0:
            self.embedder_stage.start(views)
        while self.epoch < self.config.epochs:
            epoch = self.epoch
            torch.manual_seed(self.config.seed * 1000 + epoch)
            embed_steps = len(self.embedder_stage.sampler(views))
            det_steps = self.detector_stage.steps_per_epoch(scenes) if (self.detector_stage and scenes) else 0
            started = time.perf_counter()
            with _progress(embed_steps + det_steps, f"epoch {epoch + 1}/{self.config.epochs}", "steps", progress) as bar:
                metrics = {"epoch": epoch + 1, "embed_loss": self.embedder_stage.train_epoch(views, epoch, bar)}
                if det_steps:
                    metrics["detector_loss"] = self.detector_stage.train_epoch(scenes, epoch, bar)
            metrics["seconds"] = round(time.perf_counter() - started, 2)
            if validation is not None:
                metrics.update(validation.recall(self.embedder_stage))
            self.epoch += 1
            self.history.append(metrics)
            log.info("epoch %d/%d: %s", self.epoch, self.config.epochs,
                     ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items() if k != "epoch"))
            self.save(output)
        return self.history
