"""Training views of a product: its clean catalog shot, and shopper-like crops made from its cut-out.

A shopper view is what the query path embeds: a real-background scene from
:func:`imgsearch.sample_data.make_shopper_photo` (scale, rotation, blur, noise,
JPEG, colour cast, shadow), cropped around the product's box with a jittered
margin, because at query time the crop comes from a detector box (grown by
the pipeline's 10 % margin) that is never exactly tight.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from imgsearch import sample_data
from imgsearch.sample_data import Product, SceneStyle


@dataclass(frozen=True)
class CropJitter:
    """How far a training crop strays from the true box, as fractions of the box's width/height."""
    margin: tuple[float, float] = (0.0, 0.25)  # grown on each side by this much (pipeline uses 0.10)
    shift: float = 0.08  # then moved by up to this much either way (a detector's localisation error)

    def crop(self, image: Image.Image, box, rng: np.random.Generator) -> Image.Image:
        x1, y1, x2, y2 = (float(v) for v in box)
        w, h = x2 - x1, y2 - y1
        mx1, my1, mx2, my2 = rng.uniform(*self.margin, size=4)
        dx, dy = rng.uniform(-self.shift, self.shift, size=2)
        left = max(0.0, x1 - mx1 * w + dx * w)
        top = max(0.0, y1 - my1 * h + dy * h)
        right = min(float(image.width), x2 + mx2 * w + dx * w)
        bottom = min(float(image.height), y2 + my2 * h + dy * h)
        if right - left < 2 or bottom - top < 2:  # shifted off the image: fall back to the true box
            left, top, right, bottom = x1, y1, x2, y2
        return image.crop((round(left), round(top), round(right), round(bottom)))


@dataclass(frozen=True)
class ViewMaker:
    """Seeded views of products: ``views(product, n, seed)`` -> [catalog shot, n shopper crops].

    A product's views depend only on (seed, product id, view number), not on
    which other products are in the run, so a view cache can be reused.
    """
    style: SceneStyle = SceneStyle()
    jitter: CropJitter = CropJitter()

    def catalog_view(self, product: Product) -> Image.Image:
        return sample_data.catalog_shot(product)

    def shopper_view(self, cutout: Image.Image, rng: np.random.Generator, backgrounds) -> Image.Image:
        photo, box = sample_data.make_shopper_photo(cutout, rng, backgrounds, self.style)
        return self.jitter.crop(photo, box, rng)

    def views(self, product: Product, n_shopper: int, seed: int, backgrounds=None) -> list[Image.Image]:
        backgrounds = backgrounds if backgrounds is not None else sample_data.list_backgrounds()
        cutout = sample_data.load_cutout(product, max_side=sample_data.SCENE_CUTOUT_MAX_SIDE)
        # A different stream from the eval queries' ([seed, hash, k]): the "view" tag keeps them apart.
        rng = np.random.default_rng([int(seed), 0x7669, sample_data.stable_hash(product.product_id)])
        return [self.catalog_view(product)] + [self.shopper_view(cutout, rng, backgrounds) for _ in range(n_shopper)]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SceneMaker:
    """Detector training scenes: 1-2 TRAIN products pasted into a real photo, with their boxes."""
    style: SceneStyle = SceneStyle()
    max_products: int = 2

    def scene(self, cutouts: list[Image.Image], rng: np.random.Generator, backgrounds) -> tuple[Image.Image, list]:
        count = int(rng.integers(1, self.max_products + 1))
        chosen = [cutouts[i] for i in rng.choice(len(cutouts), size=min(count, len(cutouts)), replace=False)]
        return sample_data.make_scene(chosen, backgrounds, rng, style=self.style)

    def to_dict(self) -> dict:
        return asdict(self)
