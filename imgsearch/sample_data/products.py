"""Products of the real sample catalog: the Tux Paint stamp cut-outs, their clean catalog shots,
the seeded train / eval split, and Fashion-MNIST (the category-transfer check)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from imgsearch import assets
from imgsearch.errors import BadInput

SAMPLE_SET_VERSION = 1

# Folders (or names) with these words hold drawings, letters, flags and road signs, not product photos.
SKIPPED_PATH_WORDS = ("cartoon", "symbol", "sign")
MIN_SIDE = 64
# Cut-outs whose opaque part covers less than this share of the canvas are thin
# strokes or translucent effects (lightning, fireworks, a glass), not products.
MIN_OPAQUE_FRACTION = 0.05
# Alpha above this counts as "product" for trimming and for ground-truth boxes;
# below it are faint anti-aliasing and resampling tails nobody would see.
ALPHA_THRESHOLD = 24

CATALOG_SIZE = 320
CATALOG_FILL = 0.85  # the product's longer side as a share of the catalog canvas
CATALOG_JPEG_QUALITY = 92
# Light neutral studio backgrounds; one is picked per product from its id.
CATALOG_BACKGROUNDS = ((255, 255, 255), (250, 250, 250), (246, 245, 242), (241, 241, 241), (248, 246, 240))
SCENE_CUTOUT_MAX_SIDE = 512


FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


# ---------------------------------------------------------------- products


@dataclass(frozen=True)
class Product:
    product_id: str
    category: str
    title: str
    source_path: Path  # the stamp PNG
    description: str = ""


def _is_skipped_path(relative: Path) -> bool:
    words = [part.lower() for part in relative.with_suffix("").parts]
    return any(word in part for part in words for word in SKIPPED_PATH_WORDS)


def _is_mirror_duplicate(path: Path) -> bool:
    # Tux Paint ships "x_mirror.png" next to "x.png" as a flipped copy; it is the same product.
    return path.stem.endswith("_mirror") and path.with_name(path.stem[: -len("_mirror")] + ".png").exists()


def _usable_cutout(path: Path) -> bool:
    with Image.open(path) as image:
        if min(image.size) < MIN_SIDE:
            return False
        alpha = np.asarray(image.convert("RGBA").getchannel("A"))
    return float((alpha > ALPHA_THRESHOLD).mean()) >= MIN_OPAQUE_FRACTION


def _product_id(relative: Path) -> str:
    # Dots, not slashes, so the id is safe in URLs (/v1/products/<id>) and file names.
    return ".".join(relative.with_suffix("").parts)


def _description(png: Path) -> str:
    # The .txt sibling's first line is the English description ("A syringe.").
    text = png.with_suffix(".txt")
    if not text.is_file():
        return ""
    lines = text.read_text(encoding="utf-8", errors="replace").splitlines()
    return lines[0].strip() if lines else ""


def list_products(stamps_dir: str | os.PathLike | None = None) -> list[Product]:
    """The usable stamp photos as products, sorted by product_id.

    Skips: paths with cartoon/symbol/sign in a component, mirrored duplicates,
    images under 64 px on their shorter side, and near-empty alpha masks.
    """
    root = Path(stamps_dir) if stamps_dir is not None else assets.tuxpaint_stamps_dir()
    return list(_list_products_cached(str(root.resolve())))


@functools.lru_cache(maxsize=4)
def _list_products_cached(root_str: str) -> tuple[Product, ...]:
    root = Path(root_str)
    products = []
    for path in sorted(root.rglob("*.png")):
        relative = path.relative_to(root)
        if len(relative.parts) < 2 or _is_skipped_path(relative) or _is_mirror_duplicate(path):
            continue
        if not _usable_cutout(path):
            continue
        products.append(
            Product(
                product_id=_product_id(relative),
                category=relative.parts[0],
                title=path.stem.replace("_", " "),
                source_path=path,
                description=_description(path),
            )
        )
    products.sort(key=lambda p: p.product_id)
    ids = [p.product_id for p in products]
    assert len(set(ids)) == len(ids), "product ids must be unique"
    return tuple(products)


def load_cutout(product: Product | str | os.PathLike, max_side: int | None = 256) -> Image.Image:
    """The product's cut-out as RGBA, trimmed to its alpha bbox, longer side at most ``max_side``."""
    path = product.source_path if isinstance(product, Product) else Path(product)
    with Image.open(path) as image:
        rgba = image.convert("RGBA")
    rgba = trim_to_alpha(rgba)
    if max_side is not None and max(rgba.size) > max_side:
        rgba = resize_longer_side(rgba, max_side)
    return rgba


def _alpha_bbox(rgba: Image.Image) -> tuple[int, int, int, int] | None:
    return rgba.getchannel("A").point(lambda a: 255 if a > ALPHA_THRESHOLD else 0).getbbox()


def trim_to_alpha(rgba: Image.Image) -> Image.Image:
    bbox = _alpha_bbox(rgba)
    if bbox is None:
        raise BadInput(f"cut-out has an empty alpha mask (size {rgba.size})")
    return rgba.crop(bbox)


def resize_longer_side(rgba: Image.Image, longer: float) -> Image.Image:
    # Pillow resizes RGBA premultiplied, so transparent pixels' colours do not bleed into edges.
    scale = longer / max(rgba.size)
    size = (max(1, round(rgba.width * scale)), max(1, round(rgba.height * scale)))
    return rgba.resize(size, Image.Resampling.LANCZOS)


# ---------------------------------------------------------------- catalog shots


def catalog_shot(product: Product, size: int = CATALOG_SIZE) -> Image.Image:
    """A clean product shot: the cut-out centred on a light neutral background, with margin."""
    cutout = resize_longer_side(load_cutout(product, max_side=None), size * CATALOG_FILL)
    colour = CATALOG_BACKGROUNDS[stable_hash(product.product_id) % len(CATALOG_BACKGROUNDS)]
    canvas = Image.new("RGB", (size, size), colour)
    offset = ((size - cutout.width) // 2, (size - cutout.height) // 2)
    canvas.paste(cutout, offset, mask=cutout.getchannel("A"))
    return canvas


# ---------------------------------------------------------------- split


def stable_hash(text: str) -> int:
    # Python's hash() is salted per process; this one is the same everywhere, always.
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def split_products(products: list[Product], heldout_fraction: float = 0.25) -> tuple[list[str], list[str]]:
    """(train_ids, eval_ids), stratified by category, each sorted.

    The split depends only on the product ids and the fraction, never on the
    scene seed or on ``limit_products``: builds with different seeds or sizes
    agree on which products are eval, so training on one never sees the
    eval products of another.
    """
    check_fraction(heldout_fraction)
    by_category: dict[str, list[str]] = {}
    for product in products:
        by_category.setdefault(product.category, []).append(product.product_id)
    train, held_out = [], []
    for ids in by_category.values():
        ranked = sorted(ids, key=lambda pid: (stable_hash("split:" + pid), pid))
        n_eval = int(np.floor(len(ranked) * heldout_fraction + 0.5)) if len(ranked) > 1 else 0
        held_out += ranked[:n_eval]
        train += ranked[n_eval:]
    return sorted(train), sorted(held_out)


def check_fraction(heldout_fraction: float) -> None:
    if not 0.0 < heldout_fraction < 1.0:
        raise BadInput(f"heldout_fraction must be between 0 and 1, got {heldout_fraction!r}")


def limited_subset(products: list[Product], train_ids: list[str], eval_ids: list[str], limit: int, heldout_fraction: float) -> list[Product]:
    """``limit`` products, keeping the eval share and spreading over categories (round-robin)."""
    by_id = {p.product_id: p for p in products}
    n_eval = min(len(eval_ids), max(1, int(np.floor(limit * heldout_fraction + 0.5))))
    n_train = min(len(train_ids), limit - n_eval)
    chosen = _round_robin([by_id[i] for i in eval_ids], n_eval) + _round_robin([by_id[i] for i in train_ids], n_train)
    return sorted(chosen, key=lambda p: p.product_id)


def _round_robin(products: list[Product], count: int) -> list[Product]:
    queues: dict[str, list[Product]] = {}
    for product in sorted(products, key=lambda p: (stable_hash("pick:" + p.product_id), p.product_id)):
        queues.setdefault(product.category, []).append(product)
    order = sorted(queues, key=lambda c: (-len(queues[c]), c))  # big categories first
    chosen: list[Product] = []
    while len(chosen) < count:
        for category in order:
            if queues[category] and len(chosen) < count:
                chosen.append(queues[category].pop(0))
    return chosen


# ---------------------------------------------------------------- Fashion-MNIST


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 28 x 28, labels uint8 N) of Fashion-MNIST; class names in FASHION_MNIST_CLASSES."""
    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise BadInput(f"split must be 'train' or 'test', got {split!r}")
    root = Path(data_dir) if data_dir is not None else assets.fashion_mnist_dir()
    images = _read_idx(root / f"{prefixes[split]}-images-idx3-ubyte.gz", expected_magic=2051)
    labels = _read_idx(root / f"{prefixes[split]}-labels-idx1-ubyte.gz", expected_magic=2049)
    if images.shape[0] != labels.shape[0]:
        raise BadInput(f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    # IDX: big-endian magic (0x0000, type 0x08 = uint8, ndim), then ndim uint32 sizes, then the data.
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise BadInput(f"{path} has IDX magic {magic}, expected {expected_magic}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
