"""``imgsearch train``: catalog -> views and scenes -> cached frozen maps -> epochs -> checkpoint -> held-out evaluation.

``main(argv)`` is callable from tests (torchvision-references style);
``run_train_command(args)`` is the CLI handler.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from embed.checkpoint import Checkpoint
from embed.pipeline import crop_with_margin
from imgsearch import sample_data
from imgsearch.errors import BadInput
from train.engine import TrainConfig, TrainingRun, ValidationCache, ViewCache
from train.evaluate import RetrievalSet
from train.frozen import mapped_in_order
from train.options import build_parser
from train.training_data import CatalogRow, Split, product_cutout, read_catalog, resolve_split, studio_scene
from train.views import SceneMaker, ViewMaker

log = logging.getLogger(__name__)

PIPELINE_MARGIN = 0.10  # embed.pipeline.QueryPipeline's default crop margin
SYNTHETIC_QUERIES_PER_PRODUCT = 3


def _open_rgb(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


@dataclass
class TrainingData:
    """A catalog's rows, split into train and eval products, and the views/scenes/queries made from them."""
    catalog_path: Path
    rows: list[CatalogRow]
    split: Split
    train_products: list[str]
    config: TrainConfig

    @classmethod
    def from_catalog(cls, catalog_path, config: TrainConfig) -> TrainingData:
        rows = read_catalog(catalog_path)
        split = resolve_split(catalog_path, [r.product_id for r in rows], config.heldout_fraction)
        if len(split.train) < 2:
            raise BadInput(f"{catalog_path}: {len(split.train)} train product(s) after the split ({split.source}); need at least 2")
        train = split.train
        if config.max_products is not None and config.max_products < len(train):
            train = sorted(sorted(train, key=lambda p: sample_data.stable_hash("pick:" + p))[: config.max_products])
        return cls(Path(catalog_path), rows, split, train, config)

    def rows_of(self, product_id: str) -> list[CatalogRow]:
        return [r for r in self.rows if r.product_id == product_id]

    @property
    def n_views(self) -> int:
        return sum(len(self.rows_of(p)) + self.config.shopper_views for p in self.train_products)

    def labelled_views(self):
        """(label, image): each train product's catalog shot(s), then its shopper crops; rendered by two threads."""
        maker = ViewMaker()
        backgrounds = sample_data.list_backgrounds()

        def product_views(labelled: tuple[int, str]) -> list[tuple[int, Image.Image]]:
            label, product_id = labelled
            rows = self.rows_of(product_id)
            views = [(label, _open_rgb(row.image)) for row in rows]
            cutout = product_cutout(rows[0])
            rng = np.random.default_rng([self.config.seed, 0x7669, sample_data.stable_hash(product_id)])
            views.extend((label, maker.shopper_view(cutout, rng, backgrounds)) for _ in range(self.config.shopper_views))
            return views

        for views in mapped_in_order(product_views, enumerate(self.train_products)):
            yield from views

    def scenes(self):
        """(scene, boxes) pairs: 1-2 TRAIN products in real photos, and (``studio_scenes`` of them) a
        TRAIN product's own catalog shot, where the product fills the frame. Scene i draws from its own
        seeded stream, so two threads render them and the scenes do not depend on which ran it."""
        maker = SceneMaker()
        backgrounds = sample_data.list_backgrounds()
        first_rows = [self.rows_of(p)[0] for p in self.train_products]

        def scene(i: int):
            rng = np.random.default_rng([self.config.seed, 0x5CE, i])
            if rng.random() < self.config.studio_scenes:
                row = first_rows[int(rng.integers(len(first_rows)))]
                return studio_scene(_open_rgb(row.image), rng)
            count = int(rng.integers(1, maker.max_products + 1))
            picks = rng.choice(len(first_rows), size=min(count, len(first_rows)), replace=False)
            cutouts = [product_cutout(first_rows[k], max_side=320) for k in picks]
            return sample_data.make_scene(cutouts, backgrounds, rng, style=maker.style)

        yield from mapped_in_order(scene, range(self.config.scenes), ahead=32)

    def retrieval_set(self) -> RetrievalSet | None:
        """Held-out queries: the sample set's queries.jsonl when it sits next to the catalog, else synthetic shopper photos."""
        if not self.split.eval:
            return None
        eval_ids = set(self.split.eval)
        queries_file = self.catalog_path.parent / "queries.jsonl"
        if queries_file.is_file():
            with open(queries_file, encoding="utf-8") as f:
                records = [json.loads(line) for line in f if line.strip()]
            records = [r for r in records if r.get("product_id") in eval_ids and r.get("box")]
            images = [str((self.catalog_path.parent / r["image"]).resolve()) for r in records]
            products = [r["product_id"] for r in records]
            boxes = [tuple(r["box"]) for r in records]
        else:
            backgrounds = sample_data.list_backgrounds()
            images, products, boxes = [], [], []
            for product_id in self.split.eval:
                cutout = product_cutout(self.rows_of(product_id)[0])
                rng = np.random.default_rng([self.config.seed, 0xE7A1, sample_data.stable_hash(product_id)])
                for _ in range(SYNTHETIC_QUERIES_PER_PRODUCT):
                    photo, box = sample_data.make_shopper_photo(cutout, rng, backgrounds)
                    images.append(photo)
                    products.append(product_id)
                    boxes.append(tuple(box))
        if not images:
            return None
        return RetrievalSet(images, products, boxes, [r.image for r in self.rows], [r.product_id for r in self.rows])


def validation_cache(stage, retrieval: RetrievalSet, progress) -> ValidationCache:
    """True-box crops of the held-out queries and whole catalog shots, through the frozen trunk."""
    products = sorted(set(retrieval.catalog_products) | set(retrieval.query_products))
    label = {p: i for i, p in enumerate(products)}

    def crops():
        for image, product, box in zip(retrieval.query_images, retrieval.query_products, retrieval.query_boxes):
            photo = image if isinstance(image, Image.Image) else _open_rgb(image)
            yield label[product], crop_with_margin(photo, box, PIPELINE_MARGIN)

    queries = stage.cache(crops(), len(retrieval.query_images), progress)
    catalog = stage.cache(((label[p], _open_rgb(i)) for i, p in zip(retrieval.catalog_images, retrieval.catalog_products)),
                          len(retrieval.catalog_images), progress)
    return ValidationCache(queries, catalog, products)


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    overrides = {
        "epochs": args.epochs, "loss": args.loss, "seed": args.seed, "shopper_views": args.views, "scenes": args.scenes,
        "max_products": args.max_products, "image_size": args.image_size, "detector_image_size": args.detector_image_size,
        "detector_passes": args.detector_passes, "embed_trainable_from": args.embed_trainable_from,
        "detector_trainable_from": args.detector_trainable_from, "studio_scenes": args.studio_scenes,
        "head_init": args.head_init, "transfer_weight": args.transfer_weight,
    }
    config = TrainConfig(**{k: v for k, v in overrides.items() if v is not None})
    return replace(config, detector=False) if args.no_detector else config


def _progress_flag(args) -> bool | None:
    return {"auto": None, "on": True, "off": False}[args.progress]


def train(args: argparse.Namespace) -> dict:
    """The whole job; returns a summary (config, history, evaluation, seconds)."""
    import torch

    progress = _progress_flag(args)
    started = time.perf_counter()
    # The catalog is read before any network is built, so a bad catalog fails in a second.
    config = TrainConfig.from_dict(Checkpoint.load(args.resume).extra.get("train_config", {})) if args.resume else resolve_config(args)
    data = TrainingData.from_catalog(args.catalog, config)
    if args.resume:
        run = TrainingRun.resume(args.resume, args.epochs)
        if run.run_info.get("catalog") and Path(run.run_info["catalog"]).resolve() != Path(args.catalog).resolve():
            log.warning("resuming a run trained on %s with catalog %s", run.run_info["catalog"], args.catalog)
    else:
        run = TrainingRun.fresh(config)
    config = run.config
    torch.manual_seed(config.seed)
    if args.resume and run.run_info.get("train_products") not in (None, data.train_products):
        raise BadInput(f"{args.resume} was trained on other products than {args.catalog} now gives; resume with the same catalog and split")
    run.run_info = {"catalog": str(Path(args.catalog).resolve()), "split_source": data.split.source,
                    "train_products": data.train_products, "eval_products": data.split.eval}
    log.info("train: %d train products (%s split), %d eval products held out", len(data.train_products), data.split.source,
             len(data.split.eval))
    prepare_started = time.perf_counter()
    views: ViewCache = run.embedder_stage.cache(data.labelled_views(), data.n_views, progress)
    scenes = run.detector_stage.cache(data.scenes(), config.scenes, progress) if run.detector_stage is not None else None
    retrieval = data.retrieval_set()
    validation = validation_cache(run.embedder_stage, retrieval, progress) if retrieval is not None else None
    prepare_seconds = time.perf_counter() - prepare_started
    fit_started = time.perf_counter()
    if run.epoch >= config.epochs:
        log.info("%s already has %d of %d epochs; nothing to train", args.resume, run.epoch, config.epochs)
        run.save(args.output)
    run.fit(views, scenes, args.output, validation, progress)
    summary = {"config": config.to_dict(), "history": run.history, "prepare_seconds": round(prepare_seconds, 1),
               "fit_seconds": round(time.perf_counter() - fit_started, 1)}
    if not args.no_eval and retrieval is not None:
        from train.report import evaluate_checkpoint, format_table

        evaluation = evaluate_checkpoint(args.output, retrieval, baseline=not args.no_baseline, progress=progress)
        summary["evaluation"] = evaluation
        print(format_table(evaluation))
        checkpoint = run.checkpoint()
        checkpoint.extra["evaluation"] = evaluation
        checkpoint.save(args.output)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    log.info("train: wrote %s in %.0f s", args.output, summary["seconds"])
    return summary


def main(argv: list[str] | argparse.Namespace | None = None) -> dict:
    args = argv if isinstance(argv, argparse.Namespace) else build_parser().parse_args(argv)
    return train(args)


def run_train_command(args: argparse.Namespace) -> int:
    train(args)
    return 0
