"""Duplicate-product scans: quality on real images, and speed of the self-join at 1M vectors.

``quality``: the real tuxpaint catalog shots (imgsearch.sample_data), split by product into a
CALIBRATION half and an EVALUATION half. In each half ~60% of the products get a planted
near-duplicate filed under a new product id (JPEG re-encode q=25, resize to 45%, 80% crop, or a
recolour: hue rotation + saturation/brightness change), 15% a second one; the other
products of the same category (duck/drake, hen/rooster, the penguins, the two frogs...) are the
look-alike hard negatives. Embedded with the real default pipeline. The threshold is calibrated
on the calibration half (labels: every planted pair + each product's 5 most similar
non-duplicates) for precision 0.95, then the evaluation half is scanned with ``imgsearch dedup``'s
code at that threshold; pair precision/recall are over product pairs. Baseline in the same run:
``imagehash`` pHash (64-bit), Hamming threshold calibrated the same way on the same labels.
Verified variant in the same run (``imgsearch dedup --verify``): on the same labels, calibration
picks a recall-oriented candidate similarity threshold and the verification threshold (largest
image disagreement, :mod:`embed.verify`) for the same target precision; the evaluation half is
then scanned at the candidate threshold and only pairs confirmed on the images are kept. Each
method reports precision/recall, recall per transform, and its worst false positives.

``speed``: N synthetic 128-d unit vectors (clustered, 0.5% planted near-duplicates) in a real
CatalogStore (float16), an index built by ``build_version`` (auto factory), then the CLI
``imgsearch dedup`` in a subprocess (its peak RSS is reported) and an exact brute-force
self-join (faiss.knn, blocks of queries against all N, k=11) on a sample of queries in the same
run, extrapolated to time per million queries.

    .venv/bin/python bench/bench_dedup.py quality
    .venv/bin/python bench/bench_dedup.py speed --n 1000000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


# ---------------------------------------------------------------- quality


def _transform(img, kind: int, rng):
    from PIL import Image, ImageEnhance

    w, h = img.size
    if kind == 0:  # re-encode hard
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=25)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == 1:  # resize
        return img.resize((int(w * 0.45), int(h * 0.45)), Image.BILINEAR)
    if kind == 2:  # crop 80%
        dx, dy = int(w * rng.uniform(0, 0.2)), int(h * rng.uniform(0, 0.2))
        return img.crop((dx, dy, dx + int(w * 0.8), dy + int(h * 0.8)))
    hsv = np.asarray(img.convert("HSV")).copy()  # recolour
    hsv[..., 0] = (hsv[..., 0].astype(int) + int(rng.integers(20, 60))) % 256
    out = Image.fromarray(hsv, "HSV").convert("RGB")
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.6, 1.4))
    return ImageEnhance.Brightness(out).enhance(rng.uniform(0.8, 1.15))


TRANSFORMS = ("jpeg_q25", "resize_45", "crop_80", "recolour")


def make_half(folder: Path, products, seed: int):
    """Catalog CSV with originals + planted copies; returns (catalog, truth pairs, image paths by
    product, transform name by planted copy)."""
    from imgsearch.sample_data import catalog_shot

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "img").mkdir(exist_ok=True)
    rows, truth, files, kinds = [], set(), {}, {}

    def put(pid, img, cat):
        name = f"img/{pid}.jpg"
        img.save(folder / name, "JPEG", quality=92)
        rows.append(f"{pid},{name},{cat}")
        files[pid] = folder / name

    for i, p in enumerate(products):
        shot = catalog_shot(p)
        put(p.product_id, shot, p.category)
        copies = []
        if rng.random() < 0.60:
            copies.append(f"{p.product_id}.copy-a")
            put(copies[-1], _transform(shot, i % 4, rng), p.category)
            kinds[copies[-1]] = TRANSFORMS[i % 4]
            if rng.random() < 0.25:
                copies.append(f"{p.product_id}.copy-b")
                put(copies[-1], _transform(shot, (i + 1) % 4, rng), p.category)
                kinds[copies[-1]] = TRANSFORMS[(i + 1) % 4]
        group = [p.product_id, *copies]
        truth |= {tuple(sorted((a, b))) for a in group for b in group if a < b}
    catalog = folder / "catalog.csv"
    catalog.write_text("product_id,image,category\n" + "\n".join(rows) + "\n")
    return catalog, truth, files, kinds


def product_vectors(store):
    out = {}
    for r in store.iter_records():
        out.setdefault(r.product_id, []).append(r.id)
    return {p: store.vectors_for(ids) for p, ids in out.items()}


def hard_labels(vecs: dict, truth: set, n_neg: int = 5) -> list[dict]:
    names = sorted(vecs)
    x = np.stack([vecs[n].mean(0) / np.linalg.norm(vecs[n].mean(0)) for n in names])
    sims = x @ x.T
    rows = [{"a": a, "b": b, "duplicate": True} for a, b in sorted(truth)]
    seen = set(truth)
    for i, a in enumerate(names):
        order = np.argsort(-sims[i])
        taken = 0
        for j in order:
            b = names[j]
            pair = tuple(sorted((a, b)))
            if b == a or pair in seen:
                continue
            seen.add(pair)
            rows.append({"a": pair[0], "b": pair[1], "duplicate": False})
            taken += 1
            if taken >= n_neg:
                break
    return rows


def pr(found: set, truth: set) -> tuple[float, float]:
    tp = len(found & truth)
    return tp / max(len(found), 1), tp / max(len(truth), 1)


def pair_kind(pair: tuple, kinds: dict) -> str:
    """The transform of a planted pair: the copy's, or ``copy_vs_copy`` for two copies."""
    a, b = pair
    if a in kinds and b in kinds:
        return "copy_vs_copy"
    return kinds.get(a) or kinds.get(b) or "?"


def per_transform_recall(found: set, truth: set, kinds: dict) -> dict:
    out = {}
    for kind in (*TRANSFORMS, "copy_vs_copy"):
        pairs = {t for t in truth if pair_kind(t, kinds) == kind}
        if pairs:
            out[kind] = f"{len(pairs & found)}/{len(pairs)}"
    return out


def report(found: dict, truth: set, kinds: dict, n_fp: int = 6) -> dict:
    """Precision/recall, recall per transform, and the highest-scoring false positives.
    ``found`` maps a product pair to its score (higher = more alike)."""
    p, r = pr(set(found), truth)
    fps = sorted(((s, pair) for pair, s in found.items() if pair not in truth), key=lambda x: -x[0])[:n_fp]
    return {"precision": round(p, 4), "recall": round(r, 4), "pairs_found": len(found),
            "recall_per_transform": per_transform_recall(set(found), truth, kinds),
            "worst_false_positives": [[a, b, round(float(s), 4)] for s, (a, b) in fps]}


def threshold_curve(store, index_root: str, candidate: float, truth: set,
                    thresholds=(0.02, 0.03, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3)) -> dict:
    """Precision/recall of the verified scan at other verification thresholds (same candidates;
    each candidate's lowest disagreement over its alignments), to show how sensitive it is."""
    from embed.verify import ProductVerifier, VerifyConfig
    from index.jobs import dedup

    out = dedup.run_dedup(store, index_root, dedup.DedupConfig(threshold=candidate, gpu="off"), progress=False)
    verifier = ProductVerifier(store, VerifyConfig())
    rows = []
    for a, b, _ in dedup.pairs_of_groups(out.groups):
        m = verifier.match(a, b, exhaustive=True)
        rows.append((np.inf if m is None else m.disagreement, (a, b) in truth))
    d = np.array([r[0] for r in rows])
    y = np.array([r[1] for r in rows], bool)
    curve = {}
    for t in thresholds:
        acc = d <= t
        tp = int((acc & y).sum())
        curve[f"{t:g}"] = {"precision": round(tp / max(int(acc.sum()), 1), 4), "recall": round(tp / max(len(truth), 1), 4),
                           "false_positives": int((acc & ~y).sum())}
    return curve


def phash_pairs(files: dict, threshold: float) -> dict:
    """Product pairs within the Hamming threshold -> score (-Hamming distance)."""
    names = sorted(files)
    h = np.stack([_phash_bits(files[n]) for n in names])
    dist = (h[:, None, :] != h[None, :, :]).sum(-1)
    i, j = np.nonzero(np.triu(-dist >= threshold, 1))
    return {tuple(sorted((names[a], names[b]))): -float(dist[a, b]) for a, b in zip(i, j)}


_PH = {}


def _phash_bits(path) -> np.ndarray:
    import imagehash
    from PIL import Image

    if path not in _PH:
        _PH[path] = imagehash.phash(Image.open(path)).hash.ravel()
    return _PH[path]


def quality(args) -> dict:
    from embed.pipeline import load_pipeline
    from embed.verify import ProductVerifier, VerifyConfig
    from imgsearch.sample_data import list_products
    from index.ann.build import build_version
    from index.ann.sources import store_source
    from index.jobs import dedup
    from index.store import CatalogStore
    from index.store.ingest import ingest_catalog

    products = list_products()
    if args.products == "heldout":  # products the checkpoint never trained on
        from imgsearch.sample_data import split_products

        held_out = set(split_products(products)[1])
        products = [p for p in products if p.product_id in held_out]
    if args.limit:
        products = products[: args.limit]
    halves = {"calibration": products[0::2], "evaluation": products[1::2]}
    pipe = load_pipeline(args.checkpoint)
    work = Path(tempfile.mkdtemp(prefix="bench-dedup-", dir=args.workdir))
    res, data = {"model": pipe.model_hash[:16], "checkpoint": args.checkpoint, "products": args.products}, {}
    for name, prods in halves.items():
        catalog, truth, files, kinds = make_half(work / name, prods, seed=1 if name == "calibration" else 2)
        t0 = time.monotonic()
        with CatalogStore.create_or_open(work / name / "store", dim=pipe.dim) as store:
            s = ingest_catalog(catalog, store, pipe.embed_catalog, 32, progress=False, model=pipe.model_hash)
        with CatalogStore.open_readonly(work / name / "store") as store:
            build_version(store_source(store), str(work / name / "index"), gpu="off")
            vecs = product_vectors(store)
        data[name] = (truth, files, vecs, kinds)
        res[f"{name}_products"] = len(prods)
        res[f"{name}_images"] = s.added
        res[f"{name}_true_pairs"] = len(truth)
        res[f"{name}_true_pairs_per_transform"] = per_transform_recall(truth, truth, kinds)
        res[f"{name}_embed_s"] = round(time.monotonic() - t0, 1)
    truth_c, files_c, vecs_c, _ = data["calibration"]
    labels = hard_labels(vecs_c, truth_c)
    label_path = work / "labels.jsonl"
    label_path.write_text("".join(json.dumps(r) + "\n" for r in labels))
    with CatalogStore.open_readonly(work / "calibration" / "store") as store:
        cal = dedup.calibrate(store, str(label_path), args.target_precision)
        t0 = time.monotonic()
        vcal = dedup.calibrate(store, str(label_path), args.target_precision, verify=VerifyConfig())
        vcal_s = time.monotonic() - t0
    res["labels"] = {"positives": cal["positives"], "negatives": cal["negatives"]}
    res["embedding_threshold"] = cal["threshold"]
    res["verified_thresholds"] = {k: vcal[k] for k in ("threshold", "verify_threshold", "precision", "recall",
                                                       "candidate_recall", "reached", "unverifiable_pairs",
                                                       "unaligned_pairs")}
    res["verified_thresholds"]["calibration_s"] = round(vcal_s, 1)
    vcfg = VerifyConfig(max_disagreement=vcal["verify_threshold"])
    # pHash: score = -hamming, calibrated on the same labels.
    ph_scores = np.array([max(-int((_phash_bits(files_c[r["a"]]) != _phash_bits(files_c[r["b"]])).sum()), -64)
                          for r in labels], np.float32)
    ph_cal = dedup.choose_threshold(ph_scores, np.array([r["duplicate"] for r in labels]), args.target_precision)
    res["phash_threshold_hamming"] = -ph_cal["threshold"]
    for name in ("calibration", "evaluation"):
        truth, files, _, kinds = data[name]
        with CatalogStore.open_readonly(work / name / "store") as store:
            out = dedup.run_dedup(store, str(work / name / "index"),
                                  dedup.DedupConfig(threshold=cal["threshold"], gpu="off"), progress=False)
            emb = {(a, b): sc for g in out.groups for a, b, sc in g["pairs"]}
            res[f"embedding_{name}"] = report(emb, truth, kinds)
            res[f"phash_{name}"] = report(phash_pairs(files, ph_cal["threshold"]), truth, kinds)
            out = dedup.run_dedup(store, str(work / name / "index"),
                                  dedup.DedupConfig(threshold=vcal["threshold"], gpu="off", verify=vcfg), progress=False)
            found = {(a, b): sc for g in out.groups for a, b, sc in g["pairs"]}
            rep = report(found, truth, kinds)
            # The worst false positives of the verified scan, with their image disagreement.
            verifier = ProductVerifier(store, vcfg)
            for row in rep["worst_false_positives"]:
                m = verifier.match(row[0], row[1], exhaustive=True)
                row.append(None if m is None else round(m.disagreement, 4))
            rep["verify"] = {k: out.verify[k] for k in ("candidate_pairs", "verified_pairs", "unverifiable_pairs", "seconds")}
            res[f"verified_{name}"] = rep
            missed = sorted(t for t in truth if t not in found)
            rep["missed"] = [[a, b, pair_kind((a, b), kinds)] for a, b in missed[:12]]
            if name == "evaluation":
                rep["by_verify_threshold"] = threshold_curve(store, str(work / name / "index"), vcal["threshold"], truth)
    res["workdir"] = str(work)
    return res


# ---------------------------------------------------------------- speed


def make_vectors(n: int, d: int, seed: int, dup_fraction: float = 0.005) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((1024, d)).astype(np.float32)
    x = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x[s:s + m] = centers[rng.integers(0, 1024, m)] + 0.9 * rng.standard_normal((m, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dups = rng.choice(n, int(n * dup_fraction), replace=False)
    src = rng.choice(n, len(dups), replace=False)
    x[dups] = x[src] + 0.02 * rng.standard_normal((len(dups), d)).astype(np.float32)
    x[dups] /= np.linalg.norm(x[dups], axis=1, keepdims=True)
    return x


def speed(args) -> dict:
    import faiss

    from index.ann.build import build_version
    from index.ann.sources import store_source
    from index.store import CatalogStore, ItemRecord

    faiss.omp_set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-dedup-speed-", dir=args.workdir))
    res = {"n": args.n, "dim": args.dim, "threads": args.threads}
    x = make_vectors(args.n, args.dim, 0)
    t0 = time.monotonic()
    with CatalogStore.create_or_open(work / "store", dim=args.dim, initial_map_size=1 << 30) as store:
        for s in range(0, args.n, 20_000):
            recs = [ItemRecord(product_id=f"p{i}", image=f"{i}.jpg", content_hash=str(i)) for i in range(s, min(args.n, s + 20_000))]
            store.put(recs, x[s:s + len(recs)])
    res["store_write_s"] = round(time.monotonic() - t0, 1)
    t0 = time.monotonic()
    with CatalogStore.open_readonly(work / "store") as store:
        b = build_version(store_source(store), str(work / "index"), gpu="off")
    res["index"] = {"factory": b.manifest["factory"], "search_defaults": b.manifest["search_defaults"],
                    "measured_recall": b.manifest["measured_recall"], "build_s": round(time.monotonic() - t0, 1)}
    out = work / "groups.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "IMGSEARCH_THREADS": str(args.threads)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "imgsearch", "dedup", "--store", str(work / "store"), "--index-root",
                           str(work / "index"), "--threshold", str(args.threshold), "--output", str(out), "--gpu", "off",
                           "--block-size", str(args.block_size)], env=env, capture_output=True, text=True)
    dedup_s = time.monotonic() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    res["dedup"] = {"seconds": round(dedup_s, 1), "s_per_million": round(dedup_s * 1e6 / args.n, 1),
                    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
                    "summary": proc.stdout.strip().splitlines()[-1],
                    "block_size": args.block_size}
    # Exact brute force: a sample of queries against all N, extrapolated to N queries.
    rng = np.random.default_rng(1)
    q = x[np.sort(rng.choice(args.n, min(args.exact_queries, args.n), replace=False))]
    t0 = time.monotonic()
    for s in range(0, len(q), 1000):
        faiss.knn(q[s:s + 1000], x, 11, metric=faiss.METRIC_INNER_PRODUCT)
    ex = time.monotonic() - t0
    res["exact"] = {"queries_timed": len(q), "seconds": round(ex, 1),
                    "s_per_million_queries_vs_n": round(ex * 1e6 / len(q), 1),
                    "s_full_self_join_extrapolated": round(ex * args.n / len(q), 1)}
    res["speedup_vs_exact"] = round(res["exact"]["s_full_self_join_extrapolated"] / dedup_s, 1)
    res["workdir"] = str(work)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["quality", "speed", "all"], nargs="?", default="all")
    ap.add_argument("--limit", type=int, default=0, help="quality: first N products only")
    ap.add_argument("--checkpoint", default=None, help="quality: trained checkpoint (default: the pretrained backbone)")
    ap.add_argument("--products", choices=["all", "heldout"], default="all",
                    help="quality: every sample product, or only those held out of training")
    ap.add_argument("--target-precision", type=float, default=0.95)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--block-size", type=int, default=4096)
    ap.add_argument("--exact-queries", type=int, default=10_000)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--output", default=None, help="quality: also write the results JSON here")
    args = ap.parse_args()
    if args.what in ("quality", "all"):
        t0 = time.monotonic()
        res = quality(args)
        res["seconds"] = round(time.monotonic() - t0, 1)
        print(json.dumps({"quality": res}, indent=1), flush=True)
        if args.output:
            from bench_index import run_info, write_results

            write_results(args.output, {"run": run_info(), "quality": res})
    if args.what in ("speed", "all"):
        print(json.dumps({"speed": speed(args)}, indent=1), flush=True)


if __name__ == "__main__":
    main()
