"""What training reads from a catalog: rows, the train/eval split, each product's cut-out.

The split honours ``split.json`` next to the catalog when present (the sample
set writes one); otherwise a deterministic fraction of products, chosen by a
stable hash of the product id, is held out. Training never sees eval products.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from imgsearch import assets, sample_data
from imgsearch.errors import BadInput, MissingAsset

log = logging.getLogger(__name__)

TUXPAINT_SOURCE = "tuxpaint-stamps:"
# A catalog pixel whose colour is this far (max over channels, 0..255) from the border colour is product.
BACKGROUND_TOLERANCE = 24


@dataclass(frozen=True)
class CatalogRow:
    product_id: str
    image: str  # absolute path
    category: str = ""
    source: str = ""


def read_catalog(path: str | os.PathLike) -> list[CatalogRow]:
    """Rows of a CSV or JSON Lines catalog (INTERFACE.md); rows without product id or image file are skipped."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"catalog file not found: {path}")
    if path.suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    else:
        with open(path, newline="", encoding="utf-8") as f:
            records = list(csv.DictReader(f))
    rows, skipped = [], 0
    for record in records:
        product_id, image = str(record.get("product_id") or "").strip(), str(record.get("image") or "").strip()
        full = (path.parent / image).resolve() if image else None
        if not product_id or full is None or not full.is_file():
            skipped += 1
            continue
        rows.append(CatalogRow(product_id, str(full), str(record.get("category") or ""), str(record.get("source") or "")))
    if skipped:
        log.warning("%s: skipped %d row(s) without a product id or an existing image", path, skipped)
    if not rows:
        raise BadInput(f"catalog {path} has no usable rows")
    return rows


@dataclass(frozen=True)
class Split:
    train: list[str]
    eval: list[str]
    source: str  # "split.json" or "hash:<fraction>"


def resolve_split(catalog_path: str | os.PathLike, product_ids: list[str], heldout_fraction: float = 0.25) -> Split:
    ids = sorted(set(product_ids))
    split_file = Path(catalog_path).parent / "split.json"
    if split_file.is_file():
        data = json.loads(split_file.read_text())
        train_ids, eval_ids = set(data.get("train", [])), set(data.get("eval", []))
        if train_ids & eval_ids:
            raise BadInput(f"{split_file} lists {len(train_ids & eval_ids)} product(s) as both train and eval")
        # Products the split does not name are left out of both: never train on what may be eval data.
        return Split([i for i in ids if i in train_ids], [i for i in ids if i in eval_ids], "split.json")
    if not 0.0 < heldout_fraction < 1.0:
        raise BadInput(f"heldout_fraction must be between 0 and 1, got {heldout_fraction!r}")
    ranked = sorted(ids, key=lambda pid: (sample_data.stable_hash("split:" + pid), pid))
    n_eval = max(1, int(round(len(ids) * heldout_fraction))) if len(ids) > 1 else 0
    return Split(sorted(ranked[n_eval:]), sorted(ranked[:n_eval]), f"hash:{heldout_fraction}")


def product_cutout(row: CatalogRow, max_side: int = sample_data.SCENE_CUTOUT_MAX_SIDE) -> Image.Image:
    """The product as RGBA: the original stamp when the row names one, else cut from its catalog shot."""
    if row.source.startswith(TUXPAINT_SOURCE):
        try:
            stamp = assets.tuxpaint_stamps_dir() / row.source[len(TUXPAINT_SOURCE):]
            if stamp.is_file():
                return sample_data.load_cutout(stamp, max_side=max_side)
        except MissingAsset:
            pass
    with Image.open(row.image) as image:
        return cutout_from_studio_shot(image.convert("RGB"), max_side)


def studio_mask(image: Image.Image) -> np.ndarray | None:
    """Where an RGB studio shot differs from its border colour (the product), or None for a full-bleed photo."""
    pixels = np.asarray(image, dtype=np.int16)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    mask = np.abs(pixels - np.median(border, axis=0)).max(axis=2) > BACKGROUND_TOLERANCE
    return mask if sample_data.MIN_OPAQUE_FRACTION <= mask.mean() < 0.98 else None


def studio_scene(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """A catalog shot as a detector scene: the product fills the frame, as in the catalog and in close-ups.

    Its box is the bounding box of :func:`studio_mask` (the whole image for a full-bleed photo); a
    random crop that keeps the box whole varies its place and how much border surrounds it.
    """
    image = image.convert("RGB")
    mask = studio_mask(image)
    bbox = Image.fromarray((mask * 255).astype(np.uint8), "L").getbbox() if mask is not None else None
    x1, y1, x2, y2 = bbox or (0, 0, image.width, image.height)
    left, top = int(rng.integers(0, x1 + 1)), int(rng.integers(0, y1 + 1))
    right, bottom = int(rng.integers(x2, image.width + 1)), int(rng.integers(y2, image.height + 1))
    return image.crop((left, top, right, bottom)), [(x1 - left, y1 - top, x2 - left, y2 - top)]


def cutout_from_studio_shot(image: Image.Image, max_side: int = sample_data.SCENE_CUTOUT_MAX_SIDE) -> Image.Image:
    """Alpha from "differs from the border colour": catalog shots are products on a plain light background.

    When too little of the picture differs (a full-bleed photo, not a studio
    shot), the whole image is the cut-out, an opaque rectangle.
    """
    mask = studio_mask(image)
    rgba = image.convert("RGBA")
    if mask is not None:
        rgba.putalpha(Image.fromarray((mask * 255).astype(np.uint8), "L"))
        bbox = Image.fromarray((mask * 255).astype(np.uint8), "L").getbbox()
        rgba = rgba.crop(bbox) if bbox else rgba
    if max(rgba.size) > max_side:
        rgba = sample_data.resize_longer_side(rgba, max_side)
    return rgba
