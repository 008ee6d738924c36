"""Which model a job that embeds catalog rows into a store uses, when ``--model`` does not say.

A store holds one model's vectors: a store that records a model keeps it (its checkpoint, or the
built-in one), so a second run never re-embeds everything under another model by surprise. A new
store gets the catalog projection (:mod:`embed.whitening`): the pretrained trunk with a PCA-whitening
fitted, without labels, on a seeded sample of the catalog's own images, saved as
``STORE/projection.ckpt`` (an ordinary checkpoint: its weights hash is the model hash).
``--projection fixed`` keeps the built-in seeded projection.

torch is imported only when a projection is fitted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sys
import time
from pathlib import Path

from imgsearch.errors import BadInput, JobFailed
from index.store import CatalogStore
from index.store.catalog import CatalogRow, read_catalog

log = logging.getLogger(__name__)

PROJECTION_FILE = "projection.ckpt"
PROJECTIONS = ("catalog", "fixed")


@dataclasses.dataclass(frozen=True)
class ModelChoice:
    checkpoint: str | None  # None: the built-in model (fixed projection)
    fit: bool = False  # fit the catalog projection into ``checkpoint`` first
    why: str = ""


def projection_path(store_path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(store_path)) / PROJECTION_FILE


def recorded_model(store_path: str | os.PathLike) -> tuple[str | None, str | None] | None:
    """(model hash, checkpoint) the store records; None when there is no store yet or it records no model."""
    if not (Path(store_path) / "data.mdb").is_file():
        return None
    store = CatalogStore.open_readonly(store_path)
    try:
        if store.model is None:
            return None
        return store.model, store.model_checkpoint
    finally:
        store.close()


def choose_embed_model(store_path: str | os.PathLike, model: str | None, projection: str | None) -> ModelChoice:
    """The model an embedding run into ``store_path`` uses. ``projection`` None: not given on the command line."""
    if projection is not None and projection not in PROJECTIONS:
        raise BadInput(f"--projection {projection!r} is not one of {', '.join(PROJECTIONS)}")
    if model is not None:
        if projection is not None:
            raise BadInput(f"give --model {model!r} or --projection {projection}, not both: "
                           "--projection picks the built-in model's projection")
        return ModelChoice(model, why="--model")
    recorded = recorded_model(store_path)
    own = projection_path(store_path)
    if projection is None and recorded is not None:
        checkpoint = recorded[1]
        if checkpoint is not None and not os.path.isfile(checkpoint):
            raise JobFailed(f"store {str(store_path)!r} was embedded with {checkpoint!r}, which is missing; give --model "
                            "CKPT or --projection catalog|fixed to embed the whole store again with another model")
        return ModelChoice(checkpoint, why="the store's model")
    if projection == "fixed":
        return ModelChoice(None, why="--projection fixed")
    if recorded is not None and recorded[1] is not None and Path(recorded[1]) == own and own.is_file():
        return ModelChoice(str(own), why="the store's catalog projection")
    return ModelChoice(str(own), fit=True, why="catalog projection")


def catalog_images(catalog: str | os.PathLike) -> list[Path]:
    """The image files the catalog's good rows name, resolved as ingest resolves them (BadInput for an unreadable catalog)."""
    folder = Path(catalog).resolve().parent
    return [(folder / row.image).resolve() for row in read_catalog(catalog) if isinstance(row, CatalogRow)]


FIT_HINT = " (once the catalog has {n} images, `imgsearch embed --projection catalog` fits one)"


def catalog_sha256(catalog: str | os.PathLike) -> str:
    return hashlib.sha256(Path(catalog).read_bytes()).hexdigest()


def fit_projection(catalog: str | os.PathLike, path: str | os.PathLike, batch_size: int = 32,
                   command: str = "embed", hint: str = FIT_HINT) -> str | None:
    """Fit the catalog projection and save it as checkpoint ``path`` (+ ``path.json``); ``path``, or None
    when the catalog is too small (a notice line on stderr says so: the built-in fixed projection is used).
    The catalog is read (BadInput for one that cannot be) before anything is written."""
    from embed.model import EmbedderConfig
    from embed.whitening import (
        DEFAULT_POWER,
        DEFAULT_SHRINKAGE,
        FIT_SEED,
        MAX_FIT_IMAGES,
        TooFewImages,
        fit_catalog_net,
        min_fit_images,
        save_projection,
    )

    images = [image for image in catalog_images(catalog) if image.is_file()]
    started = time.monotonic()
    try:
        net = fit_catalog_net(images, EmbedderConfig(), batch_size=batch_size)
    except TooFewImages as exc:
        print(f"imgsearch {command}: notice: {exc}; using the fixed projection instead"
              + hint.format(n=min_fit_images(EmbedderConfig().dim)), file=sys.stderr, flush=True)
        return None
    seconds = time.monotonic() - started
    path = Path(os.path.abspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_projection(net, path, {"method": "pca-whitening of GeM features", "catalog": os.path.abspath(catalog),
                                "catalog_sha256": catalog_sha256(catalog),
                                "images": net.fit_images, "max_images": MAX_FIT_IMAGES, "seed": FIT_SEED,
                                "power": DEFAULT_POWER, "shrinkage": DEFAULT_SHRINKAGE, "seconds": round(seconds, 3)})
    print(f"imgsearch {command}: fitted the catalog projection on {net.fit_images} images in {seconds:.1f} s -> {path}",
          flush=True)
    return str(path)


def resolve_embed_checkpoint(catalog: str | os.PathLike, store_path: str | os.PathLike, model: str | None,
                             projection: str | None, batch_size: int = 32, command: str = "embed") -> str | None:
    """The checkpoint to embed ``catalog`` into ``store_path`` with (None: the built-in model), fitting the
    catalog projection first when that is the choice. The catalog is validated before anything is written."""
    choice = choose_embed_model(store_path, model, projection)
    log.info("%s: model %s (%s)", command, choice.checkpoint or "built-in", choice.why)
    if not choice.fit:
        return choice.checkpoint
    return fit_projection(catalog, projection_path(store_path), batch_size, command)
