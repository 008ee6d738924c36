"""Vectors -> sharded FAISS index versions, the catalog store, and the batch jobs over them.

``from index import open_index`` is the read-only Python API (INTERFACE.md).
faiss is imported on first use, so the store can be used without it.
"""

__all__ = ["open_index"]


def __getattr__(name: str):
    if name == "open_index":
        from index.ann.search import open_index

        return open_index
    raise AttributeError(f"module 'index' has no attribute {name!r}")
