"""Only the optional C extension; all metadata lives in setup.cfg / pyproject.toml."""

from setuptools import Extension, setup

setup(
    # optional: without a compiler the install still succeeds and index.ann.search re-ranks in numpy/faiss.
    ext_modules=[Extension("index.ann._f16rerank", ["index/ann/_f16rerank.c"], optional=True, extra_compile_args=["-O3"])],
)
