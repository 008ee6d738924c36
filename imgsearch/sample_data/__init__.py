"""The real sample catalog and its evaluation set, built from offline Debian assets.

``products``: the stamp cut-outs as products, their catalog shots, the train / eval split,
Fashion-MNIST. ``scenes``: shopper photos and training views (a cut-out in a real photo).
``sets``: the on-disk sample set (catalog.csv, catalog/, queries.jsonl, split.json) that the
demo, training, the benchmarks and the tests all read.
"""

from imgsearch.sample_data.products import (
    ALPHA_THRESHOLD,
    CATALOG_SIZE,
    FASHION_MNIST_CLASSES,
    MIN_OPAQUE_FRACTION,
    SCENE_CUTOUT_MAX_SIDE,
    Product,
    catalog_shot,
    list_products,
    load_cutout,
    load_fashion_mnist,
    resize_longer_side,
    split_products,
    stable_hash,
)
from imgsearch.sample_data.scenes import (
    CLEAN_STYLE,
    SceneRender,
    SceneStyle,
    list_backgrounds,
    make_scene,
    make_shopper_photo,
    render_scene,
)
from imgsearch.sample_data.sets import SampleSet, build_sample_set, dev_queries, load_sample_set, read_queries

__all__ = [
    "ALPHA_THRESHOLD", "CATALOG_SIZE", "CLEAN_STYLE", "FASHION_MNIST_CLASSES", "MIN_OPAQUE_FRACTION", "SCENE_CUTOUT_MAX_SIDE", "Product",
    "SampleSet", "SceneRender", "SceneStyle", "build_sample_set", "catalog_shot", "dev_queries", "list_backgrounds",
    "list_products", "load_cutout", "load_fashion_mnist", "load_sample_set", "make_scene", "make_shopper_photo",
    "read_queries", "render_scene", "resize_longer_side", "split_products", "stable_hash",
]
