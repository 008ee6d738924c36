"""The real sample catalog and its evaluation set, built from offline Debian assets.

Products are the photo cut-outs of ``tuxpaint-stamps-default`` (PNGs with alpha).
Each product gets a clean catalog shot (the cut-out centred on a light neutral
background). Held-out (eval) products also get "shopper photos": the cut-out
pasted into real photos (scikit-image's bundled images and opencv-doc's sample
photos) at varied scale, position and rotation, with blur, lighting changes and
JPEG compression, and the product's box recorded as ground truth.

The same scene generator (:func:`make_scene`, :func:`make_shopper_photo`) is
what training uses on TRAIN products, so train-time and eval-time views come
from one distribution, but never from the same products.

Layout written by :func:`build_sample_set`::

    OUT/config.json      resolved config + version; a rebuild with the same config is a no-op
    OUT/catalog.csv      product_id,image,category,title,description,source (INTERFACE.md "Catalog input")
    OUT/catalog/*.jpg    one catalog shot per product (train and eval products both)
    OUT/split.json       {"train": [...], "eval": [...]} product ids
    OUT/queries.jsonl    {"image", "product_id", "category", "box": [x1, y1, x2, y2], ...}
    OUT/queries/*.jpg    shopper photos of eval products only

Boxes are in query-image pixels, PIL convention: x1, y1 inclusive, x2, y2
exclusive (pixel edges), tight around the product's alpha mask after rotation.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from imgsearch.errors import BadInput
from imgsearch.progress import Progress
from imgsearch.sample_data.products import (
    CATALOG_JPEG_QUALITY,
    CATALOG_SIZE,
    SAMPLE_SET_VERSION,
    SCENE_CUTOUT_MAX_SIDE,
    Product,
    catalog_shot,
    check_fraction,
    limited_subset,
    list_products,
    load_cutout,
    split_products,
    stable_hash,
)
from imgsearch.sample_data.scenes import SceneStyle, jpeg_roundtrip, list_backgrounds, render_scene, write_jpeg

# ---------------------------------------------------------------- the build


@dataclass
class SampleSet:
    root: Path
    catalog_csv: Path
    queries_jsonl: Path
    split_json: Path
    train_ids: list[str]
    eval_ids: list[str]
    n_products: int
    n_queries: int
    config: dict = field(default_factory=dict)


def build_sample_set(
    out_dir: str | os.PathLike,
    seed: int = 0,
    heldout_fraction: float = 0.25,
    queries_per_product: int = 3,
    limit_products: int | None = None,
    stamps_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> SampleSet:
    """Build (or reuse) the sample catalog, split and eval queries under ``out_dir``.

    Idempotent: when ``out_dir/config.json`` records the same resolved config,
    nothing is written. Atomic: everything goes to a temp folder next to
    ``out_dir`` that then replaces it. ``progress=None`` shows a bar on a terminal only.
    """
    check_fraction(heldout_fraction)
    if queries_per_product < 1:
        raise BadInput(f"queries_per_product must be at least 1, got {queries_per_product!r}")
    if limit_products is not None and limit_products < 2:
        raise BadInput(f"limit_products must be at least 2 (one train, one eval product), got {limit_products!r}")
    out = Path(out_dir)
    products = list_products(stamps_dir)
    backgrounds = list_backgrounds()
    train_ids, eval_ids = split_products(products, heldout_fraction)
    if limit_products is not None and limit_products < len(products):
        products = limited_subset(products, train_ids, eval_ids, limit_products, heldout_fraction)
        kept = {p.product_id for p in products}
        train_ids = [i for i in train_ids if i in kept]
        eval_ids = [i for i in eval_ids if i in kept]
    config = {
        "version": SAMPLE_SET_VERSION,
        "seed": int(seed),
        "heldout_fraction": float(heldout_fraction),
        "queries_per_product": int(queries_per_product),
        "limit_products": limit_products,
        "n_products": len(products),
        "n_queries": len(eval_ids) * int(queries_per_product),
        "backgrounds": [name for name, _ in backgrounds],
        "catalog_size": CATALOG_SIZE,
        "scene_style": asdict(SceneStyle()),
    }
    config = json.loads(json.dumps(config))  # tuples -> lists, so it compares equal to the file's copy
    existing = _read_existing(out, config)
    if existing is not None:
        return existing
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_catalog(tmp, products, progress)
        eval_set = set(eval_ids)
        eval_products = [p for p in products if p.product_id in eval_set]
        _write_queries(tmp, eval_products, backgrounds, seed, queries_per_product, progress)
        _write_json(tmp / "split.json", {"train": train_ids, "eval": eval_ids})
        _write_json(tmp / "config.json", config)  # last: its presence marks a complete build
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_sample_set(out)


def load_sample_set(root: str | os.PathLike) -> SampleSet:
    """The :class:`SampleSet` of an already built folder."""
    root = Path(root)
    config = json.loads((root / "config.json").read_text())
    split = json.loads((root / "split.json").read_text())
    return SampleSet(
        root=root,
        catalog_csv=root / "catalog.csv",
        queries_jsonl=root / "queries.jsonl",
        split_json=root / "split.json",
        train_ids=split["train"],
        eval_ids=split["eval"],
        n_products=config["n_products"],
        n_queries=config["n_queries"],
        config=config,
    )


def _read_existing(out: Path, config: dict) -> SampleSet | None:
    try:
        if json.loads((out / "config.json").read_text()) == config:
            return load_sample_set(out)
    except (OSError, ValueError, KeyError):
        pass
    return None


def _progress(items, total: int, desc: str, progress: bool | None):
    """``items``, reported by the one progress policy (``progress=False``: silent)."""
    with Progress(total, desc, "img", enabled=progress is not False) as bar:
        for item in items:
            yield item
            bar.update()


def _write_catalog(root: Path, products: list[Product], progress: bool | None) -> None:
    (root / "catalog").mkdir()
    with open(root / "catalog.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["product_id", "image", "category", "title", "description", "source"])
        for product in _progress(products, len(products), "catalog", progress):
            image = f"catalog/{product.product_id}.jpg"
            write_jpeg(root / image, catalog_shot(product), CATALOG_JPEG_QUALITY)
            source = f"tuxpaint-stamps:{product.product_id.replace('.', '/')}.png"
            writer.writerow([product.product_id, image, product.category, product.title, product.description, source])


def _write_queries(
    root: Path, products: list[Product], backgrounds: list, seed: int, per_product: int, progress: bool | None
) -> None:
    (root / "queries").mkdir()
    with open(root / "queries.jsonl", "w", encoding="utf-8") as f:
        for product in _progress(products, len(products), "queries", progress):
            cutout = load_cutout(product, max_side=SCENE_CUTOUT_MAX_SIDE)
            for k in range(per_product):
                # One stream per (seed, product, k): a query does not change when others are added or removed.
                rng = np.random.default_rng([int(seed), stable_hash(product.product_id), k])
                render = render_scene([cutout], rng, backgrounds)
                image = f"queries/{product.product_id}_{k}.jpg"
                write_jpeg(root / image, render.image, render.jpeg_quality)
                record = {
                    "image": image,
                    "product_id": product.product_id,
                    "category": product.category,
                    "box": list(render.boxes[0]),
                    "width": render.image.width,
                    "height": render.image.height,
                    "background": render.background_name,
                }
                f.write(json.dumps(record) + "\n")


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _replace_dir(new: Path, target: Path) -> None:
    """Swap ``new`` in as ``target``. os.replace cannot overwrite a non-empty folder, so the old one moves aside first."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "set")
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_queries(sample_set: SampleSet) -> list[dict]:
    """The eval queries, with ``image`` made absolute."""
    rows = []
    with open(sample_set.queries_jsonl, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            row["image"] = str(sample_set.root / row["image"])
            rows.append(row)
    return rows


DEV_STREAM = 0x646576  # "dev": keeps the dev photos' generators apart from the eval queries' ([seed, hash, k])


def dev_queries(sample_set: SampleSet, per_product: int = 6, stamps_dir: str | os.PathLike | None = None) -> list[dict]:
    """New shopper photos of the held-out products, for choosing settings without looking at the eval queries.

    Same products, backgrounds and style as :func:`read_queries`' photos, but drawn from
    another random stream, so no photo is an eval query. Records are shaped like
    ``read_queries``' with ``image`` an in-memory RGB image (after the JPEG round trip a
    written query goes through). Tuning on these and reporting on the eval queries keeps
    the reported figures free of the choice.
    """
    if per_product < 1:
        raise BadInput(f"per_product must be at least 1, got {per_product!r}")
    products = {p.product_id: p for p in list_products(stamps_dir)}
    missing = [pid for pid in sample_set.eval_ids if pid not in products]
    if missing:
        raise BadInput(f"{len(missing)} eval product(s) of {sample_set.root} have no stamp, e.g. {missing[0]!r}")
    backgrounds = list_backgrounds()
    seed = int(sample_set.config.get("seed", 0))
    rows = []
    for product_id in sample_set.eval_ids:
        cutout = load_cutout(products[product_id], max_side=SCENE_CUTOUT_MAX_SIDE)
        for k in range(per_product):
            render = render_scene([cutout], np.random.default_rng([seed, DEV_STREAM, stable_hash(product_id), k]), backgrounds)
            rows.append({"image": jpeg_roundtrip(render.image, render.jpeg_quality), "product_id": product_id,
                         "category": products[product_id].category, "box": list(render.boxes[0]),
                         "background": render.background_name})
    return rows


