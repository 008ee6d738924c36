"""Build an index version: choose/validate the factory, train once on a sample, add every
shard by streaming blocks, tune search defaults, write the manifest, publish atomically.

Shards share ONE trained quantizer and codebooks (``trained.faiss``): ``build_shard`` starts
from that file, so shards can be built in parallel or on other machines and still be merged
exactly at search time.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import faiss
import numpy as np

from imgsearch.errors import BadInput, JobFailed
from imgsearch.progress import Progress
from index.ann import coarse, integrity, measure, versions
from index.ann import factory as factory_mod
from index.ann import gpu as gpu_mod
from index.ann import tune as tune_mod
from index.ann.gpu import gpu_count
from index.ann.parts import shard_prefix
from index.ann.sources import DEFAULT_BLOCK, Block, VectorSource, sample_rows

log = logging.getLogger(__name__)

TRAINED = "trained.faiss"
FORMAT = 1


# -- sharding and sampling -----------------------------------------------------------------
def shard_of(ids: np.ndarray, n_shards: int) -> np.ndarray:
    """Shard number per id: splitmix64(id) mod n, balanced even for strided or clustered ids."""
    if n_shards == 1:
        return np.zeros(ids.shape, np.int64)
    z = ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(n_shards)).astype(np.int64)


def training_size(n: int, nlist: int | None) -> int:
    # k-means wants 39..256 points per centroid; PQ codebooks want >= 256 * 39 ~ 10k.
    return int(min(n, max(100_000, 64 * (nlist or 0))))


# -- training ------------------------------------------------------------------------------
def supports_ids(index) -> bool:
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return True
    try:
        faiss.extract_index_ivf(index)
        return True
    except (RuntimeError, TypeError):
        return False


def train_index(factory: str, dim: int, metric: str, sample: np.ndarray, gpu: str = "off",
                seed: int = 0, notes: dict | None = None):
    """The empty trained index for ``factory`` (wrapped in IDMap when it lacks own ids).
    ``notes`` (when given) receives how the coarse quantizer was trained."""
    index = factory_mod.validate_factory(factory, dim, metric)
    if not supports_ids(index):
        index = faiss.IndexIDMap(index)
    if not index.is_trained:
        t0 = time.monotonic()
        if coarse.wants_two_level(index, gpu):
            coarse.train_two_level(index, sample, metric == "ip", seed)
            method = f"two-level k-means (>= {coarse.TWO_LEVEL_FROM} lists on CPU)"
        else:
            if gpu != "off":
                gpu_mod.use_gpu_for_training(index, required=(gpu == "on"))
            index.train(sample)
            method = "faiss k-means" + (" on GPU" if gpu != "off" else "")
        if notes is not None:
            notes["coarse_training"] = method
        log.info("trained %r on %d vectors (%s) in %.1fs", factory, len(sample), method, time.monotonic() - t0)
    return index


def _write_index(index, path: str) -> None:
    tmp = path + ".tmp"
    faiss.write_index(index, tmp)
    os.replace(tmp, path)


# -- shards --------------------------------------------------------------------------------
def _blocks(block_iter) -> Iterator[Block]:
    return block_iter(DEFAULT_BLOCK) if callable(block_iter) else iter(block_iter)


def build_shard(trained_path: str, block_iter: Callable | Iterable[Block], shard_no: int, n_shards: int,
                out_dir: str | None = None, *, rerank: bool = True, total: int | None = None) -> dict:
    """Add this shard's ids (``shard_of(id) == shard_no``) to a copy of the trained index.

    Writes ``shard-SSSSS-of-NNNNN.{faiss,ids.i64,sorted.i64,order.i64[,rerank.f16]}`` into
    ``out_dir`` (default: the folder of ``trained_path``) and returns the manifest entry.
    Labels inside the faiss index are row numbers; ``ids.i64`` maps row -> id.
    """
    out_dir = out_dir or os.path.dirname(os.path.abspath(trained_path))
    prefix = os.path.join(out_dir, shard_prefix(shard_no, n_shards))
    index = faiss.read_index(trained_path)
    rows = 0
    bar = Progress(total, f"build shard {shard_no + 1}/{n_shards}", "vectors") if total else None
    with open(prefix + ".ids.i64", "wb") as f_ids, \
            (open(prefix + ".rerank.f16", "wb") if rerank else _Null()) as f_vec:
        for ids, x in _blocks(block_iter):
            if bar:
                bar.update(len(ids))
            mine = shard_of(ids, n_shards) == shard_no
            if not mine.any():
                continue
            ids, x = np.ascontiguousarray(ids[mine], np.int64), np.ascontiguousarray(x[mine], np.float32)
            index.add_with_ids(x, np.arange(rows, rows + len(ids), dtype=np.int64))
            f_ids.write(ids.tobytes())
            f_vec.write(x.astype(np.float16).tobytes())
            rows += len(ids)
    if bar:
        bar.close()
    _write_index(index, prefix + ".faiss")
    _write_lookup(prefix, rows)
    name = os.path.basename(prefix)
    return {"shard": shard_no, "of": n_shards, "ntotal": rows, "index": name + ".faiss",
            "ids": name + ".ids.i64", "sorted_ids": name + ".sorted.i64", "order": name + ".order.i64",
            "rerank": name + ".rerank.f16" if rerank else None}


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, data):
        pass


def _write_lookup(prefix: str, rows: int) -> None:
    """id -> row lookup on disk: ids sorted, and the row of each sorted id."""
    ids = np.fromfile(prefix + ".ids.i64", dtype=np.int64) if rows else np.empty(0, np.int64)
    order = np.argsort(ids, kind="stable").astype(np.int64)
    sorted_ids = ids[order]
    if rows and (np.diff(sorted_ids) == 0).any():
        dup = sorted_ids[np.flatnonzero(np.diff(sorted_ids) == 0)[0]]
        raise BadInput(f"duplicate id {int(dup)} in the input vectors")
    sorted_ids.tofile(prefix + ".sorted.i64")
    order.tofile(prefix + ".order.i64")


# -- the whole build -----------------------------------------------------------------------
@dataclass
class BuildResult:
    version: str
    path: str
    manifest: dict


def is_auto(factory: str | None) -> bool:
    """Whether the build chooses the factory itself (``auto``, empty or unset)."""
    return factory in (None, "", "auto")


def resolve_factory(factory: str, n: int, dim: int, metric: str, memory_budget: int | None):
    """The factory to build (``auto``: chosen within the budget); a given ``memory_budget`` the
    choice cannot meet is refused before anything is written."""
    if is_auto(factory):
        choice = factory_mod.choose_factory(n, dim, memory_budget, metric)
        index = factory_mod.validate_factory(choice.factory, dim, metric)
        if memory_budget is not None:
            factory_mod.check_ram_budget(choice.factory, index, n, dim, memory_budget)
        return choice
    index = factory_mod.validate_factory(factory, dim, metric)
    if memory_budget is not None:
        factory_mod.check_ram_budget(factory, index, n, dim, memory_budget)
    nlist = factory_mod.nlist_of(index)
    if nlist and n < nlist:
        raise BadInput(f"factory {factory!r} has {nlist} lists but there are only {n} vectors to train on")
    return factory_mod.FactoryChoice(factory, nlist, float("nan"), False, ["given by the caller"])


def build_version(source: VectorSource, index_root: str, *, factory: str = "auto", shards: int = 1,
                  metric: str | None = None, target_recall: float = 0.95, gpu: str = "auto",
                  memory_budget: int | None = None, seed: int = 0, publish: bool = True,
                  tune_queries: np.ndarray | None = None, version: str | None = None,
                  shard_builder: ShardBuilder | None = None, build_notes: dict | None = None,
                  on_stage: StageCallback | None = None) -> BuildResult:
    """Build, tune and (by default) publish a new version of ``index_root``.

    ``shard_builder`` builds the shards from the trained file (default: one after another in
    this process; :mod:`index.jobs.distributed` passes Ray tasks); ``build_notes`` are added to
    the manifest's ``build_config``. ``on_stage(name)`` is called as each stage begins: ``train``
    (k-means and codebooks on a sample), ``add`` (the shards), ``tune``. A job that writes
    INDEX_ROOT holds ``versions.index_root_lock`` around this call (``imgsearch build``, rebuild).
    """
    t0 = time.monotonic()
    metric = metric or source.default_metric
    factory_mod.metric_type(metric)
    if source.n < 1:
        raise BadInput(f"no vectors to index in {source.description!r}")
    if shards < 1 or shards > source.n:
        raise BadInput(f"--shards must be in 1..{source.n}, got {shards}")
    choice = resolve_factory(factory, source.n, source.dim, metric, memory_budget)
    gpu = _resolve_gpu(gpu)
    name = versions.check_name(version or versions.new_version_name())
    staging = versions.make_staging(index_root, name)
    try:
        measure_codes = is_auto(factory) and source.n >= measure.MEASURE_FROM
        manifest = _build_into(staging, source, choice, shards, metric, gpu, seed,
                               shard_builder or local_shard_builder(source), on_stage or _no_stage,
                               target_recall if measure_codes else None)
        manifest["build_config"].update(build_notes or {})
        # The checkpoint beside its hash: a server without --model loads it (serve.live).
        manifest.update(version=name, model=source.model, model_checkpoint=source.model_checkpoint,
                        target_recall=target_recall)
        if source.store is not None:
            manifest["store"] = source.store  # which store writes the version holds (serve.updates)
        (on_stage or _no_stage)("tune")
        tuned = tune_mod.tune_version(staging, manifest, source, target_recall, seed=seed, queries=tune_queries)
        manifest.update(tuned)
        manifest["build_seconds"] = round(time.monotonic() - t0, 3)
        manifest[integrity.FILES] = integrity.record_files(staging, manifest)
        versions.write_json_atomic(os.path.join(staging, versions.MANIFEST), manifest)
        path = versions.commit_staging(index_root, staging, name)
    except BaseException:
        versions.discard_staging(staging)
        raise
    if publish:
        versions.set_current(index_root, name)
    log.info("built index version %s: %d vectors, %s, recall@10 %.3f at nprobe=%s rerank=%s in %.1fs",
             name, manifest["ntotal"], manifest["factory"], manifest["measured_recall"],
             manifest["search_defaults"]["nprobe"], manifest["search_defaults"]["rerank_factor"],
             manifest["build_seconds"])
    return BuildResult(name, path, manifest)


def _resolve_gpu(gpu: str) -> str:
    if gpu == "off":
        return "off"

    if gpu_count() == 0:
        if gpu == "on":
            raise BadInput("--gpu on: no GPU is visible to faiss (faiss-cpu, or no device)")
        return "off"
    return "on"


# stage name -> None: told as each stage of a build (or a rebuild) begins
StageCallback = Callable[[str], None]


def _no_stage(name: str) -> None:
    pass


# (trained_path, out_dir, n_shards, rerank) -> one build_shard entry per shard, in shard order
ShardBuilder = Callable[[str, str, int, bool], list]


def local_shard_builder(source: VectorSource) -> ShardBuilder:
    """Shards built one after another in this process, each streaming the source's blocks."""
    def build(trained_path: str, out_dir: str, n_shards: int, rerank: bool) -> list:
        return [build_shard(trained_path, source.blocks, s, n_shards, out_dir, rerank=rerank, total=source.n)
                for s in range(n_shards)]
    return build


def _build_into(staging: str, source: VectorSource, choice, shards: int, metric: str, gpu: str, seed: int,
                shard_builder: ShardBuilder, on_stage: StageCallback, measure_at: float | None = None) -> dict:
    """Train, add the shards and return the manifest so far; ``measure_at`` (a target recall):
    choose the codes by a measured trial on the training sample (index/ann/measure.py)."""
    on_stage("train")
    t_train = time.monotonic()
    size = training_size(source.n, choice.nlist)
    _, sample = sample_rows(source, size, seed)
    # Shared build machines: IMGSEARCH_THREADS caps faiss' OpenMP threads.
    if os.environ.get("IMGSEARCH_THREADS"):
        faiss.omp_set_num_threads(int(os.environ["IMGSEARCH_THREADS"]))
    notes: dict = {}
    trained = train_index(choice.factory, source.dim, metric, sample, gpu, seed, notes)
    trial = None
    if measure_at is not None:
        choice, trained, trial = measure.choose_codes(choice, trained, source.n, source.dim, metric, sample,
                                                      measure_at, seed)
    del sample
    trained_path = os.path.join(staging, TRAINED)
    _write_index(trained, trained_path)
    train_seconds = time.monotonic() - t_train
    rerank = not factory_mod.is_exact(choice.factory)
    on_stage("add")
    entries = shard_builder(trained_path, staging, shards, rerank)
    ntotal = sum(e["ntotal"] for e in entries)
    if ntotal != source.n:
        raise JobFailed(f"indexed {ntotal} vectors, the source has {source.n}")
    return {
        "format": FORMAT,
        "dim": source.dim,
        "metric": metric,
        "factory": choice.factory,
        "factory_choice": choice.as_dict(),
        "nlist": choice.nlist,
        "ntotal": ntotal,
        "shards": shards,
        "shard_of": "splitmix64(id) % shards",
        "shard_files": entries,
        "trained_index": TRAINED,
        "rerank": {"kind": "float16 memmap", "dtype": "float16"} if rerank else None,
        "mmap_recommended": bool(choice.mmap),
        "bytes_per_vector": _bytes_per_vector(staging, entries, ntotal, trained),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "train_size": int(min(size, source.n)),
        "train_seconds": round(train_seconds, 3),
        "codes_trial": trial,
        "build_config": {"factory": choice.factory, "shards": shards, "metric": metric, "gpu": gpu,
                         "seed": seed, "block_size": DEFAULT_BLOCK, "source": source.description,
                         "train_size": int(min(size, source.n)), **notes},
    }


def _bytes_per_vector(staging: str, entries: list, ntotal: int, trained) -> dict:
    size = lambda f: os.path.getsize(os.path.join(staging, f)) if f else 0  # noqa: E731
    index_bytes = sum(size(e["index"]) for e in entries)
    all_bytes = sum(size(e[k]) for e in entries for k in ("index", "ids", "sorted_ids", "order", "rerank"))
    fixed = len(faiss.serialize_index(trained)) * len(entries)  # quantizer + codebooks per shard
    ivf = None
    try:
        ivf = faiss.extract_index_ivf(trained)
    except (RuntimeError, TypeError):
        pass
    n = max(ntotal, 1)
    return {
        "ram": round(index_bytes / n, 3),  # codes + labels + amortised quantizer, opened in RAM
        "ram_mmap": round(fixed / n, 3),  # opened memory-mapped: only quantizer/codebooks resident
        "disk": round((all_bytes + size(TRAINED)) / n, 3),
        "code": int(ivf.code_size) if ivf is not None else None,
        "rerank_disk": round(sum(size(e["rerank"]) for e in entries) / n, 3),
    }

