"""The one progress policy of every long job (embed, build, rebuild, dedup, train).

- On a terminal: a tqdm bar (with total and ETA when the total is known).
- Anywhere else (a pipe, a file, cron): a plain line every ``IMGSEARCH_PROGRESS_INTERVAL_S``
  seconds (default 10), plus a final line, e.g.
  ``embed catalog.csv: 1,200/5,000 rows (24%), 35.1 rows/s, ETA 1m48s``. The lines go through
  logging (logger ``imgsearch.progress``, so they take the command's log format) when logging is
  set up, and are printed to stderr otherwise, so a library caller still sees them.
- Disabled (``enabled=False``): nothing at all.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Self

from imgsearch.errors import BadInput

log = logging.getLogger(__name__)

INTERVAL_ENV = "IMGSEARCH_PROGRESS_INTERVAL_S"
DEFAULT_INTERVAL_S = 10.0


def interval_s() -> float:
    """Seconds between plain lines: ``$IMGSEARCH_PROGRESS_INTERVAL_S`` or 10."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise BadInput(f"{INTERVAL_ENV}={raw!r} must be a number of seconds >= 0")
    return value


def format_duration(seconds: float) -> str:
    """``48s``, ``1m48s``, ``2h03m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _is_tty(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Progress:
    """Progress of one job over ``total`` units (None when unknown: counts and rate, no ETA).

    ``update(n)`` after each unit of work, ``close()`` at the end (also as a context manager);
    ``set_postfix(**fields)`` adds ``key value`` pairs to the bar and the lines.
    ``stream`` (default: ``sys.stderr`` now) decides bar or lines by whether it is a terminal.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "item", *, enabled: bool = True,
                 stream=None, interval: float | None = None):
        self.total = None if total is None else max(0, int(total))
        self.desc, self.unit, self.enabled = desc, unit, bool(enabled)
        self.done = 0
        self.postfix: dict[str, object] = {}
        self.closed = False
        self.stream = stream
        self.interval = interval_s() if interval is None else float(interval)
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if self.enabled and _is_tty(stream if stream is not None else sys.stderr):
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=unit, dynamic_ncols=True,
                            file=stream if stream is not None else sys.stderr)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def set_postfix(self, **fields) -> None:
        self.postfix.update(fields)
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)

    def update(self, n: int = 1) -> None:
        if not self.enabled or self.closed:
            return
        self.done += int(n)
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last_line >= self.interval:
            self.last_line = now
            self._emit(self.line(now))

    def close(self) -> None:
        """The final line (or the bar's last state); later calls do nothing."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._emit(self.line(time.monotonic(), final=True))

    def line(self, now: float | None = None, final: bool = False) -> str:
        """``desc: done/total unit (pct%), rate unit/s, ETA …`` (``elapsed …`` when final)."""
        elapsed = max((time.monotonic() if now is None else now) - self.started, 1e-9)
        rate = self.done / elapsed
        if self.total is None:
            text = f"{self.desc}: {self.done:,} {self.unit}"
        else:
            pct = 100 if self.total == 0 else min(100, int(100 * self.done / self.total))
            text = f"{self.desc}: {self.done:,}/{self.total:,} {self.unit} ({pct}%)"
        text += f", {rate:,.1f} {self.unit}/s"
        if final:
            text += f", elapsed {format_duration(elapsed)}"
        elif self.total is not None and rate > 0 and self.done < self.total:
            text += f", ETA {format_duration((self.total - self.done) / rate)}"
        if self.postfix:
            text += "; " + ", ".join(f"{k} {v}" for k, v in self.postfix.items())
        return text

    def _emit(self, text: str) -> None:
        if self.stream is None and log.hasHandlers():
            fields = {"progress": self.desc, "done": self.done, "total": self.total, "unit": self.unit}
            log.info(text, extra={"fields": fields})
        else:
            print(text, file=self.stream if self.stream is not None else sys.stderr, flush=True)
