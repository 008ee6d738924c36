"""Bad images fail with BadImage / ImageTooLarge and messages that say what is wrong."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from embed.image_io import BadImage, ImageTooLarge
from embed.pipeline import load_embedder
from embed.preprocess import PAD_RGB, Preprocessor, letterbox

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def embedder():
    return load_embedder(None, device="cpu", runtime="eager")


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(data.coffee()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_claiming(width: int, height: int) -> bytes:
    """A 60-byte PNG whose IHDR claims ``width`` x ``height``; its IDAT holds a few bytes, not the pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 16)) + png_chunk(b"IEND", b"")


def test_truncated_jpeg(embedder):
    with pytest.raises(BadImage, match="truncated or corrupt"):
        embedder.embed([jpeg_bytes()[:2000]])


def test_zero_bytes(embedder):
    with pytest.raises(BadImage, match=r"empty \(0 bytes\)"):
        embedder.embed([b""])


def test_text_is_not_an_image(embedder, tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    with pytest.raises(BadImage, match=r"notes.jpg is not a recognised image format"):
        embedder.embed([path])


def test_png_header_claiming_50000_squared_pixels_is_refused_before_decoding(embedder):
    # PIL's own bomb check fires first here (2.5 Gpx > 2x its limit), hence its wording.
    with pytest.raises(ImageTooLarge, match="image #0 .*pixel"):
        embedder.embed([png_header_claiming(50_000, 50_000)])


def test_the_bad_image_is_named_by_its_position(embedder):
    with pytest.raises(BadImage, match="image #1"):
        embedder.embed([jpeg_bytes(), b""])


def test_unsupported_python_type(embedder):
    with pytest.raises(BadImage, match="unsupported type int"):
        embedder.embed([42])


def test_letterbox_keeps_aspect_and_pads_with_the_mean_which_normalises_to_zero():
    wide = Image.new("RGB", (400, 100), (200, 10, 10))
    boxed = np.asarray(letterbox(wide, 224))
    assert boxed.shape == (224, 224, 3)
    assert tuple(boxed[0, 0]) == PAD_RGB and tuple(boxed[112, 112]) == (200, 10, 10)
    x = Preprocessor(224)([wide])
    assert x.shape == (1, 3, 224, 224) and x.is_contiguous(memory_format=torch.channels_last)
    assert x[0, :, 0, 0].abs().max() < 0.01
