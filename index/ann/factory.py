"""Choosing and validating faiss factory strings.

From 1M vectors the codes this rule picks are then measured against 8-bit PQ of the same bytes
on the build's training sample (index/ann/measure.py); the cheaper at the target recall is built.

``choose_factory`` follows the faiss wiki "Guidelines to choose an index", adjusted by
measurements on this code base (128-d, 100k clustered synthetic vectors, 2 CPU threads,
IP metric, top-40 candidates then exact re-rank; bench/bench_index.py):
| factory            | bytes | train | R10@40 nprobe16 | QPS nprobe16 |
|--------------------|-------|-------|-----------------|--------------|
| IVF1024,PQ32       | 32    | 49.5s | 0.998           | 34k          |
| IVF1024,PQ64x4fs   | 32    |  5.9s | 0.989           | 63k          |
| IVF1024,PQ32x4fs   | 16    |  3.4s | 0.972           | 36k          |
| OPQ32,IVF1024,PQ32x4fs | 16 | 229s | 0.969          | 22k          |

so: 4-bit fast-scan PQ with d/2 sub-quantizers (same bytes as PQ{d/4}) when the codes fit
in RAM, because it is ~1.8x faster to search and ~8x faster to train, and the f16 re-rank
recovers the small candidate-recall gap. Fast-scan inverted lists cannot be memory-mapped
(faiss 1.15 reads BlockInvertedLists into RAM whatever the IO flags), so when the codes do
not fit the budget the choice falls back to plain 8-bit PQ, which opens with IO_FLAG_MMAP.
OPQ is only used where sub-vectors are long (d/M >= 8): there the rotation balances variance
between sub-spaces; at d/M = 2 it measured no gain and 40x the training time.

With inner product the codes are residuals from the list centroid (``x4fsr``): faiss' fast-scan
IVF otherwise encodes raw vectors, and real embeddings sit in a narrow cone (Fashion-MNIST
through the pipeline: mean-vector norm 0.83), where raw 4-bit codes are coarse. Measured in
one run each (2 threads, R@10 >= 0.95): own embeddings 60k x 128 0.56x -> 1.00x hnswlib's QPS
(re-rank 32 -> 8); GloVe 0.91x -> 1.01x (re-rank 8 -> 2). Not with L2: there a residual
lookup table must be built per probed list, and SIFT fell from 1.39x to 0.43x hnswlib.

When d/2 is odd (GloVe's d=50) the fast-scan split is d sub-quantizers of 1 dim (d/2 bytes).
Measured on GloVe 390k x 50, cosine, 2 threads, batch 256, fp16 re-rank, R@10 >= 0.95:
IVF2048,PQ25 (8-bit, 25 B) 6.6k QPS; IVF2048,PQ50x4fs (25 B) 19.1k QPS; IVF2048,PQ25x4fs
(12.5 B) tops out at 0.942; hnswlib M=16 ~18k QPS at 14x the RAM.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import faiss

from imgsearch.errors import BadInput

FLAT_BELOW = 10_000  # training k-means on fewer vectors is pointless; exact search is cheap
HNSW_COARSE_FROM = 1_000_000  # the wiki's threshold for an HNSW coarse quantizer
# 16*sqrt(N) lists only from 100M vectors: the training sample is 64 points per list, and flat
# k-means costs ~nlist^2 (at 1M, 16384 lists: 17-28 min on 2 cores against 68 s for 4096, which
# already reach R@10 0.95). Two-level k-means (index/ann/coarse.py) cuts that to ~nlist^1.5, but
# the 4-bit codes, not the lists, bound the cost on real data (bench_scale: rerank 32 at 1M).
FINE_LISTS_FROM = 100_000_000
MIN_POINTS_PER_CENTROID = 39  # faiss warns below this; k-means centroids are unreliable
ID_BYTES = 8  # int64 label stored next to each code in the inverted lists


def metric_type(metric: str) -> int:
    try:
        return {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}[metric]
    except KeyError:
        raise BadInput(f"unknown metric {metric!r}; expected 'l2' or 'ip'") from None


def validate_factory(factory: str, dim: int, metric: str):
    """Build the empty index for ``factory`` or raise BadInput quoting it. Returns the index."""
    if not factory or not factory.strip():
        raise BadInput("empty factory string")
    try:
        return faiss.index_factory(int(dim), factory, metric_type(metric))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "rejected by faiss"
        raise BadInput(f"bad factory string {factory!r} for d={dim}: {first}") from None


def is_exact(factory: str) -> bool:
    """Codes that hold the full float vectors (or refine in RAM) gain nothing from re-ranking."""
    parts = [p.strip() for p in factory.split(",")]
    return (parts[-1] == "Flat" or bool(re.fullmatch(r"HNSW\d+", parts[-1]))
            or "RFlat" in parts or "Refine(" in factory)


def nlist_for(n: int, per_sqrt: float) -> int:
    """Power of two near per_sqrt * sqrt(n), with >= 39 training points per centroid."""
    target = per_sqrt * math.sqrt(n)
    nlist = 2 ** round(math.log2(max(target, 1)))
    while nlist > 1 and n / nlist < MIN_POINTS_PER_CENTROID:
        nlist //= 2
    return max(nlist, 1)


@dataclass
class FactoryChoice:
    factory: str
    nlist: int | None
    bytes_per_vector_ram: float
    mmap: bool  # whether the codes are expected to live on disk (memory-mapped)
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"factory": self.factory, "nlist": self.nlist, "mmap": self.mmap,
                "bytes_per_vector_ram": self.bytes_per_vector_ram, "reasons": self.reasons}


def default_memory_budget() -> int:
    """Half of physical RAM: the other half is for the OS page cache, queries and the server."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def parse_bytes(text: str | None) -> int | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise BadInput(f"bad --ram-budget {text!r}; expected a size such as 512MB, 2GB, 1.5T")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * scale)


def _pq_sizes(dim: int) -> list[int]:
    """Fast-scan sub-quantizer counts, preferred first.

    d/2 sub-quantizers of 2 dims (d/4 bytes) when d/2 is even, then d/4 for a tighter budget.
    When d/2 is odd, d sub-quantizers of 1 dim (d/2 bytes): measured on GloVe-50 it is 3x the
    QPS of 8-bit PQ{d/2} at the same bytes, where the d/2-split reached only R@10 0.942.
    Smaller codes (d/8 and below, <= 8 B for 128-d) lose too many true neighbours from the
    candidate list for the re-rank to recover; memory-mapped 8-bit PQ is preferred then.
    """
    if dim % 4 == 0:
        sizes = [dim // 2] + ([dim // 4] if dim % 8 == 0 else [])
    else:
        sizes = [dim]
    return [m for m in sizes if m >= 2]


def choose_factory(n: int, dim: int, memory_budget: int | None = None, metric: str = "l2") -> FactoryChoice:
    budget = memory_budget or default_memory_budget()
    metric_type(metric)
    reasons = [f"N={n}, d={dim}, RAM budget {budget / 2**30:.2f} GiB"]
    if n < FLAT_BELOW:
        reasons.append(f"N < {FLAT_BELOW}: exact Flat search; too few vectors to train IVF/PQ")
        return FactoryChoice("IDMap,Flat", None, 4.0 * dim + ID_BYTES, False, reasons)

    large = n >= HNSW_COARSE_FROM
    per_sqrt = 16 if n >= FINE_LISTS_FROM else 4
    nlist = nlist_for(n, per_sqrt)
    coarse = f"IVF{nlist}_HNSW32" if large else f"IVF{nlist}"
    reasons.append(f"nlist={nlist}: power of 2 near {per_sqrt}*sqrt(N)"
                   f" with >= {MIN_POINTS_PER_CENTROID} training points per list")
    reasons.append("HNSW32 coarse quantizer: N >= 1M, assigning to many centroids must be sublinear"
                   if large else "flat coarse quantizer: N < 1M, exhaustive centroid scan is cheap")
    # Coarse quantizer RAM (float centroids, plus ~2*32 int32 links per centroid for HNSW).
    fixed = nlist * (4 * dim + (256 if large else 0))

    for m in _pq_sizes(dim):
        per_vec = m / 2 + ID_BYTES  # 4-bit codes
        if fixed + n * per_vec <= budget:
            opq = f"OPQ{m}," if dim // m >= 8 else ""
            reasons.append(f"PQ{m}x4fs: {m / 2:g} B codes + 8 B id fit the budget; fast-scan measured"
                           f" {'3' if m == dim else '1.8'}x the QPS of 8-bit PQ at equal bytes and trains 8x faster")
            # faiss' fast-scan IVF encodes raw vectors unless asked for residuals ("r").
            suffix = "x4fsr" if metric == "ip" else "x4fs"
            if metric == "ip":
                reasons.append("residual codes (x4fsr): with inner product one lookup table serves every list;"
                               " measured on real embeddings: PQ-only R@10 0.36 -> 0.54, re-rank 32 -> 8")
            if opq:
                reasons.append(f"OPQ{m}: sub-vectors of {dim // m} dims, rotation balances their variance")
            return FactoryChoice(f"{opq}{coarse},PQ{m}{suffix}", nlist, per_vec, False, reasons)

    m = next((m for m in (dim // 4, dim // 2, dim) if m >= 1 and dim % m == 0 and dim // m <= 8), dim)
    mmap = fixed + n * (m + ID_BYTES) > budget
    reasons.append(f"plain PQ{m} (8-bit, {m} B): " + (
        "4-bit codes exceed the RAM budget; 8-bit PQ inverted lists open memory-mapped from disk"
        " (fast-scan lists cannot be mapped)" if mmap else f"d={dim} too small for fast-scan"))
    opq = f"OPQ{m}," if dim // m >= 8 else ""
    ram = fixed / n if mmap else m + ID_BYTES + fixed / n
    return FactoryChoice(f"{opq}{coarse},PQ{m}", nlist, round(ram, 3), mmap, reasons)


def format_bytes(n: float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def resident_bytes(factory: str, index, n: int, dim: int) -> tuple[int, str] | None:
    """RAM an opened version of ``factory`` (``index``: its empty faiss index) needs for ``n``
    vectors, and what it is; None when this code cannot tell. Plain IVF lists open memory-mapped
    (only the coarse quantizer stays resident); fast-scan lists and non-IVF codes are read into RAM.
    The fp16 re-rank file is always memory-mapped."""
    opq = sum(int(g) * dim * 4 for g in re.findall(r"OPQ(\d+)", factory))  # rotation matrices, roughly
    try:
        ivf = faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError):
        ivf = None
    if ivf is not None:
        coarse = int(ivf.nlist) * (4 * dim + (256 if "_HNSW" in factory else 0)) + opq
        if re.search(r"x4fs", factory):
            return coarse + n * (int(ivf.code_size) + ID_BYTES), (
                f"{int(ivf.code_size)} B fast-scan codes + {ID_BYTES} B id per vector, which cannot be memory-mapped, "
                f"plus the {int(ivf.nlist)}-list coarse quantizer")
        return coarse, f"the {int(ivf.nlist)}-list coarse quantizer (its lists are memory-mapped)"
    last = factory.split(",")[-1].strip()
    if last == "Flat":
        return n * (4 * dim + ID_BYTES) + opq, f"{4 * dim} B float vectors + {ID_BYTES} B id per vector"
    hnsw = re.fullmatch(r"HNSW(\d+)", last)
    if hnsw:
        per = 4 * dim + 8 * int(hnsw.group(1)) + ID_BYTES
        return n * per + opq, f"~{per} B per vector (float vectors and graph links)"
    return None


def check_ram_budget(factory: str, index, n: int, dim: int, budget: int) -> None:
    """Refuse (BadInput naming both numbers) a factory that needs more RAM than ``budget``."""
    need = resident_bytes(factory, index, n, dim)
    if need is not None and need[0] > budget:
        raise BadInput(f"--ram-budget {format_bytes(budget)} is below the {format_bytes(need[0])} that {factory} needs "
                       f"in RAM for {n:,} vectors of {dim} dims ({need[1]}); raise the budget or choose smaller codes")


def nlist_of(index) -> int | None:
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except (RuntimeError, TypeError):
        return None
