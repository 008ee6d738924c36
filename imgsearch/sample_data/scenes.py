"""Scenes: a product cut-out pasted into a real photo (shopper photos and training views)."""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from imgsearch import assets
from imgsearch.errors import BadInput, MissingAsset
from imgsearch.sample_data.products import resize_longer_side, trim_to_alpha

# Real photos bundled with scikit-image (files inside the wheel, so no pooch download).
SKIMAGE_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "rocket", "motorcycle_left", "brick", "grass", "gravel")
# opencv-doc sample photos, picked by eye: no diagrams, charts, text, renders,
# calibration patterns, paintings or tiny logos.
OPENCV_PHOTOS = (
    "aero1.jpg", "aero3.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "board.jpg", "building.jpg",
    "butterfly.jpg", "chicky_512.png", "ela_original.jpg", "fruits.jpg", "graf1.png", "home.jpg",
    "lena.jpg", "left.jpg", "leuvenA.jpg", "licenseplate_motion.jpg", "messi5.jpg", "orange.jpg",
    "rubberwhale1.png", "squirrel_cls.jpg", "stuff.jpg",
)  # fmt: skip
MIN_BACKGROUND_SIDE = 256


# ---------------------------------------------------------------- backgrounds


def list_backgrounds() -> list[tuple[str, Image.Image]]:
    """Real photos (name, RGB image) for scene backgrounds; loaded once per process.

    The images are shared: treat them as read-only (crop or copy before drawing).
    """
    return list(_load_backgrounds())


@functools.lru_cache(maxsize=1)
def _load_backgrounds() -> tuple[tuple[str, Image.Image], ...]:
    import skimage.data  # only to find the bundled files

    found = []
    skimage_dir = Path(skimage.data.__file__).parent
    for name in SKIMAGE_PHOTOS:
        files = sorted(skimage_dir.glob(f"{name}.*"))
        if files:
            found.append((f"skimage:{name}", files[0]))
    try:
        opencv_dir = assets.opencv_samples_dir()
    except MissingAsset:
        opencv_dir = None
    if opencv_dir is not None:
        for file_name in OPENCV_PHOTOS:
            if (opencv_dir / file_name).is_file():
                found.append((f"opencv:{Path(file_name).stem}", opencv_dir / file_name))
    backgrounds = []
    for name, path in found:
        with Image.open(path) as image:
            rgb = image.convert("RGB")  # grey photos become RGB; RGBA ones are opaque
        if min(rgb.size) >= MIN_BACKGROUND_SIDE:
            backgrounds.append((name, rgb))
    return tuple(backgrounds)


# ---------------------------------------------------------------- scenes


@dataclass(frozen=True)
class SceneStyle:
    """Ranges of the shopper-photo augmentations. The defaults are the eval queries' style."""
    size_range: tuple[int, int] = (320, 640)  # each side of the scene, px
    background_zoom: tuple[float, float] = (0.55, 1.0)  # crop side / largest crop of that aspect
    object_scale: tuple[float, float] = (0.3, 0.75)  # product's longer side / scene's shorter side
    max_rotation: float = 25.0  # degrees, either way
    shadow_probability: float = 0.5
    brightness: tuple[float, float] = (0.7, 1.3)
    contrast: tuple[float, float] = (0.75, 1.25)
    colour_cast: float = 0.12  # per-channel gain in 1 +/- this
    noise_probability: float = 0.3
    max_noise_sigma: float = 5.0
    blur_probability: float = 0.4
    max_blur_radius: float = 1.6
    jpeg_quality: tuple[int, int] = (45, 95)


# No lighting, blur, noise or shadow: the scene differs from its background only inside the boxes.
CLEAN_STYLE = SceneStyle(
    shadow_probability=0.0, brightness=(1.0, 1.0), contrast=(1.0, 1.0), colour_cast=0.0,
    noise_probability=0.0, blur_probability=0.0, jpeg_quality=(95, 95),
)  # fmt: skip


@dataclass
class SceneRender:
    image: Image.Image  # RGB, before JPEG compression
    boxes: list[tuple[int, int, int, int]]
    background: Image.Image  # the background crop the products were pasted on
    background_name: str
    jpeg_quality: int  # the quality the caller should encode with


def render_scene(
    cutouts: list[Image.Image],
    rng: np.random.Generator,
    backgrounds: list[tuple[str, Image.Image]] | None = None,
    size: tuple[int, int] | None = None,
    style: SceneStyle = SceneStyle(),
) -> SceneRender:
    """Paste RGBA ``cutouts`` into a random crop of a real photo; the full record of what was drawn."""
    backgrounds = backgrounds if backgrounds is not None else list_backgrounds()
    if not backgrounds:
        raise BadInput("no background photos available")
    size = size if size is not None else _random_scene_size(rng, style)
    name, photo = backgrounds[int(rng.integers(len(backgrounds)))]
    background = _background_crop(photo, rng, size, style)
    scene = background.copy()
    # Two or more products share the frame, so each is smaller.
    crowd = 1.0 if len(cutouts) <= 1 else 0.75
    boxes: list[tuple[int, int, int, int]] = []
    for cutout in cutouts:
        placed = _transform_cutout(cutout, rng, size, style, crowd)
        box = _choose_position(placed.size, size, boxes, rng)
        if rng.random() < style.shadow_probability:
            _draw_shadow(scene, placed, box, rng)
        scene.paste(placed, box[:2], mask=placed.getchannel("A"))
        boxes.append(box)
    scene = _photometric(scene, rng, style)
    quality = int(rng.integers(style.jpeg_quality[0], style.jpeg_quality[1] + 1))
    return SceneRender(scene, boxes, background, name, quality)


def make_scene(
    cutouts: list[Image.Image],
    backgrounds: list[tuple[str, Image.Image]] | None,
    rng: np.random.Generator,
    size: tuple[int, int] | None = None,
    style: SceneStyle = SceneStyle(),
    jpeg: bool = True,
) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """A shopper-like photo holding every cut-out (for detector training: 1-2 of them), and their boxes.

    ``backgrounds=None`` uses :func:`list_backgrounds`. With ``jpeg`` the image
    went through JPEG at a random quality, as a phone upload would.
    """
    render = render_scene(cutouts, rng, backgrounds, size, style)
    image = jpeg_roundtrip(render.image, render.jpeg_quality) if jpeg else render.image
    return image, render.boxes


def make_shopper_photo(
    cutout: Image.Image,
    rng: np.random.Generator,
    backgrounds: list[tuple[str, Image.Image]] | None = None,
    style: SceneStyle = SceneStyle(),
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One product in a real scene: (RGB image, box). The view training uses for TRAIN products."""
    image, boxes = make_scene([cutout], backgrounds, rng, style=style)
    return image, boxes[0]


def _random_scene_size(rng: np.random.Generator, style: SceneStyle) -> tuple[int, int]:
    low, high = style.size_range
    width = int(rng.integers(low, high + 1))
    # Keep the aspect between 3:4 and 4:3, like phone photos.
    height = int(rng.integers(max(low, round(width * 0.75)), min(high, round(width * 4 / 3)) + 1))
    return width, height


def _background_crop(photo: Image.Image, rng: np.random.Generator, size: tuple[int, int], style: SceneStyle) -> Image.Image:
    width, height = size
    largest = min(photo.width / width, photo.height / height)  # scale of the largest crop with this aspect
    scale = largest * rng.uniform(*style.background_zoom)
    crop_w, crop_h = width * scale, height * scale
    x0 = rng.uniform(0, photo.width - crop_w)
    y0 = rng.uniform(0, photo.height - crop_h)
    crop = photo.resize(size, Image.Resampling.BILINEAR, box=(x0, y0, x0 + crop_w, y0 + crop_h))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return crop


def _transform_cutout(
    cutout: Image.Image, rng: np.random.Generator, size: tuple[int, int], style: SceneStyle, crowd: float
) -> Image.Image:
    """Scale and rotate the cut-out, trimmed tight to its alpha so its size IS the box."""
    target = rng.uniform(*style.object_scale) * min(size) * crowd
    scaled = resize_longer_side(cutout.convert("RGBA"), target)
    angle = rng.uniform(-style.max_rotation, style.max_rotation)
    # Rotate premultiplied, or bicubic drags the (arbitrary) colour of transparent pixels into the edge.
    rotated = scaled.convert("RGBa").rotate(angle, Image.Resampling.BICUBIC, expand=True).convert("RGBA")
    rotated = trim_to_alpha(rotated)
    fit = min(1.0, size[0] / rotated.width, size[1] / rotated.height)
    if fit < 1.0:
        rotated = trim_to_alpha(resize_longer_side(rotated, max(rotated.size) * fit * 0.95))
    return rotated


def _choose_position(
    object_size: tuple[int, int],
    scene_size: tuple[int, int],
    others: list[tuple[int, int, int, int]],
    rng: np.random.Generator,
    tries: int = 20,
) -> tuple[int, int, int, int]:
    """A uniformly random spot fully inside the scene, avoiding heavy overlap with earlier products."""
    w, h = object_size
    box = (0, 0, w, h)
    for _ in range(tries):
        x = int(rng.integers(0, scene_size[0] - w + 1))
        y = int(rng.integers(0, scene_size[1] - h + 1))
        box = (x, y, x + w, y + h)
        if all(_iou(box, other) < 0.1 for other in others):
            break
    return box


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def _draw_shadow(scene: Image.Image, placed: Image.Image, box: tuple[int, int, int, int], rng: np.random.Generator) -> None:
    """A soft contact shadow, so the product sits in the scene instead of floating on it."""
    longer = max(placed.size)
    radius = max(1.0, 0.04 * longer)
    opacity = rng.uniform(0.25, 0.5)
    dx, dy = (round(float(v) * longer) for v in rng.uniform(-0.04, 0.06, size=2))
    pad = int(radius * 3)
    alpha = placed.getchannel("A")
    mask = Image.new("L", (placed.width + 2 * pad, placed.height + 2 * pad), 0)
    mask.paste(alpha, (pad, pad))
    mask = mask.filter(ImageFilter.GaussianBlur(radius)).point(lambda a: int(a * opacity))
    scene.paste((0, 0, 0), (box[0] + dx - pad, box[1] + dy - pad), mask=mask)


def _photometric(scene: Image.Image, rng: np.random.Generator, style: SceneStyle) -> Image.Image:
    """Camera effects on the whole frame: exposure, contrast, white balance, sensor noise, blur."""
    brightness = rng.uniform(*style.brightness)
    contrast = rng.uniform(*style.contrast)
    gains = 1.0 + rng.uniform(-style.colour_cast, style.colour_cast, size=3)
    pixels = np.asarray(scene, dtype=np.float32)
    if (brightness, contrast) != (1.0, 1.0) or style.colour_cast:
        mean = pixels.mean()
        pixels = ((pixels - mean) * contrast + mean) * brightness * gains.astype(np.float32)
    if rng.random() < style.noise_probability:
        sigma = rng.uniform(1.0, style.max_noise_sigma)
        pixels = pixels + rng.normal(0.0, sigma, size=pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    if rng.random() < style.blur_probability:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, style.max_blur_radius)))
    return image


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    # Every encoder setting explicit, so the same pixels always give the same bytes.
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=2 if quality < 90 else 0, optimize=False, progressive=False)
    return buffer.getvalue()


def jpeg_roundtrip(image: Image.Image, quality: int) -> Image.Image:
    with Image.open(io.BytesIO(jpeg_bytes(image, quality))) as decoded:
        return decoded.convert("RGB")


def write_jpeg(path: Path, image: Image.Image, quality: int) -> None:
    path.write_bytes(jpeg_bytes(image, quality))

