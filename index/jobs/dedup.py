"""``imgsearch dedup``: groups of near-duplicate products, from a k-NN self-join of the store.

1. Every live stored vector is a query: the store is streamed in blocks of ``block_size`` and
   each block is searched against the live index (GPU when present, via ``open_index(gpu=)``)
   for its ``k`` nearest neighbours. Memory: one block of queries and their neighbours.
2. Candidate pairs of items of DIFFERENT products with similarity >= ``threshold - margin`` are
   confirmed by exact re-scoring with the stored vectors (``rescore``, on by default) and kept
   when the exact similarity is >= ``threshold``.
3. Pairs are lifted to products (a product pair's score is its best image pair) and grouped as
   connected components with union-find over int64 product keys (blake2b of the product id).
4. Output (INTERFACE.md): one JSON object per group, groups ordered by their first product:
   ``{"group": int, "products": [...sorted], "pairs": [[a, b, score], ...]}`` with ``a < b``.
   The job's settings and counts go next to it, in ``GROUPS.jsonl.job.json``.

Verification (``DedupConfig.verify``, CLI ``--verify``): the threshold above is then a
recall-oriented *candidate* threshold, and each candidate product pair is confirmed by comparing
the images themselves (:mod:`embed.verify`: alignment + colour-invariant structure); only
confirmed pairs reach union-find. The score in the output stays the embedding similarity.
Candidates are verified in sorted order with bounded caches of prepared images; a pair whose
images cannot be read is counted as unverifiable and left out, never a crash.

Similarity is the inner product of the (L2-normalised) embeddings; for an ``l2`` index it is
``1 - d/2``, the same number for unit vectors. Memory beyond one block is the set of duplicate
product pairs found (the output itself).

Threshold calibration: :func:`calibrate` scores a labelled sample of product pairs
(``{"a": id, "b": id, "duplicate": bool}`` per line) with the stored vectors and picks the
lowest threshold whose precision on the sample reaches the target (so recall is highest).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator

import numpy as np

from embed.verify import ProductVerifier, candidate_threshold, choose_verify_thresholds
from imgsearch.atomic import write_bytes_atomic
from imgsearch.calibration import precision_cut
from imgsearch.errors import BadInput
from imgsearch.progress import Progress
from index.ann.rerank import clip_unit_scores
from index.ann.search import open_index
from index.ann.versions import write_json_atomic
from index.jobs.unionfind import UnionFind

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.90
DEFAULT_K = 10
DEFAULT_BLOCK = 4096
DEFAULT_MARGIN = 0.02
SCORE_DECIMALS = 6
KEY_MASK = (1 << 63) - 1


def product_key(product_id: str) -> int:
    """A stable non-negative int64 key of a product id (union-find runs over these)."""
    digest = hashlib.blake2b(product_id.encode("utf-8"), digest_size=8, person=b"imgsearch-prod").digest()
    return int.from_bytes(digest, "big") & KEY_MASK


@dataclasses.dataclass
class DedupConfig:
    threshold: float = DEFAULT_THRESHOLD
    k: int = DEFAULT_K
    block_size: int = DEFAULT_BLOCK
    rescore: bool = True
    margin: float = DEFAULT_MARGIN
    gpu: str = "auto"
    nprobe: int | None = None
    verify: object | None = None  # embed.verify.VerifyConfig: verify candidate pairs on the images
    image_root: str | None = None  # where relative catalog image paths resolve (records without a path)

    def check(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise BadInput(f"--threshold must be a similarity in [-1, 1], got {self.threshold!r}")
        if self.k < 1 or self.block_size < 1:
            raise BadInput(f"k and block size must be >= 1, got {self.k}, {self.block_size}")
        if self.verify is not None:
            self.verify.check()

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "verify"}
        out["verify"] = self.verify.to_json() if self.verify is not None else None
        return out


@dataclasses.dataclass
class PairBatch:
    """Product-level pairs found in one block: keys ``a < b`` (int64), best score, key -> product id."""
    a: np.ndarray
    b: np.ndarray
    score: np.ndarray
    names: dict
    queries: int = 0


def similarity(scores: np.ndarray, metric: str) -> np.ndarray:
    return scores if metric == "ip" else 1.0 - scores / 2.0


def clip_similarity(s):
    """A similarity of two catalog embeddings (unit vectors) is a cosine: kept in [-1, 1]."""
    return clip_unit_scores(s, higher_is_better=True)


class DedupWorker:
    """Searches query blocks and returns product pairs. Holds an opened index and store."""

    def __init__(self, idx, store, cfg: DedupConfig):
        self.idx, self.store, self.cfg = idx, store, cfg

    def process(self, ids: np.ndarray, x: np.ndarray) -> PairBatch:
        cfg = self.cfg
        ids = np.asarray(ids, np.int64)
        x = np.ascontiguousarray(x, dtype=np.float32)
        scores, nbrs = self.idx.search(x, cfg.k + 1, nprobe=cfg.nprobe)
        sims = similarity(scores, self.idx.metric)
        low = cfg.threshold - (cfg.margin if cfg.rescore else 0.0)
        mask = (nbrs >= 0) & (nbrs != ids[:, None]) & (sims >= low)
        rows, cols = np.nonzero(mask)
        if not rows.size:
            return PairBatch(*_empty_pairs(), {}, len(ids))
        qa, qb, s = ids[rows], nbrs[rows, cols], sims[rows, cols].astype(np.float32)
        if cfg.rescore:
            uniq, inv = np.unique(qb, return_inverse=True)
            vb = self.store.vectors_for(uniq.tolist())[inv]
            s = np.einsum("nd,nd->n", x[rows], vb).astype(np.float32)
            if self.idx.metric == "l2":  # 1 - |a-b|^2/2, exact on stored vectors
                s = (1.0 - ((x[rows] - vb) ** 2).sum(axis=1) / 2.0).astype(np.float32)
            keep = s >= cfg.threshold
            qa, qb, s = qa[keep], qb[keep], s[keep]
        s = clip_similarity(s)
        if not qa.size:
            return PairBatch(*_empty_pairs(), {}, len(ids))
        uniq = np.unique(np.concatenate([qa, qb]))
        records = self.store.get_many(uniq.tolist())
        pid_of = {int(i): (r.product_id if r is not None and not r.deleted else None) for i, r in zip(uniq, records)}
        pa = [pid_of[int(i)] for i in qa.tolist()]
        pb = [pid_of[int(i)] for i in qb.tolist()]
        best: dict[tuple[int, int], float] = {}
        names: dict[int, str] = {}
        for p1, p2, sc in zip(pa, pb, s.tolist()):
            if p1 is None or p2 is None or p1 == p2:
                continue
            k1, k2 = product_key(p1), product_key(p2)
            names[k1], names[k2] = p1, p2
            key = (k1, k2) if k1 < k2 else (k2, k1)
            if sc > best.get(key, -np.inf):
                best[key] = sc
        if not best:
            return PairBatch(*_empty_pairs(), {}, len(ids))
        keys = np.array(list(best.keys()), dtype=np.int64).reshape(-1, 2)
        return PairBatch(keys[:, 0], keys[:, 1], np.array(list(best.values()), np.float32), names, len(ids))


def _empty_pairs():
    return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)


class PairCollector:
    """Merges PairBatches (best score per product pair), then groups them with union-find."""

    def __init__(self) -> None:
        self.best: dict[tuple[int, int], float] = {}
        self.names: dict[int, str] = {}
        self.queries = 0

    def add(self, batch: PairBatch) -> None:
        self.queries += batch.queries
        self.names.update(batch.names)
        best = self.best
        for a, b, s in zip(batch.a.tolist(), batch.b.tolist(), batch.score.tolist()):
            if s > best.get((a, b), -np.inf):
                best[(a, b)] = s

    def named_pairs(self) -> list[tuple[str, str, float]]:
        """``(a, b, score)`` with product ids ``a < b``, sorted."""
        out = []
        for (a, b), sc in self.best.items():
            na, nb = self.names[a], self.names[b]
            out.append((na, nb, sc) if na < nb else (nb, na, sc))
        out.sort()
        return out

    def groups(self) -> list[dict]:
        return group_pairs(self.named_pairs())


def group_pairs(pairs: Iterable[tuple[str, str, float]]) -> list[dict]:
    """Connected components (union-find over product keys) of product pairs ``(a, b, score)``."""
    uf = UnionFind()
    pairs = list(pairs)
    for a, b, _ in pairs:
        uf.union(product_key(a), product_key(b))
    by_root: dict[int, list[tuple[str, str, float]]] = {}
    for a, b, s in pairs:
        if b < a:
            a, b = b, a
        by_root.setdefault(uf.find(product_key(a)), []).append((a, b, round(float(clip_similarity(s)), SCORE_DECIMALS)))
    out = []
    for members in by_root.values():
        products = sorted({p for pair in members for p in pair[:2]})
        out.append({"products": products, "pairs": [list(p) for p in sorted(members)]})
    out.sort(key=lambda g: g["products"][0])
    return [{"group": i, **g} for i, g in enumerate(out)]


def pairs_of_groups(groups: list[dict]) -> list[tuple[str, str, float]]:
    return sorted((a, b, float(s)) for g in groups for a, b, s in g["pairs"])


def write_groups(groups: list[dict], output: str) -> None:
    """One JSON object per line, written atomically (temp file + os.replace)."""
    data = "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in groups).encode("utf-8")
    write_bytes_atomic(output, data)


@dataclasses.dataclass
class DedupResult:
    groups: list
    pairs: int
    queries: int
    seconds: float
    version: str
    threshold: float
    verify: dict | None = None  # verification counts (embed.verify.ProductVerifier.stats)

    def line(self) -> str:
        products = sum(len(g["products"]) for g in self.groups)
        rate = self.queries / max(self.seconds, 1e-9)
        if self.verify is None:
            found = f"{self.pairs} pair(s) at similarity >= {self.threshold:g}"
        else:
            v = self.verify
            found = (f"{self.pairs} verified pair(s) of {v['candidate_pairs']} candidate(s) at similarity >= "
                     f"{self.threshold:g} (disagreement <= {v['max_disagreement']:g}, {v['seconds']:.1f} s"
                     + (f"; {v['unverifiable_pairs']} unverifiable: image missing or unreadable" if v["unverifiable_pairs"] else "")
                     + ")")
        return (f"{len(self.groups)} group(s), {products} products, {found}; {self.queries} vectors scanned "
                f"against version {self.version} in {self.seconds:.1f} s ({rate:.0f}/s)")


def count_live_vectors(store) -> int:
    stats = store.stats()
    return max(0, int(stats["with_vectors"]) - int(stats["deleted"]))


def run_dedup(store, index_root: str, cfg: DedupConfig, *, progress: bool = True, idx=None) -> DedupResult:
    """Single-process self-join over ``store`` (an open CatalogStore) against the live index."""
    cfg.check()
    t0 = time.monotonic()
    if idx is None:
        deleted = np.fromiter(store.deleted_ids(), dtype=np.int64)
        idx = open_index(index_root, gpu=cfg.gpu, deleted_ids=deleted)
    worker = DedupWorker(idx, store, cfg)
    collector = PairCollector()
    with Progress(count_live_vectors(store), "dedup", "vectors", enabled=progress) as bar:
        for ids, x in store.iter_blocks(cfg.block_size):
            collector.add(worker.process(ids, x))
            bar.update(len(ids))
    result = DedupResult(collector.groups(), len(collector.best), collector.queries, time.monotonic() - t0, idx.version,
                         cfg.threshold)
    if cfg.verify is not None:
        result = verify_result(result, store, cfg, progress=progress)
    return result


def verify_result(result: DedupResult, store, cfg: DedupConfig, *, progress: bool = False) -> DedupResult:
    """Keep only the candidate pairs of ``result`` that verification confirms on the images, and
    regroup them. Candidates are taken in sorted order (image caches stay warm)."""
    t0 = time.monotonic()
    candidates = pairs_of_groups(result.groups)
    verifier = ProductVerifier(store, cfg.verify, cfg.image_root)
    kept = []
    with Progress(len(candidates), "verify", "pairs", enabled=progress) as bar:
        for a, b, score in candidates:
            m = verifier.match(a, b)
            if m is not None and m.accepted(verifier.cfg):
                kept.append((a, b, score))
            bar.set_postfix(verified=len(kept))
            bar.update(1)
    stats = verifier.stats()
    stats.update(max_disagreement=verifier.cfg.max_disagreement, seconds=round(time.monotonic() - t0, 3))
    if stats["unverifiable_pairs"]:
        log.warning("verify: %d candidate pair(s) left out, an image could not be read; first: %s",
                    stats["unverifiable_pairs"], "; ".join(stats["errors"][:3]))
    return dataclasses.replace(result, groups=group_pairs(kept), pairs=len(kept),
                               seconds=result.seconds + stats["seconds"], verify=stats)


# ---------------------------------------------------------------- calibration


@dataclasses.dataclass
class LabelledPair:
    a: str
    b: str
    duplicate: bool


def read_labels(path: str) -> list[LabelledPair]:
    """``{"a": product_id, "b": product_id, "duplicate": true|false}`` per line."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    out.append(LabelledPair(str(row["a"]), str(row["b"]), bool(row["duplicate"])))
                except (ValueError, KeyError, TypeError) as exc:
                    raise BadInput(f"labels {path!r} line {line_no}: expected {{\"a\", \"b\", \"duplicate\"}}: {exc}") from None
    except OSError as exc:
        raise BadInput(f"cannot read labels {path!r}: {exc}") from None
    return out


def product_pair_scores(store, pairs: Iterable[LabelledPair]) -> np.ndarray:
    """Best image-pair similarity of each labelled product pair (NaN when a side has no vector)."""
    cache: dict[str, np.ndarray] = {}

    def vectors(pid: str) -> np.ndarray:
        if pid not in cache:
            cache[pid] = store.product_vectors(pid)[1]
        return cache[pid]

    out = []
    for pair in pairs:
        va, vb = vectors(pair.a), vectors(pair.b)
        out.append(float((va @ vb.T).max()) if len(va) and len(vb) else np.nan)
    return np.asarray(out, np.float32)


def choose_threshold(scores: np.ndarray, labels: np.ndarray, target_precision: float) -> dict:
    """Lowest threshold (highest recall) whose precision over ``score >= t`` reaches the target.

    The threshold is placed halfway between the last accepted score and the next lower one.
    Higher scores mean "more alike". Returns threshold, precision, recall and counts."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, bool)
    ok = ~np.isnan(scores)
    scores, labels = scores[ok], labels[ok]
    n_pos = int(labels.sum())
    if n_pos == 0 or labels.all():
        raise BadInput(f"calibration needs both duplicate and non-duplicate pairs; got {n_pos} of {len(labels)}")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    cut, reached = precision_cut(s, y, target_precision)
    if reached:
        nxt = s[cut + 1] if cut + 1 < len(s) else s[cut] - 1e-3
        threshold = float((s[cut] + nxt) / 2.0)
    else:  # unreachable: the highest-precision prefix
        threshold = float(s[cut])
    accepted = scores >= threshold
    tp_at = int((accepted & labels).sum())
    return {"threshold": round(threshold, SCORE_DECIMALS),
            "precision": round(tp_at / max(int(accepted.sum()), 1), 4),
            "recall": round(tp_at / n_pos, 4), "target_precision": target_precision, "reached": reached,
            "positives": n_pos, "negatives": int((~labels).sum()), "accepted": int(accepted.sum())}


def calibrate(store, labels_path: str, target_precision: float, *, verify=None, image_root: str | None = None) -> dict:
    """Thresholds from labelled product pairs. Without ``verify``: the similarity threshold. With a
    VerifyConfig: a candidate similarity threshold and the verification threshold
    (``verify_threshold``, the largest disagreement accepted), chosen together."""
    pairs = read_labels(labels_path)
    scores = product_pair_scores(store, pairs)
    missing = int(np.isnan(scores).sum())
    labels = np.array([p.duplicate for p in pairs])
    if verify is None:
        result = choose_threshold(scores, labels, target_precision)
    else:
        candidate = candidate_threshold(scores, labels)
        dis, unreadable = verification_scores(store, pairs, scores, verify, image_root, min_similarity=candidate)
        result = choose_verify_thresholds(scores, dis, labels, target_precision, candidate)
        result["unverifiable_pairs"] = unreadable  # an image could not be read (counted as rejected)
        result["unaligned_pairs"] = int(np.sum(np.isinf(dis) & (scores >= candidate))) - unreadable
    result["labelled_pairs"] = len(pairs)
    result["unscored_pairs"] = missing
    return result


def verification_scores(store, pairs: list[LabelledPair], similarity: np.ndarray, verify, image_root=None,
                        min_similarity: float = -1.0) -> tuple[np.ndarray, int]:
    """Lowest disagreement of each labelled product pair over its image pairs (inf: not compared,
    similarity below ``min_similarity``, no alignment with enough overlap, or an unreadable
    image), and how many pairs had no readable image pair."""
    verifier = ProductVerifier(store, verify, image_root)
    out = np.full(len(pairs), np.inf, np.float64)
    order = sorted(range(len(pairs)), key=lambda i: (pairs[i].a, pairs[i].b))
    for i in order:
        if np.isnan(similarity[i]) or similarity[i] < min_similarity:
            continue
        m = verifier.match(pairs[i].a, pairs[i].b, exhaustive=True)
        if m is not None:
            out[i] = m.disagreement
    return out, verifier.unverifiable


def job_config_path(output: str) -> str:
    return output + ".job.json"


def write_job_config(output: str, cfg: DedupConfig, result: DedupResult, calibration: dict | None = None,
                     index_root: str | None = None, store: str | None = None) -> str:
    """The job's settings (thresholds included) and counts, next to the output (atomic)."""
    products = sum(len(g["products"]) for g in result.groups)
    doc = {"output": os.path.basename(output), "store": store, "index_root": index_root,
           "index_version": result.version, "config": cfg.to_json(), "calibration": calibration,
           "counts": {"groups": len(result.groups), "products": products, "pairs": result.pairs,
                      "queries": result.queries, "seconds": round(result.seconds, 3)},
           "verify": result.verify}
    path = job_config_path(output)
    write_json_atomic(path, doc)
    return path


def iter_jsonl(path: str) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def output_path_ok(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise BadInput(f"--output {path!r}: folder {folder!r} does not exist")
