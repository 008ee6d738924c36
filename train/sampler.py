"""PK batches for metric learning: P distinct products x K views of each.

Every batch then holds K-1 positives and (P-1)K negatives per anchor, which
is what batch-hard and multi-similarity mining need. The order is a pure
function of (seed, epoch), so a resumed run draws the very batches the
uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from imgsearch.errors import BadInput


class PKSampler:
    """Batches of indices into ``labels``: ``p`` distinct labels per batch, ``k`` indices of each.

    One epoch visits every label about ``views_per_label / k`` times (at least
    once), in shuffled groups of ``p``. A label with fewer than ``k`` items is
    an error: generate more augmented views of that product (views are
    sampled from augmentations, so they are free) rather than repeating one.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, p: int, k: int, seed: int = 0):
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0:
            raise BadInput(f"labels must be a non-empty 1-D sequence, got shape {labels.shape}")
        if not (isinstance(p, (int, np.integer)) and p >= 2):
            raise BadInput(f"P (products per batch) must be an int >= 2 (a batch needs negatives), got {p!r}")
        if not (isinstance(k, (int, np.integer)) and k >= 2):
            raise BadInput(f"K (views per product) must be an int >= 2 (a batch needs positives), got {k!r}")
        self.by_label: dict[int, np.ndarray] = {int(label): np.flatnonzero(labels == label) for label in np.unique(labels)}
        if p > len(self.by_label):
            raise BadInput(f"P={p} products per batch, but only {len(self.by_label)} distinct products are available")
        short = {label: len(idx) for label, idx in self.by_label.items() if len(idx) < k}
        if short:
            label, count = next(iter(short.items()))
            raise BadInput(
                f"{len(short)} product(s) have fewer than K={k} views (label {label} has {count}); "
                "generate more augmented views per product or lower K"
            )
        self.p, self.k, self.seed = int(p), int(k), int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def __len__(self) -> int:
        return len(self._label_order(np.random.default_rng(0))) // self.p

    def _label_order(self, rng: np.random.Generator) -> np.ndarray:
        # Each label appears ceil(views / k) times, so every view can be drawn about once per epoch.
        repeats = [max(1, len(idx) // self.k) for idx in self.by_label.values()]
        order = np.repeat(np.fromiter(self.by_label, dtype=np.int64), repeats)
        rng.shuffle(order)
        return order

    def __iter__(self) -> Iterator[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = list(self._label_order(rng))
        for _ in range(len(order) // self.p):
            # Take the first P distinct labels left in the order; duplicates wait for a later batch.
            chosen: list[int] = []
            rest: list[int] = []
            for label in order:
                (rest if label in chosen or len(chosen) == self.p else chosen).append(label)
            if len(chosen) < self.p:
                # Too few distinct labels left: fill from the ones not yet chosen, at random.
                spare = [label for label in self.by_label if label not in chosen]
                chosen += [int(x) for x in rng.choice(spare, self.p - len(chosen), replace=False)]
            order = rest
            yield np.concatenate([rng.choice(self.by_label[label], self.k, replace=False) for label in chosen])
