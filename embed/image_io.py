"""Decoding untrusted image bytes into RGB PIL images, safely.

Every image that enters the system (catalog ingest, HTTP upload, CLI query)
comes through :func:`decode_image`, so the limits live in one place.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from imgsearch.errors import BadInput

# 40 Mpx is above any phone camera's output and far below a decompression bomb.
DEFAULT_MAX_PIXELS = 40_000_000
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"})


ImageSource = Image.Image | bytes | bytearray | memoryview | str | os.PathLike


class BadImage(BadInput):
    """The bytes are not a decodable image (empty, truncated, unknown format)."""

    code = "undecodable_image"
    http_status = 422


class ImageTooLarge(BadInput):
    """The image's header claims more pixels than the limit allows."""

    code = "image_too_large"
    http_status = 413


def decode_image(source: bytes | str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Decode ``source`` (raw bytes or a file path) to an RGB image, EXIF orientation applied.

    The pixel count is checked from the header, before any pixel data is
    decoded, so a 50k x 50k PNG costs nothing. Raises :class:`BadImage` or
    :class:`ImageTooLarge` with a message naming the image.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = name or "uploaded image"
    else:
        label = name or str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise BadImage(f"cannot read {label}: {exc.strerror or exc}") from None
    if not data:
        raise BadImage(f"{label} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns, then raises, on bombs; our own limit below is stricter, so silence the warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage(f"{label} is not a recognised image format ({len(data)} bytes)") from None
    except Image.DecompressionBombError:
        # PIL refuses headers past twice its own limit before we can read the size.
        raise ImageTooLarge(f"{label} claims more than {2 * Image.MAX_IMAGE_PIXELS} pixels, over the limit of {max_pixels}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImage(f"{label} cannot be decoded: {exc}") from None
    if image.format not in ALLOWED_FORMATS:
        raise BadImage(f"{label} has unsupported format {image.format}; allowed: {', '.join(sorted(ALLOWED_FORMATS))}")
    width, height = image.size
    if width < 1 or height < 1:
        raise BadImage(f"{label} has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLarge(f"{label} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode != "RGB":
            image = _to_rgb(image)
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImage(f"{label} is truncated or corrupt: {exc}") from None
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Flatten transparency onto white, the usual catalog-shot background."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def load_rgb(source: ImageSource, name: str | None = None) -> Image.Image:
    """Any accepted image form -> an RGB PIL image.

    Bytes and paths go through :func:`embed.image_io.decode_image` (pixel
    limit, EXIF orientation, transparency flattened onto white). A PIL image
    is taken as already decoded and only converted to RGB.
    """
    if isinstance(source, Image.Image):
        if source.width < 1 or source.height < 1:
            raise BadImage(f"{name or 'image'} has an empty size {source.width}x{source.height}")
        return source if source.mode == "RGB" else source.convert("RGB")
    if isinstance(source, (bytes, bytearray, memoryview, str, os.PathLike)):
        return decode_image(source, name=name)
    raise BadImage(f"{name or 'image'} has unsupported type {type(source).__name__}; expected PIL.Image, bytes or a path")
