"""The index's limits and its one widening policy.

``MAX_K`` bounds every search (the index's, the HTTP API's and the shard calls'). When filtering
(deleted ids, a category, several images of one product collapsing to one result) leaves fewer
than k results, the caller searches again with a wider fetch: :func:`widen` is that step, for
the index's own retry loop and for the server's distinct-product search alike.
"""

from __future__ import annotations

import numpy as np

from imgsearch.errors import BadInput

MAX_K = 10_000
TUNED_K = 10  # the k a version's ``search_defaults`` are tuned for (``search_defaults_big_k`` has its own)
# Several images of one product collapse to one result, so a distinct-product search first fetches
# this many candidates per wanted product, and at least k + MIN_EXTRA_CANDIDATES.
DISTINCT_OVERFETCH = 4
MIN_EXTRA_CANDIDATES = 32
WIDEN_FACTOR = 2  # the index's retry loop: doubles fetch (and nprobe once the probed lists ran dry)
DISTINCT_WIDEN_FACTOR = 4  # distinct products: one query alone, so it looks deeper per step


def check_k(k) -> int:
    """``k`` as an int in 1..MAX_K, else BadInput naming it."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= MAX_K:
        raise BadInput(f"k must be an integer in 1..{MAX_K}, got {k!r}")
    return int(k)


def widen(fetch: int, limit: int, factor: int = WIDEN_FACTOR) -> int:
    """The next, wider fetch after ``fetch`` came back short, never past ``limit``."""
    return min(limit, fetch * factor)


def distinct_fetch(k: int, ntotal: int) -> tuple[int, int]:
    """(first fetch, limit) for the top ``k`` distinct products of an index of ``ntotal`` vectors."""
    limit = min(ntotal, MAX_K)
    return min(limit, max(k * DISTINCT_OVERFETCH, k + MIN_EXTRA_CANDIDATES)), limit


def defaults_for_k(manifest: dict, k: int) -> tuple[int, int]:
    """(nprobe, rerank_factor) a search for ``k`` results uses when the caller gives none: the
    tuned point nearer ``k`` on a log scale, ``search_defaults`` (tuned at TUNED_K) or
    ``search_defaults_big_k`` (tuned at its own ``k``, when the build measured one)."""
    small = manifest.get("search_defaults") or {}
    big = manifest.get("search_defaults_big_k") or {}
    use = big if big.get("k") and k * k >= TUNED_K * int(big["k"]) else small
    return int(use.get("nprobe") or 1), int(use.get("rerank_factor") or 1)
