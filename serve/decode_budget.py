"""How many decoded pixels one server process holds at once: the decode budget.

A small compressed file can claim a huge image (85 KB of WebP decodes to 6000x6000 RGB, about
100 MB), so concurrent uploads, not their byte size, decide a worker's memory. Every image a
request decodes (a query photo, an admin product upload) holds its header's pixel count against
the budget from before its decode until the request is done with the decoded image. A request
whose image does not fit waits a little for room (``wait_s``), then is refused with 503 ``busy``
and ``Retry-After``. An image alone bigger than the budget (but within the pixel limit of
:func:`embed.image_io.decode_image`) is admitted when nothing else is in flight, so every
acceptable image can be searched on an idle server.
"""

from __future__ import annotations

import io
import math
import threading
import time
import warnings
from contextlib import contextmanager

from PIL import Image

from embed.image_io import DEFAULT_MAX_PIXELS
from serve.errors import ApiError

# Two of the largest images decode_image accepts: two 40 Mpx photos (about 240 MB of RGB, plus
# the decoder's working copies) in flight per process, any number of phone-sized ones.
DEFAULT_DECODE_PIXEL_BUDGET = 2 * DEFAULT_MAX_PIXELS
DEFAULT_DECODE_WAIT_S = 1.0


def header_pixels(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Pixels the image header of ``data`` claims, read without decoding; 0 when decoding will
    not happen anyway (no readable header, or over ``max_pixels``: decode_image refuses it from
    the header and says why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Exception:  # noqa: BLE001 - any unreadable header: decode_image gives the error
        return 0
    pixels = int(width) * int(height)
    return pixels if 0 < pixels <= max_pixels else 0


class DecodeBudget:
    """Decoded pixels in flight in this process, at most ``pixels`` (see the module's notes)."""

    def __init__(self, pixels: int = DEFAULT_DECODE_PIXEL_BUDGET, wait_s: float = DEFAULT_DECODE_WAIT_S,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        if pixels < 1:
            raise ValueError(f"the decode pixel budget must be at least 1, got {pixels}")
        self.pixels = int(pixels)
        self.wait_s = float(wait_s)
        self.max_pixels = int(max_pixels)
        self.in_flight = 0
        self.peak = 0  # the most pixels held at once since start
        self.refused = 0
        self._room = threading.Condition()

    @contextmanager
    def hold(self, data: bytes):
        """Hold the pixels of ``data``'s image while the block decodes and uses it; 503 ``busy``
        (with ``Retry-After``) when they do not fit within ``wait_s``."""
        cost = header_pixels(data, self.max_pixels)
        if cost == 0:
            yield
            return
        self._acquire(cost)
        try:
            yield
        finally:
            with self._room:
                self.in_flight -= cost
                self._room.notify_all()

    def _fits(self, cost: int) -> bool:
        return self.in_flight == 0 or self.in_flight + cost <= self.pixels

    def _acquire(self, cost: int) -> None:
        deadline = time.monotonic() + self.wait_s
        with self._room:
            while not self._fits(cost):
                left = deadline - time.monotonic()
                if left <= 0:
                    self.refused += 1
                    raise ApiError(503, "busy", f"the server is decoding {self.in_flight:,} pixels of other images; this "
                                   f"one's {cost:,} do not fit its decode budget of {self.pixels:,}: retry shortly",
                                   headers={"Retry-After": str(max(1, math.ceil(self.wait_s)))})
                self._room.wait(left)
            self.in_flight += cost
            self.peak = max(self.peak, self.in_flight)
