"""Per-request faiss search parameters: nprobe (and the HNSW coarse quantizer's efSearch) passed
with each call, so the shared index object is never mutated and threads may search at once."""

from __future__ import annotations

import faiss


def ivf_of(index):
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError):
        return None


def search_params(index, nprobe: int | None, sel=None):
    """Per-request parameters for ``index`` (never mutate the shared index)."""
    ivf = ivf_of(index)
    keep = [sel]  # SWIG does not own these; keep them alive for the duration of the call
    if ivf is None:
        params = faiss.SearchParameters()
    else:
        params = faiss.SearchParametersIVF()
        params.nprobe = int(min(max(nprobe or 1, 1), ivf.nlist))
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            qp = faiss.SearchParametersHNSW()
            qp.efSearch = max(2 * params.nprobe, 16)  # HNSW must return >= nprobe lists
            params.quantizer_params = qp
            keep.append(qp)
    if sel is not None:
        params.sel = sel
    if isinstance(index, faiss.IndexPreTransform):
        outer = faiss.SearchParametersPreTransform()
        outer.index_params = params
        keep.append(params)
        params = outer
    return params, keep
