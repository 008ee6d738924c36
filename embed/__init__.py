"""Images -> vectors: safe decoding, the detector, and the metric-learned embedding network.

``from embed import load_embedder`` is the Python API (INTERFACE.md). torch is
imported on first use, so ``embed.image_io`` stays light.
"""

__all__ = ["load_embedder", "load_pipeline"]


def __getattr__(name: str):
    if name in __all__:
        from embed import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'embed' has no attribute {name!r}")
