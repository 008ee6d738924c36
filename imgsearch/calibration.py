"""Choosing an acceptance cut from labelled pairs: the core that dedup's similarity threshold and
the verifier's disagreement threshold share."""

from __future__ import annotations

import numpy as np


def precision_cut(ordered: np.ndarray, labels: np.ndarray, target_precision: float) -> tuple[int, bool] | None:
    """Where to cut values ordered most-alike first so that the accepted prefix has the most items
    while its precision reaches ``target_precision``: (index of the last accepted item, True).

    Cuts fall only between distinct values, so equal values land on the same side, and after a
    positive. When no prefix reaches the target: the highest-precision prefix, (index, False).
    None for no values.
    """
    ordered, labels = np.asarray(ordered), np.asarray(labels, bool)
    if not len(ordered):
        return None
    precision = np.cumsum(labels) / np.arange(1, len(labels) + 1)
    last_of_run = np.r_[ordered[1:] != ordered[:-1], True]
    good = np.flatnonzero(last_of_run & (precision >= target_precision) & labels)
    if good.size:
        return int(good[-1]), True
    return int(np.argmax(np.where(last_of_run, precision, -1))), False
