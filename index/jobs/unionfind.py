"""Union-find (disjoint sets) over arbitrary int64 keys, for grouping near-duplicate pairs.

Only keys that appear in a pair are held (a dict of parent pointers), so memory follows the
number of duplicate pairs, not the catalog size. Union by size, path halving: near-constant
amortised time per operation.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.size: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.parent)

    def __contains__(self, key: int) -> bool:
        return int(key) in self.parent

    def add(self, key: int) -> None:
        key = int(key)
        if key not in self.parent:
            self.parent[key] = key
            self.size[key] = 1

    def find(self, key: int) -> int:
        key = int(key)
        parent = self.parent
        if key not in parent:
            self.add(key)
            return key
        while parent[key] != key:
            parent[key] = parent[parent[key]]  # path halving
            key = parent[key]
        return key

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size.pop(rb)
        return ra

    def union_pairs(self, a: Iterable[int] | np.ndarray, b: Iterable[int] | np.ndarray) -> None:
        for x, y in zip(np.asarray(a, np.int64).tolist(), np.asarray(b, np.int64).tolist()):
            self.union(x, y)

    def groups(self) -> list[list[int]]:
        """Connected components with 2+ members: each sorted, the list sorted by its first key."""
        members: dict[int, list[int]] = {}
        for key in self.parent:
            members.setdefault(self.find(key), []).append(key)
        return sorted((sorted(m) for m in members.values() if len(m) > 1), key=lambda m: m[0])
