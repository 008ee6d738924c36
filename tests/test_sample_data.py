"""The real sample catalog, eval queries and scene generator (train/sample_data.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embed.image_io import decode_image
from imgsearch import assets
from imgsearch import sample_data as sd
from imgsearch.errors import BadInput, MissingAsset
from train.evaluate import RetrievalSet

SMALL = {"limit_products": 8, "queries_per_product": 2}


def _require(locate):
    try:
        return locate()
    except MissingAsset as exc:
        pytest.skip(f"asset missing, run make data: {exc}")


@pytest.fixture(scope="module")
def stamps_dir() -> Path:
    return _require(assets.tuxpaint_stamps_dir)


@pytest.fixture(scope="module")
def products(stamps_dir) -> list[sd.Product]:
    return sd.list_products(stamps_dir)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory, stamps_dir) -> sd.SampleSet:
    return sd.build_sample_set(tmp_path_factory.mktemp("small") / "set", seed=0, progress=False, **SMALL)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rgba(width: int, height: int, opaque_box: tuple[int, int, int, int] | None) -> Image.Image:
    image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    if opaque_box is not None:
        image.paste((200, 40, 40, 255), opaque_box)
    return image


# ---------------------------------------------------------------- products and skip rules


def test_skip_rules_on_a_synthetic_stamps_tree(tmp_path):
    layout = {
        "food/fruit/apple.png": _rgba(100, 80, (10, 10, 90, 70)),
        "food/fruit/apple_mirror.png": _rgba(100, 80, (10, 10, 90, 70)),  # flipped duplicate of apple
        "food/fruit/cartoon/pear.png": _rgba(100, 100, (0, 0, 100, 100)),
        "town/roadsigns/stop.png": _rgba(100, 100, (0, 0, 100, 100)),
        "symbols/shapes/star.png": _rgba(100, 100, (0, 0, 100, 100)),
        "food/tiny.png": _rgba(63, 200, (0, 0, 63, 200)),
        "food/empty.png": _rgba(200, 200, (0, 0, 10, 10)),
        "vehicles/emergency/ambulance.png": _rgba(120, 64, (0, 0, 120, 64)),
    }
    for relative, image in layout.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    (tmp_path / "food/fruit/apple.txt").write_text("An apple.\nfr.utf8=Une pomme.\n", encoding="utf-8")
    (tmp_path / "food/fruit/apple.ogg").write_bytes(b"OggS")
    found = sd.list_products(tmp_path)
    assert [p.product_id for p in found] == ["food.fruit.apple", "vehicles.emergency.ambulance"]
    apple = found[0]
    assert (apple.category, apple.title, apple.description) == ("food", "apple", "An apple.")
    assert sd.load_cutout(apple).size == (80, 60)  # trimmed to the opaque part


def test_real_products_follow_the_skip_rules(products, stamps_dir):
    assert len(products) > 200
    ids = [p.product_id for p in products]
    assert len(set(ids)) == len(ids) and ids == sorted(ids)
    for product in products:
        relative = product.source_path.relative_to(stamps_dir)
        assert not any(w in part.lower() for part in relative.parts for w in ("cartoon", "symbol", "sign"))
        assert not relative.stem.endswith("_mirror")
        assert product.category == relative.parts[0]
        with Image.open(product.source_path) as image:
            assert min(image.size) >= 64
    assert {"cartoon", "symbols"}.isdisjoint(p.category for p in products)


def test_load_cutout_is_trimmed_rgba_within_max_side(products):
    cutout = sd.load_cutout(products[0], max_side=128)
    assert cutout.mode == "RGBA" and max(cutout.size) <= 128
    alpha = np.asarray(cutout.getchannel("A")) > sd.ALPHA_THRESHOLD
    # Trimmed: every border row/column touches the product.
    assert alpha[0].any() and alpha[-1].any() and alpha[:, 0].any() and alpha[:, -1].any()


# ---------------------------------------------------------------- backgrounds


def test_backgrounds_are_real_photos():
    backgrounds = sd.list_backgrounds()
    assert len(backgrounds) >= 8
    names = [name for name, _ in backgrounds]
    assert len(set(names)) == len(names)
    for name, image in backgrounds:
        assert image.mode == "RGB" and min(image.size) >= 256, name
        grey = np.asarray(image.convert("L").reduce(4))
        # Photos have texture and a wide range of tones, unlike diagrams, charts and logos.
        assert grey.std() > 15, name
        assert len(np.unique(grey)) > 100, name


# ---------------------------------------------------------------- scenes


@pytest.mark.parametrize("seed", range(6))
def test_scene_boxes_are_tight_and_hold_every_changed_pixel(products, seed):
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(products), size=1 + seed % 2, replace=False)
    cutouts = [sd.load_cutout(products[i], max_side=256) for i in picks]
    render = sd.render_scene(cutouts, rng, style=sd.CLEAN_STYLE)
    width, height = render.image.size
    assert 320 <= width <= 640 and 320 <= height <= 640
    changed = np.abs(np.asarray(render.image, np.int16) - np.asarray(render.background, np.int16)).max(axis=2) > 0
    inside = np.zeros_like(changed)
    for x1, y1, x2, y2 in render.boxes:
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        inside[y1:y2, x1:x2] = True
    assert not (changed & ~inside).any(), "pixels changed outside the boxes"
    if len(render.boxes) == 1:
        # The changed pixels span the box (tight), allowing anti-aliased edges that match the background.
        ys, xs = np.nonzero(changed)
        x1, y1, x2, y2 = render.boxes[0]
        assert abs(xs.min() - x1) <= 2 and abs(ys.min() - y1) <= 2
        assert abs(xs.max() + 1 - x2) <= 2 and abs(ys.max() + 1 - y2) <= 2


def test_make_shopper_photo_is_deterministic_and_augmented(products):
    cutout = sd.load_cutout(products[3], max_side=256)
    first = sd.make_shopper_photo(cutout, np.random.default_rng(7))
    again = sd.make_shopper_photo(cutout, np.random.default_rng(7))
    other = sd.make_shopper_photo(cutout, np.random.default_rng(8))
    assert first[1] == again[1] and np.array_equal(np.asarray(first[0]), np.asarray(again[0]))
    assert first[0].mode == "RGB" and len(first[1]) == 4
    assert first[1] != other[1] or not np.array_equal(np.asarray(first[0]), np.asarray(other[0]))


def test_make_scene_with_two_products_gives_two_boxes(products):
    cutouts = [sd.load_cutout(p, max_side=200) for p in products[:2]]
    image, boxes = sd.make_scene(cutouts, None, np.random.default_rng(3), size=(400, 360))
    assert image.size == (400, 360) and len(boxes) == 2
    assert all(0 <= b[0] < b[2] <= 400 and 0 <= b[1] < b[3] <= 360 for b in boxes)


# ---------------------------------------------------------------- split


def test_split_is_stratified_disjoint_and_independent_of_limit(products, small_set):
    train, held_out = sd.split_products(products, 0.25)
    assert set(train).isdisjoint(held_out) and len(train) + len(held_out) == len(products)
    assert 0.2 < len(held_out) / len(products) < 0.3
    by_id = {p.product_id: p for p in products}
    big_categories = {c for c in {p.category for p in products} if sum(p.category == c for p in products) >= 4}
    assert big_categories <= {by_id[i].category for i in held_out}
    # A limited build's eval products are eval products of the full split too: no train/eval leak across builds.
    assert set(small_set.eval_ids) <= set(held_out) and set(small_set.train_ids) <= set(train)


# ---------------------------------------------------------------- the build


def test_catalog_csv_follows_the_interface(small_set):
    with open(small_set.catalog_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == small_set.n_products == 8
    assert {"product_id", "image", "category", "title"} <= set(rows[0])
    assert len({r["product_id"] for r in rows}) == len(rows)
    for row in rows:
        assert row["product_id"] and row["category"]
        assert not Path(row["image"]).is_absolute()
        image = decode_image(small_set.catalog_csv.parent / row["image"])
        assert image.size == (sd.CATALOG_SIZE, sd.CATALOG_SIZE)
        corner = np.asarray(image)[:4, :4].astype(int)
        assert corner.min() >= 230  # light neutral background around the product
    assert {r["product_id"] for r in rows} == set(small_set.train_ids) | set(small_set.eval_ids)


def test_queries_are_only_for_eval_products_with_boxes_inside(small_set):
    split = json.loads(small_set.split_json.read_text())
    assert split == {"train": small_set.train_ids, "eval": small_set.eval_ids}
    assert small_set.train_ids and small_set.eval_ids
    assert set(small_set.train_ids).isdisjoint(small_set.eval_ids)
    queries = sd.read_queries(small_set)
    assert len(queries) == small_set.n_queries == 2 * len(small_set.eval_ids)
    assert {q["product_id"] for q in queries} == set(small_set.eval_ids)
    for query in queries:
        image = decode_image(query["image"])
        x1, y1, x2, y2 = query["box"]
        assert 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height
        assert (image.width, image.height) == (query["width"], query["height"])
        assert query["category"]


def test_dev_queries_are_new_photos_of_the_eval_products(small_set):
    dev = sd.dev_queries(small_set, per_product=3)
    assert len(dev) == 3 * len(small_set.eval_ids)
    assert [q["product_id"] for q in dev] == [pid for pid in small_set.eval_ids for _ in range(3)]
    eval_pixels = [np.asarray(decode_image(q["image"])) for q in sd.read_queries(small_set)]
    for query in dev:
        x1, y1, x2, y2 = query["box"]
        assert 0 <= x1 < x2 <= query["image"].width and 0 <= y1 < y2 <= query["image"].height
        pixels = np.asarray(query["image"])
        assert not any(p.shape == pixels.shape and np.array_equal(p, pixels) for p in eval_pixels)
    again = sd.dev_queries(small_set, per_product=3)
    assert all(np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) and a["box"] == b["box"] for a, b in zip(dev, again))
    # Photo k of a product does not depend on how many are asked for.
    first = sd.dev_queries(small_set, per_product=1)
    assert np.array_equal(np.asarray(first[0]["image"]), np.asarray(dev[0]["image"]))
    with pytest.raises(BadInput, match="per_product must be at least 1, got 0"):
        sd.dev_queries(small_set, per_product=0)
    retrieval = RetrievalSet.from_sample_set(small_set, dev_per_product=3)
    assert retrieval.query_products == [q["product_id"] for q in dev]
    assert retrieval.query_boxes == [tuple(q["box"]) for q in dev]
    assert len(retrieval.catalog_images) == len(RetrievalSet.from_sample_set(small_set).catalog_images)


def test_build_is_deterministic_and_seed_changes_queries(tmp_path, small_set):
    again = sd.build_sample_set(tmp_path / "again", seed=0, progress=False, **SMALL)
    assert _tree_bytes(again.root) == _tree_bytes(small_set.root)
    other = sd.build_sample_set(tmp_path / "other", seed=1, progress=False, **SMALL)
    first, second = _tree_bytes(small_set.root), _tree_bytes(other.root)
    queries = [k for k in first if k.startswith("queries/")]
    assert queries and all(first[k] != second[k] for k in queries)
    assert other.eval_ids == small_set.eval_ids  # the split does not depend on the seed


def test_build_reuses_a_matching_folder_and_replaces_a_stale_one(tmp_path):
    out = tmp_path / "set"
    built = sd.build_sample_set(out, seed=0, progress=False, limit_products=4, queries_per_product=1)
    stamp = (out / "config.json").stat().st_mtime_ns
    reused = sd.build_sample_set(out, seed=0, progress=False, limit_products=4, queries_per_product=1)
    assert (out / "config.json").stat().st_mtime_ns == stamp and reused.eval_ids == built.eval_ids
    rebuilt = sd.build_sample_set(out, seed=0, progress=False, limit_products=4, queries_per_product=2)
    assert rebuilt.n_queries == 2 * len(rebuilt.eval_ids)
    assert json.loads((out / "config.json").read_text())["queries_per_product"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temp folders left behind


@pytest.mark.parametrize(
    "kwargs",
    [{"heldout_fraction": 0.0}, {"heldout_fraction": 1.0}, {"queries_per_product": 0}, {"limit_products": 1}],
)
def test_bad_build_arguments_are_rejected(tmp_path, kwargs):
    with pytest.raises(BadInput):
        sd.build_sample_set(tmp_path / "set", **kwargs)


# ---------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_loader():
    _require(assets.fashion_mnist_dir)
    images, labels = sd.load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    assert np.bincount(labels).tolist() == [1000] * 10
    train_images, train_labels = sd.load_fashion_mnist("train")
    assert train_images.shape == (60000, 28, 28) and train_labels.shape == (60000,)
    assert len(sd.FASHION_MNIST_CLASSES) == 10
    with pytest.raises(BadInput):
        sd.load_fashion_mnist("validation")
