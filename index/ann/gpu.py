"""The GPU path, kept small and isolated. Imported only when asked for; every faiss GPU
symbol is looked up with ``getattr`` so faiss-cpu never raises an import/attribute error.

- search: the CPU shards are cloned to all GPUs (``GpuMultipleClonerOptions``: shard across
  GPUs, float16 lookup tables, ids kept on the CPU when GPU memory is short).
- k: faiss GPU k-selection stops at 2048. A request needing more candidates than that
  (k * rerank_factor > 2048, up to k = 10,000) is served by the CPU copy of the same shard,
  so every k works on every backend and results are identical in kind.
- filters (IDSelector) are not supported by GPU indexes: such requests also use the CPU copy.
- 4-bit fast-scan PQ has no GPU implementation: cloning fails, the part stays on the CPU
  (logged once).
"""

from __future__ import annotations

import logging

import faiss

from imgsearch.errors import BadInput
from index.ann.params import search_params

log = logging.getLogger(__name__)

GPU_MAX_K = 2048


def gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    try:
        return int(get()) if get is not None else 0
    except RuntimeError:
        return 0


def cloner_options(indices_cpu: bool = False):
    co = faiss.GpuMultipleClonerOptions()
    co.shard = True  # split each index across GPUs: memory scales with the GPU count
    co.useFloat16LookupTables = True  # PQ tables in fp16: needed for M >= 56 in shared memory
    co.useFloat16 = True
    if indices_cpu:
        co.indicesOptions = faiss.INDICES_CPU  # labels stay in host RAM when GPU memory is short
    return co


def to_gpus(cpu_index, indices_cpu: bool = False):
    """A GPU clone of ``cpu_index`` over all GPUs, or None when this index cannot go there."""
    try:
        return faiss.index_cpu_to_all_gpus(cpu_index, co=cloner_options(indices_cpu))
    except (RuntimeError, AttributeError) as exc:
        if not indices_cpu and "memory" in str(exc).lower():
            return to_gpus(cpu_index, indices_cpu=True)
        log.warning("index stays on the CPU (GPU clone failed: %s)", str(exc).splitlines()[-1][:200])
        return None


def attach(idx, required: bool = False) -> int:
    """Clone every base part of an opened IndexVersion to the GPUs. Returns parts on GPU."""
    if gpu_count() == 0:
        if required:
            raise BadInput("gpu='on': no GPU is visible to faiss")
        return 0
    on_gpu = 0
    for part in idx._state.parts:
        if part.lock is None:  # the mutable delta part stays on the CPU
            part.gpu_index = to_gpus(part.index)
            on_gpu += part.gpu_index is not None
    return on_gpu


def search(gpu_index, cpu_index, q, fetch: int, nprobe: int):
    """Search on GPU when k-selection allows it, else on the CPU copy of the same part."""


    if fetch > GPU_MAX_K:
        params, _keep = search_params(cpu_index, nprobe)
        return cpu_index.search(q, fetch, params=params)
    params = faiss.SearchParametersIVF()  # GPU IVF reads nprobe from per-call params
    params.nprobe = int(nprobe)
    keep = params
    if isinstance(gpu_index, faiss.IndexPreTransform):
        params = faiss.SearchParametersPreTransform()
        params.index_params = keep
    return gpu_index.search(q, fetch, params=params)


def use_gpu_for_training(index, required: bool = False) -> bool:
    """k-means of the coarse quantizer on the GPUs (the dominant training cost)."""
    if gpu_count() == 0:
        if required:
            raise BadInput("gpu='on': no GPU is visible to faiss")
        return False
    try:
        ivf = faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError):
        return False
    flat = faiss.IndexFlat(ivf.d, ivf.metric_type)
    ivf.clustering_index = faiss.index_cpu_to_all_gpus(flat)
    return True
